"""prefixroute: prefix-cache-aware request routing for LLM inference fleets.

The pure core: build a `Router` (`Router.default()` or `load_config(doc)`), call
`route(request, endpoints, now)` for each request and `on_complete(decision,
usage, now)` when it ends. Drivers (gateway, Envoy ext_proc, simulator) own
all I/O and clocks.
"""

from prefixroute.admission import (
    AdmissionChain,
    AlwaysAdmit,
    ConcurrencyAdmission,
    SheddingAdmission,
    TokenBucketAdmission,
)
from prefixroute.blocks import Blocker, BlockKey, HashMode
from prefixroute.compiled_index import CompiledPrefixIndex, make_index
from prefixroute.config import ConfigError, load_config
from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState, Role
from prefixroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EndpointRemoved,
    IndexEvent,
    ModeChanged,
)
from prefixroute.fairqueue import FairQueueAdmission
from prefixroute.index import IndexStats, PrefixIndex, PrefixMatch, Tier
from prefixroute.ledger import LedgerSnapshot, TenantLedger, TenantSnapshot
from prefixroute.load import LoadTracker
from prefixroute.openai import parse_openai
from prefixroute.plugins import (
    AdmissionContext,
    AdmissionPolicy,
    CompletionListener,
    Deferring,
    Filter,
    Picker,
    RouteContext,
    Scorer,
    TenantView,
)
from prefixroute.profile import Profile, WeightedScorer
from prefixroute.registry import PluginError, Registry, default_registry
from prefixroute.request import Request, RequestError, Usage
from prefixroute.router import Router, RouterCounters, SettlementError, default_profile
from prefixroute.schema import DocumentError

__version__ = "0.1.0"

__all__ = [
    "AdmissionChain",
    "AdmissionContext",
    "AdmissionPolicy",
    "AllBlocksCleared",
    "AlwaysAdmit",
    "BlockKey",
    "BlockRemoved",
    "BlockStored",
    "Blocker",
    "CompiledPrefixIndex",
    "CompletionListener",
    "ConcurrencyAdmission",
    "ConfigError",
    "Decision",
    "Deferral",
    "Deferring",
    "DocumentError",
    "EndpointId",
    "EndpointRemoved",
    "EndpointState",
    "FairQueueAdmission",
    "Filter",
    "HashMode",
    "IndexEvent",
    "IndexStats",
    "LedgerSnapshot",
    "LoadTracker",
    "ModeChanged",
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
    "SettlementError",
    "SheddingAdmission",
    "TenantLedger",
    "TenantSnapshot",
    "TenantView",
    "Tier",
    "TokenBucketAdmission",
    "Usage",
    "WeightedScorer",
    "__version__",
    "default_profile",
    "default_registry",
    "load_config",
    "make_index",
    "parse_openai",
]
