"""Routing policies for the simulator: router config documents, built-in or from a file.

A policy is an ordinary `load_config` document (what a deployment runs) plus
an optional `simulator:` section the simulator reads and strips:

    simulator:
      kv_events: true   # feed the engines' KV-cache events to Router.observe
      precise: true     # and put every endpoint in precise mode (needs kv_events)
      routers: {replicas: 4, balance: round-robin, sharing: decisions, delay_s: 0.01}
                        # router replicas (prefixroute.sim.replicas); wins over the scenario's

Built-in policies live in `prefixroute/sim/policies/NAME.yaml`; each file's
header names the system it models, its sources and parameters
(`docs/simulator.md` has the table). Every run builds a fresh `Router` from
the document, seeded by the scenario's seed, so runs are independent and
reproducible.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from prefixroute.config import ConfigError, ConfigFields, load_config
from prefixroute.drivers.documents import read_document
from prefixroute.latency import LatencyPrior
from prefixroute.router import Router
from prefixroute.sim.replicas import Routers, parse_routers

__all__ = ["REPLICA_SEED_STEP", "Policy", "builtin_policies", "load_policy"]

REPLICA_SEED_STEP = 1_000_003
"""How far apart the picker seeds of a run's router replicas are (`Policy.build`)."""


@attrs.frozen
class Policy:
    """A named router configuration and how the simulator feeds it."""

    name: str
    document: dict[str, Any]
    kv_events: bool = False
    precise: bool = False
    routers: Routers | None = None  # None: the scenario's

    def build(
        self, seed: int, *, replica: int = 0, latency_prior: LatencyPrior | None = None
    ) -> Router:
        """A fresh router; the document's own `seed` wins over `seed` when it sets one.

        Replica `k > 0` of a run with several gets the picker seed
        `seed + k * REPLICA_SEED_STEP` (its own tie-breaks, as separate
        processes would make); the hashing seed (`hashing.seed`) is the
        document's, so every replica's block keys agree. `latency_prior`
        (the engines' profile: `CostModel.latency_prior`) becomes the
        document's `latency.prior`, the latency model's cold start, unless
        the document gives its own.
        """
        doc = copy.deepcopy(self.document)
        doc.setdefault("seed", seed)
        if replica:
            doc["seed"] += replica * REPLICA_SEED_STEP
        if latency_prior is not None:
            latency = doc.setdefault("latency", {})
            if isinstance(latency, dict) and "prior" not in latency:
                latency["prior"] = attrs.asdict(latency_prior)
        return load_config(doc)


def _policy_dir() -> Path:
    return Path(str(resources.files("prefixroute.sim") / "policies"))


def builtin_policies() -> list[str]:
    """The names of the shipped policies, sorted."""
    return sorted(p.stem for p in _policy_dir().glob("*.yaml"))


def load_policy(source: str | Path) -> Policy:
    """A policy by built-in name or from a config file; ConfigError names what is wrong."""
    path = Path(source)
    name = path.stem
    if not path.suffix and not path.exists():
        path = _policy_dir() / f"{source}.yaml"
        if not path.exists():
            known = ", ".join(builtin_policies())
            raise ConfigError("", f"unknown policy {str(source)!r} (built-in: {known})")
    doc = dict(read_document(path))
    sim = ConfigFields(doc.pop("simulator", None), "simulator")
    kv_events = sim.boolean("kv_events", False)
    precise = sim.boolean("precise", False)
    if precise and not kv_events:
        raise ConfigError("simulator.precise", "needs simulator.kv_events: true")
    routers = parse_routers(sim.sub("routers")) if sim.has("routers") else None
    sim.done()
    policy = Policy(name=name, document=doc, kv_events=kv_events, precise=precise, routers=routers)
    policy.build(0)  # validate now, with the file's name in the error
    return policy
