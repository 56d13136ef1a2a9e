"""The request model (`prefixroute.request`): validation, token storage, frozen values."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import pytest

from prefixroute.request import Request, RequestError, Usage


def test_request_defaults() -> None:
    req = Request(model="m", prompt="hello")
    assert (req.model, req.prompt, req.token_ids) == ("m", "hello", None)
    assert (req.tenant, req.session, req.priority) == ("default", None, 0)
    assert (req.cache_salt, req.lora, req.max_tokens, req.request_id, req.stream) == (
        None,
        None,
        None,
        None,
        False,
    )


def test_prompt_and_token_ids_together_are_allowed() -> None:
    req = Request(model="m", prompt="ab", token_ids=[1, 2])
    assert req.prompt == "ab"
    assert req.token_ids is not None and req.token_ids.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"model": "m"}, "prompt", "needs a prompt or token_ids"),
        ({"model": "", "prompt": "x"}, "model", "model must be a non-empty string"),
        ({"model": None, "prompt": "x"}, "model", "non-empty string"),
        ({"model": 3, "prompt": "x"}, "model", "non-empty string"),
        (
            {"model": "m", "prompt": "x", "max_tokens": -1},
            "max_tokens",
            "max_tokens must be an integer >= 0",
        ),
        ({"model": "m", "token_ids": [1, "2"]}, "token_ids", "must be integers"),
        ({"model": "m", "token_ids": [1.0, 2.0]}, "token_ids", "must be integers"),
        ({"model": "m", "token_ids": [1, None]}, "token_ids", "must be integers"),
        ({"model": "m", "token_ids": [True, False]}, "token_ids", "must be integers"),
        ({"model": "m", "token_ids": [2**64]}, "token_ids", "within [0, 2**32)"),
        ({"model": "m", "token_ids": [0, -1]}, "token_ids", "within [0, 2**32)"),
        ({"model": "m", "token_ids": [2**32]}, "token_ids", "within [0, 2**32)"),
        ({"model": "m", "token_ids": np.array([-5], dtype=np.int8)}, "token_ids", "within"),
        ({"model": "m", "token_ids": [[1, 2], [3, 4]]}, "token_ids", "flat sequence"),
        ({"model": "m", "token_ids": np.zeros((2, 2), dtype=np.int64)}, "token_ids", "flat"),
        ({"model": "m", "token_ids": [[]]}, "token_ids", "flat sequence"),
        ({"model": "m", "token_ids": 7}, "token_ids", "flat sequence"),
        ({"model": "m", "token_ids": "abc"}, "token_ids", "flat sequence"),
    ],
)
def test_invalid_requests_name_their_field(
    fields: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(RequestError) as info:
        Request(**fields)
    assert info.value.field == field
    assert message in str(info.value)
    assert info.value.status == 400


def test_ragged_token_ids_are_a_request_error() -> None:
    with pytest.raises(RequestError) as info:
        Request(model="m", token_ids=[[1], [1, 2]])  # type: ignore[list-item]
    assert info.value.field == "token_ids"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"token_ids": []}, "token_ids"),
        ({"token_ids": [True, False]}, "token_ids"),
        ({"token_ids": [1.5]}, "token_ids"),
        ({"prompt": "x", "max_tokens": "8"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "priority": "high"}, "priority"),
        ({"prompt": "x", "tenant": ""}, "tenant"),
        ({"prompt": 123}, "prompt"),
        ({"prompt": "x", "cache_salt": 5}, "cache_salt"),
        ({"prompt": "x", "lora": 5}, "lora"),
        ({"prompt": "x", "session": ["a"]}, "session"),
        ({"prompt": "x", "request_id": 1}, "request_id"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "max_tokens": 2**63}, "max_tokens"),
        ({"prompt": "x", "priority": 10**400}, "priority"),
        ({"prompt": "x", "priority": -(2**63) - 1}, "priority"),
        ({"prompt": "x", "tenant": "t\ud800"}, "tenant"),
        ({"prompt": "x", "session": "\udfff"}, "session"),
        ({"prompt": "x", "lora": "a\ud800"}, "lora"),
        ({"prompt": "x", "request_id": "\ud800"}, "request_id"),
    ],
)
def test_more_invalid_values_are_request_errors(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        Request(model="m", **fields)
    assert info.value.field == field


def test_request_error_carries_status_and_field() -> None:
    err = RequestError("too big", status=413, field="messages")
    assert (str(err), err.status, err.field) == ("too big", 413, "messages")
    assert isinstance(err, ValueError)
    plain = RequestError("bad")
    assert (plain.status, plain.field) == (400, None)


@pytest.mark.parametrize(
    "tokens",
    [
        [1, 2, 2**32 - 1],
        (1, 2, 2**32 - 1),
        np.array([1, 2, 2**32 - 1], dtype=np.int64),
        np.array([1, 2, 2**32 - 1], dtype=np.uint64),
        np.array([1, 2, 2**32 - 1], dtype=np.uint32),
    ],
    ids=["list", "tuple", "int64", "uint64", "uint32"],
)
def test_token_ids_are_a_read_only_uint32_copy(tokens: Any) -> None:
    req = Request(model="m", token_ids=tokens)
    assert req.token_ids is not None
    assert req.token_ids.dtype == np.uint32
    assert req.token_ids.tolist() == [1, 2, 2**32 - 1]
    assert not req.token_ids.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        req.token_ids[0] = 9
    if isinstance(tokens, np.ndarray):
        tokens[0] = 7  # the caller's array is copied, not shared
        assert req.token_ids[0] == 1
    assert req == Request(model="m", token_ids=[1, 2, 2**32 - 1])


def test_equality_and_hash() -> None:
    a = Request(model="m", token_ids=[1, 2, 3], tenant="t")
    b = Request(model="m", token_ids=np.array([1, 2, 3]), tenant="t")
    assert a == b
    assert hash(a) == hash(b)
    assert a != Request(model="m", token_ids=[1, 2, 4], tenant="t")
    assert a != Request(model="m", token_ids=[1, 2], tenant="t")
    assert a != Request(model="m", token_ids=[1, 2, 3], tenant="u")
    assert a != Request(model="m", prompt="x", tenant="t")
    assert Request(model="m", prompt="x") == Request(model="m", prompt="x")
    assert Request(model="m", prompt="x") != Request(model="m", prompt="x", cache_salt="s")
    assert len({a, b}) == 1


def test_repr_summarises_tokens() -> None:
    assert "<3 tokens>" in repr(Request(model="m", token_ids=[1, 2, 3]))
    assert "token_ids=None" in repr(Request(model="m", prompt="x"))


def test_request_is_frozen() -> None:
    req = Request(model="m", prompt="x")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        req.model = "other"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        req.priority = 5  # type: ignore[misc]
    evolved = attrs.evolve(req, priority=-1)
    assert (req.priority, evolved.priority) == (0, -1)


def test_evolve_revalidates() -> None:
    req = Request(model="m", prompt="x")
    with pytest.raises(RequestError):
        attrs.evolve(req, model="")


def test_usage_defaults_and_frozen() -> None:
    usage = Usage()
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (0, 0, 0)
    assert (usage.ttft_s, usage.e2e_s, usage.ok) == (None, None, True)
    assert Usage(prompt_tokens=10, cached_tokens=4) == Usage(prompt_tokens=10, cached_tokens=4)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        usage.ok = False  # type: ignore[misc]


def test_prompt_model_and_salt_may_hold_lone_surrogates() -> None:
    """JSON can carry them; the blocker hashes them with `surrogatepass`."""
    r = Request(model="m\ud800", prompt="a\ud800b", cache_salt="\udfff")
    assert r.prompt == "a\ud800b"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt_tokens": -1}, "prompt_tokens"),
        ({"cached_tokens": -5}, "cached_tokens"),
        ({"completion_tokens": 1.5}, "completion_tokens"),
        ({"cached_tokens": float("nan")}, "cached_tokens"),
        ({"cached_tokens": True}, "cached_tokens"),
        ({"prompt_tokens": "10"}, "prompt_tokens"),
        ({"ttft_s": float("nan")}, "ttft_s"),
        ({"ttft_s": -0.1}, "ttft_s"),
        ({"e2e_s": float("inf")}, "e2e_s"),
        ({"e2e_s": True}, "e2e_s"),
        ({"ok": 1}, "ok"),
    ],
)
def test_usage_refuses_negative_non_finite_and_mistyped_values(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=f"Usage.{field} "):
        Usage(**fields)


def test_usage_accepts_cached_above_prompt_for_the_router_to_clamp() -> None:
    assert Usage(prompt_tokens=10, cached_tokens=10**12).cached_tokens == 10**12
    assert Usage(ttft_s=0, e2e_s=1.5).ttft_s == 0
