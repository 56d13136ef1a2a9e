"""Prompts longer than any engine of their model takes: refused before routing, as vLLM does.

vLLM answers a prompt longer than its `--max-model-len` with a 400: "This
model's maximum context length is N tokens. However, your request has M
input tokens. Please reduce the length of the input messages." (the
renderer's `_create_tokens_prompt`, vllm-project/vllm
`vllm/entrypoints/renderer.py`). Forwarding such a prompt costs an upstream
connection and an engine's tokenizer time on megabytes of text, and an
engine that does not check holds it until the upstream timeout. The drivers
answer it themselves, but only when they are sure the engine would refuse:

- the limit is the largest `EndpointState.max_model_len` among the
  endpoints that serve the model (`EndpointPool` reads it from each
  engine's `GET /v1/models`); when one of them does not report a limit, or
  none serves the model, there is no limit here (routing decides);
- token ids given (a completions prompt of ids): exact, refused when there
  are more than the limit;
- text (a completions string, or chat messages rendered): the `Blocker`'s
  estimate, `ceil(characters / chars_per_token)`, can be off either way (a
  tokenizer may pack long runs of repeated characters into long tokens), so
  the prompt is refused only when the estimate divided by `TEXT_SLACK` (2:
  8 characters a token at the default `chars_per_token` of 4, about twice
  what English or code averages) still exceeds the limit. The message then
  says "at least" that many tokens. Prompts between the two bounds go to the
  engine, which knows their exact length.

`max_tokens` is not checked: engines differ (vLLM refuses a `max_tokens`
beyond what the context leaves, others clamp it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import attrs

from prefixroute.blocks import Blocker
from prefixroute.endpoint import EndpointState
from prefixroute.request import Request

__all__ = ["TEXT_SLACK", "ContextTooLong", "check_context", "context_limit"]

TEXT_SLACK = 2.0
"""How far a text prompt's token estimate may overcount before it is refused (see above)."""


@attrs.frozen
class ContextTooLong:
    """A prompt of `tokens` tokens (exactly, or at least) over a context of `limit` tokens."""

    limit: int
    tokens: int
    exact: bool
    code: ClassVar[str] = "context_length_exceeded"
    """The error code (the OpenAI API's; vLLM puts the status in `code`)."""

    @property
    def message(self) -> str:
        """vLLM's wording (with "at least" for an estimate)."""
        has = f"{self.tokens}" if self.exact else f"at least {self.tokens}"
        return (
            f"This model's maximum context length is {self.limit} tokens. However, your "
            f"request has {has} input tokens. Please reduce the length of the input messages."
        )


def context_limit(model: str, endpoints: Iterable[EndpointState]) -> int | None:
    """The longest context any endpoint serving `model` takes; None if one does not say.

    O(endpoints).
    """
    limit: int | None = None
    for state in endpoints:
        if not state.serves(model):
            continue
        if state.max_model_len is None:
            return None
        limit = state.max_model_len if limit is None else max(limit, state.max_model_len)
    return limit


def check_context(
    request: Request, blocker: Blocker, endpoints: Iterable[EndpointState]
) -> ContextTooLong | None:
    """A `ContextTooLong` when no endpoint of the model can take `request`'s prompt, else None.

    Exact for token ids, generous for text (see the module docstring). O(endpoints).
    """
    limit = context_limit(request.model, endpoints)
    if limit is None:
        return None
    if request.token_ids is not None:
        tokens = len(request.token_ids)
        return ContextTooLong(limit, tokens, exact=True) if tokens > limit else None
    surely = math.floor(blocker.prompt_tokens(request) / TEXT_SLACK)
    return ContextTooLong(limit, surely, exact=False) if surely > limit else None
