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
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import requests
from harness import (
    FLIP_ENV,
    HOST,
    PROD,
    CpuMeter,
    CpuUsage,
    Flipper,
    Server,
    busy_elsewhere,
    cpu_model,
    current_etag,
    exit_on_sigterm,
    filesystem_of,
    flagsvc_command,
    log,
    median,
    package_versions,
    percentiles,
    print_table,
    setup_flags,
    tail,
)

TARGET_FLIP_P95_MS = 10.0
TARGET_POLLS_PER_S = 3000.0

#: The flips go back to back from one token to time the write path: the per-token write budget
#: (20 a second in bursts of 60 by default) would answer most of them 429 after holding them.
SERVER_SETTINGS = {
    "FLAGSVC_WRITES_PER_SECOND_PER_TOKEN": "1000000",
    "FLAGSVC_WRITE_BURST_PER_TOKEN": "1000000",
}

PY_LOAD_SPAWN_S = 2.0  # head start for the Python load processes to spawn and connect


# -- statistics --------------------------------------------------------------------------------


# -- CPU accounting ----------------------------------------------------------------------------


# -- the server under test ---------------------------------------------------------------------


# -- setup: flags ------------------------------------------------------------------------------


# -- kill / restore ----------------------------------------------------------------------------


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
        with Server(root, workers, control=args.control, settings=SERVER_SETTINGS) as server:
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
            etag = current_etag(server, admin)
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
            now = current_etag(server, admin)
            if now != etag:
                problems.append(f"the production snapshot moved from {etag} to {now} during the poll phases")
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


def wrk_version(wrk: str | None) -> str:
    if not wrk:
        return "not on PATH"
    result = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = (result.stdout or result.stderr).splitlines()[0] if (result.stdout or result.stderr) else "?"
    return f"{first.split(' Copyright')[0]} ({wrk})"


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
    log(f"          {' '.join(f'{k}={v}' for k, v in SERVER_SETTINGS.items())} (flips back to back)")
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
