"""The discrete-event simulator: modelled vLLM engines, workloads, and policy comparison.

A driver of the core like the gateway: it owns the (virtual) clock, builds
`Request`s and `EndpointState`s, and calls the same `Router` a deployment runs.
"""
