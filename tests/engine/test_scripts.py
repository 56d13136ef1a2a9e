"""The project's vLLM scripts and `prefixroute.devtools.vllm` agree (fast; not marked `engine`).

`tests/engine/vllm/serve.sh` (for people) and `devtools.vllm.engine_command`
(for the tests) start the same engine; `setup.sh` builds the model from the
committed fixture, whose files must exist.
"""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

from prefixroute.devtools import vllm

SCRIPTS = vllm.ROOT / "tests" / "engine" / "vllm"


def _serve_args() -> list[str]:
    text = (SCRIPTS / "serve.sh").read_text()
    command = text.split('setsid "$DIR/venv/bin/vllm" ', 1)[1].split(' > "$DIR', 1)[0]
    return shlex.split(command.replace("\\\n", " "))


def test_serve_sh_passes_the_flags_the_tests_pass() -> None:
    args = _serve_args()
    flags = [*vllm.ENGINE_FLAGS, "--"]
    for flag, value in itertools.pairwise(flags):
        if flag.startswith("--"):
            assert flag in args, flag
            if not value.startswith("--"):  # the flag takes this value
                assert args[args.index(flag) + 1] == value, flag
    assert args[args.index("--host") + 1] == "127.0.0.1"


def test_serve_sh_binds_the_event_socket_as_the_tests_do() -> None:
    events = _serve_args()[_serve_args().index("--kv-events-config") + 1]
    assert vllm.PUB_ADDRESS.format(port="$ZPORT") in events


def test_the_engine_command_binds_loopback_only(tmp_path: Path) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "vllm").write_text("#!/bin/sh\n")
    (tmp_path / "venv" / "bin" / "vllm").chmod(0o755)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    args = vllm.engine_command(tmp_path, 8000, 8001, replay_port=8002)
    assert args[args.index("--host") + 1] == "127.0.0.1"
    events = args[args.index("--kv-events-config") + 1]
    assert '"tcp://[::ffff:127.0.0.1]:8001"' in events
    assert '"tcp://127.0.0.1:8002"' in events


def test_setup_sh_copies_the_committed_model_fixture() -> None:
    text = (SCRIPTS / "setup.sh").read_text()
    line = next(x for x in text.splitlines() if x.startswith("for f in tokenizer.json"))
    names = line.split(" in ", 1)[1].split(";", 1)[0].split()
    assert "make_tiny_model" not in text  # nothing is trained here
    for name in names:
        assert (vllm.ROOT / "tests" / "fixtures" / "tiny-model" / name).is_file(), name
