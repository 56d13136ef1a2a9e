"""pytest-benchmark suite for `prefixroute.drivers.tokens`: a 4,096-token chat, warm and cold.

The chat: a 1,500-token system prompt, ten earlier turns and a new user
question, 4,096 tokens in all with the tiny model fixture's tokenizer (the one
the real engines in the tests serve) and its ChatML template. Timed, each the
whole `ModelTokenizer.chat_ids` call (render the template, cut at special
tokens, tokenize or look up each piece, concatenate):

- warm: the same chat again, every piece in the reuse cache (the target:
  p50 <= 1 ms);
- next turn: the system prompt and history warm, a question never seen
  before (what a conversation's next request costs);
- cold: the cache emptied before each round (a first request);
- whole: the reference, the rendered text tokenized in one
  tokenizer call without the cache;
- render: the chat template alone.

Figures and the command: docs/tokens.md.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prefixroute.drivers.tokens import ModelTokenizer

TINY = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-model"
TOKENS = 4_096
WORDS = [
    "the",
    "incident",
    "report",
    "lists",
    "follow",
    "up",
    "actions",
    "owners",
    "due",
    "dates",
    "service",
    "latency",
    "cache",
    "engine",
    "request",
    "tenant",
    "routing",
    "prefix",
    "block",
    "token",
    "summary",
    "customer",
    "deployment",
    "region",
    "error",
    "budget",
    "alert",
    "page",
    "rollback",
    "canary",
    "metric",
    "dashboard",
    "queue",
    "worker",
    "thread",
    "memory",
]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.from_dir(TINY)


@pytest.fixture(scope="module")
def chat(tokenizer: ModelTokenizer) -> list[dict[str, str]]:
    """System prompt (~1,500 tokens), ten turns, then a question filling up to 4,096 tokens."""
    rng = random.Random(13)
    system = {"role": "system", "content": _text(rng, 700)}
    messages = [system]
    for _ in range(10):
        messages.append({"role": "user", "content": _text(rng, 40)})
        messages.append({"role": "assistant", "content": _text(rng, 80)})
    words = 1
    while (
        len(tokenizer.chat_ids([*messages, {"role": "user", "content": _text(rng, words)}]))
        < TOKENS
    ):
        words += 5
    question = {"role": "user", "content": _text(random.Random(1), words)}
    return [*messages, question]


def test_chat_ids_warm(benchmark: Any, tokenizer: ModelTokenizer, chat: Any) -> None:
    want = tokenizer.chat_ids(chat)
    ids = benchmark(tokenizer.chat_ids, chat)
    assert np.array_equal(ids, want) and len(ids) >= TOKENS
    assert np.array_equal(ids, tokenizer.encode_whole(tokenizer.render_chat(chat), False))


def test_chat_ids_next_turn(benchmark: Any, tokenizer: ModelTokenizer, chat: Any) -> None:
    tokenizer.chat_ids(chat)
    serial = itertools.count()

    def next_turn() -> Any:
        question = {"role": "user", "content": f"Question {next(serial)}: " + chat[-1]["content"]}
        return tokenizer.chat_ids([*chat[:-1], question])

    ids = benchmark(next_turn)
    assert len(ids) >= TOKENS


def test_chat_ids_cold(benchmark: Any, tokenizer: ModelTokenizer, chat: Any) -> None:
    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        tokenizer.cache.clear()
        return (chat,), {}

    ids = benchmark.pedantic(tokenizer.chat_ids, setup=setup, rounds=200)
    assert len(ids) >= TOKENS


def test_chat_whole_encode(benchmark: Any, tokenizer: ModelTokenizer, chat: Any) -> None:
    ids = benchmark(lambda: tokenizer.encode_whole(tokenizer.render_chat(chat), False))
    assert np.array_equal(ids, tokenizer.chat_ids(chat))


def test_chat_render_only(benchmark: Any, tokenizer: ModelTokenizer, chat: Any) -> None:
    text = benchmark(tokenizer.render_chat, chat)
    assert text.endswith("<|im_start|>assistant\n")
