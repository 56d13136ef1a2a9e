"""The streamed reply: SSE chunks of a chat completion or a completion, as vLLM sends them.

One streamer serves both endpoints; a `ChunkShape` holds what differs (the
chunk `object`, how one token's choice is spelled, chat's opening role
delta). The wire format follows the OpenAI API reference and vLLM's
`vllm/entrypoints/openai/serving_chat.py` and `serving_completion.py`:
`data: {...}` chunks, one per token, the last carrying `finish_reason`; the
`stream_options.include_usage` chunk (`choices: []`, with
`usage.prompt_tokens_details.cached_tokens`); then `data: [DONE]`. Chunks are
preformatted strings, not a `json.dumps` per token (a stream sends one chunk
per generated token, and a lexicon word needs no JSON escaping).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs

from prefixroute.devtools.fake_engine.engine import FakeEngine, Job

__all__ = ["CHAT_CHUNKS", "COMPLETION_CHUNKS", "ChunkShape", "stream", "usage_body"]


@attrs.frozen(slots=True)
class ChunkShape:
    """What a chat stream and a completions stream spell differently.

    `kind` is the chunks' `object`; one token's choice is `before_word`, the
    word, `before_reason`, the finish reason (`"length"` or `null`),
    `after_reason`; `opening`, when set, is the choice of a chunk sent just
    before the first token's (chat's role delta).
    """

    kind: str
    before_word: str
    before_reason: str
    after_reason: str
    opening: str | None = None


CHAT_CHUNKS = ChunkShape(
    kind="chat.completion.chunk",
    before_word='{"index":0,"delta":{"content":"',
    before_reason='"},"logprobs":null,"finish_reason":',
    after_reason="}",
    opening='{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
)
COMPLETION_CHUNKS = ChunkShape(
    kind="text_completion",
    before_word='{"index":0,"text":"',
    before_reason='","logprobs":null,"finish_reason":',
    after_reason=',"stop_reason":null}',
)


def usage_body(job: Job, cached: int) -> dict[str, Any]:
    """The OpenAI `usage` object of `job`, with `cached` prompt tokens."""
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.output_tokens,
        "total_tokens": job.prompt_tokens + job.output_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def stream(
    fake: FakeEngine, job: Job, shape: ChunkShape, rid: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks of `job`'s reply: the opening chunk (if any) with the first token, then one
    chunk per token (the last carries finish_reason), the usage chunk when asked, `[DONE]`.

    Each wake of `fake.tokens` yields one string holding the chunks of every token
    generated since the last. O(output tokens).
    """
    head = (
        f'data: {{"id":{json.dumps(rid)},"object":"{shape.kind}","created":{created},'
        f'"model":{json.dumps(fake.config.model)},"choices":'
    )
    opening = None if shape.opening is None else f"{head}[{shape.opening}]}}\n\n"
    word = f"{head}[{shape.before_word}"
    reason = shape.before_reason
    close = f"{shape.after_reason}]}}\n\n"
    sent = 0
    last = job.output_tokens
    async for n in fake.tokens(job):
        parts = [opening] if sent == 0 and opening is not None else []
        for j in range(sent, n):
            finish = '"length"' if j + 1 == last else "null"
            parts.append(f"{word}{job.word(j)}{reason}{finish}{close}")
        sent = n
        yield "".join(parts)
    if include_usage:
        usage = json.dumps(usage_body(job, fake.cached_tokens(job)), separators=(",", ":"))
        yield f'{head}[],"usage":{usage}}}\n\ndata: [DONE]\n\n'
    else:
        yield "data: [DONE]\n\n"
