"""Parse OpenAI chat-completions and completions bodies (plus headers) into a `Request`.

This is the one wire parser every driver shares (gateway, ext_proc server,
simulator), so identical HTTP input is an identical `Request` everywhere. It is
pure: a decoded JSON body and a header mapping in, a frozen value out.

Formats follow the OpenAI API reference for `/v1/chat/completions` (`messages`
whose `content` is a string, null, or a list of content parts; assistant
`tool_calls`) and `/v1/completions` (`prompt` as text or token ids), with
vLLM's handling where OpenAI is silent: text parts of one message are joined
with "\\n" and the text-like part types are those of vLLM's
`entrypoints/chat_utils.py`; `cache_salt` is vLLM's extension and must be a
non-empty string, as vLLM requires.

Every malformed input raises `RequestError` (status 400, or 413 for lists over
the size limits) whose `field` is the JSON path of the offending value, e.g.
`messages[2].content[0].text`, or the header's name. No other exception
escapes, whatever JSON-like value the body holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence

from prefixroute.request import Request, RequestError, is_text

__all__ = [
    "MAX_CONTENT_PARTS",
    "MAX_ID_LENGTH",
    "MAX_MESSAGES",
    "identifier",
    "message_text",
    "parse_openai",
    "render_messages",
]

MAX_MESSAGES = 10_000
"""Longest `messages` list accepted (413 beyond)."""
MAX_CONTENT_PARTS = 10_000
"""Most content parts accepted in one message (413 beyond)."""
MAX_ID_LENGTH = 256
"""Longest tenant, session or request id, after trimming whitespace."""

_TEXT_PART_SEPARATOR = "\n"  # vLLM joins a message's text parts with a newline
# Part types whose payload is text, and the key holding it (vLLM's text-like types).
_TEXT_PART_KEYS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
# Roles whose `content` may be null (OpenAI: assistant with tool_calls; deprecated function).
_NULLABLE_CONTENT_ROLES = frozenset({"assistant", "function"})
_INT32_MAX = 2**31 - 1
_TOKEN_ID_MAX = 2**32 - 1
_PRIORITY = re.compile(r"[+-]?[0-9]{1,10}")


def parse_openai(
    body: Mapping[str, object],
    headers: Mapping[str, str] | None = None,
    *,
    tenant_header: str | None = "x-tenant-id",
    session_header: str | None = "x-session-id",
    priority_header: str | None = "x-priority",
    request_id_header: str | None = "x-request-id",
    tenant_from_user: bool = False,
) -> Request:
    """Build a `Request` from a decoded chat-completions or completions body and its headers.

    The header names default to `x-tenant-id`, `x-session-id`, `x-priority`
    and `x-request-id`; a name of None means that header is not read (the
    drivers resolve identity themselves and pass None). `headers` None is no
    headers.

    Chat bodies (`messages`) become `prompt` via `render_messages`; completions
    bodies (`prompt`) give text or, for token-id prompts, `token_ids`. A body
    with both or neither is rejected. Batched prompts (a `prompt` list holding
    more than one string or token list) are not supported: route each prompt
    as its own request.

    Identity: headers are matched case-insensitively. The tenant comes from
    `tenant_header`, else (only when `tenant_from_user`) from the body's
    `user`, else "default": the body is client-controlled, so it is not
    trusted for tenant identity unless the deployment says so. The session
    comes from `session_header`, else from `prompt_cache_key`. The priority is
    an integer in `priority_header` (0 when absent); the body's `priority`
    (vLLM: lower is sooner) is not read, its sense differs. Ids are trimmed,
    at most `MAX_ID_LENGTH` characters and printable.

    `max_completion_tokens` wins over the older `max_tokens`. `lora` is left
    None: vLLM names a LoRA adapter in `model`, and the gateway maps model
    names to adapters. O(size of the fields read); unread fields are ignored.
    """
    if not isinstance(body, Mapping):
        raise RequestError("request body must be a JSON object")
    lowered = {k.lower(): v for k, v in (headers or {}).items() if isinstance(k, str)}

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model must be a non-empty string", field="model")

    prompt, token_ids = _prompt(body)
    if prompt is not None and not is_text(prompt):  # an engine's tokenizer would fail on it
        raise RequestError(
            "the prompt is not valid Unicode text (a lone surrogate)",
            field="messages" if "messages" in body else "prompt",
        )

    tenant = identifier(_header(lowered, tenant_header), tenant_header)
    if tenant is None and tenant_from_user:
        tenant = identifier(_optional_str(body, "user"), "user")

    session = identifier(_header(lowered, session_header), session_header)
    if session is None:
        session = identifier(_optional_str(body, "prompt_cache_key"), "prompt_cache_key")

    cache_salt = body.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise RequestError("cache_salt must be a non-empty string", field="cache_salt")

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", field="stream")

    max_tokens = _max_tokens(body, "max_tokens")
    max_completion_tokens = _max_tokens(body, "max_completion_tokens")
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens

    return Request(
        model=model,
        prompt=prompt,
        token_ids=token_ids,
        tenant=tenant or "default",
        session=session,
        priority=_priority(_header(lowered, priority_header), priority_header),
        cache_salt=cache_salt,
        lora=None,  # vLLM serves adapters by `model` name; the gateway maps them
        max_tokens=max_tokens,
        request_id=identifier(_header(lowered, request_id_header), request_id_header),
        stream=bool(stream),
    )


def render_messages(messages: Sequence[Mapping[str, str]]) -> str:
    """Render chat messages (each a `role` and its `content` already reduced to text).

    The defined rendering: each message becomes `<|role|n|>content`, where `n`
    is `len(content)` in characters and, inside `role`, a backslash or "|" is
    escaped with a backslash; the messages are concatenated in order. The
    header ends at the first unescaped "|" and the length says where the
    content ends, so the rendering is injective: splitting the same characters
    differently across messages (or roles) renders differently, while a
    shared leading run of messages renders to a shared prefix, which is what
    prefix-cache routing hashes. It is not any model's chat template; only its
    prefix structure matters. O(total characters).
    """
    out: list[str] = []
    for message in messages:
        role = message["role"].replace("\\", "\\\\").replace("|", "\\|")
        content = message["content"]
        out.append(f"<|{role}|{len(content)}|>{content}")
    return "".join(out)


def message_text(content: object, *, index: int) -> str:
    """Reduce message `index`'s `content` (a string, null, or a list of content parts) to text.

    Null is "". In a list, bare strings and text-like parts (`text`,
    `input_text`, `output_text` by their `text`; `refusal`; `thinking`) give
    their text; any other part (`image_url`, `input_audio`, `file`,
    `video_url`, ...) gives `<type:digest>`, where digest is 16 hex digits of
    BLAKE2b over the part's canonical JSON, so different media never look
    like the same prefix and equal media do. The pieces are joined with "\\n"
    (as vLLM does), so `["a", "b"]` and `"a\\nb"` give the same text.
    O(size of the content).
    """
    path = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list | tuple):
        raise RequestError(f"{path} must be a string, null or a list of content parts", field=path)
    if len(content) > MAX_CONTENT_PARTS:
        raise RequestError(
            f"{path} has more than {MAX_CONTENT_PARTS} parts", status=413, field=path
        )
    pieces: list[str] = []
    for j, part in enumerate(content):
        part_path = f"{path}[{j}]"
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, Mapping):
            raise RequestError(f"{part_path} must be a content part object", field=part_path)
        part_type = part.get("type")
        if not isinstance(part_type, str) or not part_type:
            raise RequestError(
                f"{part_path}.type must be a non-empty string", field=f"{part_path}.type"
            )
        key = _TEXT_PART_KEYS.get(part_type)
        if key is None:
            pieces.append(f"<{part_type}:{_digest(part, part_path)}>")
            continue
        text = part.get(key)
        if not isinstance(text, str):
            raise RequestError(f"{part_path}.{key} must be a string", field=f"{part_path}.{key}")
        pieces.append(text)
    return _TEXT_PART_SEPARATOR.join(pieces)


def _prompt(body: Mapping[str, object]) -> tuple[str | None, list[int] | None]:
    """The (text, token ids) of a chat or completions body; exactly one is set."""
    messages = body.get("messages")
    prompt = body.get("prompt")
    if messages is not None and prompt is not None:
        raise RequestError(
            "a request has messages (chat) or prompt (completions), not both", field="prompt"
        )
    if messages is not None:
        return _chat_prompt(messages, body.get("tools")), None
    if prompt is None:
        raise RequestError(
            "a request needs messages (chat) or prompt (completions)", field="messages"
        )
    if isinstance(prompt, str):
        return prompt, None
    if not isinstance(prompt, list | tuple):
        raise RequestError(
            "prompt must be a string, a list of token ids, or a list holding one of those",
            field="prompt",
        )
    if not prompt:
        raise RequestError("prompt must not be empty", field="prompt")
    first = prompt[0]
    if not isinstance(first, str | list | tuple):
        return None, _token_ids(prompt, "prompt")
    if len(prompt) > 1:
        raise RequestError(
            "batched prompts are not supported: send one prompt per request", field="prompt"
        )
    if isinstance(first, str):
        return first, None
    if not first:
        raise RequestError("prompt[0] must not be empty", field="prompt[0]")
    return None, _token_ids(first, "prompt[0]")


def _chat_prompt(messages: object, tools: object) -> str:
    """Render a chat body. Tool definitions, which chat templates place ahead of the
    conversation, render first as a `#tools` pseudo-message of canonical JSON, so
    requests offering different tools do not look like they share a prefix."""
    reduced: list[dict[str, str]] = []
    if tools is not None:
        if not isinstance(tools, list | tuple):
            raise RequestError("tools must be a list", field="tools")
        if tools:
            reduced.append({"role": "#tools", "content": _canonical_json(tools, "tools")})
    if not isinstance(messages, list | tuple):
        raise RequestError("messages must be a list of message objects", field="messages")
    if not messages:
        raise RequestError("messages must not be empty", field="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(
            f"messages has more than {MAX_MESSAGES} entries", status=413, field="messages"
        )
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{path} must be a message object", field=path)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"{path}.role must be a non-empty string", field=f"{path}.role")
        content = message.get("content")
        if content is None and role not in _NULLABLE_CONTENT_ROLES:
            raise RequestError(
                f"{path}.content is required (null only for assistant messages)",
                field=f"{path}.content",
            )
        text = message_text(content, index=i)
        if role == "assistant":
            text += _tool_calls_text(message.get("tool_calls"), f"{path}.tool_calls")
        reduced.append({"role": role, "content": text})
    return render_messages(reduced)


def _tool_calls_text(tool_calls: object, path: str) -> str:
    """Canonical JSON of an assistant message's tool calls ("" for none)."""
    if tool_calls is None:
        return ""
    if not isinstance(tool_calls, list | tuple):
        raise RequestError(f"{path} must be a list", field=path)
    if not tool_calls:
        return ""  # vLLM drops an empty list, so the template sees no tool calls
    for j, call in enumerate(tool_calls):
        if not isinstance(call, Mapping):
            raise RequestError(f"{path}[{j}] must be a tool call object", field=f"{path}[{j}]")
    return _canonical_json(tool_calls, path)


def _canonical_json(value: object, path: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError, RecursionError) as e:
        # TypeError: not JSON data; ValueError: a huge int; RecursionError: deep nesting.
        raise RequestError(f"{path} is not JSON data or is nested too deeply", field=path) from e


def _digest(part: object, path: str) -> str:
    data = _canonical_json(part, path).encode("ascii")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _token_ids(values: Sequence[object], path: str) -> list[int]:
    out: list[int] = []
    for j, t in enumerate(values):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _TOKEN_ID_MAX:
            raise RequestError(
                f"{path}[{j}] must be a token id, an integer in [0, 2**32)", field=f"{path}[{j}]"
            )
        out.append(t)
    return out


def _max_tokens(body: Mapping[str, object], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _INT32_MAX:
        raise RequestError(f"{key} must be an integer in [0, 2**31)", field=key)
    return value


def _optional_str(body: Mapping[str, object], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{key} must be a string", field=key)
    return value


def _header(lowered: Mapping[str, object], name: str | None) -> str | None:
    if name is None:
        return None
    value = lowered.get(name.lower())
    if value is not None and not isinstance(value, str):
        raise RequestError(f"header {name} must be text", field=name)
    return value


def identifier(value: str | None, field: str | None) -> str | None:
    """A trimmed id (tenant, session, request id), or None when absent or blank.

    RequestError (400, naming `field`) when longer than `MAX_ID_LENGTH` or
    not printable. Drivers resolving identity outside `parse_openai` use it too.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise RequestError(
            f"{field} must be at most {MAX_ID_LENGTH} printable characters", field=field
        )
    return value


def _priority(value: str | None, field: str | None) -> int:
    if value is None or not value.strip():
        return 0
    if _PRIORITY.fullmatch(value.strip()) is None or abs(int(value)) > _INT32_MAX:
        raise RequestError(f"header {field} must be an integer, got {value[:32]!r}", field=field)
    return int(value)
