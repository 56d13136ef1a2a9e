"""Checks for scenario documents: every error is a `ScenarioError` naming its path.

Scenario files (YAML or JSON) are user input: an unknown key, a wrong type or
an out-of-range number is refused with the path of the field
(`workload.arrival.rate_rps`), never a traceback. `Fields` reads one mapping
and remembers which keys were read, so `done()` can refuse the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["Fields", "ScenarioError"]


class ScenarioError(ValueError):
    """An invalid scenario document; `path` names the field (e.g. `endpoints.count`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Fields:
    """Typed reads from one mapping of a scenario document.

    Each getter checks type and range and returns the default when the key is
    absent. `done()` raises for any key no getter asked for, so typos fail.
    """

    def __init__(self, value: object, path: str) -> None:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ScenarioError(path, f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise ScenarioError(path, f"keys must be strings, got {key!r}")
        self.doc: Mapping[str, Any] = value
        self.path = path
        self._read: set[str] = set()

    def where(self, key: str) -> str:
        """The path of `key` inside this mapping."""
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        """Whether `key` is present (marks it read)."""
        self._read.add(key)
        return key in self.doc

    def raw(self, key: str, default: Any = None) -> Any:
        """The value at `key` unchecked, or `default`."""
        self._read.add(key)
        return self.doc.get(key, default)

    def sub(self, key: str) -> Fields:
        """The mapping at `key` (an empty one when absent)."""
        return Fields(self.raw(key), self.where(key))

    def number(
        self,
        key: str,
        default: float,
        *,
        min: float | None = None,
        max: float | None = None,
        above: float | None = None,
    ) -> float:
        """A finite number within the bounds (`above` is exclusive)."""
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(self.where(key), f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ScenarioError(self.where(key), f"must be finite, got {value!r}")
        if min is not None and value < min:
            raise ScenarioError(self.where(key), f"must be >= {min:g}, got {value:g}")
        if max is not None and value > max:
            raise ScenarioError(self.where(key), f"must be <= {max:g}, got {value:g}")
        if above is not None and value <= above:
            raise ScenarioError(self.where(key), f"must be > {above:g}, got {value:g}")
        return value

    def integer(self, key: str, default: int, *, min: int | None = None) -> int:
        """An integer, at least `min`."""
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(self.where(key), f"must be an integer, got {value!r}")
        if min is not None and value < min:
            raise ScenarioError(self.where(key), f"must be >= {min}, got {value}")
        return value

    def string(self, key: str, default: str, *, choices: tuple[str, ...] = ()) -> str:
        """A non-empty string, one of `choices` when given."""
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise ScenarioError(self.where(key), f"must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise ScenarioError(
                self.where(key), f"must be one of {', '.join(choices)}, got {value!r}"
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """A boolean."""
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ScenarioError(self.where(key), f"must be true or false, got {value!r}")
        return value

    def range(
        self, key: str, default: tuple[float, float], *, min: float = 0.0
    ) -> tuple[float, float]:
        """A `[low, high]` pair of numbers (or one number for both) with min <= low <= high."""
        value = self.raw(key, list(default))
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value, value]
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ScenarioError(self.where(key), f"must be [low, high], got {value!r}")
        pair = Fields({"low": value[0], "high": value[1]}, self.where(key))
        low = pair.number("low", 0.0, min=min)
        high = pair.number("high", 0.0, min=low)
        return low, high

    def done(self) -> None:
        """Refuse every key no getter read."""
        for key in self.doc:
            if key not in self._read:
                allowed = ", ".join(sorted(self._read)) or "none"
                raise ScenarioError(self.where(key), f"unknown key (allowed: {allowed})")
