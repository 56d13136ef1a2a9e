"""`FakeEngineConfig`: what one fake engine serves, its modelled hardware and scheduler limits.

Validated at construction (attrs validators plus `EngineConfig`'s own
checks), so a bad option fails before any socket is bound, with a message
that names the field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import attrs

from prefixroute.sim.cost import PROFILES, CostModel, cost_profile
from prefixroute.sim.engine import EngineConfig

__all__ = ["FakeEngineConfig", "default_model_path"]


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _check_time_scale(_: object, __: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"time_scale must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"time_scale must be a finite number >= 0, got {value!r}")


def _check_profile(_: object, __: attrs.Attribute[str], value: str) -> None:
    if value not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {value!r}")


def _nonempty(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string")


def default_model_path(model: str) -> str:
    """The default `model_path`: the local directory `<tmp>/prefixroute-fake-engine/<model>`.

    Created on demand with a small `config.json` (Qwen3's architecture), so it
    looks like a model directory; it holds no weights and no tokenizer. Its
    last component is the served model name ("/" becomes "--"), because
    sglang-router derives a worker's model id from the path's last component.
    Idempotent and shared by every fake engine of the same model. O(1).
    """
    path = Path(tempfile.gettempdir()) / "prefixroute-fake-engine" / model.replace("/", "--")
    config = path / "config.json"
    if not config.exists():
        path.mkdir(parents=True, exist_ok=True)
        doc = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "_comment": "prefixroute fake-engine stand-in: no weights, no tokenizer",
        }
        tmp = path / f".config.{os.getpid()}.json"
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, config)
    return str(path)


@attrs.frozen(slots=True)
class FakeEngineConfig:
    """One fake engine: what it serves, its modelled hardware, its scheduler limits.

    `model` is the one model name served (others get 404, as vLLM answers);
    `profile` names a `prefixroute.sim.cost` profile; `kv_capacity_tokens`
    defaults to the profile's; `default_max_tokens` (16, the OpenAI
    completions default) is the reply length when the body gives neither
    `max_tokens` nor `max_completion_tokens`; `seed` keys the block hashes and
    the reply words; `time_scale` multiplies every step duration (1.0: real
    time; 0: as fast as possible, for overhead benchmarks); `model_path` is the
    local directory `/model_info` and `/server_info` report (default
    `default_model_path(model)`). Invalid values raise ValueError naming the field.
    """

    engine_id: str = attrs.field(default="fake-0", validator=_nonempty)
    model: str = attrs.field(default="qwen3-0.6b", validator=_nonempty)
    profile: str = attrs.field(default="qwen3-0.6b-h100", validator=_check_profile)
    kv_capacity_tokens: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    block_size: int = attrs.field(default=16, validator=_positive)
    max_num_seqs: int = attrs.field(default=1024, validator=_positive)
    max_num_batched_tokens: int = attrs.field(default=8192, validator=_positive)
    default_max_tokens: int = attrs.field(default=16, validator=_positive)
    seed: int = attrs.field(default=0)
    time_scale: float = attrs.field(default=1.0, validator=_check_time_scale)
    model_path: str | None = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be within [0, 2**64), got {self.seed}")
        if self.model_path is not None and not Path(self.model_path).is_absolute():
            raise ValueError(f"model_path must be an absolute local path, got {self.model_path!r}")
        self.engine_config()  # EngineConfig's own checks, with their field names

    @property
    def cost(self) -> CostModel:
        """The cost profile."""
        return cost_profile(self.profile)

    def engine_config(self) -> EngineConfig:
        """The simulator engine's shape."""
        kv = self.kv_capacity_tokens
        return EngineConfig(
            kv_capacity_tokens=self.cost.kv_capacity_tokens if kv is None else kv,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )
