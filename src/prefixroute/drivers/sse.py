"""Reading OpenAI answers on their way through a driver: SSE events, usage, the first token.

`SseRelay` splits a relayed `text/event-stream` body into events as bytes
arrive, notes when the first token passed (TTFT), reads the usage chunk,
hides the usage-only chunk from a client that did not ask for it, and tells
whether the stream ended as the protocol says (`[DONE]`, no error event).
`openai_usage` turns an OpenAI `usage` object into the router's `Usage`.
Shared by the gateway and the ext_proc server, so both judge an answer alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from prefixroute.request import Usage

__all__ = ["SseRelay", "has_token", "openai_usage"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")


class SseRelay:
    """Splits an SSE byte stream into events; reads usage and the first token; drops usage-only
    chunks the client did not ask for. O(bytes) plus one JSON decode per event."""

    __slots__ = ("buffer", "done", "failed", "first_token_at", "keep_usage", "usage")

    def __init__(self, keep_usage: bool) -> None:
        self.keep_usage = keep_usage
        self.buffer = b""
        self.usage: Mapping[str, Any] | None = None
        self.first_token_at: float | None = None
        self.done = False  # `[DONE]` seen: the stream ended as the protocol says
        self.failed = False  # the engine reported an error inside the stream

    def feed(self, data: bytes, now: float) -> bytes:
        """The bytes of the complete events in `buffer + data` to pass on.

        Fast path, once the first token is seen: whole events with no `usage`,
        no `error` and no `[DONE]` pass through undecoded (O(bytes) in C, no
        JSON), which is almost every chunk of a vLLM stream (an engine that
        puts `"usage": null` in every chunk, as OpenAI does, takes the slow path).
        """
        if (
            self.first_token_at is not None
            and not self.buffer
            and data.endswith(b"\n\n")
            and b'"usage"' not in data
            and b'"error"' not in data
            and b"[DONE]" not in data
        ):
            return data
        buffer = self.buffer + data
        out = bytearray()
        start = 0
        for m in _EVENT_END.finditer(buffer):
            event = buffer[start : m.end()]
            start = m.end()
            if self._keep(event, now):
                out += event
        self.buffer = buffer[start:]
        return bytes(out)

    def flush(self, now: float) -> bytes:
        """What is left at the end of the stream: an event missing its blank line is read
        like any other (so a final usage chunk is parsed, and hidden when asked)."""
        tail, self.buffer = self.buffer, b""
        if tail.strip() and not self._keep(tail, now):
            return b""
        return tail

    def _keep(self, event: bytes, now: float) -> bool:
        payload = b"\n".join(
            line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
        )
        if not payload:
            return True
        if payload == b"[DONE]":
            self.done = True
            return True
        try:
            chunk = json.loads(payload)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        if "error" in chunk or chunk.get("object") == "error":  # vLLM's in-stream error
            self.failed = True
            return True
        choices = chunk.get("choices")
        if self.first_token_at is None and isinstance(choices, list) and has_token(choices):
            self.first_token_at = now
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if not choices and not self.keep_usage:
                return False  # the usage-only chunk the gateway asked for
        return True


def has_token(choices: list[Any]) -> bool:
    """Whether a chunk's choices carry output (text, content, reasoning, tool calls, refusal)."""
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(
            delta.get(k) for k in ("content", "reasoning_content", "tool_calls", "refusal")
        ):
            return True
    return False


def openai_usage(raw: object, *, ok: bool, ttft_s: float | None, e2e_s: float) -> Usage:
    """The router's `Usage` from an OpenAI `usage` object (zeros when absent or malformed)."""

    def count(value: object) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    prompt = cached = completion = 0
    if isinstance(raw, Mapping):
        prompt = count(raw.get("prompt_tokens"))
        completion = count(raw.get("completion_tokens"))
        details = raw.get("prompt_tokens_details")
        if isinstance(details, Mapping):
            cached = min(count(details.get("cached_tokens")), prompt) if prompt else 0
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        ok=ok,
    )
