"""Development tools: stand-ins and traffic for tests, demos and benchmarks.

- `fake_engine`: `prefixroute fake-engine`, a stand-in vLLM server driven in
  real time by the simulator's engine model.
- `bench`: `prefixroute bench`, the load tool (scenarios and traces over HTTP);
  `prompts`: text for token-only requests.
- `live`: `prefixroute demo --live` (fake engines, the gateway and load).

These import the simulator freely; no production driver imports them.
"""
