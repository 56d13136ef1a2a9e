"""What the simulator consumes: `SimRequest` values and the `Source` protocol.

A `Source` hands the simulator requests in arrival order and hears back when
each one finishes, so closed-loop users (who wait for an answer, think, and
ask again) and multi-turn chats (whose next turn carries the previous reply)
are modelled, not just open-loop arrivals. The synthetic generators
(`prefixroute.sim.workload`) and the trace replay (`prefixroute.sim.trace`)
implement it; the engine and the simulation read it. It has a module of its
own so that none of them imports another to share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.request import Request

__all__ = ["SimRequest", "Source"]


@attrs.frozen(slots=True, eq=False)
class SimRequest:
    """One simulated request: when it arrives, what the router sees, what the engine does.

    `request` carries `token_ids` always (the engine computes on tokens) and
    `prompt` when the request was born as text (text-mode policies hash it).
    The engine generates exactly `output_tokens` tokens; when
    `output_token_ids` is given (a chat reply the next turn will resend) the
    engine caches the blocks of prompt + output, as vLLM does. `user` is the
    closed-loop user or conversation that sent it (None for open-loop
    arrivals); `kind` labels the request for reports (`tenant`, `cold`,
    `chat`, `shared-prefix`, `trace`).
    """

    arrival_s: float
    request: Request
    output_tokens: int
    kind: str
    user: int | None = None
    output_token_ids: npt.NDArray[np.uint32] | None = None


class Source(Protocol):
    """A workload: arrivals in time order, and follow-ups when requests finish."""

    def arrivals(self) -> Iterator[SimRequest]:
        """Requests known ahead of time, in non-decreasing `arrival_s` (may be lazy)."""
        ...

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> SimRequest | None:
        """The request `done`'s user sends next (arriving after `finished_s`), if any."""
        ...
