"""`prefixroute.drivers.tokens` against vLLM 0.32's own renderer, request by request.

vLLM's render stack runs in-process without an engine (what its GPU-less
`vllm.entrypoints.launchers.render` server runs: `init_render_app_state`,
then `OnlineRenderer.render_chat` on a validated `ChatCompletionRequest`, or
`render_completion` on a `CompletionRequest`), on copies of the tiny model
fixture with other chat templates (templates that dump the conversation vLLM
builds with `tojson`, one that iterates over content parts, a Qwen3-style
tool and reasoning template, a BOS post-processor). The cases: adversarial
bodies (content shapes, roles, tool calls and tools of odd shapes, template
arguments, completions prompts) and random chats of words, digits,
whitespace, decomposed accents, emoji, CJK and the special-token strings.

For each body: both accept and give the same ids ("equal"), both refuse,
ours leaves it in text mode, or a disagreement (printed). Bodies vLLM refuses
in pydantic validation that we accept are counted apart: the gateway routes
them and the engine refuses them itself.

    .venv/bin/python benchmarks/tokens_vs_vllm.py --vllm-python .venv-vllm/venv/bin/python

(the vLLM interpreter: `make vllm`'s, or any with vllm 0.32 and transformers
5.19). Figures: docs/tokens.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TINY = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-model"
TEMPLATES = {
    "tiny": None,  # the fixture's ChatML template
    "dump": "<|im_start|>{{ messages | tojson }}<|im_end|>T{% if tools is defined %}"
    "{{ tools | tojson }}{% endif %}D{% if documents is defined %}{{ documents | tojson }}"
    "{% endif %}G{{ add_generation_prompt }}E{{ enable_thinking is defined and "
    "enable_thinking }}R{{ reasoning_effort is defined and reasoning_effort }}X{{ custom }}",
    "parts": "{% for message in messages %}<|im_start|>{{ message.role }}:{% if message.content"
    " is string %}S{{ message.content }}{% else %}{% for part in message.content %}"
    "[{{ part | tojson }}]{% endfor %}{% endif %}|{{ message | tojson }}<|im_end|>{% endfor %}",
    "qwen3": "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}{%- for message in messages %}{%- set c = message.content"
    " if message.content is string else '' %}{%- if message.role == 'assistant' %}"
    "<|im_start|>assistant\n<think>\n{{ (message.reasoning_content or '').strip() }}\n</think>\n\n"
    '{{ c }}{%- for call in message.tool_calls or [] %}<tool_call>\n{"name": "{{ '
    'call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>{%- endfor %}<|im_end|>\n{%- else %}<|im_start|>{{ message.role }}\n{{ c }}"
    "<|im_end|>\n{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{%- endif %}{%- endif %}",
}
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


def make_dirs(root: Path) -> dict[str, str]:
    """The model directories: the fixture's files (config.json included) with another template."""
    out = {}
    for name in [*TEMPLATES, "bos"]:
        path = root / name
        shutil.copytree(TINY, path)
        if TEMPLATES.get(name) is not None:
            config = json.loads((path / "tokenizer_config.json").read_text())
            config["chat_template"] = TEMPLATES[name]
            (path / "tokenizer_config.json").write_text(json.dumps(config))
        if name == "bos":
            tree = json.loads((path / "tokenizer.json").read_text())
            tree["post_processor"] = BOS_POST
            (path / "tokenizer.json").write_text(json.dumps(tree))
        out[name] = str(path)
    return out


def adversarial(dirs: dict[str, str]) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    def chat(d: str, messages: Any, **extra: Any) -> None:
        cases.append({"dir": dirs[d], "kind": "chat", "body": {"messages": messages, **extra}})

    def user(c: Any) -> dict[str, Any]:
        return {"role": "user", "content": c}

    contents: list[Any] = [
        "plain",
        "",
        "a<|im_start|>b<|im_end|>c",
        "emoji 😀 漢字 \r\n 12 e\u0301",
        ["a", "b"],
        [{"type": "text", "text": "x", "extra": 1}],
        [{"type": "input_text", "text": "i"}],
        [{"type": "refusal", "refusal": "no"}],
        [{"type": "thinking", "thinking": "h"}],
        [],
        [{"type": "text", "text": ""}, "", "b"],
        [{"type": "text", "text": None}],
        None,
        5,
        [{"type": "tool_reference", "name": "f"}],
        [{"text": "no type"}],
        [None],
    ]
    for d in ("tiny", "dump", "parts", "qwen3"):
        for c in contents:
            chat(d, [user(c)])
            chat(d, [{"role": "system", "content": c}, user("q")])
            chat(d, [user("q"), {"role": "assistant", "content": c}])
    for role in ("developer", "tool", "narrator", "", 5, None):
        chat("dump", [{"role": role, "content": "x"}, user("q")])
    chat(
        "dump",
        [user("a"), {"role": "developer", "content": "d"}, {"role": "system", "content": "s"}],
    )
    chat("dump", [{"role": "system", "content": "x-anthropic-billing-header: a\nreal"}, user("q")])
    for key in ("reasoning", "reasoning_content"):
        chat("qwen3", [user("q"), {"role": "assistant", "content": "a", key: "t"}, user("b")])
    calls: list[Any] = [
        [
            {
                "id": "c",
                "type": "function",
                "function": {"name": "f", "arguments": '{"b": 2, "a": 1}'},
            }
        ],
        [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}],
        [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
        [{"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}],
        [
            {
                "id": "c",
                "type": "function",
                "function": {"name": "f", "arguments": "{}", "x": 1},
                "y": 2,
            }
        ],
        [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
        [],
        "x",
        [5],
    ]
    tools: list[Any] = [
        [{"type": "function", "function": {"name": "f"}}],
        [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"b": 1, "a": 2}, "strict": True},
            }
        ],
        [{"type": "function", "defer_loading": False, "function": {"name": "f", "extra": 1}}],
        [{"function": {"name": "f"}}],
        [{"type": "function", "function": {"name": "f", "parameters": []}}],
        [],
        [5],
        "x",
    ]
    for d in ("dump", "qwen3"):
        for call in calls:
            chat(d, [user("q"), {"role": "assistant", "content": None, "tool_calls": call}])
        for tool in tools:
            chat(d, [user("q")], tools=tool, tool_choice="none")
    kwargs: list[dict[str, Any]] = [
        {"add_generation_prompt": False},
        {"add_generation_prompt": "yes"},
        {"add_generation_prompt": 2},
        {"continue_final_message": True, "add_generation_prompt": False},
        {"continue_final_message": True},
        {"reasoning_effort": "low"},
        {"reasoning_effort": "none"},
        {"reasoning_effort": "bogus"},
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"chat_template_kwargs": {"custom": "C"}},
        {"chat_template_kwargs": {"custom": "auto"}},
        {"chat_template_kwargs": {"tokenize": True}},
        {"chat_template_kwargs": {"messages": []}},
        {"chat_template_kwargs": {"bos_token": "B"}},
        {"chat_template_kwargs": {"chat_template": "x"}},
        {"documents": [{"t": "x"}]},
        {"add_special_tokens": True},
        {"chat_template": "{{ 'X' }}"},
    ]
    for d in ("dump", "qwen3"):
        for extra in kwargs:
            chat(d, [user("q"), {"role": "assistant", "content": "The answer is "}], **extra)
    for d in ("tiny", "bos"):
        for prompt in ("hello 2024", "", "<|im_start|>x", ["one"], ["a", "b"], [1, 2], None):
            for add in (True, False):
                body = {"prompt": prompt, "add_special_tokens": add}
                cases.append({"dir": dirs[d], "kind": "completion", "body": body})
    return cases


ALPHABET = [
    "a",
    "B",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\r\n",
    "\t",
    "1",
    "23",
    "456",
    " 7.5",
    "'s",
    "don't",
    "é",
    "e\u0301",
    "ﬁ",
    "A\u030a",
    "漢字",
    "😀",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_",
    "|>",
    "{",
    '"',
    ":",
    "...",
    "x" * 70,
    "\u00a0",
    "\u200b",
    "٣",
    "½",
]


def random_cases(dirs: dict[str, str], count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def text() -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25)))

    cases = []
    for _ in range(count):
        if rng.random() < 0.25:
            body = {"prompt": text() or "x", "add_special_tokens": rng.random() < 0.5}
            cases.append(
                {"dir": dirs[rng.choice(["tiny", "bos"])], "kind": "completion", "body": body}
            )
            continue
        messages = []
        for j in range(rng.randint(1, 6)):
            roles = (
                ["system", "user", "assistant", "tool", "developer"] if j else ["system", "user"]
            )
            content: Any = text()
            if rng.random() < 0.3:
                content = [{"type": "text", "text": text()} for _ in range(rng.randint(1, 3))]
            message = {"role": rng.choice(roles), "content": content}
            if message["role"] == "assistant" and rng.random() < 0.3:
                message["reasoning_content"] = text()
            if message["role"] == "tool":
                message["tool_call_id"] = "c1"
            messages.append(message)
        d = rng.choice(["tiny", "dump", "parts", "qwen3", "bos"])
        cases.append({"dir": dirs[d], "kind": "chat", "body": {"messages": messages}})
    return cases


def ours(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from prefixroute.drivers.tokens import ModelTokenizer
    from prefixroute.request import RequestError

    loaded: dict[str, ModelTokenizer] = {}
    out: list[dict[str, Any]] = []
    for case in cases:
        tok = loaded.get(case["dir"]) or loaded.setdefault(
            case["dir"], ModelTokenizer.from_dir(case["dir"])
        )
        try:
            ids = tok.body_ids({"model": "m", **case["body"]})
            out.append({"ok": True, "ids": None if ids is None else ids.tolist()})
        except RequestError as exc:
            out.append({"ok": False, "error": f"{exc} ({exc.field})"})
    return out


async def _vllm(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    os.environ.update(HF_HUB_OFFLINE="1", VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
    from starlette.datastructures import State
    from vllm import AsyncEngineArgs, envs
    from vllm.config import VllmConfig
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.launchers.render.app_state import init_render_app_state
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    states: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    for case in cases:
        if case["dir"] not in states:
            args = make_arg_parser(FlexibleArgumentParser()).parse_args(
                ["--model", case["dir"], "--served-model-name", "m", "--max-model-len", "100000"]
            )
            engine_args = AsyncEngineArgs.from_cli_args(args)
            model_config = engine_args.create_model_config()
            model_config.quantization = None
            envs.VLLM_CPU_KVCACHE_SPACE = 0
            config = VllmConfig(
                model_config=model_config,
                structured_outputs_config=engine_args.create_structured_outputs_config(),
            )
            states[case["dir"]] = State()
            await init_render_app_state(config, states[case["dir"]], args)
        renderer = states[case["dir"]].online_renderer
        body = {"model": "m", **case["body"]}
        try:
            if case["kind"] == "chat":
                result = await renderer.render_chat(ChatCompletionRequest.model_validate(body))
                prompts = result if isinstance(result, ErrorResponse) else result[1]
            else:
                prompts = await renderer.render_completion(CompletionRequest.model_validate(body))
            if isinstance(prompts, ErrorResponse):
                out.append({"ok": False, "error": prompts.error.message})
            else:
                ids = [int(t) for p in prompts for t in p["prompt_token_ids"]]
                out.append({"ok": True, "ids": ids})
        except Exception as exc:  # pydantic's ValidationError, VLLMValidationError, ...
            out.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return out


def compare(cases: list[Any], mine: list[Any], theirs: list[Any]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for case, a, b in zip(cases, mine, theirs, strict=True):
        if a["ok"] and b["ok"]:
            kind = "text mode" if a["ids"] is None else ("equal" if a["ids"] == b["ids"] else "")
        elif not a["ok"] and not b["ok"]:
            kind = "both refuse"
        elif a["ok"]:
            kind = "we route, vLLM refuses"
        else:
            kind = ""
        if not kind:
            kind = "DISAGREE"
            print("DISAGREE", Path(case["dir"]).name, json.dumps(case["body"])[:200], a, b)
        counts[kind] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", help="a Python with vllm 0.32 (runs the oracle)")
    parser.add_argument("--random", type=int, default=1500, help="random chats and prompts")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--oracle", nargs=2, help=argparse.SUPPRESS)  # cases.json out.json
    args = parser.parse_args()
    if args.oracle:
        cases = json.loads(Path(args.oracle[0]).read_text())
        Path(args.oracle[1]).write_text(json.dumps(asyncio.run(_vllm(cases))))
        return
    if not args.vllm_python:
        parser.error("--vllm-python is required")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_dirs(Path(tmp))
        sets = {
            "adversarial": adversarial(dirs),
            "random": random_cases(dirs, args.random, args.seed),
        }
        for name, cases in sets.items():
            (Path(tmp) / "cases.json").write_text(json.dumps(cases))
            subprocess.run(
                [args.vllm_python, __file__, "--oracle", f"{tmp}/cases.json", f"{tmp}/vllm.json"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            theirs = json.loads((Path(tmp) / "vllm.json").read_text())
            counts = compare(cases, ours(cases), theirs)
            print(
                f"{name}: {len(cases)} bodies: "
                + ", ".join(f"{k} {v}" for k, v in counts.most_common())
            )
    sys.exit(0)


if __name__ == "__main__":
    main()
