"""pytest-benchmark suite for `prefixroute.blocks`: a 4,096-token prompt, a 16 KB text prompt.

The router's budget is about 30 us per decision for a 4,096-token prompt over
64 endpoints; hashing the prompt is meant to be a small part of it. Timed,
each on both paths where it has two (the numba kernel, `compiled=True`, and
the numpy path, `compiled=False`; STYLE.md 10):

- `Blocker.keys` in token mode (16-token blocks, 256 keys): the router's call;
- `Blocker.keys` for a never-seen namespace (a fresh `cache_salt` per round,
  so the BLAKE2b namespace and the lane keys are derived every time);
- `reference_keys` on the same tokens: the plain-Python reference, to state
  the speedup;
- `Blocker.keys` in text mode on a 16,384-character prompt (64-character
  blocks, 256 keys, GIE's approximate-prefix block size);
- the floor for touching the same 16 KB (the 4,096 uint32 tokens): one numpy
  pass (`np.frombuffer(...).sum()`) and one `mmh3.hash_bytes` call.

The figures are in docs/performance.md ("Hashing").
"""

from __future__ import annotations

import itertools
from typing import Any

import mmh3
import numpy as np
import pytest

from prefixroute import jit
from prefixroute.blocks import Blocker, HashMode, reference_keys
from prefixroute.request import Request

TOKENS = 4_096
TEXT_CHARS = 16_384
SEED = 0x5EED_0F_DE_9107_0123
PATHS = [
    pytest.param(
        True,
        id="compiled",
        marks=pytest.mark.skipif(not jit.AVAILABLE, reason="numba is missing"),
    ),
    pytest.param(False, id="numpy"),
]


@pytest.fixture(scope="module")
def tokens() -> np.ndarray[Any, np.dtype[np.uint32]]:
    rng = np.random.default_rng(7)
    return rng.integers(0, 128_256, TOKENS).astype(np.uint32)  # Llama-3-sized vocabulary


@pytest.fixture(scope="module")
def chat_text() -> str:
    turn = (
        "<|user|>Summarise the attached incident report and list the follow-up actions "
        "with owners and due dates.<|assistant|>Here is the summary of the incident. "
    )
    return (turn * (TEXT_CHARS // len(turn) + 1))[:TEXT_CHARS]


@pytest.mark.parametrize("compiled", PATHS)
def test_keys_token_mode_4096_tokens(
    benchmark: Any, tokens: np.ndarray[Any, Any], compiled: bool
) -> None:
    blocker = Blocker(seed=SEED, compiled=compiled)
    request = Request(model="llama-3-8b", token_ids=tokens, tenant="acme")
    blocker.keys(request)  # the kernel's first call loads it (outside the calibration)
    keys = benchmark(blocker.keys, request)
    assert keys.dtype == np.uint64 and len(keys) == TOKENS // 16


@pytest.mark.parametrize("compiled", PATHS)
def test_keys_token_mode_4096_tokens_new_namespace(
    benchmark: Any, tokens: np.ndarray[Any, Any], compiled: bool
) -> None:
    blocker = Blocker(seed=SEED, compiled=compiled)
    salts = (f"salt-{i}" for i in itertools.count())

    def setup() -> tuple[tuple[Request], dict[str, Any]]:
        return (Request(model="llama-3-8b", token_ids=tokens, cache_salt=next(salts)),), {}

    benchmark.pedantic(blocker.keys, setup=setup, rounds=2_000, warmup_rounds=50)


def test_reference_keys_4096_tokens(benchmark: Any, tokens: np.ndarray[Any, Any]) -> None:
    blocker = Blocker(seed=SEED)
    request = Request(model="llama-3-8b", token_ids=tokens, tenant="acme")
    values = tokens.tolist()
    ns = blocker.namespace(request)
    keys = benchmark.pedantic(reference_keys, args=(values, ns, 16), rounds=30, warmup_rounds=1)
    assert keys == blocker.keys(request).tolist()


@pytest.mark.parametrize("compiled", PATHS)
def test_keys_text_mode_16kb(benchmark: Any, chat_text: str, compiled: bool) -> None:
    blocker = Blocker(mode=HashMode.TEXT, block_size=64, seed=SEED, compiled=compiled)
    request = Request(model="llama-3-8b", prompt=chat_text)
    blocker.keys(request)
    keys = benchmark(blocker.keys, request)
    assert len(keys) == TEXT_CHARS // 64


def test_floor_numpy_one_pass_16kb(benchmark: Any, tokens: np.ndarray[Any, Any]) -> None:
    buffer = tokens.tobytes()
    assert len(buffer) == 16_384
    total = benchmark(lambda: np.frombuffer(buffer, dtype=np.uint32).sum())
    assert total == tokens.sum()


def test_floor_mmh3_hash_bytes_16kb(benchmark: Any, tokens: np.ndarray[Any, Any]) -> None:
    buffer = tokens.tobytes()
    digest = benchmark(mmh3.hash_bytes, buffer)
    assert len(digest) == 16
