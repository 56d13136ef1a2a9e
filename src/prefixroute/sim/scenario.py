"""Scenario documents: everything one simulation run needs, in one YAML or JSON file.

    name: seed                    # required
    description: ...              # optional, shown in reports
    duration_s: 1800              # arrivals stop here; in-flight requests drain after
    seed: 0                       # seeds the workload and the router
    metrics_interval_s: 0.05      # how stale the router's view of engine metrics gets
    endpoints:
      count: 1
      profile: qwen3-0.6b-h100    # a cost profile (prefixroute.sim.cost.PROFILES)
      kv_capacity_tokens: 644896  # default: what the profile's GPU holds
      block_size: 16
      max_num_seqs: 1024          # vLLM's H100 defaults for the OpenAI server
      max_num_batched_tokens: 8192
      kv_events:                  # how engine KV events reach a policy that reads them
        delay_s: 0.0              # publish to apply, every batch alike (order kept)
        loss: 0.0                 # probability that a batch (one engine step) is lost
        replay: false             # lost batches fetched again (vLLM's replay socket)
        on_gap: clear             # a gap not replayed: clear the endpoint, or keep its entries
    restarts:                     # engines that die and come back with an empty cache
      - {endpoint: 0, at_s: 60, down_s: 15}   # endpoint index, when, how long down
    routers:                      # router replicas (prefixroute.sim.replicas)
      replicas: 1                 # default 1: one router, as before
      balance: round-robin        # round-robin | random | hash
      sharing: none               # none | decisions | events
      delay_s: 0.0                # how late shared decisions and in-flight counts arrive
    objectives:                   # the clients' latency objectives, on every request
      ttft_ms: 500                # (prefixroute.sim.objectives); default: none
      tpot_ms: 50
      tenants: {t0000: {ttft_ms: 200}}
    workload: {...}               # see prefixroute.sim.workload_schema

Unknown keys are refused with their path. Built-in scenarios live in
`prefixroute/sim/scenarios/NAME.yaml` and are named without the suffix; a
workload `trace.path` that is relative is resolved against the scenario
file's directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from prefixroute.drivers.documents import read_document
from prefixroute.sim.cost import PROFILES, CostModel
from prefixroute.sim.engine import EngineConfig
from prefixroute.sim.objectives import ClientObjectives, parse_objectives
from prefixroute.sim.replicas import Routers, parse_routers
from prefixroute.sim.schema import Fields, ScenarioError
from prefixroute.sim.simulation import EventLink, Restart

__all__ = ["Scenario", "builtin_scenarios", "load_scenario"]


@attrs.frozen
class Scenario:
    """A validated scenario; `workload` is the raw mapping (checked when the run builds it)."""

    name: str
    description: str
    duration_s: float
    seed: int
    metrics_interval_s: float
    endpoints: int
    cost: CostModel
    engine: EngineConfig
    workload: dict[str, Any]
    base_dir: Path
    link: EventLink = attrs.field(factory=EventLink)
    restarts: tuple[Restart, ...] = ()
    routers: Routers = attrs.field(factory=Routers)
    objectives: ClientObjectives = attrs.field(factory=ClientObjectives)

    def with_overrides(
        self,
        *,
        endpoints: int | None = None,
        duration_s: float | None = None,
        seed: int | None = None,
        link: EventLink | None = None,
        routers: Routers | None = None,
    ) -> Scenario:
        """A copy with the command line's overrides applied (ScenarioError if invalid)."""
        if endpoints is not None and endpoints < 1:
            raise ScenarioError("endpoints.count", f"must be >= 1, got {endpoints}")
        if duration_s is not None and not 0 < duration_s < float("inf"):
            raise ScenarioError("duration_s", f"must be finite and > 0, got {duration_s}")
        if seed is not None and seed < 0:
            raise ScenarioError("seed", f"must be >= 0, got {seed}")
        return attrs.evolve(
            self,
            endpoints=self.endpoints if endpoints is None else endpoints,
            duration_s=self.duration_s if duration_s is None else duration_s,
            seed=self.seed if seed is None else seed,
            link=self.link if link is None else link,
            routers=self.routers if routers is None else routers,
        )


def _scenario_dir() -> Path:
    return Path(str(resources.files("prefixroute.sim") / "scenarios"))


def builtin_scenarios() -> list[str]:
    """The names of the shipped scenarios, sorted."""
    return sorted(p.stem for p in _scenario_dir().glob("*.yaml"))


def load_scenario(source: str | Path | dict[str, Any]) -> Scenario:
    """A scenario from a built-in name, a YAML/JSON file, or a mapping.

    ScenarioError (a ValueError) names the offending field; a missing file
    or unknown name is a ScenarioError too.
    """
    base = Path.cwd()
    if isinstance(source, dict):
        doc: object = source
    else:
        path = Path(source)
        if not path.suffix and not path.exists():
            path = _scenario_dir() / f"{source}.yaml"
            if not path.exists():
                known = ", ".join(builtin_scenarios())
                raise ScenarioError("", f"unknown scenario {source!r} (built-in: {known})")
        doc = read_document(path, error=ScenarioError, what="scenario file")
        base = path.resolve().parent
    return _parse(doc, base)


def _parse(doc: object, base: Path) -> Scenario:
    top = Fields(doc, "")
    name = top.string("name", "")
    description: str = top.typed("description", "str", "")
    duration = top.number("duration_s", 60.0, above=0.0)
    seed = top.integer("seed", 0, min=0)
    interval = top.number("metrics_interval_s", 0.05, above=0.0)
    ep = top.sub("endpoints")
    count = ep.integer("count", 1, min=1)
    profile = ep.string("profile", "qwen3-0.6b-h100", choices=tuple(PROFILES))
    cost = PROFILES[profile]
    block_size = ep.integer("block_size", 16, min=1)
    kv = ep.integer("kv_capacity_tokens", cost.kv_capacity_tokens, min=block_size)
    seqs = ep.integer("max_num_seqs", 1024, min=1)
    batched = ep.integer("max_num_batched_tokens", 8192, min=block_size)
    ev = ep.sub("kv_events")
    link = EventLink(
        delay_s=ev.number("delay_s", 0.0, min=0.0),
        loss=ev.number("loss", 0.0, min=0.0, max=0.99),
        replay=ev.boolean("replay", False),
        on_gap=ev.string("on_gap", "clear", choices=("clear", "keep")),
    )
    ev.done()
    ep.done()
    restarts = []
    for n, item in enumerate(top.items("restarts")):
        r = Fields(item, f"restarts[{n}]")
        endpoint = r.integer("endpoint", 0, min=0)
        if endpoint >= count:
            raise ScenarioError(r.where("endpoint"), f"must be < endpoints.count ({count})")
        restarts.append(
            Restart(
                endpoint=endpoint,
                at_s=r.number("at_s", 0.0, min=0.0),
                down_s=r.number("down_s", 10.0, above=0.0),
            )
        )
        r.done()
    routers = parse_routers(top.sub("routers"))
    objectives = parse_objectives(top.sub("objectives"))
    workload = top.raw("workload")
    if not isinstance(workload, dict):
        raise ScenarioError("workload", "is required and must be a mapping")
    top.done()
    return Scenario(
        name=name,
        description=description,
        duration_s=duration,
        seed=seed,
        metrics_interval_s=interval,
        endpoints=count,
        cost=cost,
        engine=EngineConfig(
            kv_capacity_tokens=kv,
            block_size=block_size,
            max_num_seqs=seqs,
            max_num_batched_tokens=batched,
        ),
        workload=workload,
        base_dir=base,
        link=link,
        restarts=tuple(restarts),
        routers=routers,
        objectives=objectives,
    )
