"""Table cells shared by the benchmark scripts: a figure or "-" when it is missing."""

from __future__ import annotations


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return "-" if x is None else f"{x:.1%}"


def ms(x: float | None, digits: int = 1) -> str:
    """Seconds as milliseconds."""
    return "-" if x is None else f"{1000 * x:.{digits}f}"


def signed_ms(x: float | None) -> str:
    """Seconds as signed milliseconds (a bias)."""
    return "-" if x is None else f"{1000 * x:+.1f}"


def times(x: float | None) -> str:
    """A ratio, as 1.23x."""
    return "-" if x is None else f"{x:.2f}x"


def points(x: float | None) -> str:
    """A difference in percentage points, signed."""
    return "-" if x is None else f"{x:+.1f}"


def num(x: float | None) -> str:
    """A number with one decimal."""
    return "-" if x is None else f"{x:.1f}"
