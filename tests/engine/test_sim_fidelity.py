"""Test 4 of issue 13: the simulator's engine model against a real vLLM engine (fidelity).

The requests each real engine served in the precise run (`precise_run`, in
order: one at a time, its prefix cache reset first) are fed, as token ids,
to the simulator's engine model (`prefixroute.sim.engine.replay_cached_tokens`:
block size 32, the engine's 128 blocks, the generated ids too, since vLLM
caches the full blocks of a request's output as well). The model must
report the cached tokens the engine reported, request for request.
"""

from __future__ import annotations

import pytest
from benchmarks.engine_truth import Run

from prefixroute.devtools.vllm import BLOCK_SIZE

pytestmark = pytest.mark.engine

BLOCKS = 128


@pytest.mark.parametrize("endpoint", ["engine-0", "engine-1"])
def test_the_engine_model_reports_the_real_engines_cached_tokens(
    precise_run: Run, endpoint: str
) -> None:
    from prefixroute.sim.engine import replay_cached_tokens

    served = [s for s in precise_run.served if s.endpoint == endpoint and s.status == 200]
    assert len(served) > 10
    modelled = replay_cached_tokens(
        [s.prompt_ids for s in served],
        num_blocks=BLOCKS,
        block_size=BLOCK_SIZE,
        output_tokens=[len(s.output_ids) for s in served],
        output_token_ids=[s.output_ids for s in served],
    )
    real = [s.cached for s in served]
    assert sum(real) > 0
    diffs = [(s.index, m, r) for s, m, r in zip(served, modelled, real, strict=True) if m != r]
    assert diffs == []
