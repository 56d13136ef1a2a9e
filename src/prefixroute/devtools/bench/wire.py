"""What the bench sends: scenarios and traces as OpenAI requests.

`scenario_source` builds a `--scenario`'s workload with the simulator's own
code (`build_workload`): a built-in scenario name (`prefixroute/sim/
scenarios/NAME.yaml`), a scenario file (YAML/JSON, docs/simulator.md), or
a Mooncake-format trace (`.jsonl` / `.jsonl.gz`, `prefixroute.sim.trace`)
given directly. `wire_request` turns each `SimRequest` back into the
OpenAI request it stands for: a chat prompt (rendered by
`prefixroute.openai.render_messages`) is parsed back into its messages and
sent to `/v1/chat/completions` with `x-tenant-id` (and `x-session-id` for a
conversation); other text prompts go to `/v1/completions` untemplated,
without a tenant. A token-only request (a trace's) gets a text prompt of
one common English word per token id (`prefixroute.devtools.prompts`): the
same ids give the same text, so requests sharing leading hash blocks share
leading text, and the text is as many tokens as the trace says under
GPT-2-style BPE tokenizers. Its `max_tokens` is the trace's `output_length`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from prefixroute.devtools.prompts import prompt_text
from prefixroute.sim.scenario import load_scenario
from prefixroute.sim.schema import Fields, ScenarioError
from prefixroute.sim.source import SimRequest, Source
from prefixroute.sim.trace import TraceSource
from prefixroute.sim.workload_schema import build_workload

__all__ = [
    "MODEL",
    "TRACE_SUFFIXES",
    "WireRequest",
    "Workload",
    "messages_of",
    "request_kind",
    "scenario_source",
    "seed_requests",
    "source_requests",
    "wire_request",
]

MODEL = "qwen3-0.6b"
"""The model name the seed experiment's requests carry unless told otherwise."""

WireRequest = tuple[str, dict[str, Any], dict[str, str]]
"""(path, JSON body, headers) of one OpenAI request."""

TRACE_SUFFIXES = (".jsonl", ".jsonl.gz")
"""A `--scenario` path ending so is read as a Mooncake-format trace."""

_FOREVER_S = 1e12  # a workload "duration" no run reaches: the sources are lazy

_HEADER = re.compile(r"<\|((?:[^\\|]|\\.)*)\|(\d+)\|>")
_UNESCAPE = re.compile(r"\\(.)")


def messages_of(prompt: str) -> list[dict[str, str]]:
    """The chat messages whose `render_messages` rendering is `prompt` (its inverse).

    O(len(prompt)). ValueError if `prompt` is not such a rendering.
    """
    messages: list[dict[str, str]] = []
    pos = 0
    while pos < len(prompt):
        m = _HEADER.match(prompt, pos)
        if m is None:
            raise ValueError(f"not a rendered chat prompt at character {pos}")
        start = m.end()
        end = start + int(m.group(2))
        if end > len(prompt):
            raise ValueError("a message's content runs past the end of the prompt")
        role = _UNESCAPE.sub(r"\1", m.group(1))
        messages.append({"role": role, "content": prompt[start:end]})
        pos = end
    return messages


def wire_request(sim: SimRequest) -> WireRequest:
    """The OpenAI request a simulated request stands for.

    `tenant` and `chat` requests are chat completions with `x-tenant-id` (and
    `x-session-id` for a chat's conversation); the others (`cold`,
    `shared-prefix`, `trace`) are untemplated completions without a tenant,
    their prompt the text, or for a token-only request (a trace's)
    `prompt_text(token_ids)`: one word per token id. O(prompt length).
    """
    req = sim.request
    max_tokens = req.max_tokens if req.max_tokens is not None else sim.output_tokens
    if sim.kind in ("tenant", "chat") and req.prompt is not None:
        body: dict[str, Any] = {
            "model": req.model,
            "messages": messages_of(req.prompt),
            "max_tokens": max_tokens,
        }
        headers = {"x-tenant-id": req.tenant} if req.tenant else {}
        if req.session is not None:
            headers["x-session-id"] = req.session
        return "/v1/chat/completions", body, headers
    if req.prompt is not None:
        prompt = req.prompt
    else:
        assert req.token_ids is not None
        prompt = prompt_text(req.token_ids)
    return "/v1/completions", {"model": req.model, "prompt": prompt, "max_tokens": max_tokens}, {}


def source_requests(source: Source) -> Iterator[WireRequest]:
    """`source`'s arrivals as OpenAI requests, in order (lazy; arrival times ignored)."""
    for sim in source.arrivals():
        yield wire_request(sim)


def seed_requests(
    seed: int = 0, *, model: str = MODEL, scenario: str = "seed"
) -> Iterator[WireRequest]:
    """The seed experiment's request sequence, endless and deterministic given `seed`.

    Built from the built-in `scenario`'s workload (its personas, questions,
    mix and max_tokens) with its arrival process replaced by a constant one
    (`scenario_source(..., timed=False)`): only the order of requests matters
    here, `run_load` decides when they go. O(1) per request after the first
    of each (tenant, question).
    """
    return source_requests(scenario_source(scenario, model=model, seed=seed, timed=False).source)


@attrs.frozen
class Workload:
    """What `scenario_source` built: the source, and what to call it in reports.

    `timed` is True when the source's own arrival times (and follow-ups)
    are meant to drive the run; False for an endless source whose order
    only matters (`--rate` / `--users` decide when requests go).
    """

    source: Source
    name: str
    description: str
    timed: bool


def _is_trace(scenario: str) -> bool:
    return scenario.endswith(TRACE_SUFFIXES)


def scenario_source(
    scenario: str,
    *,
    model: str,
    seed: int | None = None,
    duration_s: float = 10.0,
    time_scale: float | None = None,
    timed: bool = True,
) -> Workload:
    """The requests of `scenario`: a built-in name, a scenario file or a trace (`.jsonl[.gz]`).

    `timed`: keep the scenario's arrival process, up to `duration_s`
    (scenario timing); otherwise the workload's arrival process is
    replaced by a constant one and the source is endless: only the order of
    requests matters, `run_load` decides when they go (a trace is replayed
    in timestamp order). `model` replaces the workload's model; `seed`
    (default: the scenario's) seeds it; `time_scale` multiplies a trace's
    timestamps (a trace given directly, or a scenario's `workload.trace`;
    ValueError for any other scenario, or without `timed`). ScenarioError (a ValueError) names
    what is wrong: unknown name, unreadable file, invalid field, bad trace
    line, a trace with no records. O(trace size) for a trace, read whole;
    lazy otherwise.
    """
    if time_scale is not None and not timed:
        raise ValueError(
            "--time-scale is for scenario timing: --rate and --users ignore a trace's timestamps"
        )
    horizon = duration_s if timed else _FOREVER_S
    if _is_trace(scenario):
        trace = TraceSource(
            scenario,
            time_scale=1.0 if time_scale is None else time_scale,
            model=model,
            duration_s=horizon,
        )
        _refuse_empty(trace)
        name = Path(scenario).name
        return Workload(trace, name, f"Mooncake trace {name}, {len(trace)} records", timed)
    loaded = load_scenario(scenario)
    workload = dict(loaded.workload)
    workload.pop("model", None)
    if isinstance(workload.get("trace"), dict):
        spec = dict(workload["trace"])
        if isinstance(spec.get("path"), str):
            spec["path"] = str(loaded.base_dir / spec["path"])
        if time_scale is not None:
            spec["time_scale"] = time_scale
        workload["trace"] = spec
    elif time_scale is not None:
        raise ValueError(f"--time-scale is for traces; scenario {loaded.name!r} has no trace")
    elif not timed:
        workload["arrival"] = {"process": "constant", "rate_rps": 1.0}
    source = build_workload(
        Fields(workload, "workload"),
        seed=loaded.seed if seed is None else seed,
        duration_s=horizon,
        model=model,
    )
    if isinstance(source, TraceSource):
        _refuse_empty(source)
    description = " ".join(loaded.description.split())
    return Workload(source, loaded.name or scenario, description, timed)


def _refuse_empty(trace: TraceSource) -> None:
    """ScenarioError for a trace with no records: a run of it would send nothing."""
    if len(trace) == 0:
        raise ScenarioError(str(trace.path), "no records")


def request_kind(path: str, headers: dict[str, str]) -> str:
    """The label of a request for reports: `chat`, `tenant` or `cold`."""
    if path.endswith("/chat/completions"):
        return "chat" if "x-session-id" in headers else "tenant"
    return "cold"
