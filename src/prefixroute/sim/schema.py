"""The simulator's document errors: `ScenarioError`, and `Fields` that raise it.

Scenario, workload and trace documents are validated with the core's
`prefixroute.schema` (one system for config and simulator alike); this
module only gives the simulator its own error class, so a command can tell
an invalid scenario from an invalid policy (`ConfigError`).
"""

from __future__ import annotations

from prefixroute.schema import DocumentError
from prefixroute.schema import Fields as _Fields

__all__ = ["Fields", "ScenarioError"]


class ScenarioError(DocumentError):
    """An invalid scenario document; `path` names the field (e.g. `endpoints.count`)."""


class Fields(_Fields):
    """`prefixroute.schema.Fields` over a scenario document: its errors are `ScenarioError`s."""

    error = ScenarioError
