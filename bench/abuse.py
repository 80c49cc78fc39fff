"""Abuse benchmark of flagsvc: one SDK token (and one operator token) flood the service while
an operator kills and restores a flag.

The service runs as in production: ``flagsvc serve --control-port`` on a fresh data folder and
free ports (started and stopped through :class:`harness.Server`: embedded Redis, AOF
``appendfsync always``, gevent workers, the main ones at nice 5 and the control one at 0).
Requests go where ``ops/nginx/flagsvc.conf`` routes them: heartbeats, streams and ``/metrics`` to
the main listener; kills, restores and ``/clients`` to the control listener. Kills and restores
are also sent to the main listener, to compare.

1. baseline: Redis ``used_memory``; over the length of the flood's measuring window, latency of
   kill/restore (operator token) through the control listener and through the main one (in
   ``--flip-env``, ``bench`` by default), a few kill/restores in ``production`` through the
   control listener, ``GET /clients`` (reader token), ``GET /metrics``, and a heartbeat of a
   well-behaved SDK token; a Redis write round trip from the bench; CPU and run-queue wait;
2. flood, for ``--duration`` s, all at once, from load-generator processes (asyncio on raw
   sockets, keep-alive):
   - heartbeats with distinct instance ids (``--instances`` of them, then again), as fast as
     ``--heartbeat-conns`` connections go (or ``--heartbeat-rate``);
   - heartbeats whose ``counts`` hold ``--count-keys`` flags that do not exist;
   - ``--streams`` event streams (``GET .../stream``), kept open and read if accepted;
   - no-op kills (the flag is already killed) with a new ``Idempotency-Key`` each, from a
     second operator token (to the control listener, as nginx routes them);
   meanwhile the figures of 1 again;
3. after: Redis growth, instance records, idempotency records, evaluation-count keys, checked
   against the caps.

Example::

    .venv/bin/python bench/abuse.py --repeat 3         # about 4 minutes
    .venv/bin/python bench/abuse.py --quick            # smoke run, about 30 s
    .venv/bin/python bench/abuse.py --floods idem      # one kind of flood
    .venv/bin/python bench/abuse.py --heartbeat-rate 100 --counts-rate 5 --idem-rate 20 --loadgen-nice 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import shlex
import shutil
import signal
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

import harness
import psutil
import redis
import requests
from harness import (
    FLIP_ENV,
    HOST,
    KILL_KEY,
    PROD,
    CpuMeter,
    CpuUsage,
    Flipper,
    MemorySampler,
    Server,
    call,
    create_token,
    exit_on_sigterm,
    median,
    percentiles,
    raise_fd_limit,
    redis_for,
)

from flagsvc.clients import COUNTS_TTL_SECONDS
from flagsvc.config import DEFAULTS
from flagsvc.keys import EnvKeys
from flagsvc.writes import IDEMPOTENCY_RECORDS_PER_TOKEN

MAIN_KEY = "bench.kill-main"  # flipped through the main listener (KILL_KEY through the control one)
PROD_KEY = "bench.kill-prod"  # the sparse kills in production, whose streams get every change
KILLED_KEY = "bench.killed"  # killed at setup: the target of the no-op kills
LEGIT_INSTANCES = 50  # instances of a well-behaved SDK token, registered at setup
TARGET_RATIO = 1.5  # kill p95 under the flood <= 1.5 x without it (control listener)
FLOODS = ("heartbeat", "counts", "streams", "idem")
REQUEST_TIMEOUT_S = 10.0
SPAWN_S = 2.0  # head start for the load processes to spawn and import
RESULTS_GRACE_S = REQUEST_TIMEOUT_S + 20.0


def log(message: str = "") -> None:
    print(message, flush=True)


def setting(name: str) -> int:
    """A service setting as ``flagsvc serve`` will see it: ``FLAGSVC_<name>`` (passed on to the
    server) or the default."""
    raw = os.environ.get(f"FLAGSVC_{name}")
    if raw is None:
        return int(str(DEFAULTS[name]))
    try:
        return int(json.loads(raw))
    except (ValueError, TypeError):
        return int(raw)


# -- the load generator (child processes) ------------------------------------------------------

HEAD_END = b"\r\n\r\n"
LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CHUNKED_RE = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
CLOSE_RE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
UNTIL_CLOSE, CHUNKED = -2, -1


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection on a raw socket, one request at a time:
    :meth:`request` resolves to the status once the whole answer is in. Bodies are dropped, but
    for error answers (kept in :attr:`body`, to tell one 429 from another)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.status = 0
        self.need: int | None = None  # body bytes still to come (or CHUNKED...); None: head first
        self.body = b""
        self.usable = False  # connected, and the server did not say "Connection: close"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.usable = transport, True

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.need == UNTIL_CLOSE:
                waiter.set_result(self.status)
            else:
                waiter.set_exception(ConnectionResetError("closed by the server"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.buf.clear()
            return
        if self.need is None:
            end = self.buf.find(HEAD_END)
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            self.status = int(head[9:12])
            if CLOSE_RE.search(head):
                self.usable = False
            if self.status < 200 or self.status in (204, 304):
                self.need = 0
            elif match := LENGTH_RE.search(head):
                self.need = int(match[1])
            elif CHUNKED_RE.search(head):
                self.need = CHUNKED
            else:
                self.need, self.usable = UNTIL_CLOSE, False
        if self.need == UNTIL_CLOSE or (self.need == CHUNKED and not self.buf.endswith(b"0\r\n\r\n")):
            return
        if self.need >= 0 and len(self.buf) < self.need:
            return
        self.body = bytes(self.buf[:2000]) if self.status >= 400 else b""
        self.buf.clear()
        self.need = None
        waiter.set_result(self.status)

    def request(self, data: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.need, self.body = None, b""
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"no answer in {REQUEST_TIMEOUT_S:.0f} s"))


def answer_kind(status: int, body: bytes) -> str:
    """The status, and for a 429 which limit said no."""
    if status != 429:
        return str(status)
    if b"heartbeats this minute" in body:
        return "429 rate"
    if b"live SDK instances" in body:
        return "429 cap"
    if b"event streams" in body:
        return "429 streams"
    return "429"


def http_request(method: str, port: int, path: str, token: str, body: bytes, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n{extra}"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def request_maker(kind: str, spec: dict[str, Any]) -> Callable[[int], bytes]:
    """The n-th request of one flood kind."""
    port, env = spec["main_port"], spec["env"]
    if kind in ("heartbeat", "counts"):
        instances = spec["instances"] if kind == "heartbeat" else spec["counts_instances"]
        token, prefix = spec["sdk_token"], ("hb" if kind == "heartbeat" else "ct")
        if kind == "heartbeat":
            counts = {flag: 1 for flag in spec["real_flags"]}
        else:
            counts = {f"nx.no-such-flag-{i:05d}": 1 for i in range(spec["count_keys"])}
        vary = kind == "heartbeat" and spec["vary_app"]
        app = "@" * 9 if vary else f"abuse-{kind}"  # a placeholder as long as the varying name
        body = json.dumps(
            {"app": app, "applied_version": spec["version"], "sdk": "abuse-bench", "counts": counts},
            separators=(",", ":"),
        ).encode()
        path = f"/api/v1/envs/{env}/clients/"
        head, rest = http_request("POST", port, path + "\0", token, body).split(b"\0")
        if not vary:
            return lambda n: head + f"{prefix}-{n % instances:07d}".encode() + rest
        middle, tail = rest.split(b"@" * 9)
        return lambda n: head + f"{prefix}-{n % instances:07d}".encode() + middle + b"%09d" % n + tail
    if kind == "idem":
        path = f"/api/v1/envs/{env}/flags/{KILLED_KEY}/kill"
        body = b'{"reason":"abuse bench: no-op kill"}'
        before, after = http_request(
            "POST", spec["idem_port"], path, spec["op_token"], body, "Idempotency-Key: \0\r\n"
        ).split(b"\0")
        pid = os.getpid()
        return lambda n: before + f"abuse-{pid}-{n:09d}".encode() + after
    raise ValueError(kind)


class Tally:
    """What one flood kind got back."""

    def __init__(self) -> None:
        self.answers: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []

    def result(self, seconds: float) -> dict[str, Any]:
        return {
            "answers": dict(self.answers),
            "errors": dict(self.errors),
            "latency": percentiles(self.latencies),
            "seconds": seconds,
        }


async def request_flood(
    kind: str, spec: dict[str, Any], conns: int, rate: float, port: int, tally: Tally
) -> None:
    """``conns`` keep-alive connections, each sending its next request as soon as the last is
    answered, or at ``rate`` requests/s in all (each connection on a fixed schedule)."""
    loop = asyncio.get_running_loop()
    make, counter = request_maker(kind, spec), itertools.count()
    start_at, end_at = spec["start_at"], spec["end_at"]
    interval = conns / rate if rate > 0 else 0.0

    async def one(index: int) -> None:
        conn: HttpConn | None = None
        next_at = start_at + interval * index / conns
        await asyncio.sleep(max(0.0, start_at - time.time()))
        try:
            while True:
                now = time.time()
                if interval:
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                        now = time.time()
                    next_at = max(next_at + interval, now)
                if now >= end_at:
                    break
                if conn is None or not conn.usable:
                    if conn is not None:
                        conn.close()
                    try:
                        _, conn = await loop.create_connection(HttpConn, HOST, port)
                    except OSError as exc:
                        tally.errors[f"connect: {type(exc).__name__}"] += 1
                        conn = None
                        await asyncio.sleep(0.1)
                        continue
                t0 = time.perf_counter()
                fut = conn.request(make(next(counter)))
                timer = loop.call_later(REQUEST_TIMEOUT_S, _expire, fut)
                try:
                    status = await fut
                except (OSError, TimeoutError) as exc:
                    tally.errors[type(exc).__name__] += 1
                    conn.close()
                    continue
                finally:
                    timer.cancel()
                tally.latencies.append((time.perf_counter() - t0) * 1000)
                tally.answers[answer_kind(status, conn.body)] += 1
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(one(i) for i in range(conns)))


class StreamConn(asyncio.Protocol):
    """One event stream: the request, the status; then every byte is counted and dropped."""

    def __init__(self, request: bytes, tally: StreamTally) -> None:
        self.request, self.tally = request, tally
        self.head = bytearray()
        self.status: int | None = None
        self.body = b""
        self.answered: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.answered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
        self.transport: asyncio.Transport | None = None
        self.ours = False  # we close it
        self.lost = False
        self.counted = False  # in tally.open
        self.tail = b""  # the last bytes received: how a stream the server ended, ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.status == 200:
            self.tally.bytes += len(data)
            self.tail = (self.tail + data)[-200:]
            return
        self.head += data
        end = self.head.find(HEAD_END)
        if end < 0:
            return
        if self.status is None:
            self.status = int(self.head[9:12])
            if self.status == 200:
                self.tally.bytes += len(self.head) - end - 4
                self.head = bytearray()
                self.answered.set_result(200)
                return
        # An error answer: its body too (it says which limit), then close.
        match = LENGTH_RE.search(self.head, 0, end)
        self.body = bytes(self.head[end + 4 : end + 2004])
        if match is None or len(self.head) - end - 4 >= int(match[1]):
            self._answer_error()

    def _answer_error(self) -> None:
        if not self.answered.done():
            self.answered.set_result(self.status or 0)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.status is not None and self.status != 200:
            self._answer_error()  # what came of the body is in self.body
        elif not self.answered.done():
            self.answered.set_exception(ConnectionResetError("closed before an answer"))
        elif self.status == 200 and not self.ours:
            self.tally.ended_early += 1
            if self.counted:
                self.tally.open -= 1
            if b"event: shutdown" in self.tail:
                how = "shutdown event"
            elif b"event: revoked" in self.tail:
                how = "revoked event"
            elif self.tail.endswith(b"0\r\n\r\n"):
                how = "end of body"
            else:
                how = f"closed ({type(exc).__name__ if exc else 'EOF'})"
            self.tally.ended[how] += 1

    def close(self) -> None:
        self.ours = True
        if self.transport is not None:
            self.transport.close()


class StreamTally:
    def __init__(self) -> None:
        self.answers: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes = 0
        self.ended_early = 0
        self.ended: Counter[str] = Counter()  # how they ended
        self.attempted = 0
        self.last_accept_s = math.nan  # after the start
        self.attempts_done_s = math.nan
        self.open_at_end = 0
        self.open = 0  # accepted and not ended yet
        self.peak_open = 0


async def stream_flood(spec: dict[str, Any], tally: StreamTally) -> None:
    """Open ``streams`` event streams, ``stream_concurrency`` at a time; keep the accepted ones
    open, reading and dropping what comes, until the end of the flood."""
    loop = asyncio.get_running_loop()
    start_at, end_at = spec["start_at"], spec["end_at"]
    path = f"/api/v1/envs/{spec['env']}/stream"
    req = http_request(
        "GET", spec["main_port"], path, spec["sdk_token"], b"", "Accept: text/event-stream\r\n"
    )
    accepted: list[StreamConn] = []
    numbers = iter(range(spec["streams"]))

    async def opener() -> None:
        for _ in numbers:
            if time.time() >= end_at:
                return
            tally.attempted += 1
            proto: StreamConn | None = None
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: StreamConn(req, tally), HOST, spec["main_port"]),
                    REQUEST_TIMEOUT_S,
                )
                status = await asyncio.wait_for(asyncio.shield(proto.answered), REQUEST_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                tally.errors[type(exc).__name__] += 1
                if proto is not None:
                    proto.close()
                continue
            tally.answers[answer_kind(status, proto.body)] += 1
            if status == 200 and not proto.lost:
                accepted.append(proto)
                tally.last_accept_s = time.time() - start_at
                proto.counted = True
                tally.open += 1
                tally.peak_open = max(tally.peak_open, tally.open)

    await asyncio.sleep(max(0.0, start_at - time.time()))
    try:
        await asyncio.gather(*(opener() for _ in range(spec["stream_concurrency"])))
        tally.attempts_done_s = time.time() - start_at
        await asyncio.sleep(max(0.0, end_at - time.time()))
        tally.open_at_end = sum(1 for p in accepted if not p.lost)
    finally:
        for proto in accepted:
            proto.close()
        await asyncio.sleep(0.2)  # the FINs go out before the process ends


async def _load_main(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tasks: list[Any] = []
    tallies: dict[str, Tally] = {}
    stream_tally = StreamTally()
    for kind, (conns, rate, port) in spec["requests"].items():
        tallies[kind] = Tally()
        tasks.append(request_flood(kind, spec, conns, rate, port, tallies[kind]))
    if spec["streams"]:
        tasks.append(stream_flood(spec, stream_tally))
    loop_lag = [0.0]

    async def lag_probe() -> None:
        while time.time() < spec["end_at"]:
            t0 = time.perf_counter()
            await asyncio.sleep(0.1)
            loop_lag[0] = max(loop_lag[0], (time.perf_counter() - t0 - 0.1) * 1000)

    tasks.append(lag_probe())
    await asyncio.gather(*tasks)
    seconds = spec["end_at"] - spec["start_at"]
    for kind, tally in tallies.items():
        out[kind] = tally.result(seconds)
    if spec["streams"]:
        out["streams"] = {
            k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(stream_tally).items()
        }
    out["loop_lag_ms"] = loop_lag[0]
    return out


def load_process(spec: dict[str, Any], results: Any) -> None:
    """Entry point of one load-generator process; its tallies go to ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the benchmark stops us (SIGTERM)
    if spec["nice"]:
        os.nice(spec["nice"])
    try:
        out = asyncio.run(_load_main(spec))
    except Exception as exc:  # noqa: BLE001 - reported by the benchmark
        out = {"error": f"{type(exc).__name__}: {exc}"}
    results.put((spec["name"], out))


class Flood:
    """The load-generator processes of one flood; :meth:`wait` collects their tallies."""

    def __init__(self, specs: Sequence[dict[str, Any]]) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=load_process, args=(spec, self.results), name=spec["name"], daemon=True)
            for spec in specs
        ]
        for proc in self.procs:
            proc.start()

    def processes(self) -> list[psutil.Process]:
        out = []
        for proc in self.procs:
            with contextlib.suppress(psutil.Error, ValueError):
                if proc.pid is not None and proc.is_alive():
                    out.append(psutil.Process(proc.pid))
        return out

    def wait(self, until: float) -> dict[str, dict[str, Any]]:
        """The tallies, once the processes are done (they end by ``until`` + a grace)."""
        out: dict[str, dict[str, Any]] = {}
        try:
            for _ in self.procs:
                try:
                    name, result = self.results.get(timeout=max(1.0, until - time.time()) + RESULTS_GRACE_S)
                except queue.Empty:
                    codes = {p.name: p.exitcode for p in self.procs}
                    raise RuntimeError(
                        f"load processes sent no result in time (exit codes {codes})"
                    ) from None
                out[name] = result
            for proc in self.procs:
                proc.join(10)
        finally:
            self.kill()
        return out

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# -- measurements during the baseline and the flood --------------------------------------------


@dataclass
class Figures:
    """What the operator, the monitoring and a well-behaved SDK saw during one phase."""

    control: list[float] = field(default_factory=list)  # kill/restore via the control listener, ms
    main: list[float] = field(default_factory=list)  # kill/restore via the main listener, ms
    prod: list[float] = field(default_factory=list)  # sparse kill/restore in production via control, ms
    clients: list[float] = field(default_factory=list)  # GET /clients, ms
    metrics: list[float] = field(default_factory=list)  # GET /metrics, ms
    legit: list[float] = field(default_factory=list)  # heartbeat of the well-behaved token, ms
    failures: Counter[str] = field(default_factory=Counter)
    clients_entries: int = 0  # instances in the last /clients answer
    clients_bytes: int = 0
    live_metric: float = math.nan  # flagsvc_sdk_instances_live in the last scrape
    seconds: float = 0.0
    cpu: CpuUsage | None = None
    split: dict[str, float] = field(default_factory=dict)  # server cores by part
    wait: dict[str, float] = field(default_factory=dict)  # run-queue delay by part, ms per s
    redis: list[float] = field(default_factory=list)  # INCR round trips from the bench, ms


class ServerSplit:
    """Cores used by the parts of the server over a phase: the main listener's gunicorn workers,
    the control listener's worker, redis-server, and the rest (``flagsvc serve``, the masters);
    and how long they waited for a CPU while runnable (run-queue delay from
    ``/proc/<pid>/task/*/schedstat``, ms per second): the cost of sharing the cores."""

    ROLES = ("main", "control", "redis", "rest")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.cores: dict[str, float] = {}
        self.waits: dict[str, float] = {}

    @staticmethod
    def _run_delay(pid: int) -> float:
        """Seconds the threads of ``pid`` spent runnable but not running."""
        total = 0
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with (
                    contextlib.suppress(OSError, ValueError, IndexError),
                    open(f"/proc/{pid}/task/{task}/schedstat") as fh,
                ):
                    total += int(fh.read().split()[1])
        return total / 1e9

    def roles(self) -> dict[int, tuple[str, psutil.Process]]:
        out: dict[int, tuple[str, psutil.Process]] = {}
        workers = {w.pid for w in self.server.gunicorn_workers()}
        for proc in self.server.processes():
            with contextlib.suppress(psutil.Error):
                if "redis" in proc.name():
                    role = "redis"
                elif proc.pid in workers:  # by the port it accepts on
                    role = self.server.listener_of(proc) or "rest"
                else:
                    role = "rest"  # flagsvc serve, the gunicorn master
                out[proc.pid] = (role, proc)
        return out

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def __enter__(self) -> ServerSplit:
        self._t0 = time.monotonic()
        self._before: dict[int, tuple[float, float]] = {}
        for pid, (_, proc) in self.roles().items():
            with contextlib.suppress(psutil.Error):
                self._before[pid] = (self._cpu(proc), self._run_delay(pid))
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self._t0, 1e-6)
        cores, waits = dict.fromkeys(self.ROLES, 0.0), dict.fromkeys(self.ROLES, 0.0)
        for pid, (role, proc) in self.roles().items():
            with contextlib.suppress(psutil.Error):
                cpu, delay = self._before.get(pid, (0.0, 0.0))
                cores[role] += (self._cpu(proc) - cpu) / wall
                waits[role] += (self._run_delay(pid) - delay) / wall * 1000
        self.cores, self.waits = cores, waits


class RedisProbe(threading.Thread):
    """A write round trip to the embedded Redis (``INCR`` of a key of the bench's own, so with
    the append-only fsync a kill's commit also waits for) every 0.1 s, from the bench."""

    KEY = "abuse-bench:probe"

    def __init__(self, r: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.redis, self.stop, self.samples = r, threading.Event(), list[float]()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            t0 = time.perf_counter()
            with contextlib.suppress(redis.RedisError):
                self.redis.incr(self.KEY)
                self.samples.append((time.perf_counter() - t0) * 1000)

    def __enter__(self) -> RedisProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(5)


LIVE_RE = re.compile(rf'^flagsvc_sdk_instances_live\{{env="{PROD}"\}} (\S+)$', re.MULTILINE)


class Probe:
    """The measuring side: an operator's kill/restore through both listeners, a reader's
    ``/clients``, a ``/metrics`` scrape, and a heartbeat of a well-behaved SDK token."""

    def __init__(self, server: Server, tokens: dict[str, str], flip_env: str) -> None:
        assert server.control_port
        self.control_base = f"http://{HOST}:{server.control_port}"
        self.main_base = server.base
        self.operator = tokens["operator"]
        self.flippers = {
            "control": Flipper(self.control_base, self.operator, flip_env, KILL_KEY),
            "main": Flipper(self.main_base, self.operator, flip_env, MAIN_KEY),
            "prod": Flipper(self.control_base, self.operator, PROD, PROD_KEY),
        }
        self.reader = requests.Session()
        self.reader.headers["Authorization"] = f"Bearer {tokens['reader']}"
        self.scraper = requests.Session()
        self.legit = requests.Session()
        self.legit.headers["Authorization"] = f"Bearer {tokens['legit']}"
        self.legit_n = 0

    def close(self) -> None:
        for flipper in self.flippers.values():
            flipper.close()
        for session in (self.reader, self.scraper, self.legit):
            session.close()

    def flip(self, via: str, fig: Figures) -> None:
        flipper = self.flippers[via]
        try:
            getattr(fig, via).append(flipper.flip())
        except (RuntimeError, requests.RequestException) as exc:
            fig.failures[f"kill/restore via {via}: {str(exc)[:80]}"] += 1
            with contextlib.suppress(RuntimeError, requests.RequestException, ValueError):
                flipper.enabled = bool(call(flipper.session, "GET", flipper.url, {200}).json()["enabled"])

    def timed(
        self, fig: Figures, what: str, samples: list[float], fn: Callable[[], requests.Response]
    ) -> None:
        t0 = time.perf_counter()
        try:
            response = fn()
            elapsed = (time.perf_counter() - t0) * 1000
        except requests.RequestException as exc:
            fig.failures[f"{what}: {type(exc).__name__}"] += 1
            return
        if response.status_code not in (200, 204):
            fig.failures[f"{what}: {response.status_code}"] += 1
            return
        samples.append(elapsed)
        if what == "GET /clients":
            fig.clients_bytes = len(response.content)
            fig.clients_entries = len(response.json()["instances"])
        elif what == "GET /metrics":
            match = LIVE_RE.search(response.text)
            fig.live_metric = float(match[1]) if match else math.nan

    def legit_heartbeat(self) -> requests.Response:
        instance = f"legit-{self.legit_n % LEGIT_INSTANCES:03d}"
        self.legit_n += 1
        url = f"{self.main_base}/api/v1/envs/{PROD}/clients/{instance}"
        return self.legit.post(
            url, json={"app": "legit", "applied_version": 1}, timeout=harness.HTTP_TIMEOUT_S
        )

    def run(self, flips: int, prod_kills: int, samples: int, window: tuple[float, float]) -> Figures:
        """Two threads over ``window`` (monotonic start, end), each series spread evenly over it.
        The control thread kills/restores through the control listener (``flips`` times) and
        GETs ``/clients`` (``samples`` times), one after the other, so that a ``/clients`` never
        delays a kill. The main thread kills/restores through the main listener, scrapes
        ``/metrics`` and sends a well-behaved heartbeat. Two flips never overlap (a lock): two
        writes at once to one environment would make one of them retry. The control thread also
        kills/restores a flag in production ``prod_kills`` times, far apart: each is fanned out to
        every stream open on production."""
        fig = Figures()
        lock = threading.Lock()

        def flip(via: str) -> Callable[[], None]:
            def go() -> None:
                with lock:
                    self.flip(via, fig)

            return go

        clients_url = f"{self.control_base}/api/v1/envs/{PROD}/clients"
        metrics_url = f"{self.main_base}/metrics"
        control = [
            (flips, flip("control")),
            (prod_kills, flip("prod")),
            (
                samples,
                lambda: self.timed(
                    fig,
                    "GET /clients",
                    fig.clients,
                    lambda: self.reader.get(clients_url, timeout=harness.HTTP_TIMEOUT_S),
                ),
            ),
        ]
        main = [
            (flips, flip("main")),
            (
                samples,
                lambda: self.timed(
                    fig,
                    "GET /metrics",
                    fig.metrics,
                    lambda: self.scraper.get(metrics_url, timeout=harness.HTTP_TIMEOUT_S),
                ),
            ),
            (samples, lambda: self.timed(fig, "legit heartbeat", fig.legit, self.legit_heartbeat)),
        ]
        stop, errors = threading.Event(), []
        threads = [
            threading.Thread(target=self._series, args=(tasks, window, stop, errors), daemon=True)
            for tasks in (control, main)
        ]
        t0 = time.monotonic()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            stop.set()
        if errors:
            raise errors[0]
        fig.seconds = time.monotonic() - t0
        return fig

    @staticmethod
    def _series(
        tasks: list[tuple[int, Callable[[], None]]],
        window: tuple[float, float],
        stop: threading.Event,
        errors: list[BaseException],
    ) -> None:
        """Run each task its number of times, the i-th run due at start + i x span / n."""
        done = [0] * len(tasks)
        span = window[1] - window[0]
        try:
            while not stop.is_set():
                pending = [
                    (window[0] + done[i] * span / n, i) for i, (n, _) in enumerate(tasks) if done[i] < n
                ]
                if not pending:
                    return
                due, i = min(pending)
                if stop.wait(max(0.0, due - time.monotonic())) or time.monotonic() >= window[1]:
                    return
                tasks[i][1]()
                done[i] += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by run()
            errors.append(exc)


# -- Redis -------------------------------------------------------------------------------------


def redis_figures(r: redis.Redis, flags: set[str]) -> dict[str, Any]:
    """Memory, and the records the floods can grow, in ``production``."""
    k = EnvKeys(PROD)
    mem = r.info("memory")
    evals = sorted(r.scan_iter(match=f"{k.base}:evals:*", count=1000))
    eval_fields = eval_bytes = unknown = 0
    for key in evals:
        eval_fields += r.hlen(key)
        eval_bytes += r.memory_usage(key, samples=0) or 0
        for name, _ in r.hscan_iter(key, count=1000):  # (NOVALUES needs Redis 7.4)
            if name.split("|", 1)[0] not in flags:
                unknown += 1
    per_token = [r.zcard(key) for key in r.scan_iter(match=f"{k.base}:clients:token:*", count=1000)]

    def size(pattern: str) -> int:
        return sum(r.memory_usage(key, samples=0) or 0 for key in r.scan_iter(match=pattern, count=1000))

    return {
        "used_memory": int(mem["used_memory"]),
        "dataset": int(mem["used_memory_dataset"]),
        "keys": r.dbsize(),
        "instances": r.hlen(k.clients),
        "instances_bytes": r.memory_usage(k.clients, samples=0) or 0,
        "per_token_max": max(per_token, default=0),
        "instances_bytes_all": size(f"{k.base}:clients*"),
        "idem": sum(1 for _ in r.scan_iter(match=f"{k.base}:idem:*", count=1000)),
        "idem_bytes": size(f"{k.base}:idem*"),
        "eval_keys": len(evals),
        "eval_fields": eval_fields,
        "eval_bytes": eval_bytes,
        "eval_unknown": unknown,
    }


# -- one run -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    base: Figures
    flood: Figures
    before: dict[str, Any]
    after: dict[str, Any]
    peak_memory: int
    floods: dict[str, Any]  # per flood kind: answers, errors, latency
    streams: dict[str, Any]
    workers: int
    loop_lag_ms: float
    flags: set[str]
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)


def setup(server: Server, args: argparse.Namespace) -> tuple[dict[str, str], set[str], int, int]:
    """Flags, tokens and the well-behaved SDK fleet; (tokens, flag keys, snapshot bytes, version)."""
    with requests.Session() as admin:
        admin.headers["Authorization"] = f"Bearer {server.token}"
        size, _ = harness.setup_flags(server, admin, args.flags)
        url = f"{server.base}/api/v1/envs/{PROD}/flags"
        for key in (MAIN_KEY, PROD_KEY, KILLED_KEY):
            call(admin, "PUT", f"{url}/{key}", {201}, json={"kind": "kill_switch", "enabled": True})
        other = f"{server.base}/api/v1/envs/{FLIP_ENV}/flags/{MAIN_KEY}"
        call(admin, "PUT", other, {201}, json={"kind": "kill_switch", "enabled": True})
        call(admin, "POST", f"{url}/{KILLED_KEY}/kill", {200}, json={"reason": "target of the no-op kills"})
        flags = {f["key"] for f in call(admin, "GET", url, {200}).json()["flags"]}
        version = harness.current_version(server, admin)
    tokens = {
        "reader": create_token(server.data_dir, "abuse-reader", "reader"),
        "operator": create_token(server.data_dir, "abuse-operator", "operator"),
        "legit": create_token(server.data_dir, "abuse-legit-sdk", "sdk"),
        "sdk": create_token(server.data_dir, "abuse-flood-sdk", "sdk"),
        "flood_operator": create_token(server.data_dir, "abuse-flood-operator", "operator"),
    }
    with requests.Session() as legit:
        legit.headers["Authorization"] = f"Bearer {tokens['legit']}"
        for i in range(LEGIT_INSTANCES):
            call(
                legit,
                "POST",
                f"{server.base}/api/v1/envs/{PROD}/clients/legit-{i:03d}",
                {204},
                json={"app": "legit", "applied_version": version},
            )
    return tokens, flags, size, version


def server_log_events(server: Server) -> Counter[str]:
    """Lines of the server log that tell of trouble: workers killed or restarted, tracebacks."""
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return Counter()
    return Counter({what: text.count(what) for what in ("WORKER TIMEOUT", "Booting worker", "Traceback")})


def reproduce_command() -> str:
    """The command line, with the FLAGSVC_* settings it passes on to the server."""
    env = [
        f"{k}={shlex.quote(v)}"
        for k, v in sorted(os.environ.items())
        if k.startswith("FLAGSVC_") and k not in harness.CONFLICTING_ENV
    ]
    return " ".join([*env, shlex.join([sys.executable, *sys.argv])])


def flood_specs(
    args: argparse.Namespace, server: Server, tokens: dict[str, str], real_flags: list[str], version: int
) -> list[dict[str, Any]]:
    assert server.control_port
    start_at = time.time() + SPAWN_S
    common = {
        "env": PROD,
        "main_port": server.port,
        "idem_port": server.control_port if args.idem_via == "control" else server.port,
        "sdk_token": tokens["sdk"],
        "op_token": tokens["flood_operator"],
        "instances": args.instances,
        "count_keys": args.count_keys,
        "counts_instances": args.counts_instances,
        "real_flags": real_flags,
        "vary_app": args.vary_app,
        "version": version,
        "streams": 0,
        "stream_concurrency": args.stream_concurrency,
        "start_at": start_at,
        "end_at": start_at + args.duration,
        "nice": args.loadgen_nice,
    }
    requests_spec: dict[str, tuple[int, float, int]] = {}
    if "heartbeat" in args.floods:
        requests_spec["heartbeat"] = (args.heartbeat_conns, args.heartbeat_rate, server.port)
    if "counts" in args.floods:
        requests_spec["counts"] = (args.counts_conns, args.counts_rate, server.port)
    if "idem" in args.floods:
        requests_spec["idem"] = (args.idem_conns, args.idem_rate, common["idem_port"])
    specs = []
    if requests_spec:
        specs.append({**common, "name": "requests", "requests": requests_spec})
    if "streams" in args.floods and args.streams:
        specs.append({**common, "name": "streams", "requests": {}, "streams": args.streams})
    return specs


def run_once(args: argparse.Namespace, tag: str) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix="flagsvc-abuse-", dir=args.tmp_dir))
    flood: Flood | None = None
    try:
        with Server(root, args.workers, control=True) as server:
            tokens, flags, size, version = setup(server, args)
            workers = len(server.worker_pids())
            real_flags = sorted(f for f in flags if not f.startswith("bench."))[: args.real_counts]
            r = redis_for(server)
            log(
                f"{tag} server up: main :{server.port} ({workers} workers, nice 5), control "
                f":{server.control_port} (1 worker); {len(flags)} flags, snapshot {size} bytes, "
                f"v{version}; {LEGIT_INSTANCES} well-behaved instances"
            )
            probe = Probe(server, tokens, args.flip_env)
            try:
                for via in ("control", "main", "prod"):  # warm-up: connections, caches
                    for _ in range(args.warmup_flips):
                        probe.flip(via, Figures())
                # 1. baseline
                before = redis_figures(r, flags)
                span = args.duration - args.ramp - 0.5
                with (
                    CpuMeter(server) as meter,
                    ServerSplit(server) as split,
                    RedisProbe(redis_for(server)) as rp,
                ):
                    base = probe.run(
                        args.flips, args.prod_kills, args.samples, (time.monotonic(), time.monotonic() + span)
                    )
                base.cpu, base.split, base.wait, base.redis = (
                    meter.usage,
                    split.cores,
                    split.waits,
                    rp.samples,
                )
                log_figures(tag, "1. baseline", base)
                log(f"{tag}    redis: {fmt_redis(before)}")

                # 2. flood
                events = server_log_events(server)
                specs = flood_specs(args, server, tokens, real_flags, version)
                if not specs:
                    raise RuntimeError("no flood to run: see --floods and --streams")
                log(f"{tag} 2. flood: {describe_flood(args)}")
                flood = Flood(specs)
                start_at, end_at = specs[0]["start_at"], specs[0]["end_at"]
                sampler = MemorySampler(redis_for(server))
                sampler.start()
                mono = time.monotonic() - time.time()
                window = (start_at + args.ramp + mono, end_at - 0.5 + mono)
                time.sleep(max(0.0, window[0] - time.monotonic()))
                with (
                    CpuMeter(server, flood.processes) as meter,
                    ServerSplit(server) as split,
                    RedisProbe(redis_for(server)) as rp,
                ):
                    under = probe.run(args.flips, args.prod_kills, args.samples, window)
                under.cpu, under.split, under.wait, under.redis = (
                    meter.usage,
                    split.cores,
                    split.waits,
                    rp.samples,
                )
                tallies = flood.wait(end_at)
                flood = None
                sampler.stop.set()
                sampler.join(5)
            finally:
                probe.close()
            # 3. after
            time.sleep(args.settle)
            after = redis_figures(r, flags)
            r.close()
            log_figures(tag, "2. under the flood", under)
            results = {**tallies.get("requests", {}), **tallies.get("streams", {})}
            problems = [f"load process {name}: {t['error']}" for name, t in tallies.items() if "error" in t]
            trouble = server_log_events(server) - events
            if trouble:
                problems.append(
                    "server log during the flood: "
                    + ", ".join(f"{n} x {what!r}" for what, n in trouble.items())
                )
                log(f"{tag}    ! {problems[-1]}")
            for kind in ("heartbeat", "counts", "idem"):
                if kind in results:
                    log(f"{tag}    {kind + ' flood':<16} {fmt_tally(results[kind])}")
            streams = results.get("streams", {})
            if streams:
                log(f"{tag}    {'stream flood':<16} {fmt_streams(streams)}")
            lag = max((t.get("loop_lag_ms", 0.0) for t in tallies.values()), default=0.0)
            log(f"{tag}    load generator event-loop lag max {lag:.0f} ms")
            log(f"{tag} 3. after: redis: {fmt_redis(after)}; peak used_memory {sampler.peak / 2**20:.1f} MiB")
        log(f"{tag} server stopped (SIGTERM, exit code {server.exit_code})")
        if server.exit_code != 0:
            problems.append(f"flagsvc serve exited with {server.exit_code} after SIGTERM")
        return RunResult(
            base,
            under,
            before,
            after,
            max(sampler.peak, after["used_memory"]),
            {k: v for k, v in results.items() if k != "streams" and isinstance(v, dict)},
            streams,
            workers,
            lag,
            flags,
            server.exit_code,
            problems,
        )
    except BaseException as exc:
        if flood is not None:
            flood.kill()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            log(f"{tag} interrupted: server and load processes stopped")
        else:
            log(f"{tag} failed; server log (tail):\n{harness.tail(root / 'server.log')}")
        raise
    finally:
        if args.keep_data:
            log(f"{tag} kept {root} (server.log, data/)")
        else:
            shutil.rmtree(root, ignore_errors=True)


# -- report ------------------------------------------------------------------------------------


def fmt_p(samples: Sequence[float]) -> str:
    p = percentiles(samples)
    return f"n={p['n']:<3} p50 {p['p50']:7.2f} p95 {p['p95']:7.2f} max {p['max']:7.1f} ms"


def log_figures(tag: str, label: str, fig: Figures) -> None:
    log(f"{tag} {label} ({fig.seconds:.1f} s)")
    log(f"{tag}    kill/restore via control   {fmt_p(fig.control)}")
    log(f"{tag}    kill/restore via main      {fmt_p(fig.main)}")
    log(f"{tag}    kill/restore {PROD}, ctl {fmt_p(fig.prod)}")
    log(
        f"{tag}    GET /clients (control)     {fmt_p(fig.clients)}  "
        f"({fig.clients_entries} instances, {fig.clients_bytes / 1024:.0f} KiB)"
    )
    log(f"{tag}    GET /metrics (main)        {fmt_p(fig.metrics)}  (sdk_instances_live {fig.live_metric:g})")
    log(f"{tag}    well-behaved heartbeat     {fmt_p(fig.legit)}")
    for what, n in sorted(fig.failures.items()):
        log(f"{tag}    ! {n} x {what}")
    log(f"{tag}    cpu: {fig.cpu}")
    log(f"{tag}    server cores: " + ", ".join(f"{k} {v:.2f}" for k, v in fig.split.items()))
    log(f"{tag}    run-queue wait, ms per s: " + ", ".join(f"{k} {v:.0f}" for k, v in fig.wait.items()))
    log(f"{tag}    Redis INCR from the bench  {fmt_p(fig.redis)}")


def fmt_redis(f: dict[str, Any]) -> str:
    return (
        f"used_memory {f['used_memory'] / 2**20:.1f} MiB (dataset {f['dataset'] / 2**20:.1f}), "
        f"{f['keys']} keys, {f['instances']} instance records ({f['instances_bytes'] / 2**20:.1f} MiB; "
        f"largest per-token set {f['per_token_max']}), {f['idem']} idempotency records, "
        f"evaluation counts {f['eval_fields']} fields in {f['eval_keys']} keys "
        f"({f['eval_bytes'] / 1024:.0f} KiB, "
        f"{f['eval_unknown']} for unknown flags)"
    )


def fmt_tally(t: dict[str, Any]) -> str:
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(t["answers"].items()))
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(t["errors"].items()))
    total = sum(t["answers"].values())
    lat = t["latency"]
    return (
        f"{total / t['seconds']:7.0f} req/s ({total} answers: {answers}"
        f"{'; errors ' + errors if errors else ''}); "
        f"latency p50 {lat['p50']:.1f} p95 {lat['p95']:.1f} ms"
    )


def fmt_streams(s: dict[str, Any]) -> str:
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(s["answers"].items()))
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items()))
    return (
        f"{s['attempted']} attempted ({answers}{'; errors ' + errors if errors else ''}); last accepted "
        f"{s['last_accept_s']:.1f} s in, attempts done {s['attempts_done_s']:.1f} s in; at most "
        f"{s['peak_open']} open at once, {s['open_at_end']} at the end; {s['ended_early']} ended by the "
        f"server{fmt_ended(s)}; "
        f"{s['bytes'] / 2**20:.0f} MiB received"
    )


def fmt_ended(s: dict[str, Any]) -> str:
    ended = s.get("ended") or {}
    return f" ({', '.join(f'{k}: {v}' for k, v in sorted(ended.items()))})" if ended else ""


def describe_flood(args: argparse.Namespace) -> str:
    def pace(rate: float) -> str:
        return f"{rate:g}/s" if rate > 0 else "unpaced"

    parts = []
    if "heartbeat" in args.floods:
        parts.append(
            f"heartbeats ({args.heartbeat_conns} conns, {pace(args.heartbeat_rate)}, {args.instances} "
            f"instance ids, counts for {args.real_counts} real flags"
            f"{', a new app name each' if args.vary_app else ''})"
        )
    if "counts" in args.floods:
        parts.append(
            f"counts ({args.counts_conns} conns, {pace(args.counts_rate)}, {args.counts_instances} instance "
            f"ids, {args.count_keys} unknown flags each)"
        )
    if "streams" in args.floods:
        parts.append(f"{args.streams} streams ({args.stream_concurrency} opening at a time)")
    if "idem" in args.floods:
        parts.append(f"no-op kills ({args.idem_conns} conns, {pace(args.idem_rate)}, via {args.idem_via})")
    nice = f"; load generator at nice {args.loadgen_nice}" if args.loadgen_nice else ""
    return f"{args.duration:g} s of " + "; ".join(parts) + nice


@dataclass(frozen=True)
class Row:
    label: str
    without: Callable[[RunResult], float]
    with_: Callable[[RunResult], float]
    fmt: str = "{:.2f}"


def _p(phase: str, series: str, q: str) -> Callable[[RunResult], float]:
    return lambda r: percentiles(getattr(getattr(r, phase), series))[q]


def _cpu(phase: str, part: str) -> Callable[[RunResult], float]:
    def get(r: RunResult) -> float:
        cpu = getattr(r, phase).cpu
        return math.nan if cpu is None else float(getattr(cpu, part))

    return get


def _split(phase: str, part: str) -> Callable[[RunResult], float]:
    return lambda r: getattr(r, phase).split.get(part, math.nan)


def _wait(phase: str, part: str) -> Callable[[RunResult], float]:
    return lambda r: getattr(r, phase).wait.get(part, math.nan)


def _mib(key: str, when: str) -> Callable[[RunResult], float]:
    return lambda r: getattr(r, when)[key] / 2**20


ROWS = (
    Row("kill/restore via control p50 ms", _p("base", "control", "p50"), _p("flood", "control", "p50")),
    Row("kill/restore via control p95 ms", _p("base", "control", "p95"), _p("flood", "control", "p95")),
    Row("kill/restore via main p50 ms", _p("base", "main", "p50"), _p("flood", "main", "p50")),
    Row("kill/restore via main p95 ms", _p("base", "main", "p95"), _p("flood", "main", "p95")),
    Row("  flips measured (per listener)", _p("base", "control", "n"), _p("flood", "control", "n"), "{:.0f}"),
    Row(f"kill/restore in {PROD} (control) p50 ms", _p("base", "prod", "p50"), _p("flood", "prod", "p50")),
    Row(f"kill/restore in {PROD} (control) max ms", _p("base", "prod", "max"), _p("flood", "prod", "max")),
    Row("GET /clients p50 ms", _p("base", "clients", "p50"), _p("flood", "clients", "p50")),
    Row("GET /clients p95 ms", _p("base", "clients", "p95"), _p("flood", "clients", "p95")),
    Row("  instances listed", lambda r: r.base.clients_entries, lambda r: r.flood.clients_entries, "{:.0f}"),
    Row("GET /metrics p50 ms", _p("base", "metrics", "p50"), _p("flood", "metrics", "p50")),
    Row("GET /metrics p95 ms", _p("base", "metrics", "p95"), _p("flood", "metrics", "p95")),
    Row("well-behaved heartbeat p50 ms", _p("base", "legit", "p50"), _p("flood", "legit", "p50")),
    Row("well-behaved heartbeat p95 ms", _p("base", "legit", "p95"), _p("flood", "legit", "p95")),
    Row("Redis used_memory MiB (after)", _mib("used_memory", "before"), _mib("used_memory", "after")),
    Row("Redis used_memory MiB (peak)", _mib("used_memory", "before"), lambda r: r.peak_memory / 2**20),
    Row(
        "instance records (HLEN clients)",
        lambda r: r.before["instances"],
        lambda r: r.after["instances"],
        "{:.0f}",
    ),
    Row("idempotency records", lambda r: r.before["idem"], lambda r: r.after["idem"], "{:.0f}"),
    Row(
        "evaluation-count fields",
        lambda r: r.before["eval_fields"],
        lambda r: r.after["eval_fields"],
        "{:.0f}",
    ),
    Row(
        "evaluation-count KiB",
        lambda r: r.before["eval_bytes"] / 1024,
        lambda r: r.after["eval_bytes"] / 1024,
    ),
    Row("cores: server", _cpu("base", "server"), _cpu("flood", "server")),
    Row("  main workers (nice 5)", _split("base", "main"), _split("flood", "main")),
    Row("  control worker", _split("base", "control"), _split("flood", "control")),
    Row("  redis-server", _split("base", "redis"), _split("flood", "redis")),
    Row("control worker run-queue wait ms/s", _wait("base", "control"), _wait("flood", "control"), "{:.0f}"),
    Row("main workers run-queue wait ms/s", _wait("base", "main"), _wait("flood", "main"), "{:.0f}"),
    Row("Redis INCR round trip p50 ms", _p("base", "redis", "p50"), _p("flood", "redis", "p50")),
    Row("Redis INCR round trip p95 ms", _p("base", "redis", "p95"), _p("flood", "redis", "p95")),
    Row("cores: load generator", _cpu("base", "loadgen"), _cpu("flood", "loadgen")),
    Row("cores: bench (measuring)", _cpu("base", "bench"), _cpu("flood", "bench")),
    Row("cores: others", _cpu("base", "others"), _cpu("flood", "others")),
)


def fmt(value: float, spec: str = "{:.2f}") -> str:
    return "-" if math.isnan(value) else spec.format(value)


def ratio(without: float, with_: float) -> float:
    if math.isnan(without) or math.isnan(with_) or without == 0:
        return math.nan
    return with_ / without


def bound_checks(r: RunResult, caps: dict[str, int]) -> list[tuple[str, bool, str | None]]:
    """(what, within the bound, whether the flood reached the cap) for each record kind."""
    answers: Counter[str] = Counter()
    for kind in ("heartbeat", "counts"):
        answers.update(r.floods.get(kind, {}).get("answers", {}))
    idem_sent = sum(r.floods.get("idem", {}).get("answers", {}).values())
    streams = r.streams.get("answers", {})

    def reached(yes: bool, how: str) -> str:
        return f"(cap reached: {how})" if yes else "(cap NOT reached by this flood)"

    inst_bound = caps["instances"] + LEGIT_INSTANCES
    peak, stream_bound = r.streams.get("peak_open", 0), caps["streams"] * r.workers
    a = r.after
    return [
        (
            f"instance records {a['instances']:,} <= {inst_bound:,} (cap + {LEGIT_INSTANCES} well-behaved)",
            a["instances"] <= inst_bound,
            reached(answers["429 cap"] > 0, f"{answers['429 cap']:,} x 429 cap"),
        ),
        (
            f"the flood token's instances {a['per_token_max']:,} <= {caps['instances']:,}",
            a["per_token_max"] <= caps["instances"],
            None,
        ),
        (
            f"idempotency records {a['idem']:,} <= {caps['idem']:,}",
            a["idem"] <= caps["idem"],
            reached(idem_sent > caps["idem"], f"{idem_sent:,} no-op kills sent"),
        ),
        (f"evaluation counts for unknown flags {a['eval_unknown']:,} == 0", a["eval_unknown"] == 0, None),
        (
            f"streams open at once {peak:,} <= {stream_bound:,} ({r.workers} workers)",
            peak <= stream_bound,
            reached(streams.get("429 streams", 0) > 0, f"{streams.get('429 streams', 0):,} x 429"),
        ),
    ]


def projections(r: RunResult, caps: dict[str, int], args: argparse.Namespace) -> list[str]:
    """What one token can keep in Redis at the caps, at this run's bytes per record."""
    a, out = r.after, []
    if a["instances"]:
        per = a["instances_bytes_all"] / a["instances"]
        out.append(
            f"instance records: {per:.0f} bytes each (all clients* keys) -> {caps['instances']:,} per token "
            f"and environment: {caps['instances'] * per / 2**20:.1f} MiB"
        )
    if a["idem"]:
        per = a["idem_bytes"] / a["idem"]
        out.append(
            f"idempotency records: {per:.0f} bytes each -> {caps['idem']:,} per token and environment: "
            f"{caps['idem'] * per / 2**20:.1f} MiB (for 24 h)"
        )
    if (
        a["eval_fields"] >= 1000
    ):  # fewer fields are stored compactly (listpack): no guide to the cost at scale
        per, buckets = a["eval_bytes"] / a["eval_fields"], COUNTS_TTL_SECONDS // 60
        flags = len(r.flags) if r.flags else 0
        one = caps["instances"] * flags * per
        many = one * setting("HEARTBEATS_PER_MINUTE")
        out.append(
            f"evaluation counts: {per:.0f} bytes per field (flag|app|instance), kept {buckets} minutes. "
            f"At the instance cap, counts for all {flags} flags:"
        )
        out.append(
            f"  {one / 2**20:,.0f} MiB per minute with one app name ({one * buckets / 2**30:,.1f} GiB over "
            f"{buckets} min); {many / 2**20:,.0f} MiB per minute with a new app name in each of the "
        )
        out.append(
            f"  {setting('HEARTBEATS_PER_MINUTE')} heartbeats ({many * buckets / 2**30:,.0f} GiB): only the "
            "service's throughput limits that"
        )
    return out


def print_summary(runs: list[RunResult], args: argparse.Namespace) -> bool:
    """The table and the verdicts; True if both targets are met."""
    many = len(runs) > 1
    log()
    log(f"== Summary: {len(runs)} run(s){', medians across runs' if many else ''}; {describe_flood(args)} ==")
    header = ["figure", "without flood", "with flood", "ratio", *(["runs (with)"] if many else [])]
    rows = []
    for row in ROWS:
        without = median([row.without(r) for r in runs])
        withs = [row.with_(r) for r in runs]
        with_ = median(withs)
        extra = [" ".join(fmt(v, row.fmt) for v in withs)] if many else []
        rows.append(
            [
                row.label,
                fmt(without, row.fmt),
                fmt(with_, row.fmt),
                fmt(ratio(without, with_), "{:.2f}x"),
                *extra,
            ]
        )
    harness.print_table(header, rows)

    log()
    log("== Floods: answers per kind (429 cap: instances per token; 429 rate: heartbeats per minute) ==")
    for i, r in enumerate(runs):
        prefix = f"run {i + 1} " if many else ""
        for kind in ("heartbeat", "counts", "idem"):
            if kind in r.floods:
                log(f"  {prefix}{kind:<10} {fmt_tally(r.floods[kind])}")
        if r.streams:
            log(f"  {prefix}{'streams':<10} {fmt_streams(r.streams)}")

    caps = {
        "instances": setting("MAX_INSTANCES_PER_TOKEN"),
        "streams": setting("MAX_STREAMS_PER_TOKEN"),
        "idem": IDEMPOTENCY_RECORDS_PER_TOKEN,
    }
    log()
    log("== Verdict ==")
    ratios = [ratio(_p("base", "control", "p95")(r), _p("flood", "control", "p95")(r)) for r in runs]
    kill_ok = [not math.isnan(x) and x <= TARGET_RATIO for x in ratios]
    med = median(ratios)
    kill_pass = not math.isnan(med) and med <= TARGET_RATIO
    log(
        f"  kill p95 under the flood <= {TARGET_RATIO}x without it (control listener; median of the per-run "
        "ratios): "
        f"{fmt(med, '{:.2f}x')} ({' '.join(fmt(x, '{:.2f}x') for x in ratios)})  "
        f"{'PASS' if kill_pass else 'FAIL'} ({sum(kill_ok)}/{len(runs)} runs)"
    )
    bounded = True
    for i, r in enumerate(runs):
        prefix = f"run {i + 1}: " if many else ""
        checks = bound_checks(r, caps)
        ok = all(good for _, good, _ in checks)
        bounded &= ok
        log(f"  {prefix}Redis growth bounded by the caps: {'PASS' if ok else 'FAIL'}")
        for text, good, reached in checks:
            log(f"      {'ok  ' if good else 'FAIL'} {text}{'' if reached is None else '  ' + reached}")
        grown = r.after["used_memory"] - r.before["used_memory"]
        log(
            f"      used_memory {r.before['used_memory'] / 2**20:.1f} -> "
            f"{r.after['used_memory'] / 2**20:.1f} MiB ({grown / 2**20:+.1f} MiB, "
            f"peak {r.peak_memory / 2**20:.1f})"
        )
        for line in projections(r, caps, args):
            log(f"      {line}")
        ended = {k: v for k, v in r.streams.get("ended", {}).items() if "event" not in k}
        if ended:
            log(
                f"  WARNING: {prefix}the server ended {sum(ended.values()):,} of the "
                f"{r.streams.get('answers', {}).get('200', 0):,} streams it had accepted, with no shutdown "
                "or revoked event: their clients reconnect (and get the snapshot again)"
            )
        grew = r.after["eval_bytes"] - r.before["eval_bytes"]
        if grew > r.after["instances_bytes_all"]:
            log(
                f"  WARNING: {prefix}evaluation counts of flags that exist grew by {grew / 2**20:.1f} MiB "
                f"in a {args.duration:g} s flood, more than all the instance records: no cap bounds them but "
                "instances x flags x app names per minute, kept 3 h"
            )
        for problem in r.problems:
            log(f"  ! {prefix}{problem}")
    log(
        f"  caps in force: MAX_INSTANCES_PER_TOKEN {caps['instances']:,} per environment, "
        "HEARTBEATS_PER_MINUTE "
        f"{setting('HEARTBEATS_PER_MINUTE')}, MAX_STREAMS_PER_TOKEN {caps['streams']:,} per worker "
        f"({runs[0].workers} main workers), {caps['idem']:,} idempotency records per token"
    )
    for i, r in enumerate(runs):
        for label, fig in (("baseline", r.base), ("flood", r.flood)):
            if fig.cpu is not None and fig.cpu.others > 0.2:
                log(
                    f"  NOTE: other processes on this machine used {fig.cpu.others:.2f} cores during the "
                    f"{label}{f' of run {i + 1}' if many else ''}: compare with care"
                )
    cpu = [r.flood.cpu for r in runs if r.flood.cpu]
    if cpu:
        busy = median([c.server + c.loadgen + c.bench + c.others + c.steal for c in cpu])
        log(
            f"  under the flood the machine was {busy:.2f} of {os.cpu_count()} cores busy: server "
            f"{median([c.server for c in cpu]):.2f}, load generator {median([c.loadgen for c in cpu]):.2f}, "
            f"bench {median([c.bench for c in cpu]):.2f}, others {median([c.others for c in cpu]):.2f}"
        )
    return kill_pass and bounded


# -- header and main ---------------------------------------------------------------------------


def print_header(args: argparse.Namespace, fd_limit: int) -> None:
    load1, load5, load15 = os.getloadavg()
    log(f"flagsvc abuse benchmark - {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    cores = f"nproc {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})"
    log(f"machine : {cores}, {harness.cpu_model()}")
    log(f"          {platform.system()} {platform.release()} {platform.machine()}; RLIMIT_NOFILE {fd_limit}")
    log(
        f"          loadavg {load1:.2f} {load5:.2f} {load15:.2f}; {harness.busy_elsewhere():.2f} cores busy "
        "(others) just before the start"
    )
    log(f"python  : {platform.python_version()} ({sys.executable})")
    log(f"packages: {harness.package_versions()}")
    log(f"reproduce: cd {shlex.quote(os.getcwd())} && {reproduce_command()}")
    tmp = Path(args.tmp_dir or tempfile.gettempdir()).resolve()
    server = [*harness.flagsvc_command(), "serve", "--data-dir", f"{tmp}/flagsvc-abuse-XXXX/data"]
    server += ["--host", HOST, "--port", "<free>", "--control-port", "<free>"]
    server += ["--workers", str(args.workers)] if args.workers else []
    log(f"server  : {' '.join(server)}  ({harness.filesystem_of(tmp)}; AOF fsync always)")
    log(
        f"settings: MAX_INSTANCES_PER_TOKEN {setting('MAX_INSTANCES_PER_TOKEN')}, HEARTBEATS_PER_MINUTE "
        f"{setting('HEARTBEATS_PER_MINUTE')}, MAX_STREAMS_PER_TOKEN {setting('MAX_STREAMS_PER_TOKEN')}, "
        f"idempotency records per token {IDEMPOTENCY_RECORDS_PER_TOKEN}"
    )
    log(f"flood   : {describe_flood(args)}")
    log(
        "          one SDK token (heartbeats, counts, streams) and one operator token (no-op kills), "
        "from asyncio processes on raw sockets (not wrk)"
    )
    log(
        f"measured: over {args.duration - args.ramp - 0.5:g} s per phase, each series spread evenly: "
        f"{args.flips} kill/restore in {args.flip_env} via the control listener"
    )
    log(
        f"          and GET /clients (reader) x {args.samples} in one thread, one after the other; "
        f"{args.flips} kill/restore via the main listener,"
    )
    log(
        f"          GET /metrics x {args.samples} and a well-behaved SDK heartbeat x {args.samples} "
        "in another (flips never overlap);"
    )
    log(
        f"          under the flood from {args.ramp:g} s after its start to 0.5 s before its end; "
        "latencies are client-side (python requests)"
    )
    log(
        f"target  : kill p95 under the flood <= {TARGET_RATIO}x without it (control listener); "
        "Redis growth bounded by the caps"
    )
    log("note    : the load generator runs on the same 2 cores as the server; see the cores per phase")
    log()


def flood_list(value: str) -> list[str]:
    kinds = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [k for k in kinds if k not in FLOODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown flood(s) {unknown}; choose from {','.join(FLOODS)}")
    return kinds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds of a smaller flood")
    p.add_argument("--duration", type=float, default=None, help="seconds of flood (default 30; --quick 6)")
    p.add_argument(
        "--streams", type=int, default=None, help="streams to try to open (default 16000; --quick 1500)"
    )
    p.add_argument(
        "--instances",
        type=int,
        default=None,
        help="distinct instance ids per flood kind (default 20000; --quick 3000)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs, each on a fresh server; the summary takes medians"
    )
    p.add_argument(
        "--floods", type=flood_list, default=list(FLOODS), help="which floods: " + ",".join(FLOODS)
    )
    p.add_argument("--heartbeat-conns", type=int, default=16, help="connections of the heartbeat flood")
    p.add_argument("--heartbeat-rate", type=float, default=0, help="heartbeats/s in all; 0: unpaced")
    p.add_argument(
        "--real-counts", type=int, default=3, help="flags that exist in each flood heartbeat's counts"
    )
    p.add_argument(
        "--vary-app",
        action="store_true",
        help="a new app name in every flood heartbeat (evaluation counts are kept per flag|app|instance)",
    )
    p.add_argument("--counts-conns", type=int, default=4, help="connections of the counts flood")
    p.add_argument(
        "--counts-instances",
        type=int,
        default=5,
        help="instance ids of the counts flood, in turn (few: each soon meets the per-minute limit)",
    )
    p.add_argument("--counts-rate", type=float, default=0, help="counts heartbeats/s in all; 0: unpaced")
    p.add_argument("--count-keys", type=int, default=1000, help="unknown flags in each counts heartbeat")
    p.add_argument("--stream-concurrency", type=int, default=64, help="streams being opened at a time")
    p.add_argument("--idem-conns", type=int, default=1, help="connections of the no-op-kill flood")
    p.add_argument("--idem-rate", type=float, default=0, help="no-op kills/s in all; 0: unpaced")
    p.add_argument(
        "--idem-via",
        choices=("control", "main"),
        default="control",
        help="listener of the no-op kills (nginx sends operator writes to the control one)",
    )
    p.add_argument("--loadgen-nice", type=int, default=0, help="niceness of the load-generator processes")
    p.add_argument(
        "--samples", type=int, default=None, help="GETs of each kind per phase (default 50; --quick 10)"
    )
    p.add_argument(
        "--flips",
        type=int,
        default=None,
        help="kill/restore per listener per phase (default 150; --quick 20)",
    )
    p.add_argument(
        "--flip-env",
        choices=(PROD, FLIP_ENV),
        default=FLIP_ENV,
        help=f"environment of the --flips kill/restore: {FLIP_ENV} (same flags, no streams: a few "
        f"hundred flips do not multiply the stream flood) or {PROD} (the flooded one, every flip goes to "
        "every stream)",
    )
    p.add_argument(
        "--prod-kills",
        type=int,
        default=None,
        help=f"kill/restore in {PROD} via the control listener per phase, far apart (default 12; --quick 4)",
    )
    p.add_argument("--warmup-flips", type=int, default=10, help="unmeasured flips per listener first")
    p.add_argument(
        "--ramp", type=float, default=None, help="s of flood before measuring (default 3; --quick 1.5)"
    )
    p.add_argument("--settle", type=float, default=2.0, help="s after the flood before the Redis figures")
    p.add_argument("--workers", type=int, default=None, help="main gunicorn workers (default: the service's)")
    p.add_argument("--flags", type=int, default=50, help="realistic flags besides the kill switches")
    p.add_argument("--tmp-dir", default=None, help="where the data folders go; none: the system temp dir")
    p.add_argument("--keep-data", action="store_true", help="keep each run's data folder and server log")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, short in (
        ("duration", 30.0, 6.0),
        ("streams", 16000, 1500),
        ("instances", 20000, 3000),
        ("samples", 50, 10),
        ("flips", 150, 20),
        ("prod_kills", 12, 4),
        ("ramp", 3.0, 1.5),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if args.duration <= args.ramp + 1:
        p.error("--duration must exceed --ramp by more than a second")
    for name in (
        "repeat",
        "samples",
        "flips",
        "instances",
        "counts_instances",
        "heartbeat_conns",
        "counts_conns",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.streams, args.idem_conns, args.stream_concurrency, args.count_keys, args.real_counts) < 0:
        p.error("counts must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    fd_limit = raise_fd_limit()  # before the server starts: gunicorn inherits it
    print_header(args, fd_limit)
    started = time.monotonic()
    runs = [run_once(args, f"[{k + 1}/{args.repeat}]") for k in range(args.repeat)]
    ok = print_summary(runs, args)
    log(f"\ntotal {time.monotonic() - started:.0f} s")
    log(f"reproduce: cd {shlex.quote(os.getcwd())} && {reproduce_command()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
