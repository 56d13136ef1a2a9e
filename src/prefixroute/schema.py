"""Validating decoded documents: every refusal is a `DocumentError` naming its path.

Config documents, plugin parameters and simulator scenarios are user input
(decoded YAML or JSON). An unknown key, a wrong type or an out-of-range value
is refused with the dotted path of the field (`profiles[0].plugins[1].weight`,
`workload.arrival.rate_rps`), never a traceback. Two tools, both structural:

- `Fields` reads one mapping with typed getters and remembers which keys
  were read, so `done()` (or `allow()` up front) refuses the rest.
- `build` constructs an object (an attrs class or any callable) from a
  mapping of keyword arguments. Each argument is checked on its own first,
  against its attrs field's converter and validator (or, for a plain
  callable, by a call with that argument alone), so a refusal is charged to
  the argument that caused it; what only fails in combination is charged to
  the mapping. No error location is ever read back out of a message.

Each user of this module has its own error class (`ConfigError`,
`ScenarioError`, `PluginError`), a subclass of `DocumentError`; a `Fields`
subclass sets `error` to raise it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, TypeVar

import attrs

__all__ = ["DocumentError", "Fields", "build", "evolve", "join", "json_type_ok", "parameters"]

T = TypeVar("T")


class DocumentError(ValueError):
    """An invalid document; `path` names the field (empty: the whole document).

    `message` is the reason without the path; `str()` is `path: message`.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def join(path: str, key: str) -> str:
    """The path of `key` inside the mapping at `path`."""
    return f"{path}.{key}" if path else key


def json_type_ok(value: object, expected: str) -> bool | None:
    """Whether a decoded JSON/YAML `value` can be of type `expected`.

    `expected` is `bool`, `int`, `float` (an int is fine), `str`, `list` or `mapping`;
    None for any other name (not checked). Booleans are not numbers here:
    YAML's `true` must not pass for 1, nor the string "false" for a boolean.
    """
    if expected == "bool":
        return isinstance(value, bool)
    if expected == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            float(value)  # a 400-digit int is no float
        except OverflowError:
            return False
        return True
    if expected == "str":
        return isinstance(value, str)
    if expected == "mapping":
        return isinstance(value, Mapping)
    if expected == "list":
        return isinstance(value, list)
    return None


class Fields:
    """Typed reads from one mapping of a document.

    Each getter checks type and range and returns the default when the key is
    absent. `done()` raises for any key no getter asked for, so typos fail;
    `allow()` refuses unknown keys before anything is read. Errors are
    instances of the class attribute `error` (subclasses set their own);
    `sub()` keeps the class. Every getter is O(1).
    """

    error: ClassVar[type[DocumentError]] = DocumentError

    def __init__(self, value: object, path: str) -> None:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.error(path, f"keys must be strings, got {key!r}")
        self.doc: Mapping[str, Any] = value
        self.path = path
        self._read: set[str] = set()

    def where(self, key: str) -> str:
        """The path of `key` inside this mapping."""
        return join(self.path, key)

    def has(self, key: str) -> bool:
        """Whether `key` is present (marks it read)."""
        self._read.add(key)
        return key in self.doc

    def raw(self, key: str, default: Any = None) -> Any:
        """The value at `key` unchecked, or `default`."""
        self._read.add(key)
        return self.doc.get(key, default)

    def sub(self, key: str) -> Self:
        """The mapping at `key` (an empty one when absent)."""
        return type(self)(self.raw(key), self.where(key))

    def typed(self, key: str, expected: str, default: Any = None) -> Any:
        """The value at `key`, of JSON type `expected` (see `json_type_ok`), or `default`."""
        if not self.has(key):
            return default
        value = self.doc[key]
        if json_type_ok(value, expected) is False:
            raise self.error(self.where(key), f"must be of type {expected}, got {value!r}")
        return value

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
        if not json_type_ok(value, "float"):
            raise self.error(self.where(key), f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(self.where(key), f"must be finite, got {value!r}")
        if min is not None and value < min:
            raise self.error(self.where(key), f"must be >= {min:g}, got {value:g}")
        if max is not None and value > max:
            raise self.error(self.where(key), f"must be <= {max:g}, got {value:g}")
        if above is not None and value <= above:
            raise self.error(self.where(key), f"must be > {above:g}, got {value:g}")
        return value

    def integer(self, key: str, default: int, *, min: int | None = None) -> int:
        """An integer, at least `min`."""
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(self.where(key), f"must be an integer, got {value!r}")
        if min is not None and value < min:
            raise self.error(self.where(key), f"must be >= {min}, got {value}")
        return value

    def string(self, key: str, default: str, *, choices: tuple[str, ...] = ()) -> str:
        """A non-empty string, one of `choices` when given."""
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(self.where(key), f"must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.error(self.where(key), f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """A boolean."""
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(self.where(key), f"must be true or false, got {value!r}")
        return value

    def items(self, key: str, *, required: bool = False) -> list[Any]:
        """The list at `key` (empty when absent; non-empty when `required`)."""
        value = self.raw(key, [])
        if not isinstance(value, list) or (required and not value):
            what = "a non-empty list" if required else "a list"
            raise self.error(self.where(key), f"must be {what}, got {value!r}")
        return value

    def range(
        self, key: str, default: tuple[float, float], *, min: float = 0.0
    ) -> tuple[float, float]:
        """A `[low, high]` pair of numbers (or one number for both) with min <= low <= high."""
        value = self.raw(key, list(default))
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value, value]
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise self.error(self.where(key), f"must be [low, high], got {value!r}")
        pair = type(self)({"low": value[0], "high": value[1]}, self.where(key))
        low = pair.number("low", 0.0, min=min)
        high = pair.number("high", 0.0, min=low)
        return low, high

    def allow(self, *keys: str) -> None:
        """Refuse now every key not in `keys` (they still count as unread)."""
        for key in self.doc:
            if key not in keys:
                allowed = ", ".join(sorted(keys)) or "none"
                raise self.error(self.where(key), f"unknown key (allowed: {allowed})")

    def done(self) -> None:
        """Refuse every key no getter read."""
        for key in self.doc:
            if key not in self._read:
                allowed = ", ".join(sorted(self._read)) or "none"
                raise self.error(self.where(key), f"unknown key (allowed: {allowed})")


def parameters(cls: type) -> dict[str, attrs.Attribute[Any]]:
    """An attrs class's parameters: its `init=True` fields by keyword (alias).

    Fields declared `init=False` are the instance's state, not parameters.
    """
    return {f.alias: f for f in attrs.fields(cls) if f.init}


def _annotation_name(annotation: object) -> str:
    if isinstance(annotation, str):
        return annotation
    return str(getattr(annotation, "__name__", ""))


def _check_alone(
    factory: Callable[..., object], key: str, value: object, base: Mapping[str, Any]
) -> None:
    """Check one argument on its own; TypeError/ValueError if it is refused.

    For an attrs class: the field's converter, then its validator (called
    without an instance; a validator that needs one is left to the full
    construction). For another callable: a call with `base` and this one
    argument, where a ValueError is a refusal of the argument and a
    TypeError means the callable cannot take it alone (other arguments are
    required): that case is left to the full construction.
    """
    if isinstance(factory, type) and attrs.has(factory):
        field = parameters(factory)[key]
        converter: Any = field.converter
        if converter is not None:
            if getattr(converter, "takes_self", False) or getattr(converter, "takes_field", False):
                return  # needs the instance: left to the full construction
            value = converter(value)
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except AttributeError:
                return
        return
    try:
        factory(**base, **{key: value})
    except TypeError:
        return


def build(
    factory: Callable[..., T],
    values: Mapping[str, Any],
    path: str,
    *,
    error: type[DocumentError] = DocumentError,
    base: Mapping[str, Any] | None = None,
) -> T:
    """`factory(**base, **values)`, each refusal an `error` naming its path.

    `values` come from the document at `path`; `base` are arguments that do
    not (already-built parts). For an attrs class, a key that is not one of
    its parameters is refused, and so is a value whose JSON type cannot be
    the field's annotated `bool`/`int`/`float`/`str`/`list`. Then each value
    is checked alone (see the module docstring) and refused at
    `path.key`; finally the whole construction runs, and its refusal (a rule
    across fields) is charged to `path`. O(len(values)) checks plus one
    construction; a plain callable is called once more per value.
    """
    base = base or {}
    if isinstance(factory, type) and attrs.has(factory):
        fields = parameters(factory)
        for key, value in values.items():
            field = fields.get(key)
            if field is None:
                known = ", ".join(sorted(fields)) or "none"
                raise error(join(path, key), f"unknown parameter (parameters: {known})")
            expected = _annotation_name(field.type)
            if json_type_ok(value, expected) is False:
                raise error(join(path, key), f"must be of type {expected}, got {value!r}")
    for key, value in values.items():
        try:
            _check_alone(factory, key, value, base)
        except DocumentError as exc:  # a structured value's own path, below the key
            where = join(path, key)
            raise error(join(where, exc.path) if exc.path else where, exc.message) from exc
        except (TypeError, ValueError) as exc:
            raise error(join(path, key), str(exc)) from exc
    try:
        return factory(**base, **values)
    except (TypeError, ValueError) as exc:
        raise error(path, str(exc)) from exc


def evolve(
    instance: T,
    changes: Mapping[str, Any],
    path: str,
    *,
    error: type[DocumentError] = DocumentError,
) -> T:
    """`attrs.evolve(instance, **changes)` checked as `build` checks: a refused change is
    an `error` at `path.key`.

    For overriding a part built from a document with values from elsewhere
    (command-line flags). The unchanged fields pass through the class's
    converters again, so use it on classes whose converters are idempotent.
    """
    cls = type(instance)
    unchanged = {
        alias: getattr(instance, field.name)
        for alias, field in parameters(cls).items()
        if alias not in changes
    }
    return build(cls, changes, path, error=error, base=unchanged)
