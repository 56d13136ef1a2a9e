"""The configuration both drivers read: `DriverConfig` and its `server` and `metrics` sections.

`prefixroute serve` (the gateway) and `prefixroute extproc` (the Envoy
picker) read one document: the router sections that
`prefixroute.config.load_config` accepts, plus `server`, `endpoints`,
`scrape`, `identity`, `metrics`, `kv_events`, `models` and `shared_state`.
The picker adds its own `extproc` section
(`prefixroute.drivers.extproc.ExtProcConfig`). This module sits apart from
both drivers so that neither one's optional dependencies (starlette and
uvicorn, grpc and the Envoy protos) reach the other's import path, and so
that `prefixroute.drivers.service`, which both build on, reads its
configuration without importing a driver.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from prefixroute.config import ConfigError, load_config
from prefixroute.drivers.documents import read_document
from prefixroute.drivers.identity import IdentityConfig
from prefixroute.drivers.kvevents import KVEventsConfig
from prefixroute.drivers.pool import EndpointSpec, ScrapeConfig, read_endpoints
from prefixroute.drivers.sections import DRIVER_SECTIONS, build_section, positive_number
from prefixroute.drivers.shared import SharedStateConfig
from prefixroute.router import Router

if TYPE_CHECKING:
    from prefixroute.drivers.tokens import ModelTokenizer

__all__ = ["DRIVER_SECTIONS", "DriverConfig", "MetricsConfig", "ServerConfig", "log_level_argument"]

_SERVER_KEYS = {
    "host": "str",
    "port": "int",
    "body_limit_bytes": "int",
    "upstream_connect_timeout_s": "float",
    "upstream_timeout_s": "float",
    "drain_timeout_s": "float",
    "release_interval_s": "float",
    "explain_header": "bool",
    "head_limit_bytes": "int",
    "max_headers": "int",
    "head_timeout_s": "float",
    "body_timeout_s": "float",
    "max_connections": "int",
}
_METRICS_KEYS = {"max_tenants": "int", "pool_name": "str"}


@attrs.frozen
class ServerConfig:
    """The `server` section: where the gateway listens and how patient it is.

    `upstream_timeout_s` is the longest wait for the next bytes from an
    engine (a socket read timeout): before the first byte it is a 504, later
    an error event in the stream. `drain_timeout_s` bounds the graceful
    shutdown. `explain_header` adds `x-prefixroute-decision` to responses
    (it reveals cache state: keep it off where tenants must not learn it).
    The client-side limits (`prefixroute.drivers.gateway.protocol`) bound a
    request head's size (`head_limit_bytes`, 64 KiB: Envoy's 60 KiB rounded
    up) and field count (`max_headers`, 100 as Envoy), the time to send a
    head (`head_timeout_s`, 30 s) and the idle time between body reads
    (`body_timeout_s`, 60 s as nginx), and the open client connections
    (`max_connections`, 4096; the file-descriptor limit must leave room for
    as many upstream connections). The picker validates this section but
    listens where its `extproc` section says (Envoy holds the client side).
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=8080, validator=[attrs.validators.ge(1), attrs.validators.le(65535)]
    )
    body_limit_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=attrs.validators.ge(1))
    upstream_connect_timeout_s: float = attrs.field(default=2.0, validator=positive_number)
    upstream_timeout_s: float = attrs.field(default=60.0, validator=positive_number)
    drain_timeout_s: float = attrs.field(default=30.0, validator=positive_number)
    release_interval_s: float = attrs.field(default=0.05, validator=positive_number)
    explain_header: bool = False
    head_limit_bytes: int = attrs.field(default=64 * 1024, validator=attrs.validators.ge(1024))
    max_headers: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    head_timeout_s: float = attrs.field(default=30.0, validator=positive_number)
    body_timeout_s: float = attrs.field(default=60.0, validator=positive_number)
    max_connections: int = attrs.field(default=4096, validator=attrs.validators.ge(1))


@attrs.frozen
class MetricsConfig:
    """The `metrics` section: tenant label cap and the pool's `name` label."""

    max_tenants: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    pool_name: str = "default"


@attrs.frozen
class DriverConfig:
    """A driver config: a router config document plus the drivers' own sections.

    `router_document` is what `prefixroute.config.load_config` accepts (seed,
    hashing, index, router, tenants, plugins, profiles, profile); `server`,
    `endpoints`, `scrape`, `identity`, `metrics` and `models` are the drivers' (see
    `DRIVER_SECTIONS`). The gateway reads it as is (`GatewayConfig` is this
    class under the gateway's name). Read one with `from_file` or
    `from_document`; every error is a `ConfigError` naming the field.
    """

    router_document: Mapping[str, Any] = attrs.field(factory=dict)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    endpoints: tuple[EndpointSpec, ...] = ()
    endpoint_files: tuple[Path, ...] = ()
    scrape: ScrapeConfig = attrs.field(factory=ScrapeConfig)
    identity: IdentityConfig = attrs.field(factory=IdentityConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    kv_events: KVEventsConfig = attrs.field(factory=KVEventsConfig)
    """The KV-event subscribers' knobs (docs/kv-events.md)."""
    models: Mapping[str, ModelTokenizer] = attrs.field(factory=dict)
    """Per model name, its loaded tokenizer and chat template (docs/tokens.md): token mode."""
    shared_state: SharedStateConfig | None = None
    """Where replicas share state (Redis; docs/replicas.md); None: this replica alone."""

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> DriverConfig:
        """Read a YAML/JSON config file; relative paths in it are relative to its directory."""
        return cls.from_document(read_document(path), base_dir=Path(path).parent)

    @classmethod
    def from_document(
        cls, doc: Mapping[str, Any], *, base_dir: str | os.PathLike[str] = "."
    ) -> DriverConfig:
        """Validate a whole document (the router part by building a `Router` once)."""
        if not isinstance(doc, Mapping):
            raise ConfigError("", "a config document must be a mapping")
        router_document = {k: v for k, v in doc.items() if k not in DRIVER_SECTIONS}
        load_config(router_document)  # validate now: a bad router config fails at startup
        specs, files = read_endpoints(doc.get("endpoints"), base_dir=base_dir)
        return cls(
            router_document=router_document,
            server=build_section(doc, "server", _SERVER_KEYS, ServerConfig),
            endpoints=specs,
            endpoint_files=files,
            scrape=ScrapeConfig.from_document(doc),
            identity=IdentityConfig.from_document(doc, base_dir=base_dir),
            metrics=build_section(doc, "metrics", _METRICS_KEYS, MetricsConfig),
            kv_events=KVEventsConfig.from_document(doc),
            models=_read_models(doc.get("models"), base_dir),
            shared_state=SharedStateConfig.from_document(doc, base_dir=base_dir),
        )

    def build_router(self) -> Router:
        """A fresh `Router` from `router_document`."""
        return load_config(self.router_document)


def _read_models(section: object, base_dir: str | os.PathLike[str]) -> Mapping[str, ModelTokenizer]:
    """The `models` section (`prefixroute.drivers.tokens.read_models`); its optional
    dependencies (`tokenizers`, `jinja2`) are imported only when the section is there."""
    if section is None:
        return {}
    from prefixroute.drivers.tokens import read_models

    return read_models(section, base_dir=base_dir)


def log_level_argument(parser: argparse.ArgumentParser) -> None:
    """The `--log-level` option both drivers' command lines take."""
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: info)",
    )
