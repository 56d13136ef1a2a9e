"""How a bench run goes: `LoadConfig`, validated in one place.

`run_load` builds one from its keyword arguments and the command line
builds one from its flags before any URL is tried, so both refuse the same
values with the same check. An invalid value raises `LoadConfigError`, which
carries the field's name (and the names of the other fields its message
refers to) apart from the text, so the command line can say `--think`
where the library says `think_s` without parsing a message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from prefixroute.devtools.bench.send import SPREADS

__all__ = ["PROCESSES", "LoadConfig", "LoadConfigError"]

PROCESSES = ("poisson", "constant")
"""Open-loop arrival processes."""


class LoadConfigError(ValueError):
    """An invalid `LoadConfig` field: `field` names it, `describe` words it with other names.

    `problem` may name other fields as `{field}` placeholders; `got` (the
    refused value, if any) is appended as its repr, never formatted.
    """

    def __init__(self, field: str, problem: str, got: Any = None, *, has_got: bool = True) -> None:
        self.field = field
        self.problem = problem
        self.got = got
        self.has_got = has_got
        super().__init__(self.describe({}))

    def describe(self, names: Mapping[str, str]) -> str:
        """The message, each field called `names.get(field, field)` (e.g. `--think`)."""
        known = _FieldNames(names)
        text = f"{known[self.field]} {self.problem.format_map(known)}"
        return f"{text}, got {_shown(self.got)}" if self.has_got else text


class _FieldNames(dict[str, str]):
    def __init__(self, names: Mapping[str, str]) -> None:
        super().__init__(names)

    def __missing__(self, key: str) -> str:
        return key


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(_shown(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not 0 < value < math.inf:
        raise LoadConfigError(attribute.name, "must be finite and > 0", value)


def _at_least_one(_: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 1:
        raise LoadConfigError(attribute.name, "must be >= 1", value)


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is not None and value not in choices:
            raise LoadConfigError(attribute.name, f"must be one of {', '.join(choices)}", value)

    return check


def _think(_: Any, attribute: attrs.Attribute[Any], value: tuple[float, float] | None) -> None:
    if value is not None and not 0 <= value[0] <= value[1] < math.inf:
        raise LoadConfigError(attribute.name, "must be LOW HIGH with 0 <= LOW <= HIGH", value)


def _ramp(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value < math.inf:
        raise LoadConfigError(attribute.name, "must be finite and >= 0", value)


@attrs.frozen
class LoadConfig:
    """The settings of one run (the `run_load` keywords of the same names).

    At most one of `rate_rps` (open loop; `process` poisson, the default,
    or constant) and `users` (closed loop; `think_s`, default 0.5-2 s,
    between an answer and the next request; users start evenly over
    `ramp_s`); with neither, the source's own timing drives the run.
    `process` is refused without `rate_rps` and `think_s` without `users`:
    given there, they would be silently ignored. `max_tokens` overrides every
    request's; `timeout_s` bounds waiting for a connection and any silence
    while reading; `max_in_flight` bounds outstanding requests.
    """

    rate_rps: float | None = attrs.field(default=None, validator=_positive)
    users: int | None = attrs.field(default=None, validator=_at_least_one)
    duration_s: float = attrs.field(default=10.0, validator=_positive)
    max_requests: int | None = attrs.field(default=None, validator=_at_least_one)
    stream: bool = True
    seed: int = 0
    process: str | None = attrs.field(default=None, validator=_one_of(PROCESSES))
    think_s: tuple[float, float] | None = attrs.field(default=None, validator=_think)
    ramp_s: float = attrs.field(default=1.0, validator=_ramp)
    max_tokens: int | None = attrs.field(default=None, validator=_at_least_one)
    timeout_s: float = attrs.field(default=30.0, validator=_positive)
    max_in_flight: int = attrs.field(default=4096, validator=_at_least_one)
    spread: str = attrs.field(default="round-robin", validator=_one_of(SPREADS))

    def __attrs_post_init__(self) -> None:
        if self.rate_rps is not None and self.users is not None:
            raise LoadConfigError(
                "rate_rps", "and {users} exclude each other: open or closed loop", has_got=False
            )
        if self.process is not None and self.rate_rps is None:
            raise LoadConfigError("process", "is for open loop: give {rate_rps}", has_got=False)
        if self.think_s is not None and self.users is None:
            raise LoadConfigError("think_s", "is for closed loop: give {users}", has_got=False)

    @property
    def arrivals(self) -> str:
        """The open-loop arrival process: `process`, else poisson."""
        return self.process or "poisson"

    @property
    def think(self) -> tuple[float, float]:
        """The closed-loop think time range: `think_s`, else 0.5-2 s (the seed's Locust users)."""
        return self.think_s or (0.5, 2.0)
