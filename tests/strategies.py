"""Shared hypothesis strategies for prefixroute's tests (STYLE.md 13)."""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from prefixroute.endpoint import EndpointId
from prefixroute.index import Tier

BLOCK_KEY_BITS = 64

block_keys = st.integers(min_value=0, max_value=2**BLOCK_KEY_BITS - 1)
"""Any block key: a 64-bit chained hash as a Python int."""

tiers = st.sampled_from(Tier)
"""Any tier."""

KEY_UNIVERSE: tuple[int, ...] = (
    0,
    1,
    2**64 - 1,
    2**63,
    0x9E3779B97F4A7C15,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x27D4EB2F165667C5,
    0xFF51AFD7ED558CCD,
    0xC4CEB9FE1A85EC53,
    42,
    2**32,
    2**60 + 7,
    0x5555555555555555,
)
"""A small key universe (small and full-width ints) so that chains share blocks."""

_U = KEY_UNIVERSE
BASE_CHAINS: tuple[tuple[int, ...], ...] = (
    (_U[0], _U[1], _U[2], _U[3], _U[4], _U[5]),
    (_U[0], _U[1], _U[2], _U[6], _U[7]),
    (_U[0], _U[8], _U[9]),
    (_U[10], _U[11], _U[12], _U[13], _U[3]),
)
"""A few chains with shared prefixes (as requests of one tenant's system prompt)."""


def endpoint_ids(n: int = 4) -> st.SearchStrategy[EndpointId]:
    """One of `n` endpoint ids, "e0" .. "e{n-1}"."""
    return st.sampled_from([EndpointId(f"e{i}") for i in range(n)])


def universe_keys() -> st.SearchStrategy[int]:
    """A key from `KEY_UNIVERSE`."""
    return st.sampled_from(KEY_UNIVERSE)


@st.composite
def chains(draw: st.DrawFn, *, max_tail: int = 4) -> list[int]:
    """A request's chain over `KEY_UNIVERSE` in prefix order, often overlapping others.

    Mostly a prefix of one of `BASE_CHAINS` plus a short random tail (so
    prefixes are shared and diverge); sometimes a random list of universe
    keys, duplicates allowed; sometimes empty.
    """
    kind = draw(st.sampled_from(["prefix", "prefix", "random", "empty"]))
    if kind == "empty":
        return []
    if kind == "random":
        return draw(st.lists(universe_keys(), min_size=1, max_size=8))
    base = draw(st.sampled_from(BASE_CHAINS))
    cut = draw(st.integers(min_value=1, max_value=len(base)))
    tail = draw(st.lists(universe_keys(), max_size=max_tail))
    return list(base[:cut]) + tail


def unique_chains(min_size: int = 1, max_size: int = 300) -> st.SearchStrategy[list[int]]:
    """A chain of distinct full-width keys, long enough to cross `match`'s chunks."""
    return st.lists(block_keys, min_size=min_size, max_size=max_size, unique=True)


PROMPT_PREFIXES: tuple[tuple[int, ...], ...] = (
    (),
    tuple(range(100, 108)),
    tuple(range(100, 104)) + tuple(range(200, 208)),
    tuple(range(300, 312)),
)
"""Shared leading token ids (system prompts), some sharing their own first block."""


@st.composite
def token_prompts(draw: st.DrawFn, *, max_tail: int = 9) -> tuple[int, ...]:
    """A request's token ids: one of `PROMPT_PREFIXES` plus a short tail, never empty.

    With small blocks (4 tokens) requests share prefixes, diverge, and are
    sometimes shorter than one block (an empty chain).
    """
    prefix = draw(st.sampled_from(PROMPT_PREFIXES))
    tail = draw(st.lists(st.integers(0, 7), min_size=0 if prefix else 1, max_size=max_tail))
    return prefix + tuple(tail)


# -- the wire: hostile HTTP for the fuzz suites (tests/test_fuzz_gateway.py, test_fuzz_envoy.py) --

WIRE_MODEL = "qwen3-0.6b"
"""The model the fake engines serve (tests.helpers.MODEL); every other name is unknown."""

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
"""The two routes a client may POST a completion to."""

OTHER_PATHS = (
    "/v1/chat/completions/",
    "/v1/completions/",
    "//v1/chat/completions",
    "/v1/chat/completions?stream=true",
    "/v1/chat/completions%2F",
    "/V1/CHAT/COMPLETIONS",
    "/v1/anything",
    "/v1/embeddings",
    "/v1/models",
    "/v1/models/qwen3-0.6b",
    "/metrics",
    "/health",
    "/",
    "/admin",
    "/%00",
    "/v1/%ff%fe",
    "/v1/chat/completions/../../metrics",
    "/v1/chat/completions;x=1",
    "/" + "a" * 4000,
)
"""Paths that are not a completion route: near misses, other APIs, traversal, junk."""

METHODS = ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO")
"""Methods other than POST (a client may send any token)."""

SPECIAL_STRINGS = (
    "",
    " ",
    "\ud800",
    "a\udfffb",
    "\udc00\ud800",
    "\x00",
    "\x1b[31m",
    "\u2028\u2029",
    "\u202eevil",
    "\ufeff",
    "🙂" * 3,
    "e\u0301" * 4,
    "null",
    "other",
    "unknown",
    "../../etc/passwd",
    "%00%ff",
    "${jndi:ldap://x}",
    '"}]}',
    "qwen3-0.6b ",
    "QWEN3-0.6B",
    "qwen3-0.6b\x00",
)
"""Strings that have broken parsers, label exporters and log lines elsewhere."""

LONG_UNITS = ("m", "é", "\ud800", "🙂", "ab", "\x01")
"""What long strings are made of (surrogates and control characters included)."""


def hostile_text(max_size: int = 24) -> st.SearchStrategy[str]:
    """Any short string: unicode, control characters, lone surrogates, or a known-bad one.

    Lone surrogates ("\\ud800") cannot be UTF-8 encoded: `wire_json` writes them
    JSON-escaped (what issue 12's first defect was) or as raw, invalid bytes.
    """
    pieces = st.one_of(
        st.text(max_size=max_size),
        st.text(st.characters(max_codepoint=0x1F), max_size=max_size),
        st.text(st.characters(categories=["Cs", "Co", "Cf", "Zl", "Zp"]), max_size=max_size),
        st.sampled_from(SPECIAL_STRINGS),
    )
    return st.lists(pieces, max_size=3).map("".join)


def long_text(max_size: int = 65_536) -> st.SearchStrategy[str]:
    """A long string of one repeated unit (cheap to draw), up to `max_size` units."""
    return st.builds(
        lambda unit, n: unit * n, st.sampled_from(LONG_UNITS), st.integers(0, max_size)
    )


huge_ints = st.one_of(
    st.integers(),
    st.sampled_from([-1, 0, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400]),
)
"""Integers a JSON parser accepts and a typed field does not expect (arbitrary size)."""

wire_scalars = st.one_of(
    st.none(),
    st.booleans(),
    huge_ints,
    st.floats(),  # nan and infinities too: json.dumps writes NaN / Infinity
    hostile_text(),
)
"""One JSON scalar of any type, hostile strings and non-standard floats included."""

wire_values = st.recursive(
    wire_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text(8), inner, max_size=4),
    max_leaves=12,
)
"""Any JSON value, nested a few levels."""

CHAT_KEYS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "user",
    "cache_salt",
    "prompt_cache_key",
    "tools",
    "logprobs",
    "response_format",
    "prompt",
)
"""Top-level keys of chat and completions bodies that a mutation may retype or drop."""


def model_names() -> st.SearchStrategy[Any]:
    """The served model, a hostile or long string, or not a string at all."""
    return st.one_of(
        st.just(WIRE_MODEL),
        hostile_text(),
        long_text(),
        wire_scalars,
    )


def _content() -> st.SearchStrategy[Any]:
    part = st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_audio", "junk"])},
        optional={"text": hostile_text() | long_text(4096) | wire_values, "x": wire_values},
    )
    return st.one_of(hostile_text(), long_text(4096), st.lists(part, max_size=4), wire_values)


def _messages() -> st.SearchStrategy[Any]:
    message = st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "assistant", "tool", "developer"])
            | hostile_text(),
            "content": _content(),
            "name": hostile_text(),
            "tool_calls": wire_values,
        },
    )
    return st.one_of(
        st.lists(message, max_size=6),
        st.builds(lambda m, n: [m] * n, message, st.integers(0, 5000)),
        wire_values,
    )


def _prompts() -> st.SearchStrategy[Any]:
    return st.one_of(
        hostile_text(),
        long_text(),
        st.lists(hostile_text(), max_size=4),
        st.lists(huge_ints, max_size=64),
        st.lists(st.lists(huge_ints, max_size=8), max_size=4),
        wire_values,
    )


@st.composite
def openai_bodies(draw: st.DrawFn) -> Any:
    """A chat or completions body, valid or mutated (1-3 mutations, each a hostile change).

    Mutations: the model (hostile, long, not a string), messages or prompt
    (wrong shapes, many messages, token ids with huge ints), a key retyped,
    a key dropped, numbers as strings, negative or huge `max_tokens`, odd
    `stream` flags and options, extra keys; sometimes the top level is not
    an object at all.
    """
    chat = draw(st.booleans())
    body: dict[str, Any] = {"model": WIRE_MODEL, "max_tokens": draw(st.integers(1, 4))}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(hostile_text())}]
    else:
        body["prompt"] = draw(hostile_text())
    kinds = st.sampled_from(
        [
            "model",
            "messages",
            "prompt",
            "retype",
            "drop",
            "strings",
            "max_tokens",
            "stream",
            "extra",
            "top",
        ]
    )
    for kind in draw(st.lists(kinds, max_size=3)):
        if kind == "model":
            body["model"] = draw(model_names())
        elif kind == "messages":
            body["messages"] = draw(_messages())
        elif kind == "prompt":
            body["prompt"] = draw(_prompts())
        elif kind == "retype":
            body[draw(st.sampled_from(CHAT_KEYS))] = draw(wire_values)
        elif kind == "drop" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        elif kind == "strings":
            body.update(max_tokens="4", temperature="0.5", stream="true", n="1")
        elif kind == "max_tokens":
            key = draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
            body[key] = draw(st.sampled_from([-1, 0, -(2**63), 2**63, 10**30, 1.5, 1e308]))
        elif kind == "stream":
            body["stream"] = draw(st.sampled_from([True, False, None, "yes", 1, 0, [], {}]))
            body["stream_options"] = draw(
                st.sampled_from([None, {"include_usage": True}, {"include_usage": "x"}, "x", []])
            )
        elif kind == "extra":
            body.update(draw(st.dictionaries(hostile_text(16), wire_values, max_size=4)))
        elif kind == "top":
            return draw(wire_values)
    return body


def wire_json(value: Any, *, ensure_ascii: bool = True) -> bytes:
    """`value` as JSON bytes; lone surrogates JSON-escaped, or raw (invalid UTF-8) if not ascii.

    NaN and infinities come out as Python writes them (`NaN`, `Infinity`), which
    strict JSON parsers refuse.
    """
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80")
"""Byte sequences no UTF-8 decoder accepts (a lone continuation, a CESU surrogate ...)."""


@st.composite
def damaged(draw: st.DrawFn, payload: bytes) -> bytes:
    """`payload` unchanged (often), or with byte-level damage.

    Damage: cut short, bits flipped, random bytes inserted, invalid UTF-8
    inserted, a BOM in front, trailing garbage, replaced by random bytes,
    or nested 1 to 100,000 levels deep (a recursion bomb for parsers).
    """
    kind = draw(
        st.sampled_from(
            [
                "none",
                "none",
                "none",
                "cut",
                "flip",
                "insert",
                "utf8",
                "bom",
                "tail",
                "random",
                "deep",
            ]
        )
    )
    at = draw(st.integers(0, len(payload)))
    if kind == "cut":
        return payload[:at]
    if kind == "flip" and payload:
        out = bytearray(payload)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "insert":
        return payload[:at] + draw(st.binary(min_size=1, max_size=16)) + payload[at:]
    if kind == "utf8":
        return payload[:at] + draw(st.sampled_from(INVALID_UTF8)) + payload[at:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + payload
    if kind == "tail":
        return payload + draw(st.sampled_from([b"x", b"{}", b"\x00", b" ,", b'\n\n{"a":1}']))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "deep":
        depth = draw(st.sampled_from([1, 100, 1000, 10_000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        prefix = b'{"model": "' + WIRE_MODEL.encode() + b'", "messages": '
        return prefix + opener * depth + b"1" + closer * depth + b"}"
    return payload


CONTENT_TYPES = (
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "application/json\x7f",
    "",
)
"""Content-Type values a client may send (None: the header is absent)."""

TENANT_HEADERS = ("x-tenant-id", "x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
"""The default tenant headers (docs/gateway.md `identity.tenant_headers`)."""

header_values = st.one_of(
    st.binary(max_size=40).map(
        lambda b: bytes(c for c in b if c in b"\t" or 0x20 <= c <= 0x7E or c >= 0x80).strip()
    ),
    st.sampled_from([b"", b"other", b"default", b"a" * 257, b"\xff\xfe", b"\xc3\xa9", b"1e9"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(str.encode),
)
"""Header values h11 lets a client send: visible ASCII, spaces, tabs and obs-text bytes."""


@st.composite
def hostile_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Request headers: junk tenant, session, priority and API-key headers, a client's own
    endpoint pick, `Host: evil.example`, up to 10,000 headers, or one of up to 1 MiB."""
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(
                ["tenant", "session", "priority", "auth", "pick", "host", "many", "big", "junk"]
            )
        )
        if kind == "tenant":
            headers.append((draw(st.sampled_from(TENANT_HEADERS)).encode(), draw(header_values)))
        elif kind == "session":
            headers.append((b"x-session-id", draw(header_values)))
        elif kind == "priority":
            value = draw(header_values | st.sampled_from([b"1", b"-1", b"critical", b"9" * 40]))
            headers.append((b"x-priority", value))
        elif kind == "auth":
            value = draw(header_values | st.sampled_from([b"Bearer sk-fuzz", b"Bearer ", b"Basic"]))
            value = b"Bearer " + value if draw(st.booleans()) else value
            headers.append((b"authorization", value.strip()))
        elif kind == "pick":
            value = draw(st.sampled_from([b"127.0.0.1:1", b"evil.example:80", b"[::1]:22", b""]))
            headers.append((b"x-gateway-destination-endpoint", value))
        elif kind == "host" and all(name != b"host" for name, _ in headers):
            headers.append((b"host", draw(st.sampled_from([b"evil.example", b"evil.example:443"]))))
        elif kind == "many":
            n = draw(st.sampled_from([10, 100, 1000, 10_000]))
            headers.extend((f"x-junk-{i}".encode(), b"v") for i in range(n))
        elif kind == "big":
            size = draw(st.sampled_from([1024, 8192, 65_536, 1 << 20]))
            headers.append((b"x-big", b"b" * size))
        else:
            name = draw(
                st.text(
                    st.sampled_from("abcdefghijklmnopqrstuvwxyz-_.!#$%&'*+^`|~"),
                    min_size=1,
                    max_size=20,
                )
            )
            headers.append((name.encode(), draw(header_values)))
    return headers


@st.composite
def raw_requests(draw: st.DrawFn, host: str) -> bytes:
    """A whole HTTP/1.1 request as bytes, with the framing damaged (sent over a raw socket).

    Content-Length larger or smaller than the body, negative, not a number,
    twice with different values, with `Transfer-Encoding: chunked` beside it,
    broken chunk sizes; bare LF line ends, obs-fold continuation lines, a
    header without a colon, NUL in a header, HTTP/1.0 and unknown versions,
    absolute-form targets at another host, no Host or two.
    """
    body = draw(damaged(wire_json(draw(openai_bodies()))))
    method = draw(st.sampled_from([b"POST", b"POST", b"GET", b"post", b"P\x00ST"]))
    target = draw(
        st.sampled_from(
            [
                b"/v1/chat/completions",
                b"/v1/completions",
                b"http://evil.example/v1/completions",
                b"*",
                b"/v1/chat/completions/",
                b"/" + b"t" * 10_000,
                b"/v1/chat/\xff",
            ]
        )
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    headers = [b"Host: " + host.encode(), b"Content-Type: application/json"]
    framing = draw(
        st.sampled_from(
            [
                "exact",
                "longer",
                "shorter",
                "negative",
                "nan",
                "twice",
                "te+cl",
                "chunked-bad",
                "none",
                "obs-fold",
                "no-colon",
                "nul",
                "no-host",
                "two-hosts",
                "expect",
            ]
        )
    )
    n = len(body)
    if framing == "exact":
        headers.append(b"Content-Length: %d" % n)
    elif framing == "longer":
        headers.append(b"Content-Length: %d" % (n + draw(st.integers(1, 1 << 20))))
    elif framing == "shorter":
        headers.append(b"Content-Length: %d" % draw(st.integers(0, max(n - 1, 0))))
    elif framing == "negative":
        headers.append(b"Content-Length: -%d" % n)
    elif framing == "nan":
        headers.append(b"Content-Length: " + draw(st.sampled_from([b"x", b"1e3", b"0x10", b""])))
    elif framing == "twice":
        headers += [b"Content-Length: %d" % n, b"Content-Length: %d" % (n + 1)]
    elif framing == "te+cl":
        headers += [b"Content-Length: %d" % n, b"Transfer-Encoding: chunked"]
    elif framing == "chunked-bad":
        headers.append(b"Transfer-Encoding: chunked")
        sizes = [b"%x" % n, b"zz", b"-1", b"ffffffffffffffffff", b"%x" % (n + 5)]
        end = draw(st.sampled_from([b"0\r\n\r\n", b"", b"0\r\n"]))
        body = draw(st.sampled_from(sizes)) + b"\r\n" + body + b"\r\n" + end
    elif framing == "obs-fold":
        headers += [b"Content-Length: %d" % n, b"X-Tenant-Id: a", b" folded"]
    elif framing == "no-colon":
        headers += [b"Content-Length: %d" % n, b"X-Tenant-Id a"]
    elif framing == "nul":
        headers += [b"Content-Length: %d" % n, b"X-Tenant-Id: a\x00b"]
    elif framing == "no-host":
        headers = [h for h in headers if not h.startswith(b"Host")] + [b"Content-Length: %d" % n]
    elif framing == "two-hosts":
        headers += [b"Host: evil.example", b"Content-Length: %d" % n]
    elif framing == "expect":
        headers += [b"Content-Length: %d" % n, b"Expect: 100-continue"]
    head = method + b" " + target + b" " + version + eol + eol.join(headers) + eol + eol
    return head + body


FUZZ_ENV = "PREFIXROUTE_FUZZ"
LONG_FUZZ_FACTOR = 100
"""`PREFIXROUTE_FUZZ=long` runs every fuzz test with this many times its examples."""


def fuzz_settings(examples: int) -> settings:
    """Settings for a fuzz test: `examples` examples, or `LONG_FUZZ_FACTOR` times as many
    when `PREFIXROUTE_FUZZ=long` (docs/fuzzing.md). No deadline (inputs are large on
    purpose) and no too-slow health check."""
    long = os.environ.get(FUZZ_ENV, "").strip().lower() == "long"
    return settings(
        max_examples=examples * LONG_FUZZ_FACTOR if long else examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
