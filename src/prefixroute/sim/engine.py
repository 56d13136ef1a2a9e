"""A modelled vLLM v1 engine: a paged KV pool with automatic prefix caching and its scheduler.

What is modelled (vLLM v1: `vllm/v1/core/block_pool.py`, `kv_cache_manager.py`,
`sched/scheduler.py`; docs.vllm.ai "Automatic Prefix Caching"):

- The KV pool: `num_blocks` blocks of `block_size` tokens, block 0 kept
  back as vLLM's null block (`BlockPool.null_block`), so `num_blocks - 1`
  hold tokens. A full block of known tokens gets a hash chained over its
  whole prefix (here: the block keys of `prefixroute.blocks`, which have the
  same chained property; a block of generated tokens whose ids the request
  does not bring gets a fresh key no prompt can match) and stays cached
  after its request ends, until the block is reused. Free blocks sit in one
  queue (`FreeKVCacheBlockQueue`); allocation takes the head
  (`popleft_n`) and evicts its hashes, if any. A finished request frees its
  blocks tail first (`SingleTypeKVCacheManager.free`); of those, the
  hashed ones go to the queue's tail (LRU order) and the unhashed ones
  (a partial last block) to its head, reused first (`BlockPool.free_blocks`:
  `prepend_n` / `append_n`). A cache hit on a free block takes it back out
  of the queue (`touch`, reference counts). Blocks are not deduplicated
  (`BlockHashToBlockMap`): a block computed again while an equal one is
  cached (the recomputed last block of a fully cached prompt) is cached
  too, under the same hash; a lookup takes the first block cached under a
  hash; a hash stays cached while any block holds it. With events, each
  block cached or evicted is one stored or removed hash, as vLLM emits
  them (so a hash can be stored twice and removed once while still held).
- Prefix hits: a new request walks its block hashes while they are cached;
  at most `num_tokens - 1` tokens count as hit (the last token is always
  computed, to produce logits), in whole blocks. The engine counts
  prefix-cache queries and hits in tokens, as vLLM's
  `vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` do.
- The scheduler, each step: at most `max_num_seqs` running sequences and
  `max_num_batched_tokens` new tokens. Decodes (one token each) are batched
  first, then running chunked prefills, then waiting requests first come
  first served, each taking what budget is left (chunked prefill). A waiting
  request that cannot get its blocks stops admission for the step. A running
  request that cannot get a block preempts the most recently admitted
  running request (itself, if it is the last): its blocks are freed and it
  is recomputed from its prefix-cache hits later, as vLLM v1's
  recompute preemption does.
- A request's prefill step emits its first token (the TTFT point); each
  decode step emits one more. The engine generates exactly the request's
  `output_tokens`.

- Blocks are hashed when the step that computes them is scheduled
  (`KVCacheManager.allocate_slots` calls `cache_blocks`), so a request
  admitted later in the same step, or while a chunked prefill goes on, hits
  the blocks another is computing.

Simplifications, each small for routing (none applies to requests served
one at a time, see `replay_cached_tokens`): decodes go first (vLLM v1 walks
`running` in order, so a long prefill chunk ahead of decodes can take the
budget; vLLM v0's chunked prefill and Sarathi-Serve put decodes first); the
blocks of generated tokens are hashed when the request finishes, not as
they fill, so a request preempted mid-decode recomputes its generated tokens
without hits on them.

Performance: a decode step costs O(1) plus O(log n) per finishing request or
new block, however many sequences decode. Decoding sequences are not
touched per step: a sequence's progress is `step_no - base`, its next block
need and its finish are entries in heaps keyed by step number, and the step
time's KV term is an aggregate (`n x step_no - sum(base)`).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence

import attrs
import numpy as np

from prefixroute.blocks import Blocker
from prefixroute.request import Request
from prefixroute.sim.cost import PROFILES, CostModel
from prefixroute.sim.source import SimRequest

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "SeqHandle",
    "replay_cached_tokens",
]

_WAITING, _PREFILL, _DECODE, _DONE = range(4)
_SYNTHETIC_BASE = 0xFFFF_0000_0000_0000  # keys of generated blocks without token ids


@attrs.frozen(slots=True)
class EngineConfig:
    """One engine's shape: its KV pool and scheduler limits (vLLM's H100 serving defaults)."""

    kv_capacity_tokens: int
    block_size: int = 16
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192

    def __attrs_post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError(
                f"kv_capacity_tokens must hold one block ({self.block_size}), "
                f"got {self.kv_capacity_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < max(self.block_size, self.max_num_seqs):
            raise ValueError(
                "max_num_batched_tokens must be >= block_size and >= max_num_seqs (every "
                f"running sequence may need a token per step), got {self.max_num_batched_tokens}"
            )

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool (vLLM's `num_gpu_blocks`), the null block included."""
        return self.kv_capacity_tokens // self.block_size


@attrs.frozen(slots=True)
class Completion:
    """A finished request as the engine saw it; times are the simulation's seconds."""

    sim: SimRequest
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    received_s: float
    first_token_s: float
    finished_s: float
    preemptions: int


@attrs.define(slots=True)
class EngineStats:
    """Running totals, as vLLM exports them (token counts, not requests)."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    recompute_queries: int = 0
    recompute_hits: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    busy_s: float = 0.0
    finished: int = 0


class _Seq:
    """A request inside the engine (hot: slots, no attrs)."""

    __slots__ = (
        "base",
        "blocks",
        "cached",
        "computed",
        "epoch",
        "first_token_s",
        "generated",
        "hashed",
        "id",
        "keys",
        "known",
        "need_step",
        "output",
        "preemptions",
        "prompt",
        "received_s",
        "sim",
        "state",
        "synthetic",
    )

    def __init__(self, sim: SimRequest, seq_id: int, keys: Sequence[int], now: float) -> None:
        self.sim = sim
        self.id = seq_id
        self.keys = keys  # block hashes of the known tokens' full blocks
        self.prompt = len(sim.request.token_ids)  # type: ignore[arg-type]
        self.output = sim.output_tokens
        self.known = self.prompt  # tokens known: prompt + generated
        self.computed = 0  # tokens whose KV is in `blocks`
        self.generated = 0
        self.blocks: list[int] = []
        self.cached = -1  # prefix-cache hit at first scheduling (-1: not yet)
        self.state = _WAITING
        self.base = 0  # decoding: KV tokens read at step s are s - base
        self.need_step = 0  # decoding: the step number that needs the next block
        self.preemptions = 0
        self.epoch = 0  # bumped on each entry to decode: older heap entries are stale
        self.hashed = 0  # leading blocks already offered to the cache
        self.received_s = now
        self.first_token_s = -1.0
        self.synthetic: list[int] = []  # keys of generated blocks past `keys`


SeqHandle = _Seq
"""A request inside an `Engine`, as `Engine.add` returns it: opaque to drivers, which read
it only through `Engine.emitted`, `finished`, `first_token_s` and `cached_tokens`."""


class Engine:
    """One modelled vLLM engine; the simulator drives it step by step.

    The driver calls `add` when a request reaches the engine, `begin_step`
    to start a step when the engine is idle (it returns the step's duration,
    or None with nothing to do), and `end_step` when that duration has
    passed, which returns the requests that finished. `waiting`, `running`
    and `kv_usage` are what vLLM's metrics report. A driver that streams
    follows one request through the handle `add` returns (`emitted`,
    `finished`, `first_token_s`, `cached_tokens`, `abort`). With `record_events`,
    `drain_events` returns the (stored, removed) block hashes since the
    last call, as vLLM's KV-event publisher would.
    """

    def __init__(
        self,
        config: EngineConfig,
        cost: CostModel,
        *,
        record_events: bool = False,
    ) -> None:
        self.config = config
        self.cost = cost
        self.stats = EngineStats()
        n = config.num_blocks
        self._B = config.block_size
        self._hash: list[int | None] = [None] * n
        self._ref = [0] * n
        # block 0 is vLLM's null block: never free, never holds tokens
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, n))
        self._cached: dict[int, int] = {}  # hash -> the first block cached under it
        self._dups: dict[int, list[int]] = {}  # hash -> later blocks cached under it (rare)
        self._synthetic = itertools.count(_SYNTHETIC_BASE)
        self._waiting: deque[_Seq] = deque()
        self._running: dict[int, _Seq] = {}  # admission order: preemption takes the last
        self._prefilling: list[_Seq] = []
        self._ids = itertools.count()
        # decoding sequences, implicit (see the module docstring)
        self._step_no = 0
        self._n_decode = 0
        self._sum_base = 0
        # (step, tiebreak, seq, epoch); an entry is live while seq decodes in that epoch
        self._finish_heap: list[tuple[int, int, _Seq, int]] = []
        self._block_heap: list[tuple[int, int, _Seq, int]] = []
        self._in_step: list[tuple[_Seq, int]] = []
        self._step_decodes = 0
        self._step_s = 0.0
        self._busy = False
        self._record = record_events
        self._stored: list[int] = []
        self._removed: list[int] = []
        self.itl_steps: list[float] = []  # a decode step's duration ...
        self.itl_tokens: list[int] = []  # ... and how many inter-token gaps it ended

    # -- what vLLM reports ------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests queued, not yet admitted (`vllm:num_requests_waiting`)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests admitted to the batch (`vllm:num_requests_running`)."""
        return len(self._running)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use by requests (`vllm:kv_cache_usage_perc`; the null
        block is not counted, as `BlockPool.get_usage`)."""
        n = self.config.num_blocks - 1
        return (n - len(self._free)) / n if n else 0.0

    @property
    def busy(self) -> bool:
        """Whether a step is in progress."""
        return self._busy

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self._running or self._waiting)

    def drain_events(self) -> tuple[list[int], list[int]]:
        """Hashes stored and removed since the last call (only with `record_events`)."""
        stored, removed = self._stored, self._removed
        self._stored, self._removed = [], []
        return stored, removed

    def cached_prefix_blocks(self, keys: Sequence[int]) -> int:
        """How many leading `keys` are cached now (for tests and reports). O(hit)."""
        n = 0
        cached = self._cached
        for k in keys:
            if k not in cached:
                break
            n += 1
        return n

    # -- following one request -----------------------------------------------------
    #
    # O(1) reads of a handle from `add`, for drivers that stream tokens as they
    # are generated; they cost the step loop nothing (a decoding sequence's
    # progress is derived from the step counter, see the module docstring).

    def emitted(self, handle: SeqHandle) -> int:
        """Tokens generated so far for `handle`'s request (all of them once it finished). O(1).

        Counts the steps completed by `end_step`, never the one in progress.
        A preempted request keeps the tokens it generated; its recompute
        prefill then generates the next one.
        """
        if handle.state == _DECODE:
            return self._step_no - handle.base - handle.prompt
        return handle.generated

    def finished(self, handle: SeqHandle) -> bool:
        """Whether `handle`'s request has generated all its tokens and left the engine. O(1)."""
        return handle.state == _DONE

    def first_token_s(self, handle: SeqHandle) -> float | None:
        """The `now` of the `end_step` that generated its first token, None before. O(1)."""
        return handle.first_token_s if handle.first_token_s >= 0 else None

    def cached_tokens(self, handle: SeqHandle) -> int | None:
        """Its prefix-cache hit in tokens at first scheduling, None while never scheduled. O(1)."""
        return handle.cached if handle.cached >= 0 else None

    def abort(self, handle: SeqHandle) -> bool:
        """Drop `handle`'s request (its client went away), as vLLM aborts a request.

        Its blocks are freed (full prompt blocks already cached stay cached);
        it produces no `Completion`. False when it had already finished.
        Only between steps (RuntimeError during one): a driver that learns of
        a disconnect mid-step applies it after `end_step`. O(blocks), plus
        O(waiting) for a request still queued.
        """
        if self._busy:
            raise RuntimeError("abort during a step")
        seq = handle
        if seq.state == _DONE:
            return False
        if seq.state == _WAITING:
            self._waiting.remove(seq)
        else:
            if seq.state == _DECODE:
                self._leave_decode(seq)  # its heap entries go stale with the state
            else:
                self._prefilling.remove(seq)
            del self._running[seq.id]
            self._release(seq)
        seq.state = _DONE
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block hash, as vLLM's `reset_prefix_cache` and sglang's
        `flush_cache` do; only when no request is queued or running (False otherwise,
        as they refuse too). O(blocks)."""
        if self._busy or self._running or self._waiting:
            return False
        for b, h in enumerate(self._hash):
            if h is not None:
                self._hash[b] = None
                if self._record:
                    self._removed.append(h)
        self._cached.clear()
        self._dups.clear()
        return True

    # -- driving --------------------------------------------------------------

    def fits(self, sim: SimRequest) -> bool:
        """Whether `sim` (prompt + output) fits in the pool at all; vLLM refuses it otherwise."""
        tokens = len(sim.request.token_ids) + sim.output_tokens  # type: ignore[arg-type]
        return -(-tokens // self._B) <= self.config.num_blocks - 1

    def add(self, sim: SimRequest, keys: Sequence[int], now: float) -> SeqHandle:
        """Queue `sim`; `keys` are the block hashes of its known full blocks (prompt, + output).

        Returns a handle that `emitted`, `finished`, `first_token_s` and
        `cached_tokens` read, for a driver that follows one request as it
        runs (the fake engine streams its tokens); drivers that only need
        completions ignore it. ValueError for a request without tokens, with
        no output, or that can never fit (`fits`): the driver answers those
        as vLLM does (400).
        """
        if sim.request.token_ids is None or len(sim.request.token_ids) == 0:
            raise ValueError("a simulated request needs token_ids")
        if sim.output_tokens < 1:
            raise ValueError("a simulated request must generate at least one token")
        if not self.fits(sim):
            raise ValueError("prompt and output exceed the engine's KV capacity")
        seq = _Seq(sim, next(self._ids), keys, now)
        self._waiting.append(seq)
        return seq

    def begin_step(self, now: float) -> float | None:
        """Schedule one step at `now`; its duration in seconds, or None when idle."""
        if self._busy:
            raise RuntimeError("begin_step while a step is in progress")
        B = self._B
        step_no = self._step_no
        preempted = self.stats.preemptions
        # Decodes first: every decoding sequence needs a slot for one token.
        bheap = self._block_heap
        while bheap and bheap[0][0] <= step_no:
            _, _, seq, epoch = heapq.heappop(bheap)
            if seq.state != _DECODE or seq.epoch != epoch:
                continue
            if self._grow(seq):
                seq.need_step += B
                heapq.heappush(bheap, (seq.need_step, next(self._ids), seq, epoch))
        budget = self.config.max_num_batched_tokens - self._n_decode
        scheduled: list[tuple[_Seq, int]] = []
        # Running chunked prefills, then waiting requests in order.
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.state != _PREFILL:
                continue  # preempted by an earlier allocation
            n = min(seq.known - seq.computed, budget)
            if self._allocate(seq, seq.computed + n):
                budget -= n
                scheduled.append((seq, n))
        # Blocks are hashed when their step is scheduled (vLLM's allocate_slots ->
        # cache_blocks), so a request admitted later in this step hits them: each layer
        # writes the whole batch's KV before its attention reads it. Only now, once no
        # running prefill can be preempted by a later allocation of this step.
        for seq, n in scheduled:
            if seq.state == _PREFILL:
                self._cache_blocks(seq, min((seq.computed + n) // B, len(seq.keys)))
        waiting = self._waiting
        max_seqs = self.config.max_num_seqs
        # After a preemption the step admits nobody (as vLLM v1's scheduler).
        while (
            waiting
            and budget > 0
            and len(self._running) < max_seqs
            and self.stats.preemptions == preempted
        ):
            seq = waiting[0]
            hit = self._hit_blocks(seq)
            n = min(seq.known - hit * B, budget)
            if not self._admit(seq, hit, hit * B + n):
                break
            waiting.popleft()
            budget -= n
            scheduled.append((seq, n))
            self._cache_blocks(seq, min((hit * B + n) // B, len(seq.keys)))
        scheduled = [(seq, n) for seq, n in scheduled if seq.state == _PREFILL]
        n_dec = self._n_decode
        kv_dec = n_dec * step_no - self._sum_base
        new_tokens = n_dec
        pairs = float(kv_dec)
        kv_tokens = float(kv_dec)
        for seq, n in scheduled:
            c = seq.computed
            new_tokens += n
            pairs += n * (c + (n + 1) / 2)
            kv_tokens += c + n
        if not new_tokens:
            return None
        self._in_step = scheduled
        self._step_decodes = n_dec
        dt = self.cost.step_time(new_tokens, n_dec + len(scheduled), pairs, kv_tokens)
        self._step_s = dt
        self._busy = True
        return dt

    def end_step(self, now: float) -> list[Completion]:
        """Finish the step begun last; the requests that completed at `now`."""
        if not self._busy:
            raise RuntimeError("end_step without begin_step")
        self._busy = False
        stats = self.stats
        stats.steps += 1
        stats.busy_s += self._step_s
        self._step_no += 1
        step_no = self._step_no
        done: list[Completion] = []
        n_dec = self._step_decodes
        if n_dec:
            self.itl_steps.append(self._step_s)
            self.itl_tokens.append(n_dec)
            stats.generated_tokens += n_dec
            stats.computed_tokens += n_dec
        B = self._B
        for seq, n in self._in_step:
            seq.computed += n
            stats.computed_tokens += n
            full = seq.computed // B
            if full:
                self._cache_blocks(seq, min(full, len(seq.keys)))
            if seq.computed < seq.known:
                continue
            # Prefill done: this step sampled a token.
            self._prefilling.remove(seq)
            seq.generated += 1
            seq.known += 1
            stats.generated_tokens += 1
            if seq.first_token_s < 0:
                seq.first_token_s = now
            if seq.generated >= seq.output:
                done.append(self._finish(seq, now))
                continue
            # Enter decode: at step s the sequence reads s - base KV tokens.
            seq.state = _DECODE
            seq.epoch += 1
            seq.base = step_no - seq.known
            self._n_decode += 1
            self._sum_base += seq.base
            seq.need_step = seq.base + B * len(seq.blocks) + 1
            tie = next(self._ids)
            heapq.heappush(self._block_heap, (seq.need_step, tie, seq, seq.epoch))
            finish = step_no + seq.output - seq.generated
            heapq.heappush(self._finish_heap, (finish, tie, seq, seq.epoch))
        fheap = self._finish_heap
        while fheap and fheap[0][0] <= step_no:
            _, _, seq, epoch = heapq.heappop(fheap)
            if seq.state != _DECODE or seq.epoch != epoch:
                continue
            self._leave_decode(seq)
            done.append(self._finish(seq, now))
        self._in_step = []
        return done

    # -- internals ---------------------------------------------------------------

    def _leave_decode(self, seq: _Seq) -> None:
        """Materialise a decoding sequence's progress and take it out of the aggregates."""
        self._n_decode -= 1
        self._sum_base -= seq.base
        seq.known = self._step_no - seq.base
        seq.computed = seq.known - 1
        seq.generated = seq.known - seq.prompt

    def _hit_blocks(self, seq: _Seq) -> int:
        """Leading cached blocks usable by `seq`: at most (known - 1) tokens' worth."""
        limit = min(len(seq.keys), (seq.known - 1) // self._B)
        cached = self._cached
        keys = seq.keys
        n = 0
        while n < limit and keys[n] in cached:
            n += 1
        return n

    def _admit(self, seq: _Seq, hit: int, upto: int) -> bool:
        """Give a waiting `seq` its hit blocks and blocks up to token `upto`; False if short."""
        B = self._B
        need = -(-upto // B) - hit
        hit_ids = [self._cached[k] for k in seq.keys[:hit]]
        free_hits = sum(1 for b in hit_ids if self._ref[b] == 0)
        if need > len(self._free) - free_hits:
            return False
        for b in hit_ids:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        seq.blocks = hit_ids
        seq.computed = hit * B
        seq.hashed = hit
        for _ in range(need):
            seq.blocks.append(self._take())
        stats = self.stats
        if seq.cached < 0:
            seq.cached = hit * B
            stats.prefix_queries += seq.known
            stats.prefix_hits += hit * B
            stats.prompt_tokens += seq.prompt
        else:
            stats.recompute_queries += seq.known
            stats.recompute_hits += hit * B
        seq.state = _PREFILL
        self._running[seq.id] = seq
        self._prefilling.append(seq)
        return True

    def _allocate(self, seq: _Seq, upto: int) -> bool:
        """Blocks for a running prefill up to token `upto`, preempting others if needed."""
        need = -(-upto // self._B) - len(seq.blocks)
        while need > len(self._free):
            victim = self._last_running()
            self._preempt(victim)
            if victim is seq:
                return False
        for _ in range(need):
            seq.blocks.append(self._take())
        return True

    def _grow(self, seq: _Seq) -> bool:
        """One more block for a decoding `seq`, preempting the newest running requests."""
        while not self._free:
            victim = self._last_running()
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks.append(self._take())
        return True

    def _last_running(self) -> _Seq:
        return self._running[next(reversed(self._running))]

    def _take(self) -> int:
        """The free queue's head, its cached hash evicted. Caller checks one exists. O(1)."""
        b, _ = self._free.popitem(last=False)
        h = self._hash[b]
        if h is not None:
            self._hash[b] = None
            self._uncache(h, b)
            if self._record:
                self._removed.append(h)
        self._ref[b] = 1
        return b

    def _uncache(self, h: int, b: int) -> None:
        """Block `b` no longer holds hash `h`; `h` stays cached while another block holds it."""
        dups = self._dups.get(h)
        if dups is None:
            del self._cached[h]
        elif self._cached[h] == b:
            self._cached[h] = dups.pop(0)
        else:
            dups.remove(b)
        if dups is not None and not dups:
            del self._dups[h]

    def _cache_blocks(self, seq: _Seq, upto: int) -> None:
        """Hash `seq`'s full blocks [seq.hashed, upto) that are not cached yet. O(new blocks).

        Blocks past `seq.keys` (generated tokens whose ids the request did not
        bring) get fresh keys, kept per request so a recompute reuses them.
        """
        cached = self._cached
        hashes = self._hash
        keys = seq.keys
        blocks = seq.blocks
        start = seq.hashed
        if upto <= start:
            return
        seq.hashed = upto
        for j in range(start, upto):
            b = blocks[j]
            if hashes[b] is not None:
                continue  # a hit block: cached already
            if j < len(keys):
                k = keys[j]
            else:
                extra = seq.synthetic
                while len(extra) <= j - len(keys):
                    extra.append(next(self._synthetic))
                k = extra[j - len(keys)]
            if k in cached:  # not deduplicated, as vLLM's BlockHashToBlockMap
                self._dups.setdefault(k, []).append(b)
            else:
                cached[k] = b
            hashes[b] = k
            if self._record:
                self._stored.append(k)

    def _release(self, seq: _Seq) -> None:
        """Free `seq`'s blocks tail first: hashed ones to the queue's tail (evicted in LRU
        order, a prompt's tail before its shared head), unhashed ones to its head (reused
        first), as vLLM's `BlockPool.free_blocks`. O(blocks)."""
        ref = self._ref
        free = self._free
        hashes = self._hash
        first: list[int] = []
        for b in reversed(seq.blocks):
            ref[b] -= 1
            if ref[b] == 0:
                if hashes[b] is None:
                    first.append(b)
                else:
                    free[b] = None
        for b in reversed(first):  # prepend, keeping their order
            free[b] = None
            free.move_to_end(b, last=False)
        seq.blocks = []

    def _preempt(self, seq: _Seq) -> None:
        """Recompute preemption: free `seq`'s blocks and queue it first."""
        if seq.state == _DECODE:
            self._leave_decode(seq)
        elif seq.state == _PREFILL:
            self._prefilling.remove(seq)
        del self._running[seq.id]
        self._release(seq)
        seq.computed = 0
        seq.hashed = 0
        seq.state = _WAITING
        seq.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.appendleft(seq)

    def _finish(self, seq: _Seq, now: float) -> Completion:
        full = seq.computed // self._B
        if full:
            self._cache_blocks(seq, full)
        del self._running[seq.id]
        self._release(seq)
        seq.state = _DONE
        self.stats.finished += 1
        return Completion(
            sim=seq.sim,
            prompt_tokens=seq.prompt,
            cached_tokens=seq.cached,
            output_tokens=seq.generated,
            received_s=seq.received_s,
            first_token_s=seq.first_token_s,
            finished_s=now,
            preemptions=seq.preemptions,
        )

    def check_invariants(self) -> None:
        """Reference counts, the free queue and the hash map agree. O(blocks)."""
        n = self.config.num_blocks
        refs = [0] * n
        for seq in self._running.values():
            for b in seq.blocks:
                refs[b] += 1
        assert refs == self._ref, "reference counts disagree with running requests' blocks"
        assert 0 not in self._free and self._hash[0] is None, "the null block is never used"
        for b in range(1, n):
            assert (self._ref[b] == 0) == (b in self._free), f"block {b}: free iff unreferenced"
        for h, b in self._cached.items():
            assert self._hash[b] == h, f"hash map points at block {b} not holding it"
        for h, bs in self._dups.items():
            assert bs and h in self._cached, f"duplicates of {h} without a first block"
            assert all(self._hash[b] == h for b in bs), f"duplicates of {h} not holding it"
        held = len(self._cached) + sum(len(bs) for bs in self._dups.values())
        assert sum(h is not None for h in self._hash) == held
        assert self._n_decode == sum(s.state == _DECODE for s in self._running.values())
        assert self._sum_base == sum(s.base for s in self._running.values() if s.state == _DECODE)
        for seq in self._running.values():
            if seq.state == _DECODE:
                kv = self._step_no - seq.base  # tokens the next step covers
                assert len(seq.blocks) * self._B >= kv - 1
        assert len(self._running) <= self.config.max_num_seqs


def replay_cached_tokens(
    prompts: Sequence[Sequence[int]],
    *,
    num_blocks: int,
    block_size: int = 32,
    output_tokens: int | Sequence[int] = 1,
    output_token_ids: Sequence[Sequence[int] | None] | None = None,
) -> list[int]:
    """The cached tokens this engine model reports for `prompts` served one at a time.

    For comparing the model with a real vLLM engine (simulator fidelity):
    send the same token-id prompts to the engine one after another (each
    finished before the next is sent) and compare its
    `usage.prompt_tokens_details.cached_tokens` with this list. `num_blocks`
    is the engine's `num_gpu_blocks` (the `vllm:cache_config_info` label;
    block 0 is its null block, as here) and `block_size` its block size (32
    on CPU). `output_tokens` is how many tokens each request generated (one
    count for all, or one per request: the responses' `completion_tokens`);
    their blocks take KV space and are cached too. `output_token_ids`, when
    given, are the generated ids per request (None entries allowed): a later
    prompt that resends them (a chat's next turn) then hits their blocks, as
    it would in vLLM. Block keys are this package's chained token hashes,
    which match exactly where vLLM's do. A request that cannot fit in the
    pool (prompt + output over `num_blocks - 1` blocks) raises ValueError,
    as vLLM refuses it. O(total tokens / block_size) plus the engine steps.
    """
    if num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
    n = len(prompts)
    outputs = [output_tokens] * n if isinstance(output_tokens, int) else list(output_tokens)
    if len(outputs) != n:
        raise ValueError(f"output_tokens has {len(outputs)} counts for {n} prompts")
    if output_token_ids is not None and len(output_token_ids) != n:
        raise ValueError(f"output_token_ids has {len(output_token_ids)} entries for {n} prompts")
    longest = max((len(p) + o for p, o in zip(prompts, outputs, strict=True)), default=1)
    config = EngineConfig(
        kv_capacity_tokens=num_blocks * block_size,
        block_size=block_size,
        max_num_seqs=1,
        max_num_batched_tokens=max(block_size, longest),  # a prompt prefills in one step
    )
    engine = Engine(config, PROFILES["qwen3-0.6b-h100"])
    blocker = Blocker()
    namespace = 0
    cached: list[int] = []
    t = 0.0
    for i, prompt in enumerate(prompts):
        tokens = np.asarray(prompt, dtype=np.uint32)
        out = outputs[i]
        generated = None if output_token_ids is None else output_token_ids[i]
        known = tokens
        if generated is not None:
            known = np.concatenate([tokens, np.asarray(generated, dtype=np.uint32)])
        keys = blocker.hash_tokens(known, namespace, block_size).tolist()
        request = Request(model="replay", token_ids=tokens, max_tokens=out)
        sim = SimRequest(arrival_s=t, request=request, output_tokens=out, kind="replay")
        handle = engine.add(sim, keys, t)
        while not engine.finished(handle):
            dt = engine.begin_step(t)
            if dt is None:  # pragma: no cover - a lone request always has a step to run
                raise RuntimeError("the engine stalled")
            t += dt
            engine.end_step(t)
        hit = engine.cached_tokens(handle)
        cached.append(0 if hit is None else hit)
    return cached
