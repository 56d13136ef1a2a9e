from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefixroute.radix import RadixTree, _shared, token_text

ENDPOINTS = ("e0", "e1", "e2")
# A tiny alphabet, so that sequences share prefixes and split each other's nodes.
seqs = st.text(alphabet="aab", max_size=8) | st.text(alphabet="abc", min_size=1, max_size=3)


def test_insert_and_match_report_each_endpoints_longest_prefix() -> None:
    tree = RadixTree()
    tree.insert("hello world", "a", 1.0)
    tree.insert("hello there", "b", 2.0)
    tree.insert("help", "a", 3.0)
    assert tree.match("hello world!") == {"a": 11, "b": 6}
    assert tree.match("hello thx") == {"a": 6, "b": 8}
    assert tree.match("help me") == {"a": 4, "b": 3}
    assert tree.match("xyz") == {}
    assert tree.match("") == {}
    # "hello world" + "p" (help shares "hel"); "hello there" counted whole for b
    assert tree.size("a") == 12 and tree.size("b") == 11
    tree.check_invariants()


def test_evict_drops_least_recently_inserted_leaves_until_under_the_limit() -> None:
    tree = RadixTree()
    tree.insert("aaaa", "a", 1.0)
    tree.insert("bbbb", "a", 2.0)
    tree.insert("cccc", "a", 3.0)
    tree.insert("aaaa", "b", 4.0)
    assert tree.evict(8) == 0  # "aaaa" is still b's
    assert tree.size("a") == 8
    assert tree.match("aaaa") == {"b": 4}  # a's oldest went
    assert tree.match("cccc") == {"a": 4}
    assert tree.evict(100) == 0
    tree.evict(0)
    assert tree.size("a") == tree.size("b") == 0
    assert tree.node_count() == 0
    tree.check_invariants()


def test_remove_endpoint_forgets_it_and_unlinks_nodes_nobody_holds() -> None:
    tree = RadixTree()
    tree.insert("shared prefix one", "a", 1.0)
    tree.insert("shared prefix two", "b", 1.0)
    tree.remove_endpoint("a")
    tree.remove_endpoint("nobody")
    assert tree.match("shared prefix one") == {"b": 14}
    assert tree.endpoints() == ["b"]
    assert tree.node_count() == 2  # "shared prefix " and "two": nodes are not re-merged
    tree.check_invariants()


def test_deep_trees_do_not_recurse() -> None:
    tree = RadixTree()
    text = "x" * 5000
    for i in range(1, 5000, 2):
        tree.insert(text[:i], "a", float(i))
    assert tree.node_count() == 2500
    tree.evict(10)
    assert tree.size("a") <= 10
    tree.check_invariants()


@pytest.mark.parametrize(
    ("text", "seq", "start", "expected"),
    [
        ("abc", "abcd", 0, 3),
        ("abc", "xabd", 1, 2),
        ("abcdef", "abc", 0, 3),
        ("abcdef", "zzabx", 2, 2),
        ("a" * 100 + "b", "a" * 101, 0, 100),
        ("q", "r", 0, 0),
    ],
)
def test_shared_prefix_length(text: str, seq: str, start: int, expected: int) -> None:
    assert _shared(text, seq, start) == expected


def test_token_text_is_one_code_point_per_token() -> None:
    ids = np.array([0, 65, 0xD800, 0x10FFFF, 0x110000 + 65, 2**32 - 1], dtype=np.uint32)
    text = token_text(ids)
    assert [ord(c) for c in text] == [0, 65, 0xD800, 0x10FFFF, 65, (2**32 - 1) % 0x110000]
    assert token_text([1, 2, 3]) == "\x01\x02\x03"


class RadixMachine(RuleBasedStateMachine):
    """`RadixTree` against a naive model: per endpoint, every prefix it holds and its time.

    An endpoint holds every prefix of every sequence inserted for it; a
    match is the longest held prefix; its size is the number of held
    (non-empty) prefixes, since a node of n characters carries n of them.
    Eviction is checked, not replayed: afterwards the model keeps the prefixes
    the tree still matches, and the check is that no endpoint is over the
    limit, endpoints under it lost nothing, and every evicted prefix is at
    least as old as every kept one (least recently used first).
    """

    def __init__(self) -> None:
        super().__init__()
        self.tree = RadixTree()
        self.held: dict[str, dict[str, float]] = {}
        self.now = 0.0

    def model_match(self, seq: str) -> dict[str, int]:
        out = {}
        for e, held in self.held.items():
            k = max((k for k in range(1, len(seq) + 1) if seq[:k] in held), default=0)
            if k:
                out[e] = k
        return out

    @rule(e=st.sampled_from(ENDPOINTS), seq=seqs)
    def insert(self, e: str, seq: str) -> None:
        self.now += 1.0  # distinct times: LRU order is then unambiguous
        self.tree.insert(seq, e, self.now)
        held = self.held.setdefault(e, {})
        for k in range(1, len(seq) + 1):
            held[seq[:k]] = self.now

    @rule(seq=seqs)
    def match(self, seq: str) -> None:
        assert self.tree.match(seq) == self.model_match(seq)

    @precondition(lambda self: bool(self.held))
    @rule(limit=st.integers(0, 12))
    def evict(self, limit: int) -> None:
        self.tree.evict(limit)
        for e, held in self.held.items():
            if len(held) <= limit:
                continue
            kept = {p: t for p, t in held.items() if self.tree.match(p).get(e, 0) == len(p)}
            gone = [t for p, t in held.items() if p not in kept]
            assert len(kept) <= limit
            assert gone and max(gone) <= min(kept.values(), default=float("inf"))
            self.held[e] = kept

    @rule(e=st.sampled_from(ENDPOINTS))
    def remove_endpoint(self, e: str) -> None:
        self.tree.remove_endpoint(e)
        self.held.pop(e, None)

    @invariant()
    def consistent(self) -> None:
        self.tree.check_invariants()
        for e in ENDPOINTS:
            assert self.tree.size(e) == len(self.held.get(e, {}))
        assert sorted(map(str, self.tree.endpoints())) == sorted(self.held)


TestRadixMachine = RadixMachine.TestCase
TestRadixMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
