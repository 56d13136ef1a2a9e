"""OpenAI-style error bodies, shared by every driver (importable without a web framework).

The body is the OpenAI API's error object, which OpenAI SDKs parse:
`{"error": {"message", "type", "param", "code"}}`. `type` follows the status
(OpenAI's names: `invalid_request_error`, `authentication_error`,
`rate_limit_error`, ...); `code` is a short stable label such as
`rate-limit` or `upstream-timeout` that clients and dashboards can match on.
The picker sends these bodies in Envoy `ImmediateResponse`s; the HTTP servers
wrap them in a Starlette response (`prefixroute.drivers.gateway.responses`).
Nothing here needs a web framework, so both drivers import it.

Client input is never echoed whole: `clip` cuts a client string quoted in a
message to `MAX_ECHO_CHARS`, and `error_body` cuts the whole message to
`MAX_MESSAGE_CHARS` whatever built it (a megabyte model name must not come
back in a megabyte error).
"""

from __future__ import annotations

import math

__all__ = ["MAX_ECHO_CHARS", "MAX_MESSAGE_CHARS", "clip", "error_body", "retry_after_header"]

MAX_ECHO_CHARS = 256
"""Most characters of one client-supplied string quoted in an error message."""
MAX_MESSAGE_CHARS = 1024
"""Most characters of an error message (longer ones end in "...")."""

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def clip(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` cut to `limit` characters, "..." marking a cut; lone surrogates become "\\ud800"
    escapes, so the result always encodes as UTF-8. O(limit)."""
    text = value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) < len(value) or len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    return text


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    """The JSON error object for `status`: `{"error": {message, type, param, code}}`.

    `message` and `param` are cut to `MAX_MESSAGE_CHARS` and `MAX_ECHO_CHARS` (`clip`).
    """
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = clip(message, MAX_MESSAGE_CHARS)
    param = None if param is None else clip(param)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def retry_after_header(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds)."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))
