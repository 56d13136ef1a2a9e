"""inference-perf, the Gateway API Inference Extension's benchmark, driving `prefixroute serve`.

    python -m benchmarks.inference_perf [--rates 4,8] [--duration 30] [--json PATH]
                                        [--router prefixroute|round-robin]
                                        [--python PYTHON] [--keep DIR]

`make inference-perf` runs it with the defaults. The steps, one function each:

1. `ensure_venv`: inference-perf (PyPI `inference-perf`, pinned to
   `INFERENCE_PERF_VERSION`) in its own virtualenv `.venv-inference-perf` in the
   repository root, created on first use. Its own venv because it requires
   Python >= 3.12 (the project's is 3.11) and pulls transformers, datasets,
   pandas and the cloud storage clients (no torch). `find_python` picks the
   interpreter: `--python`, else `python3.13`/`python3.12` on PATH, else
   pyenv's installed versions.
2. `write_tokenizer`: inference-perf's `shared_prefix` generator needs a
   Hugging Face tokenizer (it draws random token ids, decodes them to text of
   an exact token length, and counts output tokens). The hub is not
   reachable offline and the fake engine has no real model, so the tokenizer
   is built here: a `tokenizers` WordLevel model whose vocabulary is the fake
   engine's lexicon (`prefixroute.sim.tokenizer`: 6,400 words, " " plus four
   letters, each one token of the engine's tokenizer), split on the words'
   leading spaces and decoded by concatenation. Any sequence of its ids
   decodes to text that the engine tokenises to the same number of tokens,
   so the prompt lengths inference-perf asks for are the ones the engines
   prefill and the shared system prompts are byte-identical within a group.
   Saved with `save_pretrained` to a local directory and loaded with
   `HF_HUB_OFFLINE=1`.
3. `fleet`: two fake engines (`prefixroute fake-engine --engines 2`) and
   `prefixroute serve` in front of them with a generated config (the default
   router profile; `--router round-robin`: the tests' prefix-blind profile,
   as a baseline), all on free 127.0.0.1 ports; torn down on exit.
4. `benchmark_config`: the inference-perf YAML: `shared_prefix` data (8
   groups of 64 prompts, 2,000-token system prompt, 100-token question,
   100 output tokens, seed 0: more prompts than a stage sends, so none
   repeats within a stage; inference-perf restarts its prompt sequence at
   every stage, so a later stage first resends the earlier one's prompts),
   the completions API streamed (so TTFT is measured), a
   `vllm` server pointed at the gateway, one constant-rate stage per
   `--rates` entry, one worker process, and no Prometheus (there is no
   Prometheus server; the counters are read directly instead).
5. `run`: scrapes the gateway's and the engines' `/metrics`, runs
   `inference-perf --config_file`, scrapes again, and reports inference-perf's
   own summary (its tables and `summary_lifecycle_metrics.json`) next to the
   prefix-cache hit rate from the counter deltas: the gateway's
   `prefixroute_cached_tokens_total / prefixroute_completed_prompt_tokens_total`
   (the engines' reported usage, as the gateway settled it) and the engines'
   own `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`.

The figures of a run and the exact config are in docs/inference-perf.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from prefixroute.devtools.live import (
    ROUND_ROBIN,
    free_port,
    free_port_block,
    log_tail,
    metric_sums,
    supervised,
    wait_ready,
)
from prefixroute.sim.tokenizer import LEXICON_SIZE, lexicon_text

INFERENCE_PERF_VERSION = "0.7.0"
REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-inference-perf"
MODEL = "qwen3-0.6b"  # the fake engine's default served model name
MIN_PYTHON = (3, 12)  # inference-perf's Requires-Python
ROUTERS = ("prefixroute", "round-robin")
# The baseline router: healthy endpoints in turn (the gateway's router section).
GATEWAY_COUNTERS = (
    "prefixroute_decisions_total",
    "prefixroute_completions_total",
    "prefixroute_failures_total",
    "prefixroute_prompt_tokens_total",
    "prefixroute_predicted_cached_tokens_total",
    "prefixroute_completed_prompt_tokens_total",
    "prefixroute_cached_tokens_total",
)
ENGINE_COUNTERS = (
    "vllm:request_success_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)

# Run inside the inference-perf venv: argv[1] a JSON list of words, argv[2] the output dir.
_BUILD_TOKENIZER = """
import json, sys
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
words = json.loads(open(sys.argv[1], encoding="utf-8").read())
vocab = {w: i for i, w in enumerate(words)}
vocab["<unk>"] = len(words)
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^ ]+| +"), behavior="isolated")
tok.decoder = decoders.Fuse()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=1 << 20)
fast.save_pretrained(sys.argv[2])
"""


@attrs.frozen
class Plan:
    """What one run sends: the shared_prefix shape and the load stages."""

    rates: tuple[float, ...] = (4.0, 8.0)
    duration_s: int = 30
    groups: int = 8
    prompts_per_group: int = 64
    system_prompt_len: int = 2000
    question_len: int = 100
    output_len: int = 100
    seed: int = 0


# --- the venv and the tokenizer ------------------------------------------------------------


def _python_ok(python: str) -> bool:
    check = f"import sys; sys.exit(0 if sys.version_info >= {MIN_PYTHON!r} else 1)"
    try:
        done = subprocess.run([python, "-c", check], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find_python(explicit: str | None = None) -> str | None:
    """A Python >= 3.12 to build the venv with, or None.

    `explicit` if given (and good); else `python3.13`, `python3.12` on PATH
    (a pyenv shim for a version that is installed but not selected fails the
    check and is skipped); else the newest `$PYENV_ROOT/versions/3.1x*`.
    """
    if explicit is not None:
        return explicit if _python_ok(explicit) else None
    for name in ("python3.13", "python3.12"):
        found = shutil.which(name)
        if found is not None and _python_ok(found):
            return found
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(root.glob("3.1[2-9]*/bin/python3"), reverse=True):
        if _python_ok(str(candidate)):
            return str(candidate)
    return None


def ensure_venv(python: str | None = None, venv: Path = VENV) -> Path:
    """The inference-perf venv's bin directory, creating and installing it on first use.

    A stamp file names the installed version, so a changed pin reinstalls.
    RuntimeError (with pip's output tail) if no suitable Python or the install fails.
    """
    stamp = venv / f".inference-perf-{INFERENCE_PERF_VERSION}"
    bin_dir = venv / "bin"
    if stamp.exists():
        return bin_dir
    base = find_python(python)
    if base is None:
        raise RuntimeError(
            f"inference-perf {INFERENCE_PERF_VERSION} needs Python >= 3.12; none found "
            "(pass --python, or install one, e.g. `pyenv install 3.12`)"
        )
    started = time.monotonic()
    print(f"creating {venv} with {base} and inference-perf=={INFERENCE_PERF_VERSION} ...")
    steps = [
        [base, "-m", "venv", "--clear", str(venv)],
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            f"inference-perf=={INFERENCE_PERF_VERSION}",
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            raise RuntimeError(f"{' '.join(step)} failed:\n{tail}")
    stamp.touch()
    print(f"installed in {time.monotonic() - started:.0f} s")
    return bin_dir


def write_tokenizer(bin_dir: Path, out: Path) -> Path:
    """The lexicon tokenizer (see the module docstring) saved to `out`; returns `out`. O(6,400)."""
    words = out.with_suffix(".words.json")
    words.write_text(json.dumps([lexicon_text([i]) for i in range(LEXICON_SIZE)]), "utf-8")
    done = subprocess.run(
        [str(bin_dir / "python"), "-c", _BUILD_TOKENIZER, str(words), str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the tokenizer failed:\n{done.stderr[-2000:]}")
    return out


# --- the fleet -----------------------------------------------------------------------------


def _prefixroute(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """`prefixroute ARGS` (this interpreter's console script), output to `log`."""
    script = Path(sys.executable).with_name("prefixroute")
    command = (
        [str(script)]
        if script.exists()
        else [
            sys.executable,
            "-c",
            "import sys; from prefixroute.cli import main; sys.exit(main())",
        ]
    )
    with open(log, "wb") as f:
        return subprocess.Popen(
            [*command, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )


def gateway_yaml(addresses: Sequence[str], port: int, router: str = "prefixroute") -> str:
    """The `prefixroute serve` config: loopback, these engines, and `router`.

    `router`: "prefixroute" (the default profile) or "round-robin" (the
    prefix-blind `ROUND_ROBIN`, a baseline for the hit rate).
    """
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "endpoints": [
            {"address": a, "id": f"engine-{i}", "models": [MODEL]} for i, a in enumerate(addresses)
        ],
    }
    if router == "round-robin":
        doc.update(ROUND_ROBIN)
    elif router != "prefixroute":
        raise ValueError(f"router must be one of {ROUTERS}, not {router!r}")
    return yaml.safe_dump(doc, sort_keys=False)


@contextlib.contextmanager
def fleet(
    workdir: Path, engines: int = 2, router: str = "prefixroute"
) -> Iterator[tuple[str, list[str]]]:
    """`engines` fake engines and `prefixroute serve` (with `router`, see `gateway_yaml`)
    before them; yields (gateway URL, addresses).

    Both processes are stopped on exit (gateway first); on a start failure
    their log tails are printed.
    """
    base = free_port_block(engines)
    addresses = [f"127.0.0.1:{base + i}" for i in range(engines)]
    port = free_port()
    config = workdir / "gateway.yaml"
    config.write_text(gateway_yaml(addresses, port, router), "utf-8")
    with supervised(workdir) as procs:
        procs.append(
            _prefixroute(
                ["fake-engine", "--port", str(base), "--engines", str(engines)],
                workdir / "engines.log",
            )
        )
        wait_ready([f"http://{a}/health" for a in addresses], procs)
        procs.append(_prefixroute(["serve", "--config", str(config)], workdir / "gateway.log"))
        url = f"http://127.0.0.1:{port}"
        wait_ready([f"{url}/health"], procs)
        yield url, addresses


def scrape(url: str, names: Sequence[str]) -> dict[str, float]:
    """The sums of metrics `names` at `url` (a `/metrics` URL), no proxies."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5.0) as answer:
        return metric_sums(answer.read().decode("utf-8", "replace"), names)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


# --- the benchmark -------------------------------------------------------------------------


def benchmark_config(plan: Plan, gateway: str, tokenizer: Path, reports: Path) -> dict[str, Any]:
    """The inference-perf config document for `plan` against `gateway`."""
    return {
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "base_url": gateway, "model_name": MODEL, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer)},
        "data": {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": plan.groups,
                "num_prompts_per_group": plan.prompts_per_group,
                "system_prompt_len": plan.system_prompt_len,
                "question_len": plan.question_len,
                "output_len": plan.output_len,
                "seed": plan.seed,
            },
        },
        "load": {
            "type": "constant",
            "stages": [{"rate": r, "duration": plan.duration_s} for r in plan.rates],
            "num_workers": 1,
            "request_timeout": 60,
        },
        "report": {
            "request_lifecycle": {"summary": True, "per_stage": True, "per_request": False},
            "prometheus": {"summary": False, "per_stage": False},
        },
        "storage": {"local_storage": {"path": str(reports)}},
    }


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of inference-perf's `summary_lifecycle_metrics.json`."""
    ok = report.get("successes", {})
    latency = ok.get("latency", {})
    fields = ("mean", "median", "p90", "p99")
    tokens = ok.get("prompt_tokens", {})
    return {
        "requests": report.get("load_summary", {}).get("count"),
        "successes": ok.get("count"),
        "failures": report.get("failures", {}).get("count"),
        "ttft_s": {f: latency.get("time_to_first_token", {}).get(f) for f in fields},
        "itl_s": {f: latency.get("inter_token_latency", {}).get(f) for f in fields},
        "request_latency_s": {f: latency.get("request_latency", {}).get(f) for f in fields},
        "prompt_tokens": {f: tokens.get(f) for f in ("total", "cached", "mean", "min", "max")},
        "hit_rate": _ratio(tokens.get("cached", 0.0), tokens.get("total", 0.0)),
        "output_tokens": ok.get("output_tokens", {}).get("total"),
        "token_count_mismatches": ok.get("token_count_mismatches"),
        "throughput": ok.get("throughput", {}),
    }


def run(
    plan: Plan,
    *,
    workdir: Path,
    router: str = "prefixroute",
    python: str | None = None,
    stream: bool = True,
) -> dict[str, Any]:
    """Engines, gateway, one inference-perf run; the results as a JSON-able dict.

    `stream`: inference-perf's output goes to this process's stdout (else only
    to `workdir/inference-perf.log`). RuntimeError if inference-perf fails.
    """
    bin_dir = ensure_venv(python)
    tokenizer = write_tokenizer(bin_dir, workdir / "tokenizer")
    reports = workdir / "reports"
    with fleet(workdir, router=router) as (gateway, addresses):
        config = benchmark_config(plan, gateway, tokenizer, reports)
        config_path = workdir / "inference-perf.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
        gw_before = scrape(f"{gateway}/metrics", GATEWAY_COUNTERS)
        engines_before = [scrape(f"http://{a}/metrics", ENGINE_COUNTERS) for a in addresses]
        command = [str(bin_dir / "inference-perf"), "--config_file", str(config_path)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="160")
        started = time.monotonic()
        with open(workdir / "inference-perf.log", "w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if stream:
                    sys.stdout.write(line)
            proc.wait()
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(
                f"inference-perf exited with {proc.returncode}:\n"
                + log_tail(workdir / "inference-perf.log", 30)
            )
        gw = _delta(scrape(f"{gateway}/metrics", GATEWAY_COUNTERS), gw_before)
        engines = [
            _delta(scrape(f"http://{a}/metrics", ENGINE_COUNTERS), b)
            for a, b in zip(addresses, engines_before, strict=True)
        ]
    report = json.loads((reports / "summary_lifecycle_metrics.json").read_text("utf-8"))
    hits = sum(e["vllm:prefix_cache_hits_total"] for e in engines)
    queries = sum(e["vllm:prefix_cache_queries_total"] for e in engines)
    return {
        "inference_perf_version": INFERENCE_PERF_VERSION,
        "router": router,
        "command": " ".join(command),
        "wall_s": round(elapsed, 1),
        "config": config,
        "inference_perf": _summary(report),
        "gateway": {
            **{k.removeprefix("prefixroute_"): v for k, v in gw.items()},
            "hit_rate": _ratio(
                gw["prefixroute_cached_tokens_total"],
                gw["prefixroute_completed_prompt_tokens_total"],
            ),
            "predicted_hit_rate": _ratio(
                gw["prefixroute_predicted_cached_tokens_total"],
                gw["prefixroute_prompt_tokens_total"],
            ),
        },
        "engines": {
            "hit_rate": _ratio(hits, queries),
            "requests": [e["vllm:request_success_total"] for e in engines],
        },
    }


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{100 * ratio:.1f}%"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.1f} ms"


def report_text(result: dict[str, Any]) -> str:
    """A short plain-text summary of `run`'s result."""
    ip = result["inference_perf"]
    gw = result["gateway"]
    ttft = ip["ttft_s"]
    lines = [
        f"inference-perf {result['inference_perf_version']} through `prefixroute serve` "
        f"(router: {result['router']}): {ip['successes']} of "
        f"{ip['requests']} requests succeeded, {ip['failures']} failed ({result['wall_s']} s)",
        f"  TTFT mean {_ms(ttft['mean'])}, median {_ms(ttft['median'])}, "
        f"p90 {_ms(ttft['p90'])}, p99 {_ms(ttft['p99'])}",
        f"  ITL mean {_ms(ip['itl_s']['mean'])}; request latency mean "
        f"{_ms(ip['request_latency_s']['mean'])}",
        f"  prompt tokens (server usage) mean {ip['prompt_tokens']['mean']}, "
        f"cached {ip['prompt_tokens']['cached']:.0f} of {ip['prompt_tokens']['total']:.0f}: "
        f"hit rate {_pct(ip['hit_rate'])}; client/server token count mismatches "
        f"{ip['token_count_mismatches']}",
        f"gateway: {gw['decisions_total']:.0f} decisions, {gw['failures_total']:.0f} failures; "
        f"hit rate {_pct(gw['hit_rate'])} (engines' usage: "
        f"{gw['cached_tokens_total']:.0f} / {gw['completed_prompt_tokens_total']:.0f} tokens), "
        f"predicted {_pct(gw['predicted_hit_rate'])}",
        f"engines: hit rate {_pct(result['engines']['hit_rate'])} (vllm:prefix_cache_hits / "
        f"queries), requests per engine {[int(n) for n in result['engines']['requests']]}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="4,8", help="req/s of each stage (4,8)")
    parser.add_argument("--duration", type=int, default=30, help="seconds per stage (30)")
    parser.add_argument(
        "--router", choices=ROUTERS, default="prefixroute", help="the gateway's profile"
    )
    parser.add_argument("--python", default=None, help="Python >= 3.12 for the venv")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    args = parser.parse_args(argv)
    plan = Plan(rates=tuple(float(r) for r in args.rates.split(",")), duration_s=args.duration)
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ip-")))
        try:
            result = run(plan, workdir=workdir, router=args.router, python=args.python)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print()
    print(report_text(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
