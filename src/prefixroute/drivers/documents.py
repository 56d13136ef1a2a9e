"""Reading document files: a YAML or JSON file becomes the mapping the core validates.

The core (`prefixroute.config.load_config`) takes a mapping and reads no
file; drivers, the CLI and the simulator read config, scenario and policy
files here. YAML is a superset of JSON, so one reader serves both. Errors
(unreadable file, not UTF-8, not YAML, not a mapping) are `ConfigError`s
unless the caller names its own `DocumentError` class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from prefixroute.config import ConfigError
from prefixroute.schema import DocumentError

__all__ = ["read_document"]


def read_document(
    source: str | os.PathLike[str],
    *,
    error: type[DocumentError] = ConfigError,
    what: str = "config file",
) -> Mapping[str, Any]:
    """The mapping in a YAML/JSON file (empty for an empty file); `error` otherwise.

    `what` names the kind of file in messages ("cannot read config file ...").
    """
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error("", f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error("", f"{what} {path} is not UTF-8 text: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error("", f"{path} is not valid YAML/JSON: {_yaml_problem(exc)}") from exc

    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise error("", f"{path} must hold a mapping, got {type(doc).__name__}")
    for key in doc:
        if not isinstance(key, str):
            raise error("", f"{path}: keys must be strings, got {key!r}")
    return doc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: `line L, column C: problem` (PyYAML's own is several)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
