"""The simulator's stand-in tokenizer (`prefixroute.sim.tokenizer`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixroute.sim.tokenizer import (
    FIRST_ID,
    IM_END,
    IM_START,
    LEXICON_SIZE,
    VOCAB_SIZE,
    chat_message,
    encode,
    encode_chat,
    generation_prompt,
    lexicon_text,
    lexicon_tokens,
    pretokenize,
    synthetic_blocks,
    synthetic_tokens,
)

PERSONA = "You are a financial analyst assistant specializing in market data. "

roles = st.sampled_from(["system", "user", "assistant", "tool"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=40)}))


# --- encode ------------------------------------------------------------------------------


@given(st.text())
def test_pretokens_cover_the_text(text: str) -> None:
    assert "".join(pretokenize(text)) == text


def test_pretokens_follow_the_gpt2_family_split() -> None:
    assert pretokenize("I'll go, (maybe) x2!\n\n  end ") == [
        "I",
        "'ll",
        " go",
        ",",
        " (",
        "maybe",
        ")",
        " x",
        "2",
        "!\n\n",
        " ",
        " end",
        " ",
    ]


def test_the_seed_persona_costs_61_tokens() -> None:
    # 12 per sentence (" specializing" is two chunks) + the trailing space; Qwen3 gives ~13.
    assert len(encode(PERSONA)) == 13  # the trailing space is its own token at the end
    assert len(encode(PERSONA * 5)) == 61


def test_long_words_are_chunked_and_digits_split() -> None:
    assert len(encode("internationalization")) == 3  # 20 chars: 8 + 8 + 4
    assert len(encode(" assistant")) == 1  # 10 chars: one piece
    assert len(encode("Question 917")) == 5  # "Question", " ", "9", "1", "7"


def test_ids_are_stable_across_processes() -> None:
    # Frozen values: changing the mapping changes every simulation result.
    assert encode("Question 17").tolist() == [58902, 99694, 64180, 141362]
    assert encode("")[:].tolist() == []


@given(st.text(max_size=200))
def test_ids_are_ordinary_and_read_only(text: str) -> None:
    ids = encode(text)
    assert ids.dtype == np.uint32
    assert not ids.flags.writeable
    assert ids.size == 0 or (int(ids.min()) >= FIRST_ID and int(ids.max()) < VOCAB_SIZE)
    assert np.array_equal(ids, encode(text))


def test_encode_is_memoised() -> None:
    text = PERSONA * 3
    assert encode(text) is encode(text)


# --- chat template -----------------------------------------------------------------------


def test_chat_template_layout() -> None:
    ids = encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    nl = encode("\n").tolist()
    system = [IM_START, *encode("system").tolist(), *nl, *encode("Be brief.").tolist(), IM_END, *nl]
    user = [IM_START, *encode("user").tolist(), *nl, *encode("Hi").tolist(), IM_END, *nl]
    expected = [*system, *user, IM_START, *encode("assistant").tolist(), *nl]
    assert ids.tolist() == expected
    assert not ids.flags.writeable
    assert generation_prompt().tolist() == [IM_START, *encode("assistant").tolist(), *nl]


@given(messages, messages)
@settings(max_examples=200)
def test_chat_histories_are_prefix_stable(
    first: list[dict[str, str]], more: list[dict[str, str]]
) -> None:
    head = encode_chat(first)[: -len(generation_prompt())]
    both = encode_chat(first + more)
    assert np.array_equal(both[: len(head)], head)


@given(messages, st.text(max_size=40), messages)
def test_a_next_turn_starts_with_the_whole_previous_prompt(
    first: list[dict[str, str]], reply: str, more: list[dict[str, str]]
) -> None:
    prompt = encode_chat(first)
    nxt = encode_chat([*first, {"role": "assistant", "content": reply}, *more])
    output = [*encode(reply).tolist(), IM_END]
    assert nxt[: len(prompt) + len(output)].tolist() == prompt.tolist() + output


@given(messages)
def test_chat_message_pieces_make_encode_chat(msgs: list[dict[str, str]]) -> None:
    parts = [chat_message(m["role"], encode(m["content"])) for m in msgs]
    expected = np.concatenate([*parts, generation_prompt()])
    assert np.array_equal(encode_chat(msgs), expected)


# --- synthetic tokens --------------------------------------------------------------------

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def reference_synthetic(key: int, n: int) -> list[int]:
    """Plain-Python reference for the numpy fast path (see the module docstring)."""

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & M64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
        return x ^ (x >> 31)

    h = key
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    out = []
    for j in range(n):
        word = h ^ (splitmix64(j) >> 32)
        out.append(FIRST_ID + ((word * (VOCAB_SIZE - FIRST_ID)) >> 32))
    return out


@given(st.integers(0, M32), st.integers(0, 300))
def test_synthetic_tokens_match_the_reference(key: int, n: int) -> None:
    assert synthetic_tokens(key, n).tolist() == reference_synthetic(key, n)


def test_synthetic_tokens_properties() -> None:
    a = synthetic_tokens(7, 512)
    assert a.dtype == np.uint32 and not a.flags.writeable
    assert int(a.min()) >= FIRST_ID and int(a.max()) < VOCAB_SIZE
    assert np.array_equal(a, synthetic_tokens(7, 512))
    assert np.array_equal(synthetic_tokens(7, 100), a[:100])  # prefix-consistent
    assert np.array_equal(synthetic_tokens(7, 5000)[:512], a)  # table growth keeps values
    b = synthetic_tokens(8, 512)
    assert (a != b).mean() > 0.99
    assert len(set(a.tolist())) > 500  # spread over the vocabulary


def test_synthetic_blocks_rows_are_synthetic_tokens() -> None:
    keys = np.array([0, 1, 2**32 - 1, 182_789], dtype=np.int64)
    blocks = synthetic_blocks(keys, 16)
    assert blocks.shape == (4, 16)
    for row, key in zip(blocks, keys.tolist(), strict=True):
        assert np.array_equal(row, synthetic_tokens(key, 16))
    assert synthetic_blocks([], 16).shape == (0, 16)


@pytest.mark.parametrize("key", [-1, 2**32])
def test_synthetic_keys_must_fit_32_bits(key: int) -> None:
    with pytest.raises(ValueError, match="keys"):
        synthetic_tokens(key, 4)


# --- lexicon -----------------------------------------------------------------------------


@given(st.lists(st.integers(0, LEXICON_SIZE - 1), max_size=300))
def test_lexicon_text_encodes_to_lexicon_tokens(indices: list[int]) -> None:
    text = lexicon_text(indices)
    assert len(text) == 5 * len(indices)
    assert np.array_equal(encode(text), lexicon_tokens(indices))
    assert np.array_equal(lexicon_tokens(np.asarray(indices)), lexicon_tokens(indices))


def test_lexicon_words_are_distinct_single_tokens() -> None:
    everything = lexicon_text(range(LEXICON_SIZE))
    pieces = pretokenize(everything)
    assert len(pieces) == LEXICON_SIZE == len(set(pieces))
    assert all(len(p) == 5 and p[0] == " " for p in pieces)
