"""The optional compiled path: numba's `njit`, or nothing.

Hot loops that numpy cannot vectorise (the prefix index's probes and LRU,
the block-hash chain) have a compiled kernel beside their pure
Python/numpy path. The kernels are compiled by numba (PyPI `numba`, the
`fast` extra) at first use and cached on disk (`cache=True`: an
implementation detail of the compiler, never an input to a decision). Where
numba is not installed, `AVAILABLE` is False and every caller takes its pure
path, which the tests hold bit-identical to the kernel (they run both:
callers take a `compiled` flag, defaulting to `AVAILABLE`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["AVAILABLE", "njit"]

F = TypeVar("F", bound=Callable[..., Any])

_njit: Callable[..., Any] | None
try:
    from numba import njit as _njit
except ImportError:  # the `fast` extra is not installed: pure paths only
    _njit = None

AVAILABLE: bool = _njit is not None
"""Whether numba is importable, so the compiled kernels can run."""


def njit(fn: F) -> F:
    """`numba.njit(cache=True, nogil=True)(fn)` when `AVAILABLE`, else `fn` unchanged.

    Uncompiled, a kernel still runs (slowly) as plain Python, so a test can
    call it either way; callers pick their pure path when not `AVAILABLE`.
    """
    if _njit is None:
        return fn
    return cast(F, _njit(cache=True, nogil=True)(fn))
