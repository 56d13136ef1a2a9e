"""The gateway under a wire fuzzer: hypothesis-made requests against one real `prefixroute serve`.

One gateway process (`python -m prefixroute.drivers.gateway`, its output in a log
file) in front of two fake engines serves every example of this module. The
requests are generated (tests/strategies.py, "the wire"): OpenAI bodies with
hostile mutations, byte-level damage, odd content types, paths and methods,
junk identity headers, `Host: evil.example`, many and large headers, and whole
requests with damaged framing sent over a raw socket.

Every answer is judged (`judge`): no 5xx except 502/503/504, and those only
for a request naming the served model (an unknown model is a 404, issue 12);
every error an OpenAI error body of bounded size; no redirect to another
host; an engine reached only through a completion route. After every example
the process is watched (`Watch`): `/health` and `/metrics` answer 200, the
metrics page stays small, and its log never shows a traceback; after every
batch of `BATCH` examples and at the end of each test the page is parsed
(series count, label lengths, no unknown model holding a label) and the
process' resident memory is read from /proc. A watch failure is sticky (the
process is broken until restarted), so it names the requests of the batch
that broke it; the next test starts a fresh process.

Counts are modest by default; `PREFIXROUTE_FUZZ=long` runs `LONG_FACTOR` times
more (docs/fuzzing.md, "Wire"). `tests/test_fuzz_envoy.py` reuses this harness
against Envoy and the picker.
"""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from prefixroute.devtools.fake_engine import FakeEngineConfig, create_app
from tests.servers import free_port, serve_in_thread, wait_http
from tests.strategies import (
    COMPLETION_PATHS,
    CONTENT_TYPES,
    FUZZ_ENV,
    METHODS,
    OTHER_PATHS,
    WIRE_MODEL,
    damaged,
    hostile_headers,
    openai_bodies,
    raw_requests,
    wire_json,
)

# -- limits the properties check ----------------------------------------------------------------

LONG = os.environ.get(FUZZ_ENV, "").strip().lower() == "long"
"""`PREFIXROUTE_FUZZ=long` selects the long run (as `tests.strategies.fuzz_settings`)."""
LONG_FACTOR = 20
"""How many times more examples the long run draws (fewer than the core's 100: each example
here is a real HTTP exchange)."""
BATCH = 25
"""Examples between deep checks (metrics parsed, memory read)."""
DOCUMENTED_5XX = frozenset({502, 503, 504})
"""The only 5xx statuses a client may see (docs/gateway.md, docs/extproc.md)."""
SERVED_MODEL_ONLY = "5xx only for the served model"
ENGINE_ROUTES = frozenset(
    [*(("POST", p) for p in COMPLETION_PATHS), ("GET", "/v1/models"), ("HEAD", "/v1/models")]
)
"""What may reach an engine: the completion routes, and the model list (proxied when the
config names no models)."""
METRICS_MAX_BYTES = 4 << 20
"""A `/metrics` page larger than this is a label flood (issue 12 saw 137 KB with the caps)."""
SERIES_MAX = 5000
"""Samples on one `/metrics` page."""
LABEL_MAX = 256
"""The longest label value (identity ids are cut at 256 characters)."""
HEAD_MAX_FIELDS = 100
"""Header fields a request may carry: `server.max_headers` (the gateway), Envoy's
`max_headers_count`; over it the answer is 431 and a close, or only the close (a server that
closes with the client's bytes unread resets the connection, which may discard the 431)."""
HEAD_MAX_BYTES = 60 << 10
"""The smaller head limit: Envoy's `max_request_headers_kb` (the gateway's is 64 KiB)."""
ERROR_BODY_MAX = 16 << 10
"""The largest error body: an error must not echo a megabyte of the client's input."""
RSS_MAX_MB = 400
"""Resident memory of a watched Python process (issue 12: 66 -> ~200 MB under fuzzing)."""
PLACEHOLDERS = frozenset({"", "other", "unknown"})
"""Label values that stand for many (the metrics' `OTHER` and `UNKNOWN`)."""
ANSWER_TIMEOUT_S = 10.0
"""How long one answer may take (engines answer at once; a stall is a finding)."""
ANSWER_MAX_BYTES = 1 << 20
"""The most of one answer that is read."""


def examples(modest: int, long: int | None = None) -> int:
    """`modest` examples; with `PREFIXROUTE_FUZZ=long`, `long` or `LONG_FACTOR` times more."""
    if not LONG:
        return modest
    return modest * LONG_FACTOR if long is None else long


def fuzz(modest: int, long: int | None = None) -> Callable[[Any], Any]:
    """Hypothesis settings for a wire test: `examples(modest, long)`, no deadline (real
    servers)."""
    return settings(
        max_examples=examples(modest, long),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,  # the fixture is the long-lived server
        ],
    )


# -- what was sent, and what came back ----------------------------------------------------------


class Sent:
    """One request as sent: enough to judge its answer and to print it (hypothesis shows its
    falsifying examples with this `repr`)."""

    __slots__ = ("body", "headers", "method", "path", "raw")

    def __init__(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        raw: bytes | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = list(headers)
        self.body = body
        self.raw = raw

    def model(self) -> Any:
        """The body's `model` if the body is a JSON object, else None."""
        try:
            doc = json.loads(self.body)
        except (ValueError, RecursionError):
            return None
        return doc.get("model") if isinstance(doc, dict) else None

    def oversized_head(self) -> bool:
        """More header fields or a larger head than both drivers allow (docs/gateway.md, envoy)."""
        size = len(self.method) + len(self.path) + 12
        size += sum(len(k) + len(v) + 4 for k, v in self.headers)
        return len(self.headers) > HEAD_MAX_FIELDS or size > HEAD_MAX_BYTES

    def route(self) -> str:
        """The path without its query string (what a router matches)."""
        return self.path.partition("?")[0]

    def __str__(self) -> str:
        if self.raw is not None:
            return f"raw {short(self.raw, 400)} ({len(self.raw)} bytes)"
        headers = [(k, short(v, 60)) for k, v in self.headers[:8]]
        more = f" +{len(self.headers) - 8} headers" if len(self.headers) > 8 else ""
        return (
            f"{self.method} {short(self.path.encode(), 80)} headers={headers}{more} "
            f"body={short(self.body, 300)} ({len(self.body)} bytes)"
        )

    __repr__ = __str__


def short(data: bytes, limit: int) -> str:
    """`repr(data)` cut to about `limit` characters."""
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}...'"


class Answer:
    """What came back for one request: status, headers (lower-case names), body (capped)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = dict(headers)
        self.body = body


def judge(sent: Sent, answer: Answer, *, netloc: str) -> None:
    """The per-answer properties (module docstring); AssertionError naming request and answer."""
    where = f"{sent}\n  -> {answer.status} {short(answer.body, 300)}"
    status = answer.status
    if status == 0:
        return  # closed without an answer, allowed for an oversized head only (`send`)
    assert status < 500 or status in DOCUMENTED_5XX, f"undocumented {status}: {where}"
    if status >= 500:
        # The documented 5xx say the engines cannot serve now; for a model no endpoint serves,
        # or a request that is not a completion at all, the right answer is a 4xx (404, 400).
        served = sent.model() == WIRE_MODEL and sent.route() in COMPLETION_PATHS
        assert served and sent.method == "POST", f"{SERVED_MODEL_ONLY}, got {status}: {where}"
    if "x-fake-engine-id" in answer.headers:
        routed = (sent.method, sent.route()) in ENGINE_ROUTES
        assert routed, f"an engine answered a request outside the gateway's routes: {where}"
    if status >= 400 and sent.method != "HEAD":
        assert len(answer.body) <= ERROR_BODY_MAX, f"{len(answer.body)}-byte error: {where}"
        kind = answer.headers.get("content-type", "")
        assert kind.startswith("application/json"), f"error as {kind!r}, not JSON: {where}"
        try:
            error = json.loads(answer.body)["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"not an OpenAI error body: {where}") from None
        assert isinstance(error, dict) and isinstance(error.get("message"), str), where
    location = answer.headers.get("location")
    if location is not None:
        target = urllib.parse.urlsplit(location).netloc
        assert target in ("", netloc), f"redirect to another host {location!r}: {where}"


def send(client: httpx.Client, base: str, sent: Sent) -> Answer:
    """Send `sent` with httpx; AssertionError if no answer comes within `ANSWER_TIMEOUT_S`."""
    request = client.build_request(
        sent.method, base + sent.path, headers=sent.headers, content=sent.body
    )
    try:
        response = client.send(request, stream=True)
        try:
            body = b""
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            for chunk in response.iter_raw():
                body += chunk
                if len(body) >= ANSWER_MAX_BYTES or time.monotonic() > deadline:
                    break
        finally:
            response.close()
    except httpx.LocalProtocolError:
        raise  # the test built a request httpx refuses to send: a bug in the strategy
    except httpx.TimeoutException as exc:
        raise Stalled(f"no answer within {ANSWER_TIMEOUT_S} s ({exc!r})") from None
    except httpx.TransportError as exc:
        if sent.oversized_head():  # 431 and close: the client may see only the close
            return Answer(0, {}, b"")
        raise AssertionError(f"connection closed without an answer ({exc!r}): {sent}") from None
    return Answer(response.status_code, response.headers, body)


class Stalled(AssertionError):
    """No answer in time: the process is treated as broken, so later examples fail at once
    (hypothesis would otherwise spend minutes shrinking through timeouts)."""


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r?\n((?:[^\r\n]+\r?\n)*)")


def send_raw(address: tuple[str, int], data: bytes, *, timeout_s: float = 5.0) -> list[Answer]:
    """Write `data` on a fresh connection, read what comes, half-close, read until closed.

    The first read ends after `RAW_IDLE_S` of silence (a server waiting for a
    body the framing promised says nothing); then the client half-closes (some
    servers, Envoy among them, drop a half-closed request unanswered, hence
    not at once). Returns every response found (a damaged frame may make two
    requests of one); bodies are not split out, so only status and headers
    are judged. `Stalled` if the server still holds the connection
    `timeout_s` after the half-close.
    """
    received = b""
    with socket.create_connection(address, timeout=timeout_s) as conn:
        try:
            conn.sendall(data)
            conn.settimeout(RAW_IDLE_S)
            try:
                while chunk := conn.recv(65536):
                    received += chunk
                return parse_answers(received)  # closed by the server
            except TimeoutError:
                pass
            conn.settimeout(timeout_s)
            conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(65536):
                received += chunk
        except TimeoutError:
            raise Stalled(
                f"connection held {timeout_s} s after the client half-closed; "
                f"got {short(received, 200)}"
            ) from None
        except OSError:  # reset, or closed while the client was still writing
            pass
    return parse_answers(received)


RAW_LONG = 300
"""Raw examples in the long run: many wait out a server's silence (`RAW_IDLE_S`) or Envoy's
1 s delayed close, so they are drawn fewer times more than the others."""
RAW_IDLE_S = 0.3
"""Silence that ends the first read of a raw exchange."""


def parse_answers(received: bytes) -> list[Answer]:
    """The status lines and headers of every response in `received`."""
    answers = []
    for match in STATUS_LINE.finditer(received):
        headers = {}
        for line in match.group(2).decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        answers.append(Answer(int(match.group(1)), headers, b""))
    return answers


def judge_raw(sent: Sent, answers: list[Answer], *, netloc: str) -> None:
    """`judge` for raw exchanges: status and redirects only (the framing was not HTTP's)."""
    for answer in answers:
        where = f"{sent}\n  -> {answer.status} {answer.headers}"
        assert answer.status < 500 or answer.status in DOCUMENTED_5XX, f"undocumented: {where}"
        location = answer.headers.get("location")
        if location is not None:
            target = urllib.parse.urlsplit(location).netloc
            assert target in ("", netloc), f"redirect to another host {location!r}: {where}"


# -- the watched processes ----------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"process {pid} has no VmRSS (gone?)")


class Watch:
    """Health, metrics, memory and log of the processes behind one fuzzed address.

    `after(sent)` runs once per example: it records the request, scans the
    new log bytes for "Traceback", and checks `/health` and `/metrics` (status
    and size); every `BATCH` examples (and on `deep()`) it also parses the
    page (series, label lengths, model labels) and reads each process' RSS.
    The first failure is kept: every later call fails with it (and the
    requests of that batch) until the processes are restarted.
    """

    def __init__(
        self,
        *,
        health: str,
        metrics: str,
        pids: Mapping[str, int],
        logs: Sequence[Path],
        rss_max_mb: Mapping[str, float],
        extra: Callable[[], None] | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.pids = dict(pids)
        self.rss_max_mb = dict(rss_max_mb)
        self.offsets = {log: 0 for log in logs}
        self.extra = extra
        self.client = httpx.Client(timeout=ANSWER_TIMEOUT_S)
        self.history: collections.deque[str] = collections.deque(maxlen=BATCH)
        self.count = 0
        self.broken: str | None = None
        self.models: set[str] = set()
        self.peak_rss: dict[str, float] = {}
        self.peak_series = 0
        self.peak_page = 0

    def close(self) -> None:
        self.client.close()

    def after(self, sent: Sent) -> None:
        """Record `sent`, then the per-example checks (and the deep ones every `BATCH`)."""
        self.history.append(str(sent))
        model = sent.model()
        if isinstance(model, str) and model != WIRE_MODEL:
            self.models.add(model)
        self.count += 1
        self.check(deep=self.count % BATCH == 0)

    def deep(self) -> None:
        """The deep checks now (end of a test)."""
        self.check(deep=True)

    def check(self, *, deep: bool) -> None:
        if self.broken is not None:
            raise AssertionError(self.broken)
        try:
            self._logs()
            page = self._pages()
            if deep:
                self._series(page)
                self._memory()
                if self.extra is not None:
                    self.extra()
        except AssertionError as exc:
            recent = "\n    ".join(self.history)
            self.broken = f"{exc}\n  after {self.count} examples; the last ones:\n    {recent}"
            raise AssertionError(self.broken) from None

    def _logs(self) -> None:
        for log, offset in self.offsets.items():
            with open(log, "rb") as f:
                f.seek(offset)
                new = f.read()
            self.offsets[log] = offset + len(new)
            if b"Traceback" in new:
                at = new.index(b"Traceback")
                tail = new[max(0, at - 600) : at + 2400].decode(errors="replace")
                raise AssertionError(f"a traceback in {log.name}:\n{tail}")

    def _pages(self) -> str:
        health = self.client.get(self.health)
        assert health.status_code == 200, f"/health {health.status_code}: {health.text[:300]}"
        with self.client.stream("GET", self.metrics) as answer:
            page = b""
            for chunk in answer.iter_bytes():
                page += chunk
                assert len(page) <= METRICS_MAX_BYTES, f"/metrics over {METRICS_MAX_BYTES} bytes"
            assert answer.status_code == 200, f"/metrics {answer.status_code}: {page[:300]!r}"
        self.peak_page = max(self.peak_page, len(page))
        return page.decode()

    def _series(self, page: str) -> None:
        series = 0
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                series += 1
                for label, value in sample.labels.items():
                    assert len(value) <= LABEL_MAX, (
                        f"{sample.name} label {label} is {len(value)} characters long"
                    )
                    if label in ("model_name", "target_model_name"):
                        unknown = value not in PLACEHOLDERS and value != WIRE_MODEL
                        assert not (unknown and any(m.startswith(value) for m in self.models)), (
                            f"{sample.name} has {label}={short(value.encode(), 80)}, a model "
                            "no endpoint serves (unknown names must not take label slots)"
                        )
        self.peak_series = max(self.peak_series, series)
        assert series <= SERIES_MAX, f"/metrics has {series} series (bound {SERIES_MAX})"

    def _memory(self) -> None:
        for name, pid in self.pids.items():
            rss = rss_mb(pid)
            self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), rss)
            bound = self.rss_max_mb[name]
            assert rss <= bound, f"{name} RSS {rss:.0f} MB over {bound} MB"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(args: Sequence[str], log: Path, ready_url: str) -> subprocess.Popen[bytes]:
    """`python args...` with stdout and stderr appended to `log`; waits for `ready_url`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_http(ready_url, timeout_s=30, proc=proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def endpoints(engines: Sequence[str]) -> list[dict[str, Any]]:
    """The fake engines as config endpoints that serve only `WIRE_MODEL`."""
    return [{"address": a, "id": f"e{i}", "models": [WIRE_MODEL]} for i, a in enumerate(engines)]


SCRAPES = frozenset({("GET", "/metrics"), ("GET", "/health"), ("GET", "/v1/models")})
"""What the drivers' pool itself asks an engine (metrics, health, `max_model_len`)."""


class Recording:
    """An ASGI wrapper that notes every request an engine gets outside `ENGINE_ROUTES` and the
    pool's `SCRAPES`: a client request forwarded where the gateway would not forward it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.strays: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            key = (scope["method"], scope["path"])
            if key not in ENGINE_ROUTES and key not in SCRAPES:
                self.strays.append(f"{key[0]} {key[1]}")
        await self.app(scope, receive, send)


def recording_engines() -> Iterator[tuple[list[str], list[Recording]]]:
    """Two fake engines (as conftest's `engines`) that record stray requests."""
    apps = [
        Recording(create_app(FakeEngineConfig(engine_id=f"fake-{n}", time_scale=0.0))) for n in "ab"
    ]
    with serve_in_thread(apps[0]) as a, serve_in_thread(apps[1]) as b:
        yield [a.removeprefix("http://"), b.removeprefix("http://")], apps


_wire_engines = pytest.fixture(scope="module", name="wire_engines")(recording_engines)


IDENTITY = {"api_keys": {"sk-fuzz": "keyed"}, "priorities": {"critical": 1, "sheddable": -1}}
"""Identity settings the fuzzed headers exercise (a known key, named priorities)."""


class Fuzzed:
    """One fuzzed address: the processes behind it, restartable, and their `Watch`."""

    def __init__(
        self,
        begin: Callable[[], Watch],
        end: Callable[[], None],
        url: str,
        engines: Sequence[Recording] = (),
    ) -> None:
        self.engines = list(engines)
        self._begin = begin
        self._end = end
        self.url = url
        self.netloc = urllib.parse.urlsplit(url).netloc
        self.address = (self.netloc.rsplit(":", 1)[0], int(self.netloc.rsplit(":", 1)[1]))
        self.watch = begin()
        self.examples = 0
        """Examples sent to earlier (restarted) processes."""
        # a fresh connection per example: no example depends on what an earlier one left
        self.client = httpx.Client(
            timeout=httpx.Timeout(ANSWER_TIMEOUT_S, connect=3.0),
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def fresh(self) -> None:
        """Restart the processes if a watch check broke them (the next test starts clean)."""
        if self.watch.broken is not None:
            self.watch.close()
            self._end()
            self.examples += self.watch.count
            self.watch = self._begin()

    def exchange(self, sent: Sent) -> Answer:
        """Send `sent` (raw if it is raw), judge the answer, then run the watch."""
        if self.watch.broken is not None:
            raise AssertionError(self.watch.broken)
        try:
            if sent.raw is not None:
                answers = send_raw(self.address, sent.raw)
            else:
                answer = send(self.client, self.url, sent)
        except Stalled as exc:
            self.watch.broken = f"{exc}: {sent}"
            raise AssertionError(self.watch.broken) from None
        for engine in self.engines:  # first: the reason for a wrong answer
            strays, engine.strays = engine.strays, []
            assert not strays, f"an engine got {strays} for {sent}"
        if sent.raw is not None:
            judge_raw(sent, answers, netloc=self.netloc)
            answer = Answer(0, {}, b"")
        else:
            judge(sent, answer, netloc=self.netloc)

        self.watch.after(sent)
        return answer

    def summary(self, name: str) -> str:
        """Examples sent and the peaks the watch saw (printed at the end; pytest -s shows it)."""
        watch = self.watch
        return (
            f"\nfuzz {name}: {self.examples + watch.count} examples, peak RSS (MB) "
            f"{ {k: round(v) for k, v in watch.peak_rss.items()} }, peak series "
            f"{watch.peak_series}, peak /metrics {watch.peak_page} bytes"
        )

    def close(self) -> None:
        self.client.close()
        self.watch.close()
        self._end()


@pytest.fixture(scope="module")
def gateway(
    wire_engines: tuple[list[str], list[Recording]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    """One `prefixroute serve` process for the module (restarted only after a watch failure)."""
    engines, recorders = wire_engines
    workdir = tmp_path_factory.mktemp("fuzz-gateway")
    port = free_port()
    config = workdir / "gateway.yaml"
    doc = {
        "server": {"host": "127.0.0.1", "port": port},
        "endpoints": endpoints(engines),
        "identity": IDENTITY,
    }
    config.write_text(yaml.safe_dump(doc))
    url = f"http://127.0.0.1:{port}"
    log = workdir / "gateway.log"
    procs: list[subprocess.Popen[bytes]] = []

    def begin() -> Watch:
        args = ["-m", "prefixroute.drivers.gateway", "--config", str(config)]
        procs.append(start([*args, "--log-level", "info"], log, f"{url}/health"))
        return Watch(
            health=f"{url}/health",
            metrics=f"{url}/metrics",
            pids={"gateway": procs[-1].pid},
            logs=[log],
            rss_max_mb={"gateway": RSS_MAX_MB},
        )

    fuzzed = Fuzzed(begin, lambda: stop(procs[-1]), url, recorders)
    try:
        yield fuzzed
    finally:
        print(fuzzed.summary("gateway"))
        fuzzed.close()


@pytest.fixture
def target(gateway: Fuzzed) -> Iterator[Fuzzed]:
    """The module's gateway, restarted if broken; the deep checks run again after the test."""
    gateway.fresh()
    yield gateway
    if gateway.watch.broken is None:  # else the test has failed with it already
        gateway.watch.deep()


# -- what the tests draw ------------------------------------------------------------------------


@st.composite
def body_requests(draw: st.DrawFn) -> Sent:
    """A completion POST: a mutated body, maybe damaged, with any content type."""
    body = draw(openai_bodies())
    payload = draw(damaged(wire_json(body, ensure_ascii=draw(st.booleans() | st.just(True)))))
    path = draw(st.sampled_from(COMPLETION_PATHS))
    kind = draw(st.sampled_from(CONTENT_TYPES[:3] + CONTENT_TYPES))
    headers = [] if kind is None else [(b"content-type", kind.encode())]
    return Sent("POST", path, headers, payload)


@st.composite
def header_requests(draw: st.DrawFn) -> Sent:
    """A completion POST with a mostly valid body and hostile headers."""
    body = draw(openai_bodies() | st.just({"model": WIRE_MODEL, "prompt": "hi", "max_tokens": 1}))
    headers = [(b"content-type", b"application/json"), *draw(hostile_headers())]
    return Sent("POST", draw(st.sampled_from(COMPLETION_PATHS)), headers, wire_json(body))


@st.composite
def route_requests(draw: st.DrawFn) -> Sent:
    """Any method on any path (near misses of the routes included), sometimes `Host: evil`."""
    method = draw(st.sampled_from(("POST", *METHODS)))
    path = draw(st.sampled_from(COMPLETION_PATHS + OTHER_PATHS))
    headers = [(b"content-type", b"application/json")]
    if draw(st.booleans()):
        headers.append((b"host", b"evil.example"))
    body = {"model": WIRE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return Sent(method, path, headers, wire_json(body) if method != "GET" else b"")


def known(cases: Sequence[Sent]) -> Callable[[Any], Any]:
    """`@example(sent=...)` for each of `cases`."""

    def mark(test: Any) -> Any:
        for sent in reversed(cases):
            test = example(sent=sent)(test)
        return test

    return mark


def one_megabyte_model_names() -> list[Sent]:
    """A 1 MiB model name on both routes: drawn once per run, not per example (issue 12 saw it
    take `/metrics` to 419 MB where model labels were unbounded)."""
    name = "m" * (1 << 20)
    chat = {"model": name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    text = {"model": name, "prompt": "x", "max_tokens": 1}
    return [
        Sent("POST", COMPLETION_PATHS[0], JSON, wire_json(chat)),
        Sent("POST", COMPLETION_PATHS[1], JSON, wire_json(text)),
    ]


JSON = [(b"content-type", b"application/json")]
HI = [{"role": "user", "content": "hi"}]
ISSUE_12_BODIES = [
    # a JSON-escaped lone surrogate as the model: /metrics answered 500 from then on
    Sent(
        "POST",
        COMPLETION_PATHS[0],
        JSON,
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    ),
    # an unknown model: 503 with Retry-After (should be 404 model_not_found)
    Sent("POST", COMPLETION_PATHS[0], JSON, wire_json({"model": "nope", "messages": HI})),
    # a 64 KiB model name and a huge token id
    Sent("POST", COMPLETION_PATHS[1], JSON, wire_json({"model": "x" * 65536, "prompt": "hi"})),
    Sent("POST", COMPLETION_PATHS[1], JSON, wire_json({"model": WIRE_MODEL, "prompt": [10**30]})),
]
"""Issue 12's inputs, run first on every run (`@example`), then the drawn ones."""
ISSUE_12_ROUTES = [
    Sent("POST", "/v1/chat/completions/", [*JSON, (b"host", b"evil.example")], b"{}"),
    Sent("POST", "/v1/anything", JSON, wire_json({"model": WIRE_MODEL, "messages": HI})),
    Sent("POST", "/metrics", JSON, wire_json({"model": WIRE_MODEL, "messages": HI})),
]
"""Issue 12's redirect to a client-chosen host, and paths Envoy routed to an engine."""
FOUND_BODIES = [
    # DEL in a header value: Envoy answered nothing and closed the connection after 1 s
    Sent("POST", COMPLETION_PATHS[1], [(b"content-type", b"application/json\x7f")], b"{}"),
]
"""Inputs the fuzzer found (replayed first on every run, as issue 12's)."""
FOUND_ROUTES = [
    # a method the HTTP parser does not know: the same silent close from Envoy
    Sent("FOO", COMPLETION_PATHS[0], JSON, b"{}"),
]
"""Routes the fuzzer found."""


# -- the tests ----------------------------------------------------------------------------------


@fuzz(100)
@given(sent=body_requests())
@known(ISSUE_12_BODIES + FOUND_BODIES)
def test_fuzzed_bodies(target: Fuzzed, sent: Sent) -> None:
    target.exchange(sent)


@fuzz(50)
@given(sent=header_requests())
def test_fuzzed_headers(target: Fuzzed, sent: Sent) -> None:
    target.exchange(sent)


@fuzz(50)
@given(sent=route_requests())
@known(ISSUE_12_ROUTES + FOUND_ROUTES)
def test_fuzzed_paths_and_methods(target: Fuzzed, sent: Sent) -> None:
    target.exchange(sent)


@fuzz(50, long=RAW_LONG)
@given(data=st.data())
def test_damaged_framing_over_a_raw_socket(target: Fuzzed, data: st.DataObject) -> None:
    raw = data.draw(raw_requests(target.netloc))
    target.exchange(Sent("RAW", "", raw=raw))


def test_one_megabyte_model_name_leaves_metrics_small(target: Fuzzed) -> None:
    for sent in one_megabyte_model_names():
        target.exchange(sent)
    target.watch.deep()
