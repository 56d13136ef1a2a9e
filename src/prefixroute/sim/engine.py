"""A modelled vLLM v1 engine: a paged KV pool with automatic prefix caching and its scheduler.

What is modelled (vLLM v1: `vllm/v1/core/block_pool.py`, `kv_cache_manager.py`,
`sched/scheduler.py`; docs.vllm.ai "Automatic Prefix Caching"):

- The KV pool: `num_blocks` blocks of `block_size` tokens. A full block of
  known tokens gets a hash chained over its whole prefix (here: the block
  keys of `prefixroute.blocks`, which have the same chained property) and
  stays cached after its request ends, until the block is reused. Free blocks
  sit in one queue, least recently freed first; allocation takes the head
  and evicts its hash, if any. A finished request frees its blocks tail
  first, so a prompt's tail is evicted before its shared head. A cache hit on
  a free block takes it back out of the queue (reference counts).
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

Simplifications, each small for routing: decodes go first (vLLM v1 walks
`running` in order, so a long prefill chunk ahead of decodes can take the
budget; vLLM v0's chunked prefill and Sarathi-Serve put decodes first); the
blocks of generated tokens are hashed only when the request brings its
output token ids (a chat reply the next turn resends), and then when it
finishes, not as they fill, so a request preempted mid-decode recomputes its
generated tokens without hits on them; two requests prefilling the same
new block concurrently both compute it, and only the first is cached.

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

from prefixroute.sim.cost import CostModel
from prefixroute.sim.source import SimRequest

__all__ = ["Completion", "Engine", "EngineConfig", "EngineStats", "SeqHandle"]

_WAITING, _PREFILL, _DECODE, _DONE = range(4)


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
        """Blocks in the pool (vLLM's `num_gpu_blocks`)."""
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
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n))
        self._cached: dict[int, int] = {}  # hash -> block id
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
        """Fraction of KV blocks in use by requests (`vllm:kv_cache_usage_perc`)."""
        n = self.config.num_blocks
        return (n - len(self._free)) / n

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
        return True

    # -- driving --------------------------------------------------------------

    def fits(self, sim: SimRequest) -> bool:
        """Whether `sim` (prompt + output) fits in the pool at all; vLLM refuses it otherwise."""
        tokens = len(sim.request.token_ids) + sim.output_tokens  # type: ignore[arg-type]
        return -(-tokens // self._B) <= self.config.num_blocks

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
        """The least recently freed block, its cached hash evicted. Caller checks it exists."""
        b, _ = self._free.popitem(last=False)
        h = self._hash[b]
        if h is not None:
            self._hash[b] = None
            del self._cached[h]
            if self._record:
                self._removed.append(h)
        self._ref[b] = 1
        return b

    def _cache_blocks(self, seq: _Seq, upto: int) -> None:
        """Hash `seq`'s full blocks [seq.hashed, upto) that are not cached yet. O(new blocks)."""
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
                continue
            k = keys[j]
            if k in cached:
                continue  # another block holds it (computed twice concurrently)
            hashes[b] = k
            cached[k] = b
            if self._record:
                self._stored.append(k)

    def _release(self, seq: _Seq) -> None:
        """Free `seq`'s blocks tail first, so its tail is evicted before its head."""
        ref = self._ref
        free = self._free
        for b in reversed(seq.blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
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
        full = min(seq.computed // self._B, len(seq.keys))
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
        for b in range(n):
            assert (self._ref[b] == 0) == (b in self._free), f"block {b}: free iff unreferenced"
        for h, b in self._cached.items():
            assert self._hash[b] == h, f"hash map points at block {b} not holding it"
        assert sum(h is not None for h in self._hash) == len(self._cached)
        assert self._n_decode == sum(s.state == _DECODE for s in self._running.values())
        assert self._sum_base == sum(s.base for s in self._running.values() if s.state == _DECODE)
        for seq in self._running.values():
            if seq.state == _DECODE:
                kv = self._step_no - seq.base  # tokens the next step covers
                assert len(seq.blocks) * self._B >= kv - 1
        assert len(self._running) <= self.config.max_num_seqs
