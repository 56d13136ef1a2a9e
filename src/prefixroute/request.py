"""The request model: `Request` (what to route), `Usage` (what happened).

Both are plain frozen values: they check their own fields and parse no wire
format. The OpenAI parser, `prefixroute.openai.parse_openai`, builds a
`Request` from a chat-completions or completions body (plus HTTP headers);
every driver uses it, so the gateway, the ext_proc server and the simulator
see identical requests. Invalid fields raise `RequestError`, whose `status` is
the HTTP status a driver answers with (400 for the client's mistakes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

__all__ = ["Request", "RequestError", "Usage", "is_text"]

TokenIds = npt.NDArray[np.uint32]


class RequestError(ValueError):
    """A request the router cannot use; `status` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int = 400, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def _token_array(value: Sequence[int] | npt.NDArray[Any] | None) -> TokenIds | None:
    if value is None:
        return None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise RequestError(
            "token_ids must be a flat sequence of integers", field="token_ids"
        ) from exc
    if arr.ndim != 1:
        raise RequestError("token_ids must be a flat sequence of integers", field="token_ids")
    if arr.size == 0:
        raise RequestError("token_ids must not be empty", field="token_ids")
    integral = np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_
    if not integral and not (arr.dtype == object and all(_is_int(v) for v in arr)):
        raise RequestError("token_ids must be integers", field="token_ids")
    if int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF:
        raise RequestError("token_ids must be within [0, 2**32)", field="token_ids")
    out = arr.astype(np.uint32, copy=True)
    out.flags.writeable = False
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


_ID_FIELDS = ("tenant", "session", "lora", "request_id")
_INT64 = 2**63  # counts and priorities stay int64, so the router's float arithmetic cannot overflow


def is_text(value: str) -> bool:
    """Whether `value` encodes as UTF-8 (no lone surrogates), as every id must. O(len)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tokens_eq(a: TokenIds | None, b: TokenIds | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a, b))


@attrs.frozen(slots=True)
class Request:
    """One inference request, as the router sees it.

    Give `prompt` (text; `prefixroute.openai.render_messages` renders chat messages) or
    `token_ids` (any integer sequence, stored as a read-only uint32 array),
    or both. `priority` below zero marks the request sheddable. `cache_salt`
    and `lora` are folded into the block keys, so requests with different
    salts or adapters never share a prefix. `max_tokens` is the expected
    output length, when known (below 2**63, as `priority` lies in
    [-2**63, 2**63)). Invalid fields raise `RequestError` naming the field;
    ids (`tenant`, `session`, `lora`, `request_id`) must be valid text (a
    lone surrogate, which JSON can carry, is refused: ids are hashed and
    exported as UTF-8), while `prompt`, `model` and `cache_salt` may hold
    any string.

    Latency objectives (issue 16; drivers read them from `x-slo-ttft-ms`,
    `x-slo-tpot-ms` and `x-prediction-based-scheduling`, as llm-d does):
    `slo_ttft_s` and `slo_tpot_s` are the client's objectives for time to
    first token and time per output token, in seconds (> 0, finite; None:
    the tenant's configured default, if any). `predictive` turns the
    predicted-latency plugins on (True) or off (False) for this request;
    None leaves it to their configuration.
    """

    model: str
    prompt: str | None = None
    token_ids: TokenIds | None = attrs.field(
        default=None,
        converter=_token_array,
        eq=attrs.cmp_using(eq=_tokens_eq),
        hash=False,
        repr=lambda t: "None" if t is None else f"<{len(t)} tokens>",
    )
    tenant: str = "default"
    session: str | None = None
    priority: int = 0
    cache_salt: str | None = None
    lora: str | None = None
    max_tokens: int | None = None
    request_id: str | None = None
    stream: bool = False
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    predictive: bool | None = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise RequestError("model must be a non-empty string", field="model")
        if self.prompt is None and self.token_ids is None:
            raise RequestError("a request needs a prompt or token_ids", field="prompt")
        max_tokens = self.max_tokens
        if max_tokens is not None and not (_is_int(max_tokens) and 0 <= max_tokens < _INT64):
            raise RequestError(
                "max_tokens must be an integer >= 0, below 2**63", field="max_tokens"
            )
        if not (_is_int(self.priority) and -_INT64 <= self.priority < _INT64):
            raise RequestError("priority must be an integer in [-2**63, 2**63)", field="priority")
        if not isinstance(self.tenant, str) or not self.tenant:
            raise RequestError("tenant must be a non-empty string", field="tenant")
        for name in ("prompt", "session", "cache_salt", "lora", "request_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RequestError(f"{name} must be a string or None", field=name)
        for name in _ID_FIELDS:  # ids are hashed and exported as UTF-8
            value = getattr(self, name)
            if value is not None and not is_text(value):
                raise RequestError(f"{name} must be valid text (no lone surrogates)", field=name)
        if not isinstance(self.stream, bool):
            raise RequestError("stream must be a boolean", field="stream")
        for name in ("slo_ttft_s", "slo_tpot_s"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and 0.0 < value < math.inf
            ):
                raise RequestError(f"{name} must be a number of seconds > 0", field=name)
        if self.predictive is not None and not isinstance(self.predictive, bool):
            raise RequestError("predictive must be a boolean or None", field="predictive")


def _check_tokens(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"Usage.{attr.name} must be an integer >= 0, got {value!r}")


def _check_seconds(_inst: object, attr: attrs.Attribute[float | None], value: float | None) -> None:
    if value is None:
        return
    if not (isinstance(value, int | float) and not isinstance(value, bool)) or not (
        0.0 <= value < math.inf
    ):
        raise ValueError(f"Usage.{attr.name} must be a finite number >= 0 or None, got {value!r}")


def _check_ok(_inst: object, attr: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Usage.{attr.name} must be a boolean, got {value!r}")


@attrs.frozen(slots=True)
class Usage:
    """What serving a request really cost, as the engine reported it.

    `cached_tokens` is the engine's prefix-cache hit for this request
    (`usage.prompt_tokens_details.cached_tokens` in vLLM's OpenAI API).
    Latencies are seconds, None when unknown; `ok` is False for a failed
    request (an error or a dropped stream).

    Checked at construction (ValueError naming the field): token counts are
    integers >= 0, latencies finite and >= 0 (or None), `ok` a boolean.
    `cached_tokens` above the prompt is accepted here and clamped to the
    prompt when `Router.on_complete` settles it (an engine's report cannot
    make a hit rate exceed 1).
    """

    prompt_tokens: int = attrs.field(default=0, validator=_check_tokens)
    cached_tokens: int = attrs.field(default=0, validator=_check_tokens)
    completion_tokens: int = attrs.field(default=0, validator=_check_tokens)
    ttft_s: float | None = attrs.field(default=None, validator=_check_seconds)
    e2e_s: float | None = attrs.field(default=None, validator=_check_seconds)
    ok: bool = attrs.field(default=True, validator=_check_ok)
