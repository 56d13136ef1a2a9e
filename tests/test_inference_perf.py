"""inference-perf (the Gateway API Inference Extension's benchmark) drives `prefixroute serve`.

A real run of `benchmarks.inference_perf`: PyPI's inference-perf with its
`shared_prefix` data, through the gateway, in front of two fake engines. The
first run creates `.venv-inference-perf` (pip, about a minute); later runs
reuse it. Skipped when no Python >= 3.12 is installed, which inference-perf
requires.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.inference_perf import INFERENCE_PERF_VERSION, VENV, Plan, find_python, run

pytestmark = pytest.mark.slow


def test_shared_prefix_benchmark_through_the_gateway(tmp_path: Path) -> None:
    stamp = VENV / f".inference-perf-{INFERENCE_PERF_VERSION}"
    if not stamp.exists() and find_python() is None:
        pytest.skip("inference-perf needs Python >= 3.12 and none is installed")
    plan = Plan(rates=(4.0,), duration_s=5)
    sent = 20  # a constant stage sends rate x duration requests

    result = run(plan, workdir=tmp_path, stream=False)

    ip, gw = result["inference_perf"], result["gateway"]
    # every request inference-perf sent went through the gateway and succeeded
    assert ip["requests"] == ip["successes"] == sent
    assert ip["failures"] == 0
    assert gw["decisions_total"] == gw["completions_total"] == sent
    assert gw["failures_total"] == 0
    # the lexicon tokenizer counts as the engines do: system prompt + question, exactly
    prompt = plan.system_prompt_len + plan.question_len
    assert ip["prompt_tokens"]["min"] == ip["prompt_tokens"]["max"] == prompt
    assert ip["output_tokens"] == sent * plan.output_len
    assert ip["token_count_mismatches"] == 0
    # inference-perf's cached tokens (from the responses' usage) are the gateway's and
    # the engines' own counters
    assert ip["prompt_tokens"]["cached"] == gw["cached_tokens_total"]
    assert ip["hit_rate"] == pytest.approx(result["engines"]["hit_rate"])
    # prefix-aware routing: only the first request of each group prefills its system
    # prompt; every later one finds it cached on the engine it was sent to
    assert gw["cached_tokens_total"] >= (sent - plan.groups) * plan.system_prompt_len
    assert sum(result["engines"]["requests"]) == sent
