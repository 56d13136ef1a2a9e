"""The block-hash chain's two paths: the numba kernel and numpy, against the reference.

`Blocker(compiled=True)` runs `prefixroute.blocks._chain_kernel`,
`Blocker(compiled=False)` the numpy path; both must give `reference_keys`'
keys bit for bit for every input: any length (0..5,000 values), block size
(1..64), value range and dtype, namespace, and chain continuation (`parent`,
`start`). The kernel tests are skipped where numba is not installed (the
numpy path is then the only one, and still tested here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixroute import jit
from prefixroute.blocks import Blocker, HashMode, reference_keys
from prefixroute.request import Request

MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1
SEED = 0x0123_4567_89AB_CDEF

needs_numba = pytest.mark.skipif(not jit.AVAILABLE, reason="numba (the `fast` extra) is missing")
PATHS = [
    pytest.param(True, id="compiled", marks=needs_numba),
    pytest.param(False, id="numpy"),
]
COMPILED = Blocker(seed=SEED, compiled=True) if jit.AVAILABLE else None
PURE = Blocker(seed=SEED, compiled=False)


def blockers() -> list[Blocker]:
    """Every path this machine can run: numpy always, the kernel with numba."""
    return [PURE] if COMPILED is None else [COMPILED, PURE]


# Values: full 32-bit range, a small alphabet with the extremes, realistic vocabulary ids.
KINDS = ("u32", "alphabet", "vocab")


def make_values(length: int, kind: str, seed: int) -> npt.NDArray[np.uint32]:
    rng = np.random.default_rng(seed)
    if kind == "u32":
        return rng.integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32)
    if kind == "alphabet":
        return rng.choice(np.array([0, 1, 2, 7, 2**16, 2**31, MAX_U32], dtype=np.uint32), length)
    return rng.integers(0, 131_072, length, dtype=np.uint32)


values_st = st.builds(
    make_values,
    length=st.integers(min_value=0, max_value=5_000),
    kind=st.sampled_from(KINDS),
    seed=st.integers(min_value=0, max_value=2**32),
)
namespaces = st.integers(min_value=0, max_value=MAX_U64)
block_sizes = st.integers(min_value=1, max_value=64)


# -- both paths are the reference ------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(values=values_st, namespace=namespaces, block_size=block_sizes)
def test_both_paths_equal_the_reference(
    values: npt.NDArray[np.uint32], namespace: int, block_size: int
) -> None:
    expected = reference_keys(values.tolist(), namespace, block_size)
    for blocker in blockers():
        got = blocker.hash_tokens(values, namespace, block_size)
        assert got.dtype == np.uint64 and got.flags.writeable
        assert got.tolist() == expected, blocker.compiled


@settings(max_examples=120, deadline=None)
@given(
    prefix=values_st,
    tail=values_st,
    namespace=namespaces,
    block_size=block_sizes,
    parent=st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_U64)),
)
def test_both_paths_continue_a_chain_from_any_parent_and_start(
    prefix: npt.NDArray[np.uint32],
    tail: npt.NDArray[np.uint32],
    namespace: int,
    block_size: int,
    parent: int | None,
) -> None:
    """`parent`/`start` continue a chain: the tail of the whole chain, shifted by the parent.

    With `parent` None the true parent (the prefix's last key) is used; any
    other parent shifts every key by the same amount modulo 2**64 (the chain
    is a running sum).
    """
    start = len(prefix) // block_size
    prefix = prefix[: start * block_size]
    whole = reference_keys(np.concatenate([prefix, tail]).tolist(), namespace, block_size)
    true_parent = whole[start - 1] if start else 0
    chosen = true_parent if parent is None else parent
    expected = [(k - true_parent + chosen) & MAX_U64 for k in whole[start:]]
    for blocker in blockers():
        got = blocker.hash_tokens(tail, namespace, block_size, parent=chosen, start=start)
        assert got.tolist() == expected, blocker.compiled


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("start", [0, 1, 1023, 1024, 5_000])
@pytest.mark.parametrize("parent", [0, 1, 2**63 - 1, 2**63, MAX_U64])
def test_extreme_parents_and_starts(compiled: bool, start: int, parent: int) -> None:
    """Parents across the int64 sign boundary (the kernel takes them as int64 bit
    patterns), starts past the position table's first size (1,024)."""
    values = make_values(3 * 16 + 5, "u32", start % 97)
    blocker = Blocker(seed=SEED, compiled=compiled)
    got = blocker.hash_tokens(values, 77, 16, parent=parent, start=start)
    assert got.tolist() == _continued_chain(values, 77, 16, start, parent)
    if start == 0:
        assert [(k - parent) & MAX_U64 for k in got.tolist()] == reference_keys(
            values.tolist(), 77, 16
        )


@needs_numba
@pytest.mark.parametrize("start", [2**40, 2**63 - 1, 2**63, 2**64 + 5])
def test_the_kernel_continues_a_chain_at_any_position(start: int) -> None:
    """Position tags wrap modulo 2**64 like every other term. (The numpy path tabulates
    the tags of positions up to `start`, so it serves only positions that fit in memory.)"""
    assert COMPILED is not None
    values = make_values(2 * 16, "vocab", 5)
    got = COMPILED.hash_tokens(values, 77, 16, parent=3, start=start)
    assert got.tolist() == _continued_chain(values, 77, 16, start, 3)


def _continued_chain(
    values: npt.NDArray[np.uint32], namespace: int, block_size: int, start: int, parent: int
) -> list[int]:
    """The continued chain in plain Python, from the module docstring's definition."""
    from prefixroute.blocks import _fmix64, _lane_keys

    gamma = 0x9E37_79B9_7F4A_7C15
    lanes = _lane_keys(namespace, block_size)
    out, chain = [], parent
    for j in range(len(values) // block_size):
        c = (start + j + 1) * gamma
        for lane, key in enumerate(lanes):
            c += key * int(values[j * block_size + lane])
        chain = (chain + _fmix64(c & MAX_U64)) & MAX_U64
        out.append(chain)
    return out


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int64, np.uint64])
@pytest.mark.parametrize("block_size", [1, 2, 16, 17, 64])
def test_any_integer_dtype_gives_the_same_keys(
    compiled: bool, dtype: type[np.integer[Any]], block_size: int
) -> None:
    values = np.random.default_rng(block_size).integers(0, 200, 40 * block_size + 3)
    blocker = Blocker(seed=SEED, compiled=compiled)
    got = blocker.hash_tokens(values.astype(dtype), 12345, block_size)
    assert got.tolist() == reference_keys(values.tolist(), 12345, block_size)


@pytest.mark.parametrize("compiled", PATHS)
def test_strided_and_read_only_inputs(compiled: bool) -> None:
    """Views that are not contiguous, or not writeable, hash as their values."""
    blocker = Blocker(seed=SEED, compiled=compiled)
    base = make_values(2 * 4_096, "vocab", 3)
    strided = base[::2]
    assert not strided.flags.c_contiguous
    readonly = base.copy()
    readonly.flags.writeable = False
    for values in (strided, readonly, base[7:]):
        got = blocker.hash_tokens(values, 9, 16)
        assert got.tolist() == reference_keys(values.tolist(), 9, 16)


@needs_numba
def test_the_kernel_leaves_its_inputs_alone_and_returns_a_fresh_array() -> None:
    assert COMPILED is not None
    values = make_values(4_096, "vocab", 1)
    before = values.copy()
    request = Request(model="m", token_ids=values)
    a, b = COMPILED.keys(request), COMPILED.keys(request)
    assert a is not b and not np.shares_memory(a, b)
    a[:] = 0
    assert COMPILED.keys(request).tolist() == b.tolist()
    assert np.array_equal(values, before)


# -- requests: every hashing path, both paths ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    tokens=values_st,
    text=st.text(max_size=3_000),
    block_size=block_sizes,
    model=st.sampled_from(["m", "llama"]),
    salt=st.one_of(st.none(), st.text(max_size=8)),
    tenant=st.sampled_from(["default", "t1"]),
)
def test_request_keys_agree_on_every_path(
    tokens: npt.NDArray[np.uint32],
    text: str,
    block_size: int,
    model: str,
    salt: str | None,
    tenant: str,
) -> None:
    """Token and text modes, token ids and prompts (the four namespaces), both paths."""
    for mode in HashMode:
        fields: dict[str, Any] = {"block_size": block_size, "seed": SEED, "isolate_tenants": True}
        pure = Blocker(mode=mode, compiled=False, **fields)
        others = [Blocker(mode=mode, compiled=True, **fields)] if jit.AVAILABLE else []
        requests = [Request(model=model, prompt=text or "x", cache_salt=salt, tenant=tenant)]
        if len(tokens):
            requests.append(Request(model=model, token_ids=tokens, cache_salt=salt, tenant=tenant))
        for request in requests:
            expected = pure.keys(request)
            if request.token_ids is not None:
                unit_values = request.token_ids.tolist()
            else:
                unit_values = [ord(ch) for ch in request.prompt or ""]
            size = pure._unit_block_size(pure._unit(request))
            ns = pure.namespace(request)
            assert expected.tolist() == reference_keys(unit_values, ns, size)
            for blocker in others:
                assert blocker.keys(request).tolist() == expected.tolist()


# -- the switch ------------------------------------------------------------------------


def test_compiled_defaults_to_numba_being_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Blocker().compiled is jit.AVAILABLE
    assert Blocker(compiled=False).compiled is False
    monkeypatch.setattr(jit, "AVAILABLE", False)
    assert Blocker().compiled is False  # without numba, the numpy path
    with pytest.raises(ValueError, match="compiled=True needs numba"):
        Blocker(compiled=True)


@pytest.mark.parametrize("value", [1, 0, "yes", 1.0])
def test_compiled_must_be_a_bool_or_none(value: object) -> None:
    with pytest.raises(ValueError, match="compiled must be True, False or None"):
        Blocker(compiled=value)  # type: ignore[arg-type]


@needs_numba
def test_the_path_is_not_part_of_the_value() -> None:
    a, b = Blocker(seed=1, compiled=True), Blocker(seed=1, compiled=False)
    assert a == b and hash(a) == hash(b)
    assert "compiled" not in repr(a)


@pytest.mark.parametrize("compiled", PATHS)
def test_golden_chains_on_both_paths(compiled: bool) -> None:
    """The pinned chains of tests/test_blocks.py, on each path."""
    from tests.test_blocks import GOLDEN_RAW, GOLDEN_TEXT, GOLDEN_TOKENS

    blocker = Blocker(seed=42, compiled=compiled)
    raw = Blocker(compiled=compiled).hash_tokens(np.arange(40, dtype=np.uint32), 0, 16)
    assert raw.tolist() == GOLDEN_RAW
    request = Request(model="llama", token_ids=list(range(100, 150)), lora="sql", cache_salt="s")
    assert blocker.keys(request).tolist() == GOLDEN_TOKENS
    text = Blocker(mode="text", block_size=64, seed=42, compiled=compiled)
    prompt = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 🚀 " * 3
    assert text.keys(Request(model="m", prompt=prompt)).tolist() == GOLDEN_TEXT
