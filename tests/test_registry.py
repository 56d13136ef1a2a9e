from __future__ import annotations

import attrs
import pytest

from prefixroute import PluginError, Registry, default_registry
from prefixroute.registry import plugin_kind
from prefixroute.scorers import QueueDepthScorer


def test_builtins_are_kebab_case_and_refuse_duplicates() -> None:
    registry = default_registry()
    assert "prefix-affinity-scorer" in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register("prefix-affinity-scorer", QueueDepthScorer)
    with pytest.raises(ValueError, match="kebab-case"):
        registry.register("MyScorer", QueueDepthScorer)


def test_create_checks_types_and_parameters() -> None:
    registry = default_registry()
    assert registry.create("queue-depth-scorer", {"scale": 2.0}) == QueueDepthScorer(scale=2.0)
    with pytest.raises(PluginError, match="unknown plugin type"):
        registry.create("nope")
    with pytest.raises(PluginError) as err:
        registry.create("queue-depth-scorer", {"sclae": 2})
    assert err.value.field == "sclae"
    with pytest.raises(PluginError, match="scale"):
        registry.create("queue-depth-scorer", {"scale": 0})


def test_custom_plugins_register_and_must_implement_one_protocol() -> None:
    class Both:
        def score(self, ctx: object, candidates: object) -> list[float]:
            return []

        def filter(self, ctx: object, candidates: object) -> list[object]:
            return []

    registry = Registry()
    registry.register("both-ways", Both)
    with pytest.raises(PluginError, match="exactly one"):
        registry.create("both-ways")
    with pytest.raises(PluginError, match="exactly one"):
        plugin_kind(object())
    assert registry.types() == ["both-ways"]


@attrs.frozen
class _Picky:
    """A scorer whose validators' messages name no field, or the wrong one."""

    low: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    high: float = attrs.field(default=1.0)
    mute: int = attrs.field(default=0)

    @high.validator
    def _high(self, attr: attrs.Attribute[float], value: float) -> None:
        if value > 10:
            raise ValueError("'low' is fine, this is not")  # names the other field

    @mute.validator
    def _mute(self, attr: attrs.Attribute[int], value: int) -> None:
        if value:
            raise ValueError("no")

    def __attrs_post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")

    def score(self, ctx: object, candidates: list[object]) -> list[float]:
        return [0.0] * len(candidates)


def test_the_refused_parameter_comes_from_structure_not_from_the_message() -> None:
    registry = Registry()
    registry.register("picky-scorer", _Picky)
    cases: list[tuple[dict[str, object], str]] = [
        ({"low": 0.5, "high": 99.0}, "high"),  # the message names 'low'
        ({"mute": 1}, "mute"),  # the message names nothing
        ({"low": -1.0, "mute": 0}, "low"),
        ({"high": "x"}, "high"),  # JSON type against the annotation
    ]
    for params, field in cases:
        with pytest.raises(PluginError) as err:
            registry.create("picky-scorer", params)
        assert err.value.field == field, params
    with pytest.raises(PluginError) as err:  # a rule across fields names none of them
        registry.create("picky-scorer", {"low": 5.0, "high": 2.0})
    assert err.value.field is None and "exceed" in str(err.value)
    assert registry.create("picky-scorer", {"low": 1.0, "high": 2.0}) == _Picky(1.0, 2.0)


def test_state_fields_are_not_parameters() -> None:
    registry = default_registry()
    with pytest.raises(PluginError) as err:
        registry.create("round-robin-picker", {"turn": 3})
    assert err.value.field == "turn" and "parameters: none" in str(err.value)
    with pytest.raises(PluginError) as err:
        registry.create("cache-aware-picker", {"trees": {}})
    assert err.value.field == "trees"


def test_plain_function_factories_are_checked_one_argument_at_a_time() -> None:
    def make(scale: float = 1.0, bias: float = 0.0) -> QueueDepthScorer:
        if bias < 0:
            raise ValueError("negative")
        return QueueDepthScorer(scale=scale)

    registry = Registry()
    registry.register("made-scorer", make)
    assert registry.create("made-scorer", {"scale": 3.0}) == QueueDepthScorer(scale=3.0)
    with pytest.raises(PluginError) as err:
        registry.create("made-scorer", {"scale": 2.0, "bias": -1.0})
    assert err.value.field == "bias"
    with pytest.raises(PluginError) as err:  # the refusal is QueueDepthScorer's
        registry.create("made-scorer", {"scale": 0.0})
    assert err.value.field == "scale"
