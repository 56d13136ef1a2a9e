"""`FakeEngine`: the simulator's engine stepped against the clock, and the jobs it runs.

One `FakeEngine` owns a `prefixroute.sim.engine.Engine` (paged KV pool,
automatic prefix caching, chunked-prefill scheduler) and an asyncio task that
steps it: `begin_step` gives the step's modelled duration, the task sleeps
until the step's deadline, `end_step` completes it, and the streams whose
requests produced tokens are woken. Latency, batching, queueing, cache hits
and evictions are therefore those of the cost profile.

The reply to a prompt is `max_tokens` lexicon words, one token each, chosen by
a keyed hash of (seed, prompt tokens), so it is deterministic; its token ids
are handed to the engine so the reply's blocks are cached as vLLM caches them,
and a next chat turn that resends the reply verbatim hits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.blocks import Blocker
from prefixroute.devtools.fake_engine.config import FakeEngineConfig, default_model_path
from prefixroute.devtools.fake_engine.metrics import EngineMetrics
from prefixroute.request import Request
from prefixroute.sim.engine import Completion, Engine, SeqHandle
from prefixroute.sim.source import SimRequest
from prefixroute.sim.tokenizer import LEXICON_SIZE, lexicon_text, lexicon_tokens, synthetic_tokens

__all__ = ["WORD_CHARS", "FakeEngine", "Job", "TokenIds"]

_log = logging.getLogger(__name__)
TokenIds = npt.NDArray[np.uint32]

WORD_CHARS = 5  # every lexicon word is " " + four ASCII letters: one token
_SLACK_S = 0.002  # a step that wakes this late still starts at its deadline


@attrs.frozen(slots=True)
class Job:
    """One accepted request: its tokens, its reply and its handle in the engine."""

    handle: SeqHandle
    sim: SimRequest
    prompt_tokens: int
    output_tokens: int
    text: str  # the whole reply: output_tokens words of WORD_CHARS characters

    def word(self, j: int) -> str:
        """The reply's token `j` as text. O(1)."""
        return self.text[j * WORD_CHARS : (j + 1) * WORD_CHARS]


class FakeEngine:
    """One modelled vLLM engine behind an HTTP app (see the module docstring).

    `start` (from the app's lifespan) runs the step loop; `stop` ends it. The
    request handlers call `submit`, then await `wait_done` (non-streamed) or
    iterate `tokens` (streamed). Everything runs on one event loop, so the
    engine needs no lock. Per step the loop does O(1) work plus O(1) per
    finished request and wakes each open stream once (one shared future).
    """

    def __init__(self, config: FakeEngineConfig) -> None:
        self.config = config
        self.cost = config.cost
        self.engine = Engine(config.engine_config(), self.cost)
        self.blocker = Blocker(block_size=config.block_size, seed=config.seed)
        self.model_path = config.model_path or default_model_path(config.model)
        self.started_at = int(time.time())
        self.metrics = EngineMetrics(self.engine, config.model)
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Completion]] = {}  # id(sim) -> non-streamed
        self._aborts: list[SeqHandle] = []
        self._wake: asyncio.Event | None = None
        self._tick: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the step loop ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the step loop on the running event loop."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._tick = loop.create_future()
        self._task = asyncio.create_task(self._run(), name=f"fake-engine-{self.config.engine_id}")

    async def stop(self) -> None:
        """Stop the step loop; pending requests fail with 503 (their futures are cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()
        if self._tick is not None:
            self._tick.cancel()

    @property
    def alive(self) -> bool:
        """Whether the step loop is running (`/health` answers 503 otherwise)."""
        return self._task is not None and not self._task.done()

    @property
    def stopped(self) -> bool:
        """Whether the step loop is gone: `stop` ran, or `start` never did."""
        return self._task is None

    async def _run(self) -> None:
        """The step loop (`_steps`); a crash is logged, and `/health` then fails."""
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("fake engine %s: the step loop failed", self.config.engine_id)
            raise

    async def _steps(self) -> None:
        """Step while there is work; wait on `_wake` when idle.

        Deadline based: a step begun at `start` ends at `start + duration x
        time_scale`, and the next one begins at that deadline when the loop
        wakes within `_SLACK_S` of it (timer granularity: epoll rounds sleeps
        up to whole milliseconds, which would otherwise stretch every short
        decode step), else at the time it woke: a long stall delays the
        steps after it and is never caught up in a burst.
        """
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        engine = self.engine
        scale = self.config.time_scale
        wake = self._wake
        deadline = loop.time()
        while True:
            self._apply_aborts()
            if not engine.has_work():
                wake.clear()
                await wake.wait()
                deadline = loop.time()
                continue
            now = loop.time()
            start = deadline if now - deadline <= _SLACK_S else now
            dt = engine.begin_step(start)
            if dt is None:  # nothing schedulable (cannot happen for requests that fit)
                wake.clear()
                await wake.wait()
                continue
            deadline = start + dt * scale
            delay = deadline - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            now = loop.time()
            for done in engine.end_step(now):
                self._completed(done)
            tick, self._tick = self._tick, loop.create_future()
            assert tick is not None
            if not tick.done():
                tick.set_result(None)

    def _apply_aborts(self) -> None:
        """Aborts queued by disconnected streams: applied between steps, as the engine requires."""
        if self._aborts:
            for handle in self._aborts:
                self.engine.abort(handle)
            self._aborts.clear()

    def _completed(self, done: Completion) -> None:
        self.metrics.completed(done)
        fut = self._waiters.pop(id(done.sim), None)
        if fut is not None and not fut.done():
            fut.set_result(done)

    # -- requests ----------------------------------------------------------------------

    def reply(self, prompt: TokenIds, n: int) -> tuple[str, TokenIds]:
        """The deterministic reply to `prompt`: `n` lexicon words (text, token ids). O(prompt + n).

        Word `j` is entry `j` of `synthetic_tokens(k, n)` modulo the lexicon
        size, where `k` is a 32-bit BLAKE2b of the prompt's ids keyed by the seed.
        """
        digest = hashlib.blake2b(
            np.ascontiguousarray(prompt, dtype=np.uint32).tobytes(),
            digest_size=4,
            key=self.config.seed.to_bytes(8, "little"),
        ).digest()
        words = synthetic_tokens(int.from_bytes(digest, "little"), n) % LEXICON_SIZE
        return lexicon_text(words), lexicon_tokens(words)

    async def submit(
        self, prompt: TokenIds, max_tokens: int, cache_salt: str | None, arrival_s: float
    ) -> Job:
        """Queue a request in the engine (after the profile's frontend latency). O(prompt + output).

        The caller has checked `fits`. The engine's keys cover the prompt and
        the reply (vLLM caches the blocks of generated tokens too).
        """
        text, out_ids = self.reply(prompt, max_tokens)
        request = Request(model=self.config.model, token_ids=prompt, cache_salt=cache_salt)
        blocker = self.blocker
        tokens = np.concatenate((prompt, out_ids))
        keys = blocker.hash_tokens(tokens, blocker.namespace(request), self.config.block_size)
        sim = SimRequest(
            arrival_s=arrival_s,
            request=request,
            output_tokens=max_tokens,
            kind="live",
            output_token_ids=out_ids,
        )
        frontend = self.cost.frontend_latency_s * self.config.time_scale
        if frontend > 0:
            await asyncio.sleep(frontend)
        loop = asyncio.get_running_loop()
        handle = self.engine.add(sim, keys.tolist(), loop.time())
        if self._wake is not None:
            self._wake.set()
        return Job(handle, sim, len(prompt), max_tokens, text)

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether prompt + reply fit in the KV pool at all (vLLM refuses such a request). O(1)."""
        cfg = self.engine.config
        return -(-(prompt_tokens + max_tokens) // cfg.block_size) <= cfg.num_blocks

    async def wait_done(self, job: Job) -> Completion:
        """Wait until `job` finishes; its completion."""
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._waiters[id(job.sim)] = fut
        try:
            return await fut
        finally:
            if not fut.done():  # cancelled: the client went away
                self._waiters.pop(id(job.sim), None)
                self._aborts.append(job.handle)

    async def tokens(self, job: Job) -> AsyncIterator[int]:
        """Yield the count of tokens generated so far each time it grows, until all are out.

        A stream that falls behind skips counts (it gets several tokens at
        once); a stream closed early aborts its request in the engine.
        """
        engine = self.engine
        handle = job.handle
        sent = 0
        try:
            while True:
                n = engine.emitted(handle)
                if n > sent:
                    sent = n
                    yield n
                if sent >= job.output_tokens or engine.finished(handle):
                    return
                tick = self._tick
                assert tick is not None
                # shielded: a cancelled stream must not cancel the tick every stream shares
                await asyncio.shield(tick)
        finally:
            if not engine.finished(handle):
                self._aborts.append(handle)
                if self._wake is not None:
                    self._wake.set()

    def cached_tokens(self, job: Job) -> int:
        """`job`'s prefix-cache hit in tokens (0 before it was scheduled)."""
        cached = self.engine.cached_tokens(job.handle)
        return 0 if cached is None else cached

    def next_id(self, prefix: str) -> str:
        """A response id, unique in this engine: `prefix-<engine id>-<n>`."""
        return f"{prefix}-{self.config.engine_id}-{next(self._ids)}"
