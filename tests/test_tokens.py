"""Engine-exact tokens (`prefixroute.drivers.tokens`): templates, exactness, the cache, config.

The tiny model fixture (tests/fixtures/tiny-model) is the tokenizer the real
engines in tests/engine serve; the other templates here are written in the
style of real models' templates (Qwen2.5's tool template, Llama 2's
`bos_token` + `raise_exception` template, a template that iterates over
content parts) over the same tokenizer. Their renderings were checked once
against transformers 5.19's `apply_chat_template` (docs/tokens.md); the
`EXPECTED_*` strings below are those renderings.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixroute.blocks import Blocker
from prefixroute.config import ConfigError
from prefixroute.drivers.gateway import DECISION_HEADER, GatewayConfig, create_app
from prefixroute.drivers.service import RoutingService
from prefixroute.drivers.settings import DriverConfig
from prefixroute.drivers.tokens import (
    ModelTokenizer,
    SegmentCache,
    TokenizerFilesError,
    read_models,
)
from prefixroute.request import Request, RequestError
from tests.helpers import MODEL, pool
from tests.servers import serve_in_thread

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny-model"

QWEN_TOOLS = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first)'
    ' or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content"
    " + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

PARTS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] != 'text' %}{% continue %}{% endif %}"
    "[{{ part['text'] }}]"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def model_dir(
    tmp: Path,
    *,
    template: Any = None,
    jinja: str | None = None,
    config: dict[str, Any] | None = None,
    post_processor: dict[str, Any] | None = None,
    added: dict[str, Any] | None = None,
    model_type: str | None = None,
) -> Path:
    """A copy of the tiny model's tokenizer with another template or tokenizer quirk; a
    `config.json` of that `model_type` when given (else none: transformers then takes
    tokenizer.json as it stands)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if model_type is not None:
        (tmp / "config.json").write_text(json.dumps({"model_type": model_type}))
    tree = json.loads((TINY / "tokenizer.json").read_text())
    if post_processor is not None:
        tree["post_processor"] = post_processor
    if added is not None:
        tree["added_tokens"][1].update(added)
    (tmp / "tokenizer.json").write_text(json.dumps(tree))
    base = json.loads((TINY / "tokenizer_config.json").read_text())
    if template is not None:
        base["chat_template"] = template
    base.update(config or {})
    (tmp / "tokenizer_config.json").write_text(json.dumps(base))
    if jinja is not None:
        (tmp / "chat_template.jinja").write_text(jinja)
    return tmp


@pytest.fixture(scope="module")
def tiny() -> ModelTokenizer:
    return ModelTokenizer.from_dir(TINY)


BOS_POST = {
    "type": "TemplateProcessing",
    "single": [
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {
        "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}
    },
}

# -- rendering ------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello <|im_end|> there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": [{"type": "text", "text": "part one"}, "part two"]},
]


def test_chatml_fixture_renders_as_vllm(tiny: ModelTokenizer) -> None:
    text = tiny.render_chat(CHAT)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello <|im_end|> there<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
        "<|im_start|>user\npart one\npart two<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tiny.render_chat(CHAT, add_generation_prompt=False).endswith("two<|im_end|>\n")
    ids = tiny.chat_ids(CHAT)
    assert ids.dtype == np.uint32 and not ids.flags.writeable
    assert ids.tolist() == tiny.encode_whole(text, False).tolist()
    assert ids[0] == 1 and ids.tolist().count(2) == 5  # <|im_start|>, <|im_end|> (one in text)


def test_tools_template_with_tool_calls(tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, template=QWEN_TOOLS))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"a": 1}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]},
    ]
    text = tok.render_chat(messages, tools)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": null, '
        '"parameters": {"a": 1}}}\n</tools><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_tools = tok.render_chat(messages[:1])
    assert no_tools.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_bos_token_and_raise_exception(tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(
        model_dir(tmp_path, template=LLAMA2, config={"bos_token": "<|endoftext|>"})
    )
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.render_chat(messages)
    assert text == (
        "<|endoftext|>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\n Hi [/INST] Hello <|im_end|>"
        "<|endoftext|>[INST] Bye [/INST]"
    )
    assert tok.chat_ids(messages)[0] == 0
    with pytest.raises(RequestError, match="roles must alternate") as refused:
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert refused.value.field == "messages" and refused.value.status == 400


def test_content_parts_template_and_kwargs(tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, jinja=PARTS, template="ignored {{ x }}"))
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
    ]
    text = tok.render_chat(messages)  # "openai" format: the template sees the parts
    assert text == "<|im_start|>user\n[a][b]<|im_end|>\n<|im_start|>assistant\n[c]<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    off = tok.render_chat(messages, chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<think></think><|im_start|>assistant\n")
    ids = tok.body_ids({"model": "m", "messages": messages, "reasoning_effort": "none"})
    assert ids is not None and ids.tolist() == tok.encode_whole(off, False).tolist()


def test_named_templates_pick_tool_use(tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": "D{% for m in messages %}{{ m.content }}{% endfor %}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, template=named))
    messages = [{"role": "user", "content": "x"}]
    assert tok.render_chat(messages) == "Dx"
    assert tok.render_chat(messages, [{"function": {"name": "f"}}]) == "T1"


def test_continue_final_message_and_developer_role(tiny: ModelTokenizer) -> None:
    messages = [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "The answer is"},
    ]
    text = tiny.render_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == (
        "<|im_start|>system\nrules<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is"
    )
    with pytest.raises(RequestError) as both:
        tiny.render_chat(messages, continue_final_message=True)
    assert both.value.field == "continue_final_message"


def test_body_ids_follow_vllm_defaults(tiny: ModelTokenizer, tmp_path: Path) -> None:
    bos = ModelTokenizer.from_dir(model_dir(tmp_path, post_processor=BOS_POST))
    body = {"model": "m", "messages": CHAT}
    text = bos.render_chat(CHAT)
    assert bos.body_ids(body).tolist() == bos.encode_whole(text, False).tolist()  # type: ignore[union-attr]
    with_bos = bos.body_ids({**body, "add_special_tokens": True})
    assert with_bos is not None and with_bos[0] == 0 and with_bos[1] == 1
    prompt = bos.body_ids({"model": "m", "prompt": "complete this"})
    assert prompt is not None and prompt.tolist() == [0, *bos.encode_whole("complete this", False)]
    assert bos.body_ids({"model": "m", "prompt": [5, 6, 7]}) is None  # ids are kept as given
    assert tiny.body_ids({**body, "chat_template": "{{ 1 }}"}) is None  # the engine decides
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    assert tiny.body_ids({"model": "m", "messages": [{"role": "user", "content": [image]}]}) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "weird"}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]},
            "tools[0].function",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": 2},
            "add_generation_prompt",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "chat_template_kwargs": {"chat_template": "x"},
            },
            "chat_template_kwargs",
        ),
        ({"messages": [{"role": "user", "content": "x" * 2000}]}, "messages"),
        ({"prompt": "y" * 2000}, "prompt"),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    tok = ModelTokenizer.from_dir(TINY, max_chars=1000)
    with pytest.raises(RequestError) as refused:
        tok.body_ids({"model": "m", **body})
    assert refused.value.field == field and refused.value.status == 400


def test_a_template_failing_on_its_input_is_a_400(tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, template="{{ messages[0].content + 1 }}"))
    with pytest.raises(RequestError, match="could not render") as failed:
        tok.render_chat([{"role": "user", "content": "x"}])
    assert failed.value.field == "messages"


# -- agreement with vLLM 0.32's own renderer ------------------------------------------------
# Expected values below are vLLM 0.32.0's: its render stack (`OnlineRenderer.render_chat` /
# `render_completion` on `ChatCompletionRequest` / `CompletionRequest`, no engine) run on the
# same directories, and transformers 5.19's `AutoTokenizer` (docs/tokens.md, "How it was checked").


def test_qwen2_models_tokenize_as_transformers_builds_them(tiny: ModelTokenizer) -> None:
    # tiny-model's config.json says qwen2: transformers loads a Qwen2Tokenizer, whose own
    # normalizer (NFC) and pre-tokenizer (digits one by one) replace tokenizer.json's
    assert tiny.prompt_ids(" 12", add_special_tokens=False).tolist() == [223, 19, 20]
    assert tiny.prompt_ids("hello world 2024", add_special_tokens=False).tolist() == [
        *[442, 358, 81, 1122, 587, 223, 20, 18, 20, 22]
    ]
    assert tiny.prompt_ids("e\u0301", add_special_tokens=False).tolist() == (
        tiny.prompt_ids("\u00e9", add_special_tokens=False).tolist()
    )


@pytest.mark.parametrize(
    ("model_type", "tokenizer_class", "ids"),
    [
        ("qwen3", "PreTrainedTokenizerFast", [500, 20]),  # the hub class wins: tokenizer.json
        ("qwen3", None, [223, 19, 20]),  # no class named: the model type's, Qwen2Tokenizer
        ("llama", "Qwen2TokenizerFast", [223, 19, 20]),
        ("qwen2", "LlamaTokenizerFast", [223, 19, 20]),  # qwen2's hub class is ignored
        (None, "PreTrainedTokenizerFast", [500, 20]),
    ],
)
def test_which_directories_load_as_qwen2(
    tmp_path: Path, model_type: str | None, tokenizer_class: str | None, ids: list[int]
) -> None:
    path = model_dir(tmp_path, model_type=model_type, config={"tokenizer_class": tokenizer_class})
    tok = ModelTokenizer.from_dir(path)
    assert tok.prompt_ids(" 12", add_special_tokens=False).tolist() == ids


DUMP = "{{ messages | tojson }}G{{ add_generation_prompt }}"


def test_conversation_is_the_one_vllm_gives_the_template(tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, template=DUMP))
    call = {"type": "function", "function": {"arguments": '{"x": 1}', "name": "f"}, "id": "c1"}
    body = {
        "model": "m",
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": ""}, "", "b"],
            },
            {"role": "user", "content": "q 12", "name": "n"},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "think",
                "tool_calls": [call],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
            {"role": "", "content": "odd"},
        ],
        "add_generation_prompt": "yes",  # pydantic's lax booleans
        "chat_template_kwargs": {"tokenize": True},  # consumed by vLLM, not refused
    }
    vllm = (
        '[{"role": "system", "content": "a\\nb"}, '
        '{"role": "user", "content": "q 12", "name": "n"}, '
        '{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "function": '
        '{"arguments": {"x": 1}, "name": "f"}, "type": "function"}], "reasoning": "think", '
        '"reasoning_content": "think"}, {"role": "tool", "content": "r", "tool_call_id": "c1"}, '
        '{"role": "", "content": "odd"}]GTrue'
    )
    ids = tok.body_ids(body)
    assert ids is not None and ids.tolist() == tok.encode_whole(vllm, False).tolist()
    assert body["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'
    with pytest.raises(RequestError) as refused:  # vLLM: render() got `messages` twice
        tok.body_ids({**body, "chat_template_kwargs": {"messages": []}})
    assert refused.value.field == "chat_template_kwargs"


def test_deeply_nested_tool_calls_are_rendered_not_a_crash(tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, template=DUMP + "{{ messages[-1].content }}"))
    deep: Any = 1
    for _ in range(900):  # as deep as `json.loads` of a body goes
        deep = {"a": deep}
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x", "tool_calls": [call]},
    ]
    ids = tok.body_ids({"messages": messages})
    assert ids is not None and len(ids) > 900
    cont = tok.body_ids(
        {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    )
    assert cont is not None and len(cont) > 900


def test_a_template_slow_on_a_request_leaves_it_in_text_mode(tmp_path: Path) -> None:
    quadratic = (
        "{% for m in messages %}{% for n in messages %}{{ n.role[:0] }}{% endfor %}{% endfor %}"
    )
    tok = ModelTokenizer.from_dir(
        model_dir(tmp_path, template=quadratic + "{{ messages | length }}"),
        render_timeout_s=0.05,
    )
    five = tok.body_ids({"messages": [{"role": "user", "content": "x"}] * 5})
    assert five is not None and five.tolist() == tok.encode_whole("5", False).tolist()
    many = [{"role": "user", "content": "x"}] * 3000  # 9 million steps: many seconds
    assert tok.body_ids({"messages": many}) is None  # given up after 0.05 s: text mode
    assert tok.body_ids({"messages": many[:5]}) is not None  # the bound is per render


def test_a_template_writing_too_much_is_stopped_as_it_writes(tmp_path: Path) -> None:
    ticks: list[int] = []
    quadratic = "{% for m in messages %}{% for n in messages %}{{ n.content }}{{ tick() }}"
    tok = ModelTokenizer.from_dir(
        model_dir(tmp_path, template=quadratic + "{% endfor %}{% endfor %}"), max_chars=1000
    )
    tok._env.globals["tick"] = lambda: ticks.append(1) or ""
    messages = [{"role": "user", "content": "y" * 30}] * 30  # 900 characters in, 27,000 out
    with pytest.raises(RequestError, match="rendered chat is too long") as refused:
        tok.body_ids({"messages": messages})
    assert refused.value.field == "messages"
    assert len(ticks) < 40  # stopped at 1,000 characters, not after writing all 27,000


def test_the_render_bound_counts_cpu_not_waiting(tmp_path: Path) -> None:
    # a render that waits (for a core, for the GIL) past the bound without spending it
    tok = ModelTokenizer.from_dir(
        model_dir(tmp_path, template="{{ nap() }}{{ messages[0].content }}"), render_timeout_s=0.05
    )
    tok._env.globals["nap"] = lambda: time.sleep(0.2) or ""
    ids = tok.body_ids({"messages": [{"role": "user", "content": "x"}]})
    assert ids is not None and ids.tolist() == tok.encode_whole("x", False).tolist()


# -- exactness of the reuse cache ---------------------------------------------------------------

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
text_piece = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=64, max_size=100),  # cached alone
    st.sampled_from([*SPECIALS, " ", "\n", "  \n\n", "user\n", "<|im_", "|>", "123 456"]),
)
texts = st.lists(text_piece, max_size=12).map("".join)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": texts}
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chats=st.lists(st.lists(message, min_size=1, max_size=6), min_size=1, max_size=4))
def test_cached_chat_ids_equal_whole_text_encoding(
    tiny: ModelTokenizer, chats: list[list[dict[str, str]]]
) -> None:
    assert tiny.segmented
    for chat in chats + chats:  # the second round runs on a warm cache
        text = tiny.render_chat(chat)
        assert tiny.chat_ids(chat).tolist() == tiny.encode_whole(text, False).tolist()
    tiny.cache.check_invariants()


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    return ModelTokenizer.from_dir(
        model_dir(tmp_path_factory.mktemp("bos"), post_processor=BOS_POST)
    )


@settings(max_examples=150, deadline=None)
@given(text=texts, add=st.booleans())
def test_cached_text_ids_equal_whole_text_encoding(
    bos_tokenizer: ModelTokenizer, tiny: ModelTokenizer, text: str, add: bool
) -> None:
    for tok in (tiny, bos_tokenizer):
        assert tok.segmented
        want = tok.encode_whole(text, add).tolist()
        assert tok.encode(text, add_special_tokens=add).tolist() == want
        assert tok.encode(text, add_special_tokens=add).tolist() == want  # warm


@pytest.mark.parametrize("added", [{"lstrip": True}, {"rstrip": True}, {"single_word": True}])
def test_quirky_added_tokens_fall_back_to_whole_text(tmp_path: Path, added: dict[str, Any]) -> None:
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, added=added))
    assert not tok.segmented and "lstrip/rstrip/single_word" in tok.why_whole
    text = "a  <|im_start|>  b <|im_end|>\n"
    assert (
        tok.encode(text, add_special_tokens=False).tolist()
        == tok.encode_whole(text, False).tolist()
    )
    assert len(tok.cache) == 0


def test_unknown_post_processor_falls_back(tmp_path: Path) -> None:
    post = {
        "type": "RobertaProcessing",
        "sep": ["<|im_end|>", 2],
        "cls": ["<|im_start|>", 1],
        "trim_offsets": True,
        "add_prefix_space": False,
    }
    tok = ModelTokenizer.from_dir(model_dir(tmp_path, post_processor=post))
    assert not tok.segmented and "RobertaProcessing" in tok.why_whole
    assert tok.prompt_ids("hi").tolist() == tok.encode_whole("hi", True).tolist()


# -- the cache bound --------------------------------------------------------------------------


def test_segment_cache_is_bounded_by_entries_and_bytes() -> None:
    ids = np.arange(100, dtype=np.uint32)
    ids.flags.writeable = False
    cache = SegmentCache(max_entries=5, max_bytes=10_000)
    for i in range(20):
        cache.put(f"piece {i}", ids)
        cache.check_invariants()
    assert len(cache) == 5 and cache.get("piece 19") is not None and cache.get("piece 0") is None
    per = SegmentCache.cost("piece 10", ids)
    small = SegmentCache(max_entries=100, max_bytes=10 * per + 10)
    for i in range(10, 40):
        small.put(f"piece {i}", ids)
    small.check_invariants()
    assert len(small) == 10 and small.nbytes <= small.max_bytes
    assert small.get("piece 39") is not None and small.get("piece 29") is None
    huge = np.zeros(2000, dtype=np.uint32)
    huge.flags.writeable = False
    small.put("huge", huge)  # over an eighth of the budget: never kept
    assert small.get("huge") is None and len(small) == 10


def test_model_cache_stays_within_its_budget(tmp_path: Path) -> None:
    tok = ModelTokenizer.from_dir(TINY, cache_entries=50, cache_bytes=40_000)
    for i in range(300):
        tok.chat_ids([{"role": "system", "content": f"system prompt number {i} " * 5}])
    tok.cache.check_invariants()
    assert len(tok.cache) <= 50 and tok.cache.nbytes <= 40_000
    system = [{"role": "system", "content": "a long shared system prompt " * 40}]
    tok.chat_ids(system)
    hits = tok.cache.hits
    tok.chat_ids([*system, {"role": "user", "content": "new question"}])
    assert tok.cache.hits > hits  # the system prompt was not tokenized again


def test_many_short_pieces_take_one_entry_and_flush_nothing() -> None:
    tok = ModelTokenizer.from_dir(TINY, cache_entries=100)
    system = [{"role": "system", "content": "a long shared system prompt " * 40}]
    tok.chat_ids(system)
    noise = "".join(f"<|im_start|>{i}" for i in range(1000))  # 1,000 distinct short pieces
    assert tok.prompt_ids(noise).tolist() == tok.encode_whole(noise, True).tolist()
    assert len(tok.cache) <= 4
    hits = tok.cache.hits
    tok.chat_ids(system)
    assert tok.cache.hits > hits  # the system prompt is still cached


def test_the_shared_cache_stays_exact_from_many_threads() -> None:
    tok = ModelTokenizer.from_dir(TINY, cache_entries=16)  # evicting all the time
    rng = random.Random(3)
    words = ["tenant", " prompt", "<|im_end|>", " 12", "\n", "é", "x" * 70]
    chats = [
        [
            {"role": rng.choice(["system", "user"]), "content": "".join(rng.choices(words, k=12))}
            for _ in range(rng.randint(1, 4))
        ]
        for _ in range(120)
    ]
    want = [tok.encode_whole(tok.render_chat(chat), False).tolist() for chat in chats] * 3
    with ThreadPoolExecutor(4) as threads:
        got = list(threads.map(lambda chat: tok.chat_ids(chat).tolist(), chats * 3))
    assert got == want
    tok.cache.check_invariants()


# -- config -----------------------------------------------------------------------------------


def test_models_section_loads_relative_to_the_config(tmp_path: Path) -> None:
    shutil.copytree(TINY, tmp_path / "tiny")
    (tmp_path / "gw.yaml").write_text(
        "models:\n  tiny:\n    tokenizer: tiny\n    max_chars: 99\n    render_timeout_s: 0.5\n"
    )
    config = DriverConfig.from_file(tmp_path / "gw.yaml")
    assert set(config.models) == {"tiny"} and config.models["tiny"].max_chars == 99
    assert config.models["tiny"].render_timeout_s == 0.5
    assert "models" not in config.router_document


@pytest.mark.parametrize(
    ("section", "path", "words"),
    [
        ({"m": {"tokenizer": "nowhere"}}, "models.m.tokenizer", "not a directory"),
        ({"m": {"tokenizer": "empty"}}, "models.m.tokenizer", "tokenizer.json is missing"),
        ({"m": {"tokenizer": "broken"}}, "models.m.tokenizer", "cannot load"),
        ({"m": {"tokenizer": "badconfig"}}, "models.m.tokenizer", "cannot read"),
        ({"m": {"tokenizer": "badtemplate"}}, "models.m.tokenizer", "does not compile"),
        ({"m": {}}, "models.m.tokenizer", "directory path"),
        ({"m": {"tokenizer": "empty", "colour": 1}}, "models.m.colour", "unknown key"),
        ({"m": {"tokenizer": "empty", "max_chars": 0}}, "models.m.max_chars", ">= 1"),
        ({"m": {"tokenizer": "empty", "render_timeout_s": 0}}, "models.m.render_timeout_s", "> 0"),
        (["m"], "models", "mapping"),
    ],
)
def test_models_config_errors(tmp_path: Path, section: Any, path: str, words: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    model_dir(tmp_path / "badconfig")
    (tmp_path / "badconfig" / "tokenizer_config.json").write_text("[")
    model_dir(tmp_path / "badtemplate", template="{% for %}")
    with pytest.raises(ConfigError) as error:
        read_models(section, base_dir=tmp_path)
    assert error.value.path == path and words in str(error.value)


def test_files_error_is_a_value_error() -> None:
    with pytest.raises(TokenizerFilesError):
        ModelTokenizer.from_dir(TINY / "tokenizer.json")


# -- through the gateway ------------------------------------------------------------------------


def test_gateway_routes_a_chat_on_the_engines_token_blocks(engines: list[str]) -> None:
    doc = {
        "endpoints": pool(*engines),
        "server": {"explain_header": True},
        "models": {MODEL: {"tokenizer": str(TINY)}},
    }
    app = create_app(GatewayConfig.from_document(doc))
    messages = [
        {"role": "system", "content": "You are the token-mode test assistant. " * 20},
        {"role": "user", "content": "Which blocks do I hash to?"},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    with serve_in_thread(app) as url:
        first = httpx.post(f"{url}/v1/chat/completions", json=body)
        again = httpx.post(f"{url}/v1/chat/completions", json=body)
        refused = httpx.post(
            f"{url}/v1/chat/completions",
            json={**body, "messages": [{"role": "user", "content": [{"type": "weird"}]}]},
        )
    gateway = app.state.gateway
    ids = ModelTokenizer.from_dir(TINY).chat_ids(messages)
    blocker: Blocker = gateway.router.blocker
    keys = blocker.keys(Request(model=MODEL, token_ids=ids))
    text_keys = blocker.keys(Request(model=MODEL, prompt="".join(m["content"] for m in messages)))
    assert first.status_code == again.status_code == 200, first.text
    assert len(keys) == len(ids) // blocker.block_size != len(text_keys)
    explained = dict(p.split("=", 1) for p in again.headers[DECISION_HEADER].split("; "))
    assert int(explained["total_blocks"]) == len(keys)
    assert int(explained["matched_blocks"]) == len(keys)  # the first request's blocks, exactly
    endpoint = explained["endpoint"]
    assert all(endpoint in gateway.router.index.holders(int(k)) for k in keys)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages[0].content[0].type"


def test_bad_bodies_through_the_gateway_are_4xx_naming_the_field(
    engines: list[str], tmp_path: Path
) -> None:
    slow = (  # ChatML, after a loop over all messages for each message
        "{% for m in messages %}{% for n in messages %}{{ n.role[:0] }}{% endfor %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{{ tools | tojson }}"
    )
    spec = {"tokenizer": str(model_dir(tmp_path, template=slow)), "render_timeout_s": 0.05}
    app = create_app(
        GatewayConfig.from_document({"endpoints": pool(*engines), "models": {MODEL: spec}})
    )
    deep = '{"a": ' * 900 + "1" + "}" * 900
    call = '{"id": "c", "type": "function", "function": {"name": "f", "arguments": ' + deep + "}}"
    bodies = {
        "deep tool-call arguments": (
            '{"messages": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": "a", "tool_calls": [' + call + "]}]}",
            200,
            None,
        ),
        "a slow render": ({"messages": [{"role": "user", "content": "x"}] * 3000}, 200, None),
        "template kwargs": (
            {
                "messages": [{"role": "user", "content": "x"}],
                "chat_template_kwargs": {"messages": []},
            },
            400,
            "chat_template_kwargs",
        ),
        "tool shape": (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"function": "f"}]},
            400,
            "tools[0].function",
        ),
        "huge message": (
            {"messages": [{"role": "user", "content": "x" * 5_000_000}]},
            400,
            "messages",
        ),
        "role": ({"messages": [{"role": 5, "content": "x"}]}, 400, "messages[0].role"),
        "lone surrogate in a tool": (  # a TypeError in the tokenizer: once a 500
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}],
            },
            400,
            "messages",
        ),
    }
    with serve_in_thread(app) as url, httpx.Client(timeout=60) as client:
        for name, (body, status, param) in bodies.items():
            if isinstance(body, str):
                raw = (f'{{"model": "{MODEL}", "max_tokens": 1, ' + body[1:]).encode()
            else:
                raw = json.dumps({"model": MODEL, "max_tokens": 1, **body}).encode()
            answer = client.post(f"{url}/v1/chat/completions", content=raw)
            assert answer.status_code == status, (name, answer.text[:300])
            if param is not None:
                assert answer.json()["error"]["param"] == param, name


def test_service_without_tokenizer_stays_in_text_mode() -> None:
    service = RoutingService(DriverConfig.from_document({}))
    from prefixroute.drivers.metrics import RequestRecord

    record = RequestRecord(service.metrics, 0.0)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
    prepared = service.prepare(body, {}, record, may_ask_usage=False, endpoints=[])
    assert prepared.request.token_ids is None and prepared.request.prompt


def test_big_bodies_are_tokenized_in_a_worker_thread() -> None:
    from prefixroute.drivers.metrics import RequestRecord
    from prefixroute.drivers.service import TOKENS_OFFLOAD_BYTES

    doc = {"endpoints": pool("127.0.0.1:9"), "models": {MODEL: {"tokenizer": str(TINY)}}}
    service = RoutingService(DriverConfig.from_document(doc))

    async def read(content: str) -> Any:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        record = RequestRecord(service.metrics, 0.0)
        raw = json.dumps(body).encode()
        return await service.read_request(raw, {}, record, may_ask_usage=False)

    small = asyncio.run(read("short question"))
    assert service._workers is None and small.request.token_ids is not None
    big = asyncio.run(read("many words " * (TOKENS_OFFLOAD_BYTES // 10)))
    assert service._workers is not None  # prepared (and tokenized) off the loop
    want = ModelTokenizer.from_dir(TINY).chat_ids(
        [{"role": "user", "content": "many words " * (TOKENS_OFFLOAD_BYTES // 10)}]
    )
    assert big.request.token_ids.tolist() == want.tolist()
    assert big.keys is not None and len(big.keys) == len(want) // 16
    service._workers.shutdown()


def test_without_a_models_section_the_tokens_extra_is_not_imported() -> None:
    code = (
        "import sys\n"
        "from prefixroute.drivers.gateway import GatewayConfig, create_app\n"
        "create_app(GatewayConfig.from_document({}))\n"
        "assert 'tokenizers' not in sys.modules and 'jinja2' not in sys.modules, "
        "[m for m in sys.modules if m.startswith(('tokenizers', 'jinja2'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_context_check_is_exact_in_token_mode() -> None:
    from prefixroute.drivers.metrics import RequestRecord
    from prefixroute.drivers.service import Refusal
    from prefixroute.endpoint import EndpointState

    service = RoutingService(
        DriverConfig.from_document({"models": {MODEL: {"tokenizer": str(TINY)}}})
    )
    messages = [{"role": "user", "content": "a short question about caching"}]
    ids = ModelTokenizer.from_dir(TINY).chat_ids(messages)
    body = json.dumps({"model": MODEL, "messages": messages}).encode()

    def prepare(limit: int) -> Any:
        engine = EndpointState(id="e0", address="127.0.0.1:9", models={MODEL}, max_model_len=limit)
        record = RequestRecord(service.metrics, 0.0)
        return service.prepare(body, {}, record, may_ask_usage=False, endpoints=[engine])

    assert prepare(len(ids)).request.token_ids.tolist() == ids.tolist()
    with pytest.raises(Refusal) as refused:  # the text estimate (chars / 4 / 2) would pass
        prepare(len(ids) - 1)
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert f"your request has {len(ids)} input tokens" in refused.value.message
