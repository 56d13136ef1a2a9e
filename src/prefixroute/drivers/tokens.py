"""Engine-exact token ids for text requests: a model's chat template and tokenizer, locally.

`ModelTokenizer` renders chat messages with the model's own chat template and
tokenizes the text with the model's own `tokenizer.json`, as vLLM 0.32 does
for `/v1/chat/completions` and `/v1/completions`, so the router hashes the
engine's token blocks. Nothing is downloaded: the files come from a local
directory named in the drivers' `models` config section (`read_models`).

What is reproduced, and from where (all read in vLLM 0.32.0 and transformers
5.19, the versions the real-engine tests run; vllm-project/vllm,
huggingface/transformers):

- Messages to a conversation (vLLM `vllm/renderers/chat_utils.py`,
  `_parse_chat_message_content` and `_postprocess_messages`): a string
  `content` becomes one text part; text-like parts (`text`, `input_text`,
  `output_text` by `text`, `refusal`, `thinking`) give their text; in the
  "string" content format the texts are joined with "\\n", in the "openai"
  format the template gets the list of `{"type": "text", "text": ...}` parts
  (extra fields kept); in the "string" format an empty text is dropped.
  Assistant `tool_calls` are kept, their `arguments` JSON strings parsed to
  objects (anything but an object becomes `{}`; an empty list is dropped),
  each call's keys in the order vLLM's pydantic validation leaves them (`id`,
  `function` {`arguments`, `name`}, `type`, then extra keys); `reasoning`
  (else the deprecated `reasoning_content`, `ChatCompletionRequest.
  _normalize_messages_before`) is given as both `reasoning` and `reasoning_content`;
  a tool message keeps `tool_call_id` and has its all-text parts joined;
  `name` is kept; system text parts lose Claude Code's
  `x-anthropic-billing-header` line; `developer` messages become `system`
  (merged into one leading system message) when the template does not
  mention "developer" (`vllm/renderers/hf.py`, `safe_apply_chat_template`).
- The content format ("auto"): "openai" when the template loops over a
  message's `content` (vLLM `_detect_content_format`, an AST walk over the
  template, reimplemented in `_content_format` below), else "string".
- Tools: each becomes `{"type": "function", "function": {"name",
  "description", "parameters"[, "strict"][, "defer_loading"]}}` with None for
  a missing description or parameters, as vLLM's pydantic `model_dump` gives
  them (`ChatCompletionToolsParam`, `FunctionDefinition`).
- The template's arguments (vLLM `ChatCompletionRequest.build_chat_params`,
  `merge_kwargs`, `resolve_chat_template_kwargs`; transformers
  `apply_chat_template`): `add_generation_prompt` (default True),
  `continue_final_message`, `documents`, `reasoning_effort` (and
  `enable_thinking` when it is set), the request's `chat_template_kwargs`
  (only names the template uses reach it; values None or "auto" are
  dropped), and the tokenizer's named special tokens (`bos_token`,
  `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`,
  `mask_token` from `tokenizer_config.json`, else `special_tokens_map.json`).
- The Jinja environment (transformers `utils/chat_template_utils.py`,
  `_compile_jinja_template`): `ImmutableSandboxedEnvironment(trim_blocks=True,
  lstrip_blocks=True)` with `loopcontrols` and the `{% generation %}` tag,
  `tojson` as `json.dumps(x, ensure_ascii=False, indent=None,
  separators=None, sort_keys=False)` (not Jinja's HTML-escaping one),
  `raise_exception(message)` raising a `TemplateError`, `strftime_now(fmt)`.
  `continue_final_message` cuts the text after the last message's content
  (transformers `render_jinja_template`).
- The template itself (transformers `PreTrainedTokenizerBase.from_pretrained`
  and `get_chat_template`): `chat_template.jinja` (and
  `additional_chat_templates/*.jinja`) win over `tokenizer_config.json`'s
  `chat_template`, which is a string or a list of `{name, template}`; with
  several templates, `tool_use` serves a request with tools, else `default`.
  A processor's `chat_template.json` (multimodal models) is not read.
- Booleans of the body (`add_generation_prompt`, `continue_final_message`,
  `add_special_tokens`) are read as pydantic's lax mode reads them (1, "yes",
  "off", ...): vLLM's request models are pydantic models.
- The tokenizer (transformers `AutoTokenizer.from_pretrained`, which vLLM's
  `get_tokenizer` calls): `tokenizer.json` as it stands, except when
  transformers makes a `Qwen2Tokenizer` of the directory (`config.json`'s
  `model_type` and `tokenizer_config.json`'s `tokenizer_class`,
  `_loads_as_qwen2`): that class keeps the vocabulary, merges, added tokens
  and post-processor but sets its own normalizer (NFC) and pre-tokenizer
  (digits one by one), whatever `tokenizer.json` says. Other model classes
  that rebuild their pipeline in code (`LlamaTokenizer`, ...) are not
  reproduced: their `tokenizer.json` is trusted to say the same.
- Tokenizing (vLLM `TokenizeParams`): `add_special_tokens` False for chat
  (the template writes the special tokens), True for completions, either
  overridden by the body's `add_special_tokens`; the tokenizer's own
  truncation and padding are off.

Bounds: a chat template renders in a sandbox that also checks a deadline
(`render_timeout_s` of the thread's CPU time) at every attribute, item and
call, so a template that is slow on a request (quadratic in the messages,
say) gives up and leaves the request in text mode; its output stops at
`max_chars` (a 400).

The reuse cache (`SegmentCache`). HF `tokenizers` first cuts the text at
added tokens (special tokens such as `<|im_start|>`: `AddedVocabulary`'s
`extract_and_normalize`, leftmost-longest, the non-normalized tokens first),
then normalizes, pre-tokenizes and tokenizes each piece between them on its
own, and the post-processor adds e.g. a BOS around the whole. So the ids of a
text are the concatenation of the ids of any chunks it is cut into at added
tokens, and a chunk seen before (a tenant's system prompt, the earlier turns
of a conversation) is looked up instead of tokenized. A chunk is a piece of
at least `CACHED_PIECE_CHARS` between added tokens, or all the text between
two such pieces, so a text of thousands of short pieces is one chunk. That
holds only when no added token has `lstrip`,
`rstrip` or `single_word` set, normalized added tokens meet no normalizer,
`encode_special_tokens` is off, no `Metaspace` pre-tokenizer prepends only to
the first piece, and the post-processor is none, `ByteLevel` or
`TemplateProcessing`; `ModelTokenizer.segmented` says whether it does (and
`why_whole` why not), checked from `tokenizer.json` and by encoding probe
texts both ways at load. When not, every text is encoded whole (exact, no
reuse).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import attrs
import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
import numpy as np
import numpy.typing as npt
import tokenizers

from prefixroute.config import ConfigError
from prefixroute.request import RequestError, is_text

__all__ = [
    "CACHED_PIECE_CHARS",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_MAX_CHARS",
    "DEFAULT_RENDER_TIMEOUT_S",
    "ModelTokenizer",
    "SegmentCache",
    "TokenizerFilesError",
    "read_models",
]

TokenIds = npt.NDArray[np.uint32]

DEFAULT_CACHE_ENTRIES = 8192
"""Pieces the reuse cache holds per model, at most."""
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
"""Bytes the reuse cache holds per model, at most (text and ids, Python's sizes)."""
DEFAULT_MAX_CHARS = 4 * 1024 * 1024
"""Longest text (message texts, rendered chat or prompt) tokenized; 400 beyond."""
CACHED_PIECE_CHARS = 64
"""Shortest piece between added tokens cached on its own (shorter ones join their neighbours)."""
DEFAULT_RENDER_TIMEOUT_S = 1.0
"""Longest a chat template may render one request; beyond, the request stays in text mode."""

_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# transformers 5.19 `apply_chat_template`'s named parameters: vLLM lets them through
# `resolve_chat_template_kwargs`, and `apply_chat_template` consumes them (never the template).
_APPLY_PARAMS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
_TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
# vLLM's media part types (`MM_PARSER_MAP`): engine-specific placeholder tokens, not ours to make.
_MEDIA_PARTS = frozenset(
    {
        "image_url",
        "input_image",
        "image_embeds",
        "audio_embeds",
        "video_embeds",
        "prompt_embeds",
        "image_pil",
        "audio_url",
        "input_audio",
        "video_url",
    }
)
# Fields of vLLM's content-part types: the rest of a text part reaches an "openai" template.
_KNOWN_PART_FIELDS = frozenset(
    {"type", "text", "refusal", "thinking", "closed", "name", "uuid", "data", "detail"}
    | _MEDIA_PARTS
)
_BILLING_HEADER = "x-anthropic-billing-header"
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TokenizerFilesError(ValueError):
    """A tokenizer directory that cannot be used: missing, unreadable or invalid files."""


class _Untokenizable(Exception):
    """A request whose exact tokens cannot be made here (media parts, a render over its time
    bound): left to text mode."""


# -- the reuse cache ------------------------------------------------------------------------


class SegmentCache:
    """A bounded, thread-safe LRU map from a text piece to its token ids.

    Bounded by `max_entries` and by `max_bytes` (each entry counts
    `sys.getsizeof(piece) + ids.nbytes`); a piece over an eighth of
    `max_bytes` is never kept, so one huge prompt cannot flush everyone's
    system prompts. `get` and `put` are O(1) plus hashing the piece (O(its
    length)); a lock makes them safe from the event loop and the worker
    threads at once. An `OrderedDict` in recency order is the LRU: its
    `move_to_end` and `popitem(last=False)` are O(1).
    """

    def __init__(
        self, max_entries: int = DEFAULT_CACHE_ENTRIES, max_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._map: collections.OrderedDict[str, TokenIds] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def cost(piece: str, ids: TokenIds) -> int:
        """The bytes an entry counts for."""
        return sys.getsizeof(piece) + ids.nbytes

    def __len__(self) -> int:
        return len(self._map)

    @property
    def nbytes(self) -> int:
        """Bytes held (as `cost` counts them)."""
        return self._bytes

    def get(self, piece: str) -> TokenIds | None:
        """The ids of `piece`, refreshed as most recent; None (a miss) when absent."""
        with self._lock:
            ids = self._map.get(piece)
            if ids is None:
                self.misses += 1
                return None
            self._map.move_to_end(piece)
            self.hits += 1
            return ids

    def put(self, piece: str, ids: TokenIds) -> None:
        """Keep `piece -> ids` (read-only), dropping the least recent entries to fit."""
        cost = self.cost(piece, ids)
        if cost > self.max_bytes // 8:
            return
        with self._lock:
            old = self._map.pop(piece, None)
            if old is not None:
                self._bytes -= self.cost(piece, old)
            self._map[piece] = ids
            self._bytes += cost
            while len(self._map) > self.max_entries or self._bytes > self.max_bytes:
                dropped, dropped_ids = self._map.popitem(last=False)
                self._bytes -= self.cost(dropped, dropped_ids)

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        with self._lock:
            self._map.clear()
            self._bytes = 0

    def check_invariants(self) -> None:
        """Raise AssertionError if the bounds or the byte count are wrong."""
        with self._lock:
            assert len(self._map) <= self.max_entries
            assert self._bytes <= self.max_bytes
            assert self._bytes == sum(self.cost(p, i) for p, i in self._map.items())
            assert all(not i.flags.writeable and i.dtype == np.uint32 for i in self._map.values())


# -- the Jinja environment (transformers' apply_chat_template) ------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers marks
    assistant tokens with it; rendering is unchanged)."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: object) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _tojson(
    x: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Deadline(threading.local):
    """This thread's render deadline, inf when not rendering: `at` on `time.monotonic` (cheap
    to check), `cpu_at` on `time.thread_time` (what the template really spent)."""

    at = math.inf
    cpu_at = math.inf

    def start(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.cpu_at = time.thread_time() + seconds

    def stop(self) -> None:
        self.at = self.cpu_at = math.inf

    def passed(self) -> bool:
        """Past `at`: whether the thread's CPU time is also past `cpu_at`. If not (the
        thread waited for a core or the GIL), `at` moves by the CPU time still left."""
        spent = time.thread_time()
        if spent > self.cpu_at:
            return True
        self.at = time.monotonic() + (self.cpu_at - spent)
        return False


_deadline = _Deadline()
_Sandbox = jinja2.sandbox.ImmutableSandboxedEnvironment


def _too_late() -> _Untokenizable:
    return _Untokenizable("the chat template took too long to render")


class _BoundedEnvironment(_Sandbox):
    """transformers' sandbox, plus a time bound: every attribute, item and call the template
    makes checks this thread's deadline, in CPU time (Jinja has none; vLLM bounds the render by
    `VLLM_CHAT_TEMPLATE_RENDER_TIMEOUT` around its thread instead, which a router cannot
    afford on its event loop). A loop that touches nothing runs between two checks."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if time.monotonic() > _deadline.at and _deadline.passed():
            raise _too_late()
        return _Sandbox.getattr(self, obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if time.monotonic() > _deadline.at and _deadline.passed():
            raise _too_late()
        return _Sandbox.getitem(self, obj, argument)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() > _deadline.at and _deadline.passed():
            raise _too_late()
        return _Sandbox.call(self, __context, __obj, *args, **kwargs)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# -- vLLM's content-format detection (hf.py `_detect_content_format`) ------------------------


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (
            _is_var(node.node, name)
            and isinstance(node.arg, jinja2.nodes.Const)
            and node.arg.value == key
        )
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_access(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _is_access(node.node, name, key)
    if isinstance(node, jinja2.nodes.Test):
        return _is_access(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_access(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _aliases(root: jinja2.nodes.Template, name: str) -> list[str]:
    out = [name]
    pending = collections.deque([name])
    while pending:
        current = pending.popleft()
        for assign in root.find_all(jinja2.nodes.Assign):
            target = assign.target
            if isinstance(target, jinja2.nodes.Name) and _is_access(assign.node, current):
                out.append(target.name)
                if target.name != current:
                    pending.append(target.name)
    return out


def _loops_over_content(root: jinja2.nodes.Template) -> Iterator[jinja2.nodes.For]:
    messages = _aliases(root, "messages")
    message_vars = [
        loop.target.name
        for loop in root.find_all(jinja2.nodes.For)
        if isinstance(loop.target, jinja2.nodes.Name)
        and any(_is_access(loop.iter, m) for m in messages)
    ]
    macro_params: dict[int, set[str]] = {}
    in_macros: set[int] = set()
    for macro in root.find_all(jinja2.nodes.Macro):
        names = {arg.name for arg in macro.args}
        params: set[str] = set()
        for call in root.find_all(jinja2.nodes.Call):
            if not (isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name):
                continue
            for i, arg in enumerate(call.args):
                if i < len(macro.args) and any(_is_access(arg, m, "content") for m in message_vars):
                    params.add(macro.args[i].name)
            for kw in call.kwargs:
                if kw.key in names and any(
                    _is_access(kw.value, m, "content") for m in message_vars
                ):
                    params.add(kw.key)
        for loop in macro.find_all(jinja2.nodes.For):
            in_macros.add(id(loop))
            if params:
                macro_params[id(loop)] = params
    for loop in root.find_all(jinja2.nodes.For):
        over_content = any(_is_access(loop.iter, m, "content") for m in message_vars)
        over_param = isinstance(loop.iter, jinja2.nodes.Name) and (
            loop.iter.name in macro_params.get(id(loop), ())
            or (id(loop) not in in_macros and loop.iter.name == "content")
        )
        if over_content or over_param:
            yield loop


def _content_format(env: jinja2.Environment, source: str) -> str:
    """ "openai" when the template iterates over a message's content parts, else "string"."""
    try:
        ast = env.parse(source)
        next(_loops_over_content(ast))
    except StopIteration:
        return "string"
    except Exception:  # vLLM: a template its walk cannot read defaults to "string"
        return "string"
    return "openai"


# -- the tokenizer ------------------------------------------------------------------------


@attrs.frozen
class _Template:
    source: str
    compiled: jinja2.Template
    variables: frozenset[str]
    content_format: str
    developer: bool


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise TokenizerFilesError(f"cannot read {path}: {exc}") from None


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _find(tree: object, key: str, value: str) -> Iterator[Mapping[str, Any]]:
    """Every mapping inside `tree` (a decoded tokenizer.json part) whose `key` is `value`."""
    if isinstance(tree, Mapping):
        if tree.get(key) == value:
            yield tree
        for child in tree.values():
            yield from _find(child, key, value)
    elif isinstance(tree, list):
        for child in tree:
            yield from _find(child, key, value)


# transformers 5.19 `TOKENIZER_MAPPING_NAMES`: the model types whose tokenizer class is
# `Qwen2Tokenizer`; of them, `qwen2` is in `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` (its
# `tokenizer_class` in tokenizer_config.json is ignored).
_QWEN2_MODEL_TYPES = frozenset(
    {
        "audioflamingo3", "colqwen2", "cosmos3_omni", "fun_asr_nano", "hunyuan_vl",
        "internvl", "lighton_ocr", "ovis2", "qianfan_ocr", "qwen2", "qwen2_5_omni",
        "qwen2_5_vl", "qwen2_audio", "qwen2_moe", "qwen2_vl", "qwen3", "qwen3_asr",
        "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl", "qwen3_vl_moe", "vibevoice",
    }
)  # fmt: skip
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _loads_as_qwen2(model_type: object, tokenizer_class: object) -> bool:
    """Whether transformers 5.19's `AutoTokenizer` (vLLM's loader) makes a `Qwen2Tokenizer`
    of this directory (`tokenization_auto.py`, `AutoTokenizer.from_pretrained`): the class
    named in tokenizer_config.json, except for `qwen2` models; else the model type's."""
    named = tokenizer_class.removesuffix("Fast") if isinstance(tokenizer_class, str) else None
    if named is None or model_type == "qwen2":
        return model_type in _QWEN2_MODEL_TYPES
    return named == "Qwen2Tokenizer"


def _rebuild_as_qwen2(tokenizer: tokenizers.Tokenizer, add_prefix_space: object) -> None:
    """transformers 5.19 `Qwen2Tokenizer.__init__`: it keeps tokenizer.json's vocabulary,
    merges, added tokens and post-processor but sets its own normalizer (NFC) and
    pre-tokenizer (its split regex, then byte-level), whatever tokenizer.json says."""
    tokenizer.normalizer = tokenizers.normalizers.NFC()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(
                tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated", invert=False
            ),
            tokenizers.pre_tokenizers.ByteLevel(
                add_prefix_space=add_prefix_space is True, use_regex=False
            ),
        ]
    )


def _frozen(ids: Sequence[int] | npt.NDArray[Any]) -> TokenIds:
    out = np.array(ids, dtype=np.uint32)
    out.flags.writeable = False
    return out


class ModelTokenizer:
    """One model's chat template and tokenizer, with the reuse cache (module docstring).

    Build one with `from_dir`. `chat_ids`, `prompt_ids` and `body_ids` are safe
    from several threads at once (the Rust tokenizer and the cache lock
    themselves; a render's only state is its thread's deadline). Every method costs O(text length)
    on a cache miss; a hit costs hashing the piece and copying its ids.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        templates: Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_chars: int = DEFAULT_MAX_CHARS,
        render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S,
        name: str = "",
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.special_tokens = dict(special_tokens or {})
        self.max_chars = max_chars
        self.render_timeout_s = render_timeout_s
        self.cache = SegmentCache(cache_entries, cache_bytes)
        self._env = _environment()
        self._templates: dict[str, _Template] = {}
        for key, source in (templates or {}).items():
            try:
                compiled = self._env.from_string(source)
                variables = frozenset(
                    jinja2.meta.find_undeclared_variables(self._env.parse(source))
                )
            except jinja2.TemplateError as exc:
                raise TokenizerFilesError(
                    f"chat template {key!r} does not compile: {exc}"
                ) from None
            self._templates[key] = _Template(
                source=source,
                compiled=compiled,
                variables=variables,
                content_format=_content_format(self._env, source),
                developer='"developer"' in source or "'developer'" in source,
            )
        self._tree = json.loads(tokenizer.to_str())
        self._added = self._added_tokens()
        # `encode_batch_fast` (no offsets) is tokenizers >= 0.21; `encode_batch` gives the same ids
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._first, self._second = self._splitters()
        self._prefix, self._suffix, self._post_ok = self._post_ids()
        self.why_whole = self._why_not_segmented()
        self.segmented = not self.why_whole

    # -- loading --

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike[str], *, name: str = "", **options: Any
    ) -> ModelTokenizer:
        """Load `path/tokenizer.json`, `tokenizer_config.json` and the chat template files.

        `options` are the constructor's (`cache_entries`, `max_chars`, ...);
        `name` defaults to the directory's. `tokenizer.json` is required
        (`config.json` is read for the tokenizer class transformers would
        make, module docstring); `tokenizer_config.json` is read when
        present (a directory without one has no chat template and no named
        special tokens). Raises `TokenizerFilesError` naming the file when a
        file is missing, unreadable or invalid. Never downloads anything.
        """
        root = Path(path)
        if not root.is_dir():
            raise TokenizerFilesError(f"{root} is not a directory")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerFilesError(f"{tok_file} is missing (a fast tokenizer's file)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokenizerFilesError(f"cannot load {tok_file}: {exc}") from None
        config_file = root / "tokenizer_config.json"
        config: Any = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, Mapping):
            raise TokenizerFilesError(f"{config_file} must hold a JSON object")
        model_file = root / "config.json"
        model: Any = _read_json(model_file) if model_file.is_file() else {}
        model_type = model.get("model_type") if isinstance(model, Mapping) else None
        if _loads_as_qwen2(model_type, config.get("tokenizer_class")):
            _rebuild_as_qwen2(tokenizer, config.get("add_prefix_space"))
        map_file = root / "special_tokens_map.json"
        legacy: Any = _read_json(map_file) if map_file.is_file() else {}
        special: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(key))
            if text is None and isinstance(legacy, Mapping):
                text = _token_text(legacy.get(key))
            if text is not None:
                special[key] = text
        return cls(
            tokenizer,
            templates=cls._read_templates(root, config),
            special_tokens=special,
            name=name or root.name,
            **options,
        )

    @staticmethod
    def _read_templates(root: Path, config: Mapping[str, Any]) -> dict[str, str]:
        templates: dict[str, str] = {}
        try:
            if (root / "chat_template.jinja").is_file():
                templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
            extra = root / "additional_chat_templates"
            if extra.is_dir():
                for file in sorted(extra.glob("*.jinja")):
                    templates[file.stem] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerFilesError(
                f"cannot read a chat template file in {root}: {exc}"
            ) from None
        if templates:
            return templates
        value = config.get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list):
            for entry in value:
                if not (
                    isinstance(entry, Mapping)
                    and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)
                ):
                    raise TokenizerFilesError(
                        "tokenizer_config.json chat_template entries must be {name, template}"
                    )
                templates[entry["name"]] = entry["template"]
            return templates
        raise TokenizerFilesError(
            "tokenizer_config.json chat_template must be a string or a list of {name, template}"
        )

    def _added_tokens(self) -> dict[str, Any]:
        return {t.content: t for t in self.tokenizer.get_added_tokens_decoder().values()}

    def _splitters(self) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
        """Regexes cutting at non-normalized, then at normalized added tokens (longest first)."""

        def pattern(contents: list[str]) -> re.Pattern[str] | None:
            if not contents:
                return None
            ordered = sorted(set(contents), key=lambda c: (-len(c), c))
            return re.compile("|".join(re.escape(c) for c in ordered))

        first = [c for c, t in self._added.items() if c and not t.normalized]
        second = [c for c, t in self._added.items() if c and t.normalized]
        return pattern(first), pattern(second)

    def _post_ids(self) -> tuple[TokenIds, TokenIds, bool]:
        """The ids the post-processor puts before and after a single sequence (and if known)."""
        empty = _frozen([])
        post = self._tree.get("post_processor")
        parts = [post] if post is not None else []
        if isinstance(post, Mapping) and post.get("type") == "Sequence":
            parts = list(post.get("processors") or [])
        prefix: list[int] = []
        suffix: list[int] = []
        for part in parts:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "ByteLevel":
                continue
            if kind != "TemplateProcessing":
                return empty, empty, False
            seen_sequence = False
            try:
                for item in part.get("single") or []:
                    if "Sequence" in item:
                        seen_sequence = True
                        continue
                    special = part["special_tokens"][item["SpecialToken"]["id"]]
                    (suffix if seen_sequence else prefix).extend(int(i) for i in special["ids"])
            except (KeyError, TypeError, ValueError):  # a shape not modelled: encode whole
                return empty, empty, False
        return _frozen(prefix), _frozen(suffix), True

    def _why_not_segmented(self) -> str:
        """ "" when piece-wise encoding is exact for this tokenizer, else the reason."""
        if self.tokenizer.encode_special_tokens:
            return "encode_special_tokens is on"
        for content, token in self._added.items():
            if token.lstrip or token.rstrip or token.single_word:
                return f"added token {content!r} has lstrip/rstrip/single_word"
            if token.normalized and self._tree.get("normalizer") is not None:
                return f"added token {content!r} is normalized and there is a normalizer"
        for node in _find(self._tree.get("pre_tokenizer"), "type", "Metaspace"):
            if node.get("prepend_scheme") == "first":
                return "a Metaspace pre-tokenizer prepends to the first piece only"
        if not self._post_ok:
            return f"post-processor {self._tree['post_processor'].get('type')!r} is not modelled"
        probes = ["", "x" * CACHED_PIECE_CHARS, " a b\n\n" * 12, "Hello, world! 123 \t\n" * 4]
        specials = sorted(self._added)[:8]
        texts = [a + b + c for a in probes for b in specials or [""] for c in probes]
        texts += [b + b + " " + c for b in specials for c in specials]
        for text in texts:
            for add in (False, True):
                if not np.array_equal(self._encode_pieces(text, add), self.encode_whole(text, add)):
                    return f"probe {text!r} tokenizes differently in pieces"
        self.cache.clear()
        return ""

    # -- tokenizing --

    def pieces(self, text: str) -> list[tuple[str, bool]]:
        """`text` cut at added tokens: (piece, is an added token) in order. O(len(text))."""
        out: list[tuple[str, bool]] = []
        for piece, special in self._cut(text, self._first):
            if special:
                out.append((piece, True))
            else:
                out.extend(self._cut(piece, self._second))
        return out

    @staticmethod
    def _cut(text: str, pattern: re.Pattern[str] | None) -> list[tuple[str, bool]]:
        if not text:
            return []
        if pattern is None:
            return [(text, False)]
        out: list[tuple[str, bool]] = []
        at = 0
        for match in pattern.finditer(text):
            if match.start() > at:
                out.append((text[at : match.start()], False))
            out.append((match.group(), True))
            at = match.end()
        if at < len(text):
            out.append((text[at:], False))
        return out

    def encode_whole(self, text: str, add_special_tokens: bool) -> TokenIds:
        """The reference: the whole text in one tokenizer call, no cache. O(len(text))."""
        return _frozen(self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def _encode_pieces(self, text: str, add_special_tokens: bool) -> TokenIds:
        """`text` encoded in chunks cut at added tokens, each looked up in the cache, the
        misses encoded in one batch: a chunk is an ordinary piece of at least
        `CACHED_PIECE_CHARS`, or all the text between two such pieces (short pieces and
        added tokens). So a text of many short pieces costs what encoding it whole costs
        and takes one cache entry, not thousands that would flush everyone's prompts."""
        chunks: list[str] = []
        run: list[str] = []
        for piece, special in self.pieces(text):
            if special or len(piece) < CACHED_PIECE_CHARS:
                run.append(piece)
                continue
            if run:
                chunks.append("".join(run))
                run = []
            chunks.append(piece)
        if run:
            chunks.append("".join(run))
        arrays = [self.cache.get(chunk) for chunk in chunks]
        todo = [i for i, ids in enumerate(arrays) if ids is None]
        if todo:
            encoded = self._encode_batch([chunks[i] for i in todo], add_special_tokens=False)
            for i, encoding in zip(todo, encoded, strict=True):
                arrays[i] = ids = _frozen(encoding.ids)
                self.cache.put(chunks[i], ids)
        done = cast(list[TokenIds], arrays)
        parts = [self._prefix, *done, self._suffix] if add_special_tokens else done
        return _frozen(np.concatenate(parts)) if parts else _frozen([])

    def encode(self, text: str, *, add_special_tokens: bool, field: str = "prompt") -> TokenIds:
        """The ids of `text` as the engine computes them: piece-wise through the cache when
        `segmented`, else whole. Read-only uint32. `RequestError` (400, naming `field`) when
        `text` is over `max_chars` or holds a lone surrogate. O(len(text)); pieces seen
        before cost a lookup."""
        if len(text) > self.max_chars:
            raise RequestError(
                f"the prompt is too long to tokenize ({len(text)} characters, "
                f"at most {self.max_chars})",
                field=field,
            )
        try:
            if self.segmented:
                return self._encode_pieces(text, add_special_tokens)
            return self.encode_whole(text, add_special_tokens)
        except TypeError:  # the Rust side takes only valid Unicode
            if is_text(text):
                raise
            raise RequestError(
                "the text to tokenize is not valid Unicode (a lone surrogate, in a message, "
                "a tool or a template argument)",
                field=field,
            ) from None

    def prompt_ids(self, text: str, *, add_special_tokens: bool = True) -> TokenIds:
        """A completions prompt's ids (vLLM's default `add_special_tokens=True`)."""
        return self.encode(text, add_special_tokens=add_special_tokens, field="prompt")

    def chat_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        *,
        add_special_tokens: bool = False,
        **options: Any,
    ) -> TokenIds:
        """A chat's ids: `render_chat` (`options` are its keyword arguments), then `encode`
        (vLLM's chat default: no added BOS)."""
        text = self.render_chat(messages, tools, chat_template_kwargs, **options)
        return self.encode(text, add_special_tokens=add_special_tokens, field="messages")

    # -- rendering --

    def _template_for(self, tools: object) -> _Template:
        """The template a request uses (transformers `get_chat_template`); 400 when none."""
        if not self._templates:
            raise RequestError(
                f"model {self.name!r} has no chat template: send a completions prompt",
                field="messages",
            )
        if len(self._templates) == 1 and "default" in self._templates:
            return self._templates["default"]
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise RequestError(
            f"model {self.name!r} has several chat templates and no default", field="messages"
        )

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        documents: Sequence[Mapping[str, Any]] | None = None,
        extra_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The text the chat template makes of `messages`, as vLLM renders it (module docstring).

        `extra_kwargs` are the request's other template arguments (vLLM's
        `reasoning_effort`, `enable_thinking`) that win over `chat_template_kwargs`.
        Raises `RequestError` (400) naming the field for a malformed message,
        a content part that is neither text nor media, a template that
        refuses the chat (`raise_exception`) or fails on it, a rendered text
        over `max_chars`; `_Untokenizable` for media parts and a render over
        `render_timeout_s`. O(size of the chat + the rendered text).
        """
        tool_dicts = None if tools is None else _tool_dicts(tools)
        template = self._template_for(tool_dicts)
        conversation = _conversation(messages, template.content_format, self.max_chars)
        if not template.developer and any(m["role"] == "developer" for m in conversation):
            conversation = _merge_systems([_as_system(m) for m in conversation])
        own = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "documents": documents,
            **(extra_kwargs or {}),
        }
        kwargs = _template_kwargs(chat_template_kwargs, own, tool_dicts)
        tool_arg = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        add_generation_prompt = bool(kwargs.get("add_generation_prompt"))
        continue_final_message = bool(kwargs.get("continue_final_message"))
        if continue_final_message and add_generation_prompt:
            raise RequestError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                field="continue_final_message",
            )
        passed = {k: v for k, v in kwargs.items() if k in template.variables - _APPLY_PARAMS}
        if "messages" in passed:  # transformers' render(messages=..., **kwargs): a TypeError
            raise RequestError(
                "chat_template_kwargs must not set `messages`", field="chat_template_kwargs"
            )
        final: str | None = None
        if continue_final_message:
            final = _tag_final(conversation, template.source)
        arguments = {
            "messages": conversation,
            "tools": tool_arg,
            "documents": documents,
            "add_generation_prompt": add_generation_prompt,
            **self.special_tokens,
            **passed,
        }
        _deadline.start(self.render_timeout_s)
        try:
            chunks, size = [], 0
            for chunk in template.compiled.generate(arguments):
                size += len(chunk)
                if size > self.max_chars:
                    raise RequestError(
                        f"the rendered chat is too long to tokenize (over {self.max_chars} "
                        "characters)",
                        field="messages",
                    )
                chunks.append(chunk)
            text = "".join(chunks)
        except (_Untokenizable, RequestError):
            raise
        except jinja2.TemplateError as exc:
            raise RequestError(
                f"the chat template refused the request: {exc}", field="messages"
            ) from None
        except Exception as exc:  # a model's template is foreign code: any failure is a 400
            raise RequestError(
                f"the chat template could not render the messages: {type(exc).__name__}: {exc}",
                field="messages",
            ) from None
        finally:
            _deadline.stop()
        return text if final is None else _cut_final(text, final)

    def body_ids(self, doc: Mapping[str, Any]) -> TokenIds | None:
        """The engine's ids for a decoded chat or completions body, or None to stay in text mode.

        None for a completions prompt given as token ids (they are the ids
        already), a request carrying its own `chat_template` (vLLM refuses it
        unless trusted; the engine decides) and chats with media parts
        (images, audio, video: their placeholder tokens are the engine's).
        `RequestError` (400, naming the field) for what vLLM also refuses.
        """
        messages = doc.get("messages")
        if messages is None:
            prompt = doc.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                return None
            return self.prompt_ids(
                prompt, add_special_tokens=_flag(doc, "add_special_tokens", True)
            )
        if doc.get("chat_template") is not None:
            return None
        if not isinstance(messages, list):
            raise RequestError("messages must be a list of message objects", field="messages")
        tools = doc.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise RequestError("tools must be a list", field="tools")
        documents = doc.get("documents")
        if documents is not None and not (
            isinstance(documents, list) and all(isinstance(d, Mapping) for d in documents)
        ):
            raise RequestError("documents must be a list of objects", field="documents")
        ckw = doc.get("chat_template_kwargs")
        if ckw is not None and not isinstance(ckw, Mapping):
            raise RequestError(
                "chat_template_kwargs must be an object", field="chat_template_kwargs"
            )
        effort = doc.get("reasoning_effort")
        extra: dict[str, Any] = {"reasoning_effort": effort}
        if effort is not None and "enable_thinking" not in (ckw or {}):
            extra["enable_thinking"] = effort != "none"
        try:
            text = self.render_chat(
                messages,
                tools,
                ckw,
                add_generation_prompt=_flag(doc, "add_generation_prompt", True),
                continue_final_message=_flag(doc, "continue_final_message", False),
                documents=documents,
                extra_kwargs=extra,
            )
        except _Untokenizable:
            return None
        return self.encode(
            text, add_special_tokens=_flag(doc, "add_special_tokens", False), field="messages"
        )


# -- request pieces as vLLM shapes them -----------------------------------------------------


_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _flag(doc: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean field as pydantic's lax mode reads it (vLLM's request models): a bool, 0 or
    1, or one of `_TRUE` / `_FALSE` in any case; absent or null is `default`."""
    value = doc.get(key, default)
    if value is None or isinstance(value, bool):
        return default if value is None else value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise RequestError(f"{key} must be a boolean", field=key)


def _template_kwargs(
    user: Mapping[str, Any] | None, extra: Mapping[str, Any] | None, tools: object
) -> dict[str, Any]:
    """vLLM's merge: the request's `chat_template_kwargs`, then its own fields over them,
    then both over the server's defaults (`tools`); None and "auto" values never override."""
    user = dict(user or {})
    if "chat_template" in user:
        raise RequestError(
            "Found unexpected chat template kwargs from request: {'chat_template'}",
            field="chat_template_kwargs",
        )
    user.pop("tokenize", None)  # vLLM's `safe_apply_chat_template` consumes it
    unset = (None, "auto")

    def overlay(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
        return base | {k: v for k, v in over.items() if not _unset(v, unset)}

    request = overlay(user, extra or {})
    return overlay({"tools": tools}, request)


def _unset(value: object, unset: tuple[object, ...]) -> bool:
    return value is None or (isinstance(value, str) and value in unset)


def _tool_dicts(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools as vLLM's `ChatCompletionToolsParam.model_dump()` gives them to the template."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        path = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise RequestError(f"{path}.function.name must be a string", field=f"{path}.function")
        if tool.get("type", "function") != "function":
            raise RequestError(f"{path}.type must be 'function'", field=f"{path}.type")
        params = function.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise RequestError(
                f"{path}.function.parameters must be an object", field=f"{path}.function.parameters"
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(
                f"{path}.function.description must be a string",
                field=f"{path}.function.description",
            )
        defer = tool.get("defer_loading")
        fn: dict[str, Any] = {"name": function["name"], "description": description}
        fn["parameters"] = params
        if function.get("strict") is not None:
            fn["strict"] = function["strict"]
        fn_defer = function.get("defer_loading")
        if fn_defer is None:
            fn_defer = defer
        if fn_defer is not None:
            fn["defer_loading"] = fn_defer
        entry: dict[str, Any] = {"type": "function", "function": fn}
        if defer is not None:
            entry["defer_loading"] = defer
        out.append(entry)
    return out


def _part_text(part: object, path: str, wrap: bool) -> Any:
    """One content part: its text (or a text part dict when `wrap`), None to skip."""
    if isinstance(part, str):
        return {"type": "text", "text": part} if wrap else part
    if not isinstance(part, Mapping):
        raise RequestError(f"{path} must be a content part object", field=path)
    kind = part.get("type")
    media_keys = any(key in part for key in _MEDIA_PARTS)
    if kind in _MEDIA_PARTS or ((kind is None or part.get("uuid") is not None) and media_keys):
        raise _Untokenizable(path)
    if kind == "tool_reference":
        name = part.get("name")
        return {"type": "tool_reference", "name": name} if wrap else name
    key = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
    if key is None:
        raise RequestError(f"Unsupported chat content part type: {kind!r}", field=f"{path}.type")
    text = part.get(key)
    if text is None and kind in ("text", "refusal"):
        return None
    if not isinstance(text, str):
        raise RequestError(f"{path}.{key} must be a string", field=f"{path}.{key}")
    if not wrap:
        return text
    out = {"type": "text", "text": text}
    out.update({k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS})
    return out


def _strip_billing(parts: list[Any]) -> list[Any]:
    out: list[Any] = []
    for part in parts:
        text = part if isinstance(part, str) else None
        if isinstance(part, Mapping) and part.get("type") == "text":
            text = part.get("text")
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _conversation(
    messages: Sequence[Mapping[str, Any]], content_format: str, max_chars: int
) -> list[dict[str, Any]]:
    """vLLM's `parse_chat_messages` + `_postprocess_messages` for text-only chats."""
    wrap = content_format == "openai"
    out: list[dict[str, Any]] = []
    chars = 0
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{path} must be a message object", field=path)
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError(f"{path}.role must be a string", field=f"{path}.role")
        content = message.get("content")
        if content is None:
            parts: list[Any] = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = list(content)
        else:
            raise RequestError(
                f"{path}.content must be a string, null or a list", field=f"{path}.content"
            )
        if role == "system":
            parts = _strip_billing(parts)
        texts = []
        for j, part in enumerate(parts):
            value = _part_text(part, f"{path}.content[{j}]", wrap)
            if not value:  # vLLM drops a skipped part, and an empty text unless wrapped
                continue
            text = value if isinstance(value, str) else value.get("text")
            chars += len(text) if isinstance(text, str) else 0
            texts.append(value)
        if chars > max_chars:
            raise RequestError(
                f"the messages are too long to tokenize (over {max_chars} characters)",
                field="messages",
            )
        entry: dict[str, Any] = {"role": role}
        if wrap:
            entry["content"] = texts
        else:
            if any(not isinstance(t, str) for t in texts):
                raise RequestError(f"{path}.content holds a part without text", field=path)
            entry["content"] = "\n".join(texts)
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise RequestError(
                        f"{path}.tool_calls must be a list", field=f"{path}.tool_calls"
                    )
                entry["tool_calls"] = list(calls)
            reasoning = message.get("reasoning")
            if reasoning is None:  # vLLM renames the deprecated `reasoning_content`
                reasoning = message.get("reasoning_content")
            if reasoning is not None:
                entry["reasoning"] = reasoning
                entry["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in message:
                entry["tool_call_id"] = message["tool_call_id"]
            body = entry["content"]
            if isinstance(body, list) and all(
                isinstance(item, dict) and item.get("type") == "text" for item in body
            ):
                entry["content"] = "\n".join(item.get("text", "") for item in body)
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        if isinstance(message.get("task"), str):
            entry["task"] = message["task"]
        if role == "developer":
            entry["tools"] = message.get("tools")
        out.append(entry)
    for i, entry in enumerate(out):
        if entry["role"] == "assistant" and "tool_calls" in entry:
            _parse_arguments(entry, f"messages[{i}].tool_calls")
    return out


def _parse_arguments(entry: dict[str, Any], path: str) -> None:
    """vLLM's `_postprocess_messages`: each assistant tool call's `arguments` parsed to an
    object, the call rebuilt in the key order vLLM's pydantic validation gives it (`id`,
    `function` {`arguments`, `name`, extras}, `type`, extras); an empty list is dropped."""
    calls = entry["tool_calls"]
    if not calls:
        del entry["tool_calls"]
        return
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict):
            raise RequestError("assistant tool_calls entries must be objects.", field=path)
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise RequestError(
                "chat completions only support assistant tool_calls of type 'function'.",
                field=f"{path}[{j}]",
            )
        raw = function.get("arguments")
        parsed: Any = {}
        if raw:
            if isinstance(raw, str):
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
            else:
                parsed = raw
            if not isinstance(parsed, dict):
                parsed = {}
        rebuilt = _ordered({**function, "arguments": parsed}, ("arguments", "name"))
        out.append(_ordered(call, ("id", "function", "type")) | {"function": rebuilt})
    entry["tool_calls"] = out


def _ordered(mapping: Mapping[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    """`mapping` with the keys `first` (those present) first, then the others in order."""
    head = {key: mapping[key] for key in first if key in mapping}
    return head | {key: value for key, value in mapping.items() if key not in head}


def _as_system(message: dict[str, Any]) -> dict[str, Any]:
    """vLLM's `_convert_developer_to_system` for one message."""
    if message["role"] != "developer":
        return message
    out = dict(message, role="system")
    out.pop("tools", None)
    return out


def _merge_systems(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's `_consolidate_system_messages`: all system messages as one, first."""
    texts: list[str] = []
    rest: list[dict[str, Any]] = []
    merge = False
    for i, message in enumerate(conversation):
        if message["role"] != "system":
            rest.append(message)
            continue
        if i > 0 or texts:
            merge = True
        content = message.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p
                for p in content
                if isinstance(p, str) or (isinstance(p, dict) and "text" in p)
            )
        if content:
            texts.append(content)
    if not merge:
        return conversation
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest]


def _tag_final(conversation: list[dict[str, Any]], source: str) -> str:
    """transformers' `continue_final_message`: tag the last message's text to cut after;
    returns that text."""
    if not conversation or conversation[-1].get("content") is None:
        raise RequestError(
            'continue_final_message is set but the final message has no "content" to continue',
            field="continue_final_message",
        )
    if "content" not in source:
        raise RequestError(
            "continue_final_message is set but the chat template does not use content",
            field="continue_final_message",
        )
    last = conversation[-1]  # this call's own dicts (`_conversation`): changed in place
    content = last["content"]
    final: str
    if isinstance(content, list):
        for block in reversed(content):
            if isinstance(block, dict) and "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                break
        else:
            raise RequestError(
                "continue_final_message is set but the final message has no text",
                field="continue_final_message",
            )
    else:
        final = content
        last["content"] = content + _CONTINUE_TAG
    return final


def _cut_final(text: str, final: str) -> str:
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise RequestError(
            "continue_final_message is set but the final message does not appear in the chat "
            "after applying the chat template",
            field="continue_final_message",
        )
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


# -- config ---------------------------------------------------------------------------------


_MODEL_KEYS = {"tokenizer", "cache_entries", "cache_bytes", "max_chars", "render_timeout_s"}


def read_models(
    section: object, *, base_dir: str | os.PathLike[str] = "."
) -> dict[str, ModelTokenizer]:
    """The drivers' `models` section: `{NAME: {tokenizer: DIR}}`, each tokenizer loaded now.

    `DIR` is relative to `base_dir` (the config file's directory). Optional
    per model: `cache_entries`, `cache_bytes` (the reuse cache's bounds) and
    `max_chars` (the longest text tokenized) and `render_timeout_s` (the
    longest a chat template may render one request). Raises `ConfigError` at the
    field's path (`models.NAME.tokenizer`) when a value is wrong or the
    files are missing or unreadable. Nothing is downloaded.
    """
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError("models", "must be a mapping of model name to {tokenizer: DIR}")
    out: dict[str, ModelTokenizer] = {}
    for name, spec in section.items():
        path = f"models.{name}"
        if not isinstance(name, str) or not name:
            raise ConfigError("models", "model names must be non-empty strings")
        if not isinstance(spec, Mapping):
            raise ConfigError(path, "must be a mapping with a `tokenizer` directory")
        unknown = sorted(set(spec) - _MODEL_KEYS)
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}", "unknown key")
        directory = spec.get("tokenizer")
        if not isinstance(directory, str) or not directory:
            raise ConfigError(f"{path}.tokenizer", "must be a directory path (string)")
        sizes: dict[str, int] = {}
        for key, default in (
            ("cache_entries", DEFAULT_CACHE_ENTRIES),
            ("cache_bytes", DEFAULT_CACHE_BYTES),
            ("max_chars", DEFAULT_MAX_CHARS),
        ):
            value = spec.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}.{key}", f"must be an integer >= 1, got {value!r}")
            sizes[key] = value
        timeout = spec.get("render_timeout_s", DEFAULT_RENDER_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"{path}.render_timeout_s", f"must be a number > 0, got {timeout!r}")
        where = Path(base_dir) / directory
        try:
            out[name] = ModelTokenizer.from_dir(
                where,
                name=name,
                cache_entries=sizes["cache_entries"],
                cache_bytes=sizes["cache_bytes"],
                max_chars=sizes["max_chars"],
                render_timeout_s=float(timeout),
            )
        except TokenizerFilesError as exc:
            raise ConfigError(f"{path}.tokenizer", str(exc)) from None
    return out
