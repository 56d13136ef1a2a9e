"""A real Redis for tests and benchmarks: find Debian's `redis-server`, run it on loopback.

`start_redis()` runs `redis-server` on 127.0.0.1 at a free port with
nothing persisted (`--save '' --appendonly no`), in its own temporary
directory, and waits until it answers `PING`. The returned `RedisServer`
can be stopped, paused (SIGSTOP: the kernel still accepts connections, the
server answers nothing: a hung Redis), resumed (SIGCONT) and restarted on
the same port (an empty Redis again: the script cache and every key are
gone), which is what the shared-state fault tests need
(`tests/test_shared_state.py`, issue 15).

Options: `password` (the default user's `requirepass`), `username` (an ACL
user with that password and every permission, the default user then
disabled) and `tls` (a TLS-only port with a self-signed certificate for
127.0.0.1 made with the `openssl` command line; Debian's build links
OpenSSL, `redis-server --tls-port` works there).

The binary: `redis-server` on PATH or /usr/bin/redis-server; `make redis`
installs Debian's package where it is missing. Nothing here is imported by
a production driver.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from prefixroute.devtools.live import free_port, stop_process

__all__ = [
    "INSTALL_HINT",
    "RedisServer",
    "TlsFiles",
    "make_tls_files",
    "redis_server",
    "redis_version",
    "require_redis",
    "start_redis",
]

INSTALL_HINT = (
    "run `make redis` at the repository root (it runs `apt-get install -y redis-server` "
    "on Debian/Ubuntu), or put a redis-server (Redis >= 7.0 or Valkey) on PATH"
)


def require_redis() -> Path:
    """The `redis-server` executable (PATH, then /usr/bin); RuntimeError naming `make redis`."""
    found = shutil.which("redis-server")
    for candidate in (found, "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise RuntimeError(f"redis-server is not installed: {INSTALL_HINT}")


def redis_version() -> str:
    """`redis-server --version`'s version field, e.g. `7.0.15`."""
    out = subprocess.run(
        [str(require_redis()), "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


@attrs.frozen
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 and its key; the certificate is its own CA."""

    cert_file: Path
    key_file: Path

    @property
    def ca_file(self) -> Path:
        return self.cert_file


def make_tls_files(directory: Path) -> TlsFiles:
    """Write `cert.pem` / `key.pem` (RSA 2048, one day, SAN IP:127.0.0.1) with `openssl`.

    RuntimeError when the `openssl` command is missing or fails.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    run = subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"openssl could not make a certificate: {run.stderr.strip()}")
    return TlsFiles(cert_file=cert, key_file=key)


_LIVE: set[RedisServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Servers a crashed test forgot: they must not outlive the interpreter."""
    for server in list(_LIVE):
        server.close()


@attrs.define(eq=False)
class RedisServer:
    """One `redis-server` process on 127.0.0.1:`port`, with its directory and log.

    `url` is what a `shared_state` section takes (`redis://` or, with TLS,
    `rediss://`). The password is never part of `url` nor of the repr.
    """

    port: int
    directory: Path
    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    tls: TlsFiles | None = None
    _proc: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False, repr=False)
    _paused: bool = attrs.field(default=False, init=False)
    _own_directory: bool = attrs.field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    def running(self) -> bool:
        """Whether the process is alive (paused counts as alive)."""
        return self._proc is not None and self._proc.poll() is None

    def _auth_file(self) -> Path | None:
        """The password lines in a 0600 config file, so they are not on the command line."""
        if self.password is None:
            return None

        def quoted(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

        if self.username is None:
            lines = [f"requirepass {quoted(self.password)}"]
        else:
            # An ACL user with every permission; the default user then cannot log in.
            secret = quoted(">" + self.password)
            lines = [f"user {quoted(self.username)} on {secret} ~* &* +@all", "user default off"]
        path = self.directory / "auth.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _args(self) -> list[str]:
        auth = self._auth_file()
        args = [
            str(require_redis()),
            *([str(auth)] if auth else []),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self.log_file),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "optional",
            ]  # fmt: skip
        return args

    def start(self, *, timeout_s: float = 15.0) -> None:
        """Start the process and wait until it answers PING; RuntimeError with its log if not."""
        if self.running():
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self._proc = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal stays with the test runner
        )
        self._paused = False
        _LIVE.add(self)
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (
                    self.log_file.read_text(errors="replace")[-2000:]
                    if self.log_file.exists()
                    else ""
                )
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def ping(self, timeout_s: float = 0.5) -> bool:
        """Whether the server answers a RESP `PING` now (a NOAUTH error counts: it answers)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as raw:
                sock: socket.socket = raw
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=str(self.tls.ca_file))
                    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                answer = sock.recv(64)
        except OSError:
            return False
        return answer.startswith((b"+PONG", b"-NOAUTH", b"-ERR"))

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections are accepted by the kernel, nothing answers)."""
        if self._proc is not None and self.running():
            os.kill(self._proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self._proc is not None and self.running():
            os.kill(self._proc.pid, signal.SIGCONT)
            self._paused = False

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Terminate the process (resumed first if paused); SIGKILL after `timeout_s`."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None and self._paused:
            self.resume()
        stop_process(proc, timeout_s=timeout_s)
        self._proc = None
        self._paused = False

    def kill(self) -> None:
        """SIGKILL, no shutdown: a crashed Redis."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._paused = False

    def restart(self, *, timeout_s: float = 15.0) -> None:
        """`stop` then `start` on the same port: an empty Redis (no keys, no scripts)."""
        self.stop()
        self.start(timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the process and delete the directory if `start_redis` made it."""
        self.stop()
        _LIVE.discard(self)
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_redis(
    port: int | None = None,
    *,
    password: str | None = None,
    username: str | None = None,
    tls: bool = False,
    directory: Path | None = None,
) -> RedisServer:
    """A started `RedisServer` on 127.0.0.1 (`port`, or a free one) in `directory` (or a new
    temporary one, deleted by `close`). `tls` makes a self-signed certificate in it and
    serves TLS only. RuntimeError naming `make redis` when the binary is missing."""
    require_redis()
    own = directory is None
    where = Path(tempfile.mkdtemp(prefix="prefixroute-redis-")) if directory is None else directory
    try:
        files = make_tls_files(where) if tls else None
        server = RedisServer(
            port=port or free_port(),
            directory=where,
            password=password,
            username=username,
            tls=files,
        )
        server._own_directory = own
        server.start()
    except BaseException:
        if own:
            shutil.rmtree(where, ignore_errors=True)
        raise
    return server


@contextlib.contextmanager
def redis_server(**options: object) -> Iterator[RedisServer]:
    """`start_redis(**options)` as a context manager: closed (stopped, directory gone) on exit."""
    server = start_redis(**options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()
