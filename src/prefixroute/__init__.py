"""prefixroute: prefix-cache-aware request routing for LLM inference fleets.

The pure core: build a `Router` (`Router.default()` or `load_config(doc)`), call
`route(request, endpoints, now)` for each request and `on_complete(decision,
usage, now)` when it ends. Drivers (gateway, Envoy ext_proc, simulator) own
all I/O and clocks.
"""

from prefixroute.admission import AdmissionChain, AlwaysAdmit
from prefixroute.blocks import Blocker, BlockKey, HashMode
from prefixroute.config import ConfigError, load_config
from prefixroute.decision import Decision, Rejection
from prefixroute.endpoint import Endpoint, EndpointId, EndpointState, Role
from prefixroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EndpointRemoved,
    IndexEvent,
)
from prefixroute.index import IndexStats, PrefixIndex, PrefixMatch, Tier
from prefixroute.load import LoadTracker
from prefixroute.plugins import AdmissionPolicy, Filter, Picker, RouteContext, Scorer
from prefixroute.profile import Profile, WeightedScorer
from prefixroute.registry import PluginError, Registry, default_registry
from prefixroute.request import Request, RequestError, Usage
from prefixroute.router import Router, RouterCounters, default_profile

__version__ = "0.1.0"

__all__ = [
    "AdmissionChain",
    "AdmissionPolicy",
    "AllBlocksCleared",
    "AlwaysAdmit",
    "BlockKey",
    "BlockRemoved",
    "BlockStored",
    "Blocker",
    "ConfigError",
    "Decision",
    "Endpoint",
    "EndpointId",
    "EndpointRemoved",
    "EndpointState",
    "Filter",
    "HashMode",
    "IndexEvent",
    "IndexStats",
    "LoadTracker",
    "Picker",
    "PluginError",
    "PrefixIndex",
    "PrefixMatch",
    "Profile",
    "Registry",
    "Rejection",
    "Request",
    "RequestError",
    "Role",
    "RouteContext",
    "Router",
    "RouterCounters",
    "Scorer",
    "Tier",
    "Usage",
    "WeightedScorer",
    "__version__",
    "default_profile",
    "default_registry",
    "load_config",
]
