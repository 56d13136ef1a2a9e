"""The drivers' own config sections (`server`, `scrape`, `extproc`, ...), read like the core's.

The core's `load_config` reads the router's sections; the drivers read the
rest of the same document with the same validator (`prefixroute.schema`), so
an error names its path the same way (`scrape.interval_s`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from prefixroute.config import ConfigError, read_section
from prefixroute.schema import build

__all__ = ["DRIVER_SECTIONS", "build_section", "positive_number"]

DRIVER_SECTIONS = (
    "server",
    "endpoints",
    "scrape",
    "identity",
    "metrics",
    "kv_events",
    "models",
    "shared_state",
)
"""The top-level sections a `DriverConfig` reads itself; the rest is the router's document."""


def positive_number(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    """An attrs validator for drivers' config fields: a finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attr.name} must be a finite number > 0, got {value!r}")


def build_section(doc: Mapping[str, Any], name: str, schema: Mapping[str, str], cls: Any) -> Any:
    """`cls(**read_section(doc, name, schema))`; a refused value is a ConfigError at its path."""
    return build(cls, read_section(doc, name, schema), name, error=ConfigError)
