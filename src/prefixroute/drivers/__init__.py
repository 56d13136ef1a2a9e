"""Production drivers: what puts the pure core on the wire, and what a user deploys.

Each driver owns its I/O, clock and concurrency and calls the core's
synchronous `Router` from one asyncio event loop:

- `gateway`: `prefixroute serve`, an OpenAI-compatible HTTP gateway (a
  package: `app` the handlers, `server` the process and command line).
- `extproc`: `prefixroute extproc`, the Envoy ext_proc endpoint picker (the
  Gateway API Inference Extension protocol).
- `settings`: the configuration both read (`DriverConfig`).
- `service`: what both run around the `Router` (pool, metrics, identity,
  deferrals); `deferral`: where deferred requests wait for a release.
- `pool`: the endpoints a driver routes over: static or file-reloaded lists,
  Prometheus scraping of vLLM's metrics, active health checks.
- `identity`: tenant, session and priority from headers and API keys.
- `metrics`: the Prometheus exporter.
- `kvevents`: the engines' KV-cache events (vLLM's ZMQ publisher) into the
  router's index, per endpoint precise or approximate (the `events` extra).
- `tokens`: engine-exact token ids from a model's own chat template and
  tokenizer (the `tokens` extra).
- `sse`: the server-sent-events reader both drivers relay streams with.
- `errors`: OpenAI-style error bodies (plain data), shared by both drivers.

Nothing here imports the simulator or the dev tools. The gateway needs the
`gateway` extra, the picker the `extproc` extra; neither extra's packages
leak into the other driver's import path.
"""
