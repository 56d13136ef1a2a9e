"""An approximate radix tree of what each endpoint was sent, as SGLang's router keeps.

`RadixTree` is the data structure behind the `cache-aware-picker` baseline
(`prefixroute.pickers.CacheAwarePicker`). It does not see the engines' caches:
it records the sequences the router itself sent to each endpoint and guesses
that the endpoint still holds them, until LRU eviction says otherwise.

Design, after the SGLang router's `tree.rs` (sgl-project/sglang,
`sgl-router/src/tree.rs`, later `sgl-model-gateway/src/policies/tree.rs`;
reimplemented, not copied):

- **One shared, compressed tree for all endpoints.** Each node holds a run of
  characters (`text`) and, per endpoint that holds it, the last time it was
  inserted for that endpoint. An endpoint on a node is on every ancestor too
  (insertion marks the whole path; eviction only takes leaves), so the
  longest prefix an endpoint holds is the deepest node on the request's path
  that names it: one walk answers `match` for every endpoint at once.
- **Sizes in characters** (tokens, for token-only requests), counted per
  endpoint as SGLang's `tenant_char_count` does: a node of length n counts n
  for every endpoint on it. `evict(max_size)` pops the endpoint's least
  recently used leaves (nodes where no child names it) until it is at or
  under `max_size`, as SGLang's `evict_tenant_by_size`; emptied nodes are
  unlinked.
- **Pure.** Times are arguments; `match` is a read-only query (SGLang's
  `prefix_match` also refreshes timestamps on the matched path, which the
  picker's insert of the chosen endpoint does here). No locks: the core is
  single-threaded.

Sequences are `str`. Token ids become one code point each (`token_text`),
so the tree, its slicing and its comparisons all run on Python strings in C.

Complexity: `insert` and `match` walk one root-to-leaf path, O(len(seq) +
depth * endpoints on the path) with C-speed string comparisons; `evict` and
`remove_endpoint` visit the whole tree, O(nodes log nodes), and run rarely
(every eviction interval, on endpoint removal).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["RadixTree", "token_text"]

_CODE_POINTS = 0x110000


def token_text(token_ids: Sequence[int] | npt.NDArray[Any]) -> str:
    """Token ids as a string, one code point per token (id modulo 0x110000).

    Vectorised: one numpy modulo and one UTF-32 decode (surrogates allowed,
    since lone surrogates are valid in a Python `str`). Ids of 1,114,112 and
    above wrap around and may collide with small ids; vocabularies are far
    smaller, and the tree is an approximation anyway.
    """
    arr = np.asarray(token_ids, dtype=np.int64) % _CODE_POINTS
    return arr.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")


class _Node:
    """A run of characters and the endpoints that hold it, with their last insert time."""

    __slots__ = ("children", "holders", "parent", "text")

    def __init__(self, text: str, parent: _Node | None, holders: dict[Hashable, float]) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.holders = holders


def _shared(text: str, seq: str, start: int) -> int:
    """Length of the common prefix of `text` and `seq[start:]`.

    The full-match case is one `startswith` (no copy); a partial match is
    found by bisecting on slice comparisons, O(len(text)) work in C.
    """
    if seq.startswith(text, start):
        return len(text)
    n = min(len(text), len(seq) - start)
    if text[:n] == seq[start : start + n]:
        return n
    lo, hi = 0, n  # text[:lo] matches seq there, text[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if text[lo:mid] == seq[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixTree:
    """A compressed radix tree of sequences, each node tagged with the endpoints holding it.

    Endpoints are any hashable ids. `insert(seq, endpoint, now)` records that
    `endpoint` was sent `seq`; `match(seq)` says, per endpoint, how long a
    prefix of `seq` it holds; `evict(max_size)` trims every endpoint to
    `max_size` characters, least recently inserted leaves first.
    """

    __slots__ = ("_root", "_sizes")

    def __init__(self) -> None:
        self._root = _Node("", None, {})
        self._sizes: dict[Hashable, int] = {}

    def insert(self, seq: str, endpoint: Hashable, now: float) -> None:
        """Record that `endpoint` was sent `seq` at `now`. O(len(seq) + depth).

        Every node on `seq`'s path gets `endpoint` with time `now`; a node
        the path leaves half way is split first, both halves keeping its
        holders, so no endpoint's size changes but `endpoint`'s.
        """
        sizes = self._sizes
        size = sizes.get(endpoint, 0)
        node = self._root
        i, n = 0, len(seq)
        while i < n:
            child = node.children.get(seq[i])
            if child is None:
                node.children[seq[i]] = _Node(seq[i:], node, {endpoint: now})
                size += n - i
                break
            k = _shared(child.text, seq, i)
            if k < len(child.text):
                child = self._split(child, k)
            if endpoint not in child.holders:
                size += k
            child.holders[endpoint] = now
            node = child
            i += k
        sizes[endpoint] = size

    @staticmethod
    def _split(child: _Node, k: int) -> _Node:
        """Cut `child` after `k` characters; return the new upper half (same holders)."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.text[:k], parent, dict(child.holders))
        parent.children[child.text[0]] = upper
        child.text = child.text[k:]
        child.parent = upper
        upper.children[child.text[0]] = child
        return upper

    def match(self, seq: str) -> dict[Hashable, int]:
        """For each endpoint holding a prefix of `seq`, that prefix's length (absent = 0).

        One walk down `seq`'s path; a node entered part way counts its
        matched part (its holders hold all of it, so they hold that prefix).
        Read-only. O(len(seq) + path length x holders per node).
        """
        out: dict[Hashable, int] = {}
        node = self._root
        i, n = 0, len(seq)
        while i < n:
            child = node.children.get(seq[i])
            if child is None:
                break
            k = _shared(child.text, seq, i)
            i += k
            for e in child.holders:
                out[e] = i
            if k < len(child.text):
                break
            node = child
        return out

    def size(self, endpoint: Hashable) -> int:
        """Characters (tokens) held by `endpoint`: the sum of its nodes' lengths. O(1)."""
        return self._sizes.get(endpoint, 0)

    def endpoints(self) -> list[Hashable]:
        """Every endpoint ever inserted and not removed (some may hold nothing after eviction)."""
        return list(self._sizes)

    def evict(self, max_size: int) -> int:
        """Trim every endpoint over `max_size` characters to at most that; returns nodes unlinked.

        Per endpoint over the limit, its leaves (nodes where no child names
        it) leave in order of their last insert time, oldest first; a parent
        that becomes a leaf joins the queue. Ties go by a visit counter, so
        eviction is deterministic. O(nodes log nodes).
        """
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size!r}")
        sizes = self._sizes
        if all(s <= max_size for s in sizes.values()):
            return 0
        heap: list[tuple[float, int, Hashable, _Node]] = []
        order = 0
        for node in self._nodes():
            for e, t in node.holders.items():
                if sizes[e] > max_size and not any(e in c.holders for c in node.children.values()):
                    heap.append((t, order, e, node))
                    order += 1
        heapq.heapify(heap)
        unlinked = 0
        while heap:
            _, _, e, node = heapq.heappop(heap)
            if sizes[e] <= max_size:
                continue
            del node.holders[e]
            sizes[e] -= len(node.text)
            parent = node.parent
            assert parent is not None
            if not node.holders and not node.children:
                del parent.children[node.text[0]]
                unlinked += 1
            if parent is not self._root and not any(
                e in c.holders for c in parent.children.values()
            ):
                heapq.heappush(heap, (parent.holders[e], order, e, parent))
                order += 1
        return unlinked

    def remove_endpoint(self, endpoint: Hashable) -> None:
        """Forget `endpoint` everywhere, unlinking nodes nobody holds any more. O(nodes)."""
        if self._sizes.pop(endpoint, None) is None:
            return
        # Children before parents, so a parent left empty is also childless by then.
        for node in reversed(list(self._nodes())):
            if node.holders.pop(endpoint, None) is not None and not node.holders:
                assert not node.children and node.parent is not None
                del node.parent.children[node.text[0]]

    def node_count(self) -> int:
        """Nodes in the tree, the root excluded. O(nodes)."""
        return sum(1 for _ in self._nodes())

    def _nodes(self) -> Iterator[_Node]:
        """Every node but the root, each before its descendants (iterative: trees get deep)."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree's links, holder sets or sizes are inconsistent."""
        root = self._root
        if root.text or root.holders or root.parent is not None:
            raise AssertionError("the root must be empty and parentless")
        sizes: dict[Hashable, int] = {}
        stack = [root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                if not child.text or child.text[0] != first:
                    raise AssertionError(f"child keyed {first!r} has text {child.text[:8]!r}")
                if child.parent is not node:
                    raise AssertionError("a child's parent link is wrong")
                if not child.holders:
                    raise AssertionError("a node nobody holds is still linked")
                if node is not root and not child.holders.keys() <= node.holders.keys():
                    raise AssertionError("an endpoint holds a node but not its parent")
                for e in child.holders:
                    sizes[e] = sizes.get(e, 0) + len(child.text)
                stack.append(child)
        for e, s in self._sizes.items():
            if sizes.get(e, 0) != s:
                raise AssertionError(f"size of {e!r} is {s}, its nodes hold {sizes.get(e, 0)}")
        if not sizes.keys() <= self._sizes.keys():
            raise AssertionError("a node names an endpoint the tree does not count")
