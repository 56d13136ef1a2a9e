"""OpenAI-style error bodies, shared by every driver (importable without a web framework).

The body is the OpenAI API's error object, which OpenAI SDKs parse:
`{"error": {"message", "type", "param", "code"}}`. `type` follows the status
(OpenAI's names: `invalid_request_error`, `authentication_error`,
`rate_limit_error`, ...); `code` is a short stable label such as
`rate-limit` or `upstream-timeout` that clients and dashboards can match on.
The picker sends these bodies in Envoy `ImmediateResponse`s; the HTTP servers
wrap them in a Starlette response (`prefixroute.drivers.gateway.responses`).
Nothing here needs a web framework, so both drivers import it.
"""

from __future__ import annotations

import math

__all__ = ["error_body", "retry_after_header"]

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


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    """The JSON error object for `status`: `{"error": {message, type, param, code}}`."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def retry_after_header(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds)."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))
