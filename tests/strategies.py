"""Shared hypothesis strategies for prefixroute's tests (STYLE.md 13)."""

from __future__ import annotations

from hypothesis import strategies as st

from prefixroute.endpoint import EndpointId
from prefixroute.index import Tier

BLOCK_KEY_BITS = 64

block_keys = st.integers(min_value=0, max_value=2**BLOCK_KEY_BITS - 1)
"""Any block key: a 64-bit chained hash as a Python int."""

tiers = st.sampled_from(Tier)
"""Any tier."""

KEY_UNIVERSE: tuple[int, ...] = (
    0,
    1,
    2**64 - 1,
    2**63,
    0x9E3779B97F4A7C15,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x27D4EB2F165667C5,
    0xFF51AFD7ED558CCD,
    0xC4CEB9FE1A85EC53,
    42,
    2**32,
    2**60 + 7,
    0x5555555555555555,
)
"""A small key universe (small and full-width ints) so that chains share blocks."""

_U = KEY_UNIVERSE
BASE_CHAINS: tuple[tuple[int, ...], ...] = (
    (_U[0], _U[1], _U[2], _U[3], _U[4], _U[5]),
    (_U[0], _U[1], _U[2], _U[6], _U[7]),
    (_U[0], _U[8], _U[9]),
    (_U[10], _U[11], _U[12], _U[13], _U[3]),
)
"""A few chains with shared prefixes (as requests of one tenant's system prompt)."""


def endpoint_ids(n: int = 4) -> st.SearchStrategy[EndpointId]:
    """One of `n` endpoint ids, "e0" .. "e{n-1}"."""
    return st.sampled_from([EndpointId(f"e{i}") for i in range(n)])


def universe_keys() -> st.SearchStrategy[int]:
    """A key from `KEY_UNIVERSE`."""
    return st.sampled_from(KEY_UNIVERSE)


@st.composite
def chains(draw: st.DrawFn, *, max_tail: int = 4) -> list[int]:
    """A request's chain over `KEY_UNIVERSE` in prefix order, often overlapping others.

    Mostly a prefix of one of `BASE_CHAINS` plus a short random tail (so
    prefixes are shared and diverge); sometimes a random list of universe
    keys, duplicates allowed; sometimes empty.
    """
    kind = draw(st.sampled_from(["prefix", "prefix", "random", "empty"]))
    if kind == "empty":
        return []
    if kind == "random":
        return draw(st.lists(universe_keys(), min_size=1, max_size=8))
    base = draw(st.sampled_from(BASE_CHAINS))
    cut = draw(st.integers(min_value=1, max_value=len(base)))
    tail = draw(st.lists(universe_keys(), max_size=max_tail))
    return list(base[:cut]) + tail


def unique_chains(min_size: int = 1, max_size: int = 300) -> st.SearchStrategy[list[int]]:
    """A chain of distinct full-width keys, long enough to cross `match`'s chunks."""
    return st.lists(block_keys, min_size=min_size, max_size=max_size, unique=True)


PROMPT_PREFIXES: tuple[tuple[int, ...], ...] = (
    (),
    tuple(range(100, 108)),
    tuple(range(100, 104)) + tuple(range(200, 208)),
    tuple(range(300, 312)),
)
"""Shared leading token ids (system prompts), some sharing their own first block."""


@st.composite
def token_prompts(draw: st.DrawFn, *, max_tail: int = 9) -> tuple[int, ...]:
    """A request's token ids: one of `PROMPT_PREFIXES` plus a short tail, never empty.

    With small blocks (4 tokens) requests share prefixes, diverge, and are
    sometimes shorter than one block (an empty chain).
    """
    prefix = draw(st.sampled_from(PROMPT_PREFIXES))
    tail = draw(st.lists(st.integers(0, 7), min_size=0 if prefix else 1, max_size=max_tail))
    return prefix + tuple(tail)
