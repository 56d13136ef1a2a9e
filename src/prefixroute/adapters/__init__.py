"""Drivers that put the pure core on the wire.

Each adapter owns its I/O, clock and concurrency and calls the core's
synchronous `Router` from one asyncio event loop:

- `gateway`: `prefixroute serve`, an OpenAI-compatible HTTP gateway.
- `extproc`: `prefixroute extproc`, the Envoy ext_proc endpoint picker (the
  Gateway API Inference Extension protocol).
- `service`: what both run around the `Router` (pool, metrics, identity,
  deferrals); `deferral`: where deferred requests wait for a release.
- `pool`: the endpoints a driver routes over: static or file-reloaded lists,
  Prometheus scraping of vLLM's metrics, active health checks.
- `identity`: tenant, session and priority from headers and API keys.
- `metrics`: the Prometheus exporter.
- `fake_engine`: `prefixroute fake-engine`, a stand-in vLLM server driven in
  real time by the simulator's engine model.
- `loadgen` and `live`: the load generator and `prefixroute demo --live`.
- `errors`: OpenAI-style error bodies, shared by every HTTP driver.

Everything here needs the `gateway` extra (starlette, uvicorn with uvloop and
httptools, aiohttp, prometheus-client); `extproc` also the `extproc` extra
(grpcio, grpcio-health-checking, xds-protos).
"""
