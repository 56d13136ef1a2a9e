"""OpenAI-style error responses for the HTTP servers (the gateway, the fake engine).

The body is `prefixroute.drivers.errors.error_body`, shared with the ext_proc
picker; this module adds the Starlette response around it, so it needs the
`gateway` extra and the picker never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse

from prefixroute.drivers.errors import error_body, retry_after_header

__all__ = ["error_response"]


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    retry_after_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error response with an OpenAI-style body and, when given, a `Retry-After` header."""
    out = dict(headers or {})
    if retry_after_s is not None:
        out["retry-after"] = retry_after_header(retry_after_s)
    return JSONResponse(error_body(status, message, code=code, param=param), status, out)
