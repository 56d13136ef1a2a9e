"""The engine harness's start-up watchdog, with stand-in processes (fast; not marked `engine`).

`wait_healthy` starts an engine anew, once, when its log stops growing
before `/health` answers (a start seen to hang in CI, printing nothing); a
second stall fails with the processes' states. The stand-ins are small
Python programs: one prints nothing and sleeps, the other serves `/health`
and a completion on 127.0.0.1 the way a vLLM server answers them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from prefixroute.devtools import vllm
from prefixroute.devtools.live import free_port_block

STAND_IN = """
import http.server, pathlib, sys, time
marker = pathlib.Path(sys.argv[2])
if sys.argv[3] == "silent" or not marker.exists():
    marker.touch()
    time.sleep(600)  # stuck before the first line
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        body = b'{"choices": [{"text": "x"}]}'
        self.send_response(200); self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _stand_in(tmp_path: Path, mode: str) -> vllm.Engine:
    port = free_port_block(1)
    script = tmp_path / "engine.py"
    script.write_text(STAND_IN)
    args = (sys.executable, str(script), str(port), str(tmp_path / "started"), mode)
    log = tmp_path / f"engine-{port}.log"
    return vllm.Engine(
        port=port,
        zmq_port=port,
        replay_port=None,
        process=vllm._spawn(args, {}, log),
        log=log,
        kv_bytes=0,
        home=tmp_path,
        args=args,
    )


def test_an_engine_that_prints_nothing_is_started_anew_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _stand_in(tmp_path, "hang-once")
    (ready,) = vllm.wait_healthy([engine], timeout_s=30, stall_s=1.0)
    try:
        assert ready.process.pid != engine.process.pid
        assert not vllm._group_alive(engine.pgid)  # the stalled group was killed
        assert "starting anew" in caplog.text
        assert ready.log.read_text().startswith("# prefixroute started at")
        assert "serving" in ready.log.read_text()
    finally:
        vllm.kill_engine(ready)


def test_an_engine_that_stalls_twice_fails_with_its_process_states(tmp_path: Path) -> None:
    engine = _stand_in(tmp_path, "silent")
    with pytest.raises(RuntimeError, match=r"printed nothing for 1 s twice \(processes: \d+ S "):
        vllm.wait_healthy([engine], timeout_s=30, stall_s=1.0)
    assert not engine.alive()
