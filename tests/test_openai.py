"""The OpenAI body + headers parser (`prefixroute.openai`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixroute.openai import (
    MAX_ID_LENGTH,
    MAX_MESSAGES,
    message_text,
    parse_openai,
    render_messages,
)
from prefixroute.request import Request, RequestError

DEFAULT_HEADERS: dict[str, Any] = {
    "tenant_header": "x-tenant-id",
    "session_header": "x-session-id",
    "priority_header": "x-priority",
    "request_id_header": "x-request-id",
    "tenant_from_user": False,
}


def parse(body: Any, headers: Mapping[str, str] | None = None, **options: Any) -> Request:
    return parse_openai(body, headers or {}, **{**DEFAULT_HEADERS, **options})


def chat(*messages: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def rendered(*pairs: tuple[str, str]) -> str:
    return render_messages([{"role": r, "content": c} for r, c in pairs])


# --- chat -------------------------------------------------------------------------------


def test_chat_with_string_content() -> None:
    req = parse(chat({"role": "system", "content": "Be brief."}, user("Hi")))
    assert req.model == "m"
    assert req.prompt == "<|system|9|>Be brief.<|user|2|>Hi"
    assert req.token_ids is None
    assert (req.tenant, req.session, req.priority) == ("default", None, 0)
    assert (req.cache_salt, req.lora, req.max_tokens, req.request_id) == (None, None, None, None)
    assert req.stream is False


def test_text_parts_join_with_newline_like_vllm() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert message_text(parts, index=0) == "a\nb"
    assert parse(chat(user(parts))).prompt == parse(chat(user("a\nb"))).prompt
    assert parse(chat(user(parts))).prompt != parse(chat(user("ab"))).prompt


def test_text_like_part_types() -> None:
    parts = [
        "bare",
        {"type": "input_text", "text": "in"},
        {"type": "output_text", "text": "out"},
        {"type": "refusal", "refusal": "no"},
        {"type": "thinking", "thinking": "hm"},
    ]
    assert message_text(parts, index=0) == "bare\nin\nout\nno\nhm"
    assert message_text([], index=0) == ""
    assert message_text(None, index=0) == ""


def test_different_images_render_differently_and_equal_images_alike() -> None:
    a = parse(chat(user([{"type": "text", "text": "what is this?"}, image("http://x/a.png")])))
    b = parse(chat(user([{"type": "text", "text": "what is this?"}, image("http://x/b.png")])))
    a2 = parse(chat(user([{"type": "text", "text": "what is this?"}, image("http://x/a.png")])))
    assert a.prompt != b.prompt
    assert a.prompt == a2.prompt
    assert a.prompt is not None and b.prompt is not None
    # Same-length placeholders: the header and the text before the image are a shared prefix.
    for req in (a, b):
        assert req.prompt is not None
        assert req.prompt.startswith("<|user|42|>what is this?\n<image_url:")


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}},
    ],
)
def test_media_parts_render_as_typed_digests(part: dict[str, Any]) -> None:
    text = message_text([part], index=0)
    kind = part["type"]
    assert text.startswith(f"<{kind}:") and text.endswith(">")
    digest = text[len(kind) + 2 : -1]
    assert len(digest) == 16 and int(digest, 16) >= 0
    # key order in the JSON does not matter, the payload does
    assert message_text([dict(reversed(list(part.items())))], index=0) == text
    other = {**part, kind: {"x": 1}}
    assert message_text([other], index=0) != text


def test_assistant_tool_calls_render_as_canonical_json() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    body = chat(
        user("weather?"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    )
    req = parse(body)
    expected_call = (
        '[{"function":{"arguments":"{\\"city\\":\\"Paris\\"}","name":"get_weather"},'
        '"id":"call_1","type":"function"}]'
    )
    assert req.prompt == rendered(
        ("user", "weather?"), ("assistant", expected_call), ("tool", "sunny")
    )
    reordered = {"function": call["function"], "type": "function", "id": "call_1"}
    body2 = chat(
        user("weather?"),
        {"role": "assistant", "content": None, "tool_calls": [reordered]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    )
    assert parse(body2).prompt == req.prompt
    other = {**call, "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}
    body3 = chat(user("weather?"), {"role": "assistant", "content": None, "tool_calls": [other]})
    assert parse(body3).prompt != req.prompt


def test_assistant_text_plus_tool_calls_and_empty_tool_calls() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_calls = parse(
        chat(user("q"), {"role": "assistant", "content": "ok", "tool_calls": [call]})
    )
    assert with_calls.prompt is not None
    assert with_calls.prompt.endswith(
        '|>ok[{"function":{"arguments":"{}","name":"f"},"id":"c","type":"function"}]'
    )
    empty = parse(chat(user("q"), {"role": "assistant", "content": "ok", "tool_calls": []}))
    assert empty.prompt == rendered(("user", "q"), ("assistant", "ok"))
    no_content = parse(chat(user("q"), {"role": "assistant"}))
    assert no_content.prompt == rendered(("user", "q"), ("assistant", ""))


def test_any_non_empty_role_is_accepted() -> None:
    for role in ("system", "developer", "user", "assistant", "tool", "function", "narrator"):
        req = parse(chat({"role": role, "content": "x"}))
        assert req.prompt == rendered((role, "x"))


# --- completions ------------------------------------------------------------------------


def test_completions_string_prompt() -> None:
    req = parse({"model": "m", "prompt": "Once upon"})
    assert req.prompt == "Once upon"
    assert req.token_ids is None


def test_completions_empty_string_prompt_is_allowed() -> None:
    assert parse({"model": "m", "prompt": ""}).prompt == ""


def test_completions_token_prompt() -> None:
    req = parse({"model": "m", "prompt": [1, 2, 3, 2**32 - 1]})
    assert req.prompt is None
    assert req.token_ids is not None
    assert req.token_ids.dtype == np.uint32
    assert req.token_ids.tolist() == [1, 2, 3, 2**32 - 1]


def test_completions_single_element_lists() -> None:
    assert parse({"model": "m", "prompt": ["hello"]}).prompt == "hello"
    req = parse({"model": "m", "prompt": [[5, 6]]})
    assert req.prompt is None
    assert req.token_ids is not None and req.token_ids.tolist() == [5, 6]
    assert req == parse({"model": "m", "prompt": [5, 6]})


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], ["a", [1]], [[1], "a"]])
def test_batched_prompts_are_rejected(prompt: list[Any]) -> None:
    with pytest.raises(RequestError, match="batched prompts are not supported") as info:
        parse({"model": "m", "prompt": prompt})
    assert info.value.status == 400
    assert info.value.field == "prompt"


# --- malformed input names its field ----------------------------------------------------

MALFORMED: list[tuple[str, Any, str | None, str]] = [
    ("not an object", ["model", "m"], None, "must be a JSON object"),
    ("no model", {"prompt": "x"}, "model", "model must be a non-empty string"),
    ("empty model", {"model": "", "prompt": "x"}, "model", "non-empty string"),
    ("model not text", {"model": 3, "prompt": "x"}, "model", "non-empty string"),
    ("neither", {"model": "m"}, "messages", "needs messages"),
    ("both", {"model": "m", "prompt": "x", "messages": [user("x")]}, "prompt", "not both"),
    ("messages not list", {"model": "m", "messages": "hi"}, "messages", "must be a list"),
    ("messages empty", {"model": "m", "messages": []}, "messages", "must not be empty"),
    ("message not object", chat("hi"), "messages[0]", "must be a message object"),
    ("no role", chat({"content": "x"}), "messages[0].role", "role must be a non-empty string"),
    ("empty role", chat({"role": "", "content": "x"}), "messages[0].role", "non-empty string"),
    ("role not text", chat({"role": 1, "content": "x"}), "messages[0].role", "non-empty"),
    ("user null content", chat(user("a"), user(None)), "messages[1].content", "is required"),
    ("user no content", chat({"role": "user"}), "messages[0].content", "is required"),
    ("content number", chat(user(3)), "messages[0].content", "must be a string, null or a list"),
    ("content object", chat(user({"type": "text"})), "messages[0].content", "must be a string"),
    ("part number", chat(user([3])), "messages[0].content[0]", "content part object"),
    ("part no type", chat(user([{"text": "x"}])), "messages[0].content[0].type", "non-empty"),
    (
        "part empty type",
        chat(user([{"type": "", "text": "x"}])),
        "messages[0].content[0].type",
        "must be a non-empty string",
    ),
    (
        "text not string",
        chat(user("a"), user("b"), user([{"type": "text", "text": 5}])),
        "messages[2].content[0].text",
        "messages[2].content[0].text must be a string",
    ),
    (
        "text missing",
        chat(user(["ok", {"type": "text"}])),
        "messages[0].content[1].text",
        "must be a string",
    ),
    (
        "refusal not string",
        chat({"role": "assistant", "content": [{"type": "refusal", "refusal": None}]}),
        "messages[0].content[0].refusal",
        "must be a string",
    ),
    (
        "tool_calls not list",
        chat({"role": "assistant", "content": None, "tool_calls": {"id": "x"}}),
        "messages[0].tool_calls",
        "must be a list",
    ),
    (
        "tool call not object",
        chat({"role": "assistant", "content": None, "tool_calls": ["x"]}),
        "messages[0].tool_calls[0]",
        "tool call object",
    ),
    ("prompt number", {"model": "m", "prompt": 5}, "prompt", "must be a string, a list"),
    ("prompt object", {"model": "m", "prompt": {"a": 1}}, "prompt", "must be a string"),
    ("prompt empty list", {"model": "m", "prompt": []}, "prompt", "must not be empty"),
    ("prompt empty tokens", {"model": "m", "prompt": [[]]}, "prompt[0]", "must not be empty"),
    ("token negative", {"model": "m", "prompt": [1, -1]}, "prompt[1]", "must be a token id"),
    ("token too big", {"model": "m", "prompt": [2**32]}, "prompt[0]", "must be a token id"),
    ("token bool", {"model": "m", "prompt": [True]}, "prompt[0]", "must be a token id"),
    ("token float", {"model": "m", "prompt": [1, 2.0]}, "prompt[1]", "must be a token id"),
    ("token text", {"model": "m", "prompt": [1, "2"]}, "prompt[1]", "must be a token id"),
    ("nested token", {"model": "m", "prompt": [[1, None]]}, "prompt[0][1]", "must be a token id"),
    ("max_tokens text", chat(user("x"), max_tokens="9"), "max_tokens", "must be an integer"),
    ("max_tokens bool", chat(user("x"), max_tokens=True), "max_tokens", "must be an integer"),
    ("max_tokens neg", chat(user("x"), max_tokens=-1), "max_tokens", "must be an integer"),
    ("max_tokens float", chat(user("x"), max_tokens=10.0), "max_tokens", "must be an integer"),
    ("max_tokens huge", chat(user("x"), max_tokens=2**31), "max_tokens", "must be an integer"),
    (
        "max_completion_tokens bool",
        chat(user("x"), max_completion_tokens=False),
        "max_completion_tokens",
        "must be an integer",
    ),
    (
        "bad max_tokens with good max_completion_tokens",
        chat(user("x"), max_tokens="x", max_completion_tokens=3),
        "max_tokens",
        "must be an integer",
    ),
    ("stream text", chat(user("x"), stream="yes"), "stream", "must be a boolean"),
    ("stream int", chat(user("x"), stream=1), "stream", "must be a boolean"),
    ("cache_salt empty", chat(user("x"), cache_salt=""), "cache_salt", "non-empty string"),
    ("cache_salt int", chat(user("x"), cache_salt=7), "cache_salt", "non-empty string"),
    (
        "prompt_cache_key int",
        chat(user("x"), prompt_cache_key=7),
        "prompt_cache_key",
        "must be a string",
    ),
    (
        "prompt_cache_key too long",
        chat(user("x"), prompt_cache_key="k" * (MAX_ID_LENGTH + 1)),
        "prompt_cache_key",
        "printable",
    ),
    (
        "prompt_cache_key control char",
        chat(user("x"), prompt_cache_key="a\x00b"),
        "prompt_cache_key",
        "printable",
    ),
]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [pytest.param(b, f, m, id=name) for name, b, f, m in MALFORMED],
)
def test_malformed_body_names_its_field(body: Any, field: str | None, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse(body)
    assert info.value.field == field
    assert message in str(info.value)
    assert info.value.status == 400


def test_media_part_that_is_not_json_data() -> None:
    part = {"type": "image_url", "image_url": {"url": object()}}
    with pytest.raises(RequestError) as info:
        parse(chat(user([part])))
    assert info.value.field == "messages[0].content[0]"


def test_deeply_nested_tool_calls_are_a_request_error() -> None:
    deep: Any = "x"
    for _ in range(100_000):
        deep = [deep]
    body = chat({"role": "assistant", "content": None, "tool_calls": [{"function": deep}]})
    with pytest.raises(RequestError) as info:
        parse(body)
    assert info.value.field == "messages[0].tool_calls"


def test_too_many_messages_is_413() -> None:
    ok = chat(*[user("x")] * MAX_MESSAGES)
    assert parse(ok).prompt is not None
    with pytest.raises(RequestError) as info:
        parse(chat(*[user("x")] * (MAX_MESSAGES + 1)))
    assert (info.value.status, info.value.field) == (413, "messages")


def test_too_many_content_parts_is_413() -> None:
    with pytest.raises(RequestError) as info:
        parse(chat(user(["x"] * 10_001)))
    assert (info.value.status, info.value.field) == (413, "messages[0].content")


# --- fields and headers -----------------------------------------------------------------


def test_body_fields() -> None:
    req = parse(chat(user("x"), max_tokens=7, stream=True, cache_salt="s1"))
    assert (req.max_tokens, req.stream, req.cache_salt) == (7, True, "s1")
    nulls = parse(chat(user("x"), max_tokens=None, stream=None, cache_salt=None, user=None))
    assert (nulls.max_tokens, nulls.stream, nulls.cache_salt) == (None, False, None)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 5}, 5),
        ({"max_completion_tokens": 6}, 6),
        ({"max_tokens": 5, "max_completion_tokens": 6}, 6),
        ({"max_tokens": 5, "max_completion_tokens": 0}, 0),
        ({"max_tokens": 5, "max_completion_tokens": None}, 5),
    ],
)
def test_max_completion_tokens_wins(fields: dict[str, Any], expected: int) -> None:
    assert parse(chat(user("x"), **fields)).max_tokens == expected


def test_model_names_a_lora_adapter_and_lora_stays_unset() -> None:
    req = parse(chat(user("x"), model="sql-lora", lora="ignored"))
    assert (req.model, req.lora) == ("sql-lora", None)


def test_headers_are_case_insensitive() -> None:
    headers = {
        "X-Tenant-ID": "acme",
        "X-SESSION-ID": "s-1",
        "x-Priority": "-1",
        "X-Request-Id": "r-9",
    }
    req = parse(chat(user("x")), headers)
    assert (req.tenant, req.session, req.priority, req.request_id) == ("acme", "s-1", -1, "r-9")
    # and the configured header names are case-insensitive too
    req2 = parse(chat(user("x")), {"x-org": "beta"}, tenant_header="X-Org")
    assert req2.tenant == "beta"


def test_header_names_are_configurable_and_can_be_disabled() -> None:
    headers = {"x-tenant-id": "acme", "x-session-id": "s", "x-priority": "3", "x-request-id": "r"}
    req = parse(
        chat(user("x")),
        headers,
        tenant_header=None,
        session_header=None,
        priority_header=None,
        request_id_header=None,
    )
    assert (req.tenant, req.session, req.priority, req.request_id) == ("default", None, 0, None)


def test_tenant_is_trimmed_and_blank_means_default() -> None:
    assert parse(chat(user("x")), {"x-tenant-id": "  acme  "}).tenant == "acme"
    assert parse(chat(user("x")), {"x-tenant-id": "   "}).tenant == "default"
    assert parse(chat(user("x")), {"x-tenant-id": "t" * MAX_ID_LENGTH}).tenant == "t" * 256


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-tenant-id", "t" * (MAX_ID_LENGTH + 1)),
        ("x-tenant-id", "a\nb"),
        ("x-tenant-id", "a\x7fb"),
        ("x-session-id", "s\x00"),
        ("x-request-id", "r" * 300),
    ],
)
def test_bad_ids_are_rejected(header: str, value: str) -> None:
    with pytest.raises(RequestError, match="printable") as info:
        parse(chat(user("x")), {header.upper(): value})
    assert info.value.field == header


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("-1", -1), ("10", 10), ("+3", 3), (" 7 ", 7), ("", 0), ("2147483647", 2**31 - 1)],
)
def test_priority_parsing(value: str, expected: int) -> None:
    assert parse(chat(user("x")), {"x-priority": value}).priority == expected


@pytest.mark.parametrize(
    "value", ["high", "1.5", "1e3", "--1", "0x10", "1_000", "٣", "2147483648", "99999999999"]
)
def test_bad_priority_names_the_header(value: str) -> None:
    with pytest.raises(RequestError, match="X-Prio must be an integer") as info:
        parse(chat(user("x")), {"x-prio": value}, priority_header="X-Prio")
    assert info.value.field == "X-Prio"


def test_prompt_cache_key_is_the_session_unless_a_session_header_is_present() -> None:
    body = chat(user("x"), prompt_cache_key="pck")
    assert parse(body).session == "pck"
    assert parse(body, {"X-Session-Id": "hdr"}).session == "hdr"
    assert parse(body, {"X-Session-Id": "  "}).session == "pck"
    assert parse(chat(user("x")), {"X-Session-Id": "hdr"}).session == "hdr"


def test_user_is_the_tenant_only_when_enabled() -> None:
    body = chat(user("x"), user="alice")
    assert parse(body).tenant == "default"
    assert parse(body, tenant_from_user=True).tenant == "alice"
    # the tenant header still wins
    assert parse(body, {"x-tenant-id": "acme"}, tenant_from_user=True).tenant == "acme"
    # when disabled, `user` is not read at all, so even a malformed one is ignored
    assert parse(chat(user("x"), user=5)).tenant == "default"
    with pytest.raises(RequestError) as info:
        parse(chat(user("x"), user=5), tenant_from_user=True)
    assert info.value.field == "user"


def test_default_header_names_are_the_conventional_ones() -> None:
    body = chat(user("x"), user="alice")
    headers = {"X-Tenant-Id": "acme", "x-priority": "2", "X-Session-Id": "s", "x-request-id": "r"}
    assert parse_openai(body, headers) == parse(body, headers)
    parsed = parse_openai(body, headers)
    assert (parsed.tenant, parsed.priority, parsed.session, parsed.request_id) == (
        "acme",
        2,
        "s",
        "r",
    )
    assert parse_openai(body).tenant == "default"
    assert parse_openai(body, None) == parse_openai(body, {})


def test_the_package_exports_the_parser() -> None:
    import prefixroute

    assert prefixroute.parse_openai is parse_openai
    assert not hasattr(Request, "from_openai")  # the value stays plain


# --- render_messages --------------------------------------------------------------------


def test_render_messages_format() -> None:
    assert rendered(("user", "héllo")) == "<|user|5|>héllo"
    assert rendered() == ""
    assert rendered(("a|b", "x"), ("c\\", "")) == "<|a\\|b|1|>x<|c\\\\|0|>"


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ([("user", "ab"), ("user", "c")], [("user", "a"), ("user", "bc")]),
        ([("user", "abc")], [("user", "ab"), ("user", "c")]),
        ([("user", "a"), ("user", "")], [("user", "a")]),
        ([("user", "<|user|1|>x")], [("user", ""), ("user", "x")]),
        # a role holding header syntax cannot imitate a message boundary
        ([("r|1|>X<|s", "y")], [("r", "X"), ("s", "y")]),
        ([("a\\", "|x")], [("a", "\\|x")]),
    ],
)
def test_render_messages_different_splits_do_not_collide(
    left: list[tuple[str, str]], right: list[tuple[str, str]]
) -> None:
    assert rendered(*left) != rendered(*right)


def test_shared_leading_messages_share_a_prefix() -> None:
    head = [("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello!")]
    a = rendered(*head, ("user", "What is 2+2?"))
    b = rendered(*head, ("user", "Tell me a joke"))
    prefix = rendered(*head)
    assert a.startswith(prefix) and b.startswith(prefix)
    # And through the parser, with growing chat history:
    turn1 = parse(chat(*[{"role": r, "content": c} for r, c in head]))
    turn2 = parse(chat(*[{"role": r, "content": c} for r, c in head], user("more")))
    assert turn1.prompt is not None and turn2.prompt is not None
    assert turn2.prompt.startswith(turn1.prompt)


messages_strategy = st.lists(
    st.tuples(st.sampled_from(["user", "a|b", "\\", "assistant"]), st.text(max_size=6)),
    max_size=5,
)


@given(messages_strategy, messages_strategy)
def test_render_messages_is_injective(
    left: list[tuple[str, str]], right: list[tuple[str, str]]
) -> None:
    assert (rendered(*left) == rendered(*right)) == (left == right)


# --- robustness: any JSON-like body gives a Request or a RequestError -------------------

KEYS = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "content",
        "role",
        "type",
        "text",
        "refusal",
        "image_url",
        "url",
        "tool_calls",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "cache_salt",
        "prompt_cache_key",
        "user",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["m", "user", "assistant", "text", "image_url", "x"])
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(KEYS | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=25,
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` about nine times in ten, else any JSON value (`one_of` would be about 1:1)."""
    return st.integers(0, 9).flatmap(lambda i: JSON if i == 0 else good)


PARTS = mostly(
    st.fixed_dictionaries(
        {"type": mostly(st.sampled_from(["text", "image_url", "refusal", "input_audio"]))},
        optional={
            "text": mostly(st.text(max_size=5)),
            "image_url": JSON,
            "refusal": mostly(st.text(max_size=5)),
        },
    )
    | st.text(max_size=5)
)
MESSAGES = st.lists(
    mostly(
        st.fixed_dictionaries(
            {
                "role": mostly(st.sampled_from(["user", "assistant", "system", "tool"])),
                "content": mostly(st.text(max_size=5) | st.lists(PARTS, max_size=3)),
            },
            optional={"tool_calls": mostly(st.lists(st.dictionaries(KEYS, JSON, max_size=3)))},
        )
    ),
    min_size=1,
    max_size=4,
)
PROMPTS = mostly(
    st.text(max_size=5)
    | st.lists(st.integers(-2, 2**33), max_size=4)
    | st.lists(st.text(max_size=3) | st.lists(st.integers(-1, 9), max_size=3), max_size=2)
)
OPTIONAL_FIELDS = {
    "max_tokens": mostly(st.integers(-1, 100)),
    "max_completion_tokens": mostly(st.integers(-1, 100)),
    "stream": mostly(st.booleans()),
    "cache_salt": mostly(st.text(max_size=3)),
    "prompt_cache_key": mostly(st.text(max_size=3)),
    "user": mostly(st.text(max_size=3)),
}
BODIES = mostly(
    st.fixed_dictionaries(
        {"model": mostly(st.just("m")), "messages": mostly(MESSAGES)},
        optional=OPTIONAL_FIELDS,
    )
    | st.fixed_dictionaries(
        {"model": mostly(st.just("m")), "prompt": PROMPTS},
        optional=OPTIONAL_FIELDS,
    )
)
HEADERS = st.dictionaries(
    st.sampled_from(["x-tenant-id", "X-Session-Id", "x-priority", "x-request-id", "other"]),
    st.text(max_size=12) | st.integers(-5, 5).map(str),
    max_size=4,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES, headers=HEADERS, tenant_from_user=st.booleans())
def test_any_json_body_gives_a_request_or_a_request_error(
    body: Any, headers: dict[str, str], tenant_from_user: bool
) -> None:
    try:
        req = parse(body, headers, tenant_from_user=tenant_from_user)
    except RequestError as e:
        assert e.status in (400, 413)
        assert str(e)
        return
    assert isinstance(req, Request)
    assert req.prompt is not None or req.token_ids is not None
    assert isinstance(req.model, str) and req.model


def test_tool_definitions_render_ahead_of_the_conversation() -> None:
    weather = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    search = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    hello = user("hi")
    with_weather = parse(chat(hello, tools=weather)).prompt
    with_search = parse(chat(hello, tools=search)).prompt
    plain = parse(chat(hello)).prompt
    assert with_weather is not None and with_search is not None and plain is not None
    assert with_weather != with_search and with_weather.startswith("<|#tools|")
    assert with_weather.endswith(plain)
    assert parse(chat(hello, tools=[])).prompt == plain
    with pytest.raises(RequestError) as info:
        parse(chat(hello, tools="weather"))
    assert info.value.field == "tools"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "hi \ud800"}]},
        {"model": "m", "prompt": "hi \udfff there"},
    ],
)
def test_a_prompt_with_a_lone_surrogate_is_refused_before_routing(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as info:
        parse_openai(body, {})
    assert info.value.status == 400
    assert info.value.field == ("messages" if "messages" in body else "prompt")
