"""Test 0 of issue 13: the gateway's tokenizer gives exactly the real engine's token ids.

`prefixroute.drivers.tokens.ModelTokenizer` on the committed fixture
`tests/fixtures/tiny-model/` (the very files the engines serve: `make vllm`
copies them into `.venv-vllm/tiny`) against the engine's own
`POST /tokenize`: chats with the generation prompt (the ids the engine uses
for a chat request), without it, and plain completions prompts. The same
pairs, recorded (`tests/fixtures/vllm/tokenize.json`), are replayed without
the engine by tests/engine/test_recorded.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from benchmarks.engine_truth import TOKENIZER_DIR, Chat, tokenize_cases

from prefixroute.devtools.vllm import Engine

pytestmark = pytest.mark.engine


def _engine_ids(engine: Engine, body: dict[str, Any]) -> list[int]:
    answer = httpx.post(f"{engine.url}/tokenize", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["tokens"])


def test_chat_and_prompt_ids_equal_the_engines(
    vllm_engines: list[Engine], chats: list[Chat]
) -> None:
    tokens = pytest.importorskip("prefixroute.drivers.tokens")
    tokenizer = tokens.ModelTokenizer.from_dir(TOKENIZER_DIR)
    cases = tokenize_cases(chats)
    assert len(cases) >= 8
    for body in cases:
        want = _engine_ids(vllm_engines[0], body)
        if "messages" in body:
            got = tokenizer.chat_ids(
                body["messages"], add_generation_prompt=body["add_generation_prompt"]
            )
        else:
            got = tokenizer.prompt_ids(body["prompt"])
        assert [int(t) for t in got] == want, body
