"""Router replicas in the simulator: how many, how requests reach them, what they share.

    routers:
      replicas: 4             # Router instances in front of the same engines (default 1)
      balance: round-robin    # round-robin | random | hash: how a request picks a replica
      sharing: decisions      # none | decisions | events: what replicas learn of each other
      delay_s: 0.01           # how late shared decisions and in-flight counts arrive
      carry: [completions, sessions]   # what decision records carry besides blocks (the default)

The section goes in a scenario (top level) or in a policy's `simulator:`
section; a policy's wins. One replica (the default) is the simulator as it
was: the same decisions, bit for bit.

Each replica is its own `Router` built from the same policy document (its
own index, in-flight counts, ledger and admission state; the same hashing
seed, so block keys agree; its own seed for the picker's tie-breaks). The
engines are shared. A balancer in front sends each arriving request to one
replica, and that replica's `on_complete` gets its completion:

- `round-robin`: replica 0, 1, ..., N-1, 0, ... in arrival order (a
  Kubernetes Service behind kube-proxy's IPVS `rr`, Envoy's `ROUND_ROBIN`);
- `random`: uniformly, from a generator seeded by the scenario's seed;
- `hash`: consistent hashing on the session id when the request has one
  (tenant and session together, so equal session ids of two tenants do not
  collide), else on the tenant: an L7 balancer hashing a header, as Envoy's
  `RING_HASH` load balancer does (a ketama ring of 1,024 points by default,
  `minimum_ring_size`; Karger et al., "Consistent hashing and random
  trees", STOC 1997). Here each replica gets `ceil(1024 / N)` points,
  hashed with BLAKE2b (Envoy uses xxHash; any good hash spreads alike). A
  workload without tenants or sessions (a Mooncake trace: every request is
  tenant `default`) sends everything to one replica, which is what hashing
  on a key that does not vary does.

What replicas share (`sharing`):

- `none`: nothing. Each replica's index learns only from its own decisions
  and completions, its in-flight counts are its own, and no replica
  receives the engines' KV events, so a policy that reads them runs in
  approximate mode (a replica that subscribed to every engine's events
  would be `events`).
- `events`: every replica subscribes to every engine's KV events and gets
  the same stream (after the scenario's `endpoints.kv_events` link: its
  delay, loss and replay apply to each batch once, and every replica sees
  the same outcome). This is how precise mode agrees across replicas
  (issue 15); for a policy that reads no events it shares nothing, as
  `none`.
- `decisions`: each replica's decision (the endpoint and the block keys it
  inserted speculatively, with the deciding replica's `speculative_ttl_s`)
  is applied to every other replica's index `delay_s` later, as
  speculative entries expiring `speculative_ttl_s` after they arrive (what
  a Redis Stream of decision records delivers: `drivers/shared.py`); and
  every replica sees the others' in-flight requests and tokens per
  endpoint as they were `delay_s` earlier (`LoadTracker.set_peers`, what
  the shared in-flight contributions give). The engines' KV events reach
  no replica (approximate mode). `carry` adds to the records, each
  `delay_s` late too, the rest of what a router records of its own
  decisions, so that its peers record it alike:
  - `completions`: a successful request's completion, which confirms its
    blocks on the endpoint that served it (`Router.on_complete`); without
    it a peer's entries stay speculative and expire `speculative_ttl_s`
    after they arrived unless a later decision refreshes them, while the
    deciding replica keeps its own (confirmed) until its LRU evicts them;
  - `cold`: that the decision was a cold placement (no endpoint matched
    any block), which the cold-request spreader reads
    (`LoadTracker.note_cold`);
  - `sessions`: the request's session binding (`LoadTracker.bind_session`),
    which session affinity reads;
  - `latency`: the decision's uncached prefill, which joins the peers'
    prefill backlog for its endpoint, and the latency sample its completion
    taught the deciding replica's model (`Router.latency_sample`), which
    their models learn too. Not by default: the drivers' shared state
    carries neither (issue 15), each replica's model learns from its own
    completions.
  With all four and no delay, N replicas make the decisions one router
  would, but for the picker's random tie-breaks (docs/simulator.md).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from typing import Any

import attrs

from prefixroute.request import Request
from prefixroute.schema import Fields

__all__ = [
    "BALANCES",
    "CARRIES",
    "DEFAULT_CARRY",
    "RING_POINTS",
    "SHARINGS",
    "Balancer",
    "Routers",
    "parse_routers",
]

BALANCES = ("round-robin", "random", "hash")
SHARINGS = ("none", "decisions", "events")
CARRIES = ("completions", "cold", "sessions", "latency")
DEFAULT_CARRY = ("completions", "sessions")
"""What decision records carry unless told: not `cold`, which a delay turns into herding."""
RING_POINTS = 1024
"""Points on the consistent-hash ring, all replicas together (Envoy's `minimum_ring_size`)."""


def _carry(value: object) -> tuple[str, ...]:
    """`carry` in the order of `CARRIES`; ValueError for an unknown or repeated item."""
    if isinstance(value, str) or not isinstance(value, list | tuple | frozenset | set):
        raise ValueError(f"carry must be a list of {', '.join(CARRIES)}, got {value!r}")
    items = list(value)
    for item in items:
        if item not in CARRIES:
            raise ValueError(f"carry items must be among {', '.join(CARRIES)}, got {item!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"carry lists an item twice: {items!r}")
    return tuple(c for c in CARRIES if c in items)


@attrs.frozen
class Routers:
    """How many router replicas a run has, how requests reach them, what they share.

    The module docstring says what each value means. ValueError names the
    field when a value is out of range.
    """

    replicas: int = 1
    balance: str = "round-robin"
    sharing: str = "none"
    delay_s: float = 0.0
    carry: tuple[str, ...] = attrs.field(default=DEFAULT_CARRY, converter=_carry)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int):
            raise ValueError(f"replicas must be an integer, got {self.replicas!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        if self.sharing not in SHARINGS:
            raise ValueError(f"sharing must be one of {', '.join(SHARINGS)}, got {self.sharing!r}")
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ValueError(f"delay_s must be finite and >= 0, got {self.delay_s}")

    @property
    def label(self) -> str:
        """A short name for reports: '' for one replica, else e.g. 'x4 decisions 50ms'."""
        if self.replicas == 1:
            return ""
        parts = [f"x{self.replicas}", self.sharing]
        if self.balance != "round-robin":
            parts.append(self.balance)
        if self.sharing == "decisions":  # the only sharing the delay and the records apply to
            if self.delay_s:
                parts.append(f"{self.delay_s * 1e3:g}ms")
            if self.carry != DEFAULT_CARRY:
                parts.append("+" + "+".join(self.carry) if self.carry else "blocks only")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready mapping (the summary's `routers`)."""
        return {
            "replicas": self.replicas,
            "balance": self.balance,
            "sharing": self.sharing,
            "delay_s": self.delay_s,
            "carry": list(self.carry),
        }


def parse_routers(section: Fields) -> Routers:
    """A `Routers` from a document's `routers:` mapping; errors name the field (`routers.replicas`).

    `section` is a scenario's or a policy's `Fields`, so the error is a
    `ScenarioError` or a `ConfigError` (both `DocumentError`s). Unknown
    keys are refused.
    """
    routers = Routers(
        replicas=section.integer("replicas", 1, min=1),
        balance=section.string("balance", "round-robin", choices=BALANCES),
        sharing=section.string("sharing", "none", choices=SHARINGS),
        delay_s=section.number("delay_s", 0.0, min=0.0),
        carry=_parse_carry(section),
    )
    section.done()
    return routers


def _parse_carry(section: Fields) -> tuple[str, ...]:
    items = section.items("carry") if section.has("carry") else list(DEFAULT_CARRY)
    try:
        return _carry(items)
    except ValueError as exc:
        raise section.error(section.where("carry"), str(exc).removeprefix("carry ")) from None


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class Balancer:
    """Sends each arriving request to one of `routers.replicas` replicas (module docstring).

    `pick` is O(1) for round-robin and random, O(log ring) for hash; the
    ring is built once, O(RING_POINTS log RING_POINTS). Deterministic given
    `seed`.
    """

    def __init__(self, routers: Routers, seed: int) -> None:
        self.replicas = routers.replicas
        self.balance = routers.balance
        self._next = 0
        self._rng = random.Random(f"balance:{seed}")
        ring: list[tuple[int, int]] = []
        if routers.balance == "hash":
            per = math.ceil(RING_POINTS / routers.replicas)
            ring = sorted(
                (_point(f"replica-{k}_{i}"), k) for k in range(routers.replicas) for i in range(per)
            )
        self._ring_points = [p for p, _ in ring]
        self._ring_owner = [k for _, k in ring]

    def pick(self, request: Request) -> int:
        """The replica that gets `request`."""
        if self.replicas == 1:
            return 0
        if self.balance == "round-robin":
            k = self._next
            self._next = (k + 1) % self.replicas
            return k
        if self.balance == "random":
            return self._rng.randrange(self.replicas)
        key = request.tenant if request.session is None else f"{request.tenant}\0{request.session}"
        at = bisect.bisect_left(self._ring_points, _point(key))
        return self._ring_owner[at % len(self._ring_owner)]
