"""Fleet benchmark of flagsvc (issue 16): 100,000 simulated SDK instances against ``flagsvc serve``.

Each phase (``--phases``) runs on its own fresh server, started as in production: ``flagsvc serve
--control-port`` on a temporary data folder and free ports (:class:`harness.Server`: embedded
Redis, AOF ``appendfsync always``, gevent workers, the main gunicorn at nice 5, the one-worker
control gunicorn at nice 0; SIGTERM at the end and on any error), with ``bench.kill`` and
``--flags`` realistic flags in ``production`` and ``bench``, an operator token and ``--sdk-tokens``
SDK tokens: 10 tokens with the admin one.

``commands``
    Redis ``INFO commandstats`` with no load: idle commands per worker per second; then
    ``--changes`` kill/restores of ``bench.kill`` in ``production`` through the control listener
    and idle again (commands per change per worker, the mean idle rate subtracted); the same once
    ``--big-flags`` more flags are in ``production``.
``tokens``
    Idle commands per worker per second with the 10 tokens, then with ``--many-tokens`` in all
    (made through ``flagsvc.tokens.TokenStore`` in this process, on the server's Redis).
``fleet``
    ``--instances`` SDK instances, simulated by ``--loadgen-procs`` asyncio processes on raw
    keep-alive HTTP/1.1 sockets (``--conns`` connections in all; ``--close``: one per heartbeat,
    as the Python SDK does). Each instance reports on a random phase every interval the server
    announces (``X-Flagsvc-Report-Interval``; a fleet already running at the pace the server
    gives a fleet of its size, ``FLAGSVC_FLEET_HEARTBEATS_PER_SECOND``, and adopting what each
    answer says as the SDK does), with the payload the Python SDK builds (``--apps`` app names,
    counts for the ``--flags-per-app`` flags its app evaluates). After ``--warmup`` s (every
    instance has reported once, and those the fresh server told its starting pace adopted the
    stretched one), a ``--duration`` s steady window, during which an
    operator kills and restores ``bench.kill`` in ``bench`` and asks for dry runs of a kill in
    ``production`` (its blast radius), both through the control listener. Then a kill in
    ``production``: every instance reports the new version within the announced jitter (the
    burst), its periodic timer unchanged. Last, the Redis memory of ``production``'s keys.
``sink`` (not by default)
    The fleet's heartbeats sent to nginx answering 204: the load generator's own ceiling.

Example::

    .venv/bin/python bench/fleet.py                   # 100,000 instances: about 8 minutes
    .venv/bin/python bench/fleet.py --quick           # 5,000 instances: about a minute
    .venv/bin/python bench/fleet.py --repeat 3        # medians of 3 runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import psutil
import redis
import requests
from abuse import ServerSplit
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
    exit_on_sigterm,
    log,
    median,
    percentiles,
    raise_fd_limit,
    redis_for,
)

from flagsvc.clients import Pace, pace_for
from flagsvc.config import service_config
from flagsvc.connection import connect
from flagsvc.embedded import running_socket, url_for_socket
from flagsvc.extensions import limits_from
from flagsvc.keys import EnvKeys, SystemKeys
from flagsvc.tokens import Role, TokenStore
from flagsvc_client._report import INTERVAL_BOUNDS, JITTER_BOUNDS, _rescheduled
from flagsvc_client._version import __version__ as SDK_VERSION

TARGET_USAGE_MB = 200.0
TARGET_HEARTBEAT_P95_MS = 50.0
TARGET_DRY_RUN_P95_MS = 50.0
TARGET_KILL_P95_MS = 50.0
TARGET_RATE_PERCENT = 95.0  # heartbeats answered / wanted, for the latency figures to mean anything
CONSTANT_SLACK = (1.10, 1.0)  # "constant": the larger case within 10 % + 1 of the smaller one
PHASES = ("commands", "fleet", "tokens", "sink")
DEFAULT_PHASES = ("commands", "fleet", "tokens")
REQUEST_TIMEOUT_S = 10.0
SPAWN_S = 3.0  # head start for the load processes to spawn, import and build the fleet
TICK_S = 0.002  # the dispatcher's wake-up period
COUNT_VARIANTS = 16  # different evaluation-count bodies per app
TOKEN_THREADS = 8
MiB = 2**20


# -- the simulated fleet (load-generator processes) ----------------------------------------------

HEAD_END = b"\r\n\r\n"
LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CLOSE_RE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
INTERVAL_RE = re.compile(rb"\r\nx-flagsvc-report-interval:[ \t]*([0-9.eE+-]+)", re.IGNORECASE)
JITTER_RE = re.compile(rb"\r\nx-flagsvc-report-jitter:[ \t]*([0-9.eE+-]+)", re.IGNORECASE)
PERIODIC, CHANGE = 0, 1  # what a scheduled report is
IDLE, QUEUED, QUEUED_CHANGE, IN_FLIGHT = 0, 1, 2, 3  # where an instance's report stands
RETRY_S = 0.02  # a change report waits this long for the instance's report in flight, again


class HttpConn(asyncio.Protocol):
    """One HTTP/1.1 client connection on a raw socket, one request at a time: :meth:`request`
    resolves to (status, head, body) once the whole answer is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bytes]] | None = None
        self.head = b""
        self.status = 0
        self.need: int | None = None  # body bytes still to come; -1: until close; None: head first
        self.usable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.usable = transport, True

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if self.waiter is not None and not self.waiter.done():
            if self.need == -1:
                self.waiter.set_result((self.status, self.head, bytes(self.buf)))
            else:
                self.waiter.set_exception(ConnectionResetError("closed by the server"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            self.buf.clear()
            return
        if self.need is None and not self._read_head():
            return
        if self.need == -1 or len(self.buf) < (self.need or 0):
            return
        body = bytes(self.buf[: self.need])
        self.buf.clear()
        self.waiter.set_result((self.status, self.head, body))

    def _read_head(self) -> bool:
        """Parse the answer's head once it is complete; False while it is not."""
        end = self.buf.find(HEAD_END)
        if end < 0:
            return False
        self.head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        self.status = int(self.head[9:12])
        if CLOSE_RE.search(self.head):
            self.usable = False
        if self.status in (204, 304) or self.status < 200:
            self.need = 0
        elif match := LENGTH_RE.search(self.head):
            self.need = int(match[1])
        else:
            self.need, self.usable = -1, False
        return True

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.need, self.head = None, b""
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()


def answer_kind(status: int, body: bytes) -> str:
    """The status as counted: 204, ``429 rate``/``429 cap`` (which limit), ``5xx``, ..."""
    if status == 429:
        if b"heartbeats this minute" in body:
            return "429 rate"
        if b"live SDK instances" in body:
            return "429 cap"
        return "429"
    return "5xx" if status >= 500 else str(status)


@dataclass
class PhaseTally:
    """The heartbeats of one phase: answers by kind, socket errors, latencies (ms)."""

    answers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: array[float] = field(default_factory=lambda: array("f"))  # send -> answer
    delay: array[float] = field(default_factory=lambda: array("f"))  # due -> answer
    samples: dict[str, str] = field(default_factory=dict)  # answer kind -> the first such body

    def export(self) -> dict[str, Any]:
        return {
            "answers": dict(self.answers),
            "errors": dict(self.errors),
            "samples": self.samples,
            "latency": self.latency.tobytes(),
            "delay": self.delay.tobytes(),
        }


def app_counts(spec: dict[str, Any], app: int) -> list[bytes]:
    """``COUNT_VARIANTS`` JSON ``counts`` objects for one app: its ``flags_per_app`` flags (a
    fixed choice per app), each with an evaluation count since the last report."""
    rng = random.Random(f"{spec['seed']}-{app}")
    flags = spec["app_flags"][app]
    out = []
    for _ in range(COUNT_VARIANTS):
        counts = {flag: rng.randint(1, 2000) for flag in flags}
        out.append(json.dumps(counts, separators=(",", ":")).encode())
    return out


class Fleet:
    """This process's share of the SDK instances: their schedule, their heartbeats, the tallies."""

    BODY = (
        b'{"host":"%s","pid":%d,"sdk":"python/%s","app":"%s","mode":"stream","applied_version":%d,'
        b'"source":"server","stale":false,"last_error":null,"counts":%s}'
    )

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.first, self.n = spec["first"], spec["last"] - spec["first"]
        self.version = spec["version"]
        self.interval = array("d", [spec["interval"]]) * self.n
        self.jitter = array("d", [spec["jitter"]]) * self.n
        self.counts = [app_counts(spec, a) for a in range(spec["apps"])]
        self.heads = [self._head(token) for token in spec["tokens"]]
        self.rng = random.Random(f"{spec['seed']}-{self.first}")
        self.heap: list[tuple[float, int, int]] = []
        self.queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()
        self.tallies: defaultdict[str, PhaseTally] = defaultdict(PhaseTally)
        self.answered_by_s: Counter[int] = Counter()
        self.refused_by_s: Counter[int] = Counter()  # answers other than 204, and socket errors
        self.known = bytearray(self.n)  # 1: the server accepted a heartbeat of this instance
        self.state = bytearray(self.n)  # IDLE, QUEUED, QUEUED_CHANGE or IN_FLIGHT
        self.change_due = array("d", [0.0]) * self.n  # when its change report was due
        self.next_due = array("d", [0.0]) * self.n  # its next periodic report (older heap entries: stale)
        self.due_by_s: Counter[int] = Counter()  # periodic reports that came due, per second
        self.skipped = 0  # periodic reports due while the instance's previous one was pending
        self.burst_at = math.inf
        self.pending_changes = 0
        self.last_change_answer = math.nan
        self.burst_done: asyncio.Event = asyncio.Event()
        self.backlog_at_stop = 0
        self.stopping = False

    def _head(self, token: str) -> tuple[bytes, bytes]:
        """A heartbeat's request head, around the instance id and the body length."""
        close = "Connection: close\r\n" if self.spec["close"] else ""
        before = f"POST /api/v1/envs/{self.spec['env']}/clients/"
        after = (
            f" HTTP/1.1\r\nHost: {HOST}:{self.spec['port']}\r\nAuthorization: Bearer {token}\r\n{close}"
            "Content-Type: application/json\r\nContent-Length: "
        )
        return before.encode(), after.encode()

    def instance_id(self, index: int) -> bytes:
        """A 32-hex-digit id, as the SDK's ``uuid4().hex``, unique in the run."""
        return b"%s%08x" % (self.spec["salt"].encode(), self.first + index)

    def request(self, index: int) -> bytes:
        """The heartbeat of instance ``index`` (of this process) as the Python SDK sends it."""
        number = self.first + index
        app = number % self.spec["apps"]
        counts = self.counts[app][self.rng.randrange(COUNT_VARIANTS)]
        body = self.BODY % (
            b"app-%02d-host-%05d" % (app, number // 8),
            1000 + number % 30000,
            SDK_VERSION.encode(),
            b"app-%02d" % app,
            self.version,
            counts,
        )
        before, after = self.heads[number % len(self.heads)]
        return b"".join((before, self.instance_id(index), after, b"%d\r\n\r\n" % len(body), body))

    def start(self, start_at: float) -> None:
        """Every instance's first report, spread over one interval (a fleet already running)."""
        for index in range(self.n):
            due = start_at + self.rng.uniform(0, self.interval[index])
            self.next_due[index] = due
            self.heap.append((due, index, PERIODIC))
        heapq.heapify(self.heap)

    def change(self, version: int, at: float) -> None:
        """A change applied at ``at``: every instance reports within its jitter; the periodic
        schedule runs on."""
        self.version, self.burst_at, self.pending_changes = version, at, self.n
        for index in range(self.n):
            self.change_due[index] = at + self.rng.uniform(0, self.jitter[index])
            heapq.heappush(self.heap, (self.change_due[index], index, CHANGE))

    def phase_of(self, sent: float, kind: int) -> str:
        """By the time a heartbeat is sent (when overloaded, the due ones wait for a connection)."""
        if kind == CHANGE:
            return "burst, change reports"
        if sent >= self.burst_at:
            return "burst, periodic"
        return "steady" if sent >= self.spec["measure_at"] else "warmup"

    async def dispatch(self) -> None:
        """Move due reports to the queue the connections take from; reschedule periodic ones."""
        while not self.stopping:
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                due, index, kind = heapq.heappop(self.heap)
                if kind == PERIODIC:
                    if due != self.next_due[index]:
                        continue  # rescheduled since: a new interval was adopted
                    self.next_due[index] = due + self.interval[index]
                    heapq.heappush(self.heap, (self.next_due[index], index, PERIODIC))
                    self.due_by_s[int(due - self.spec["start_at"])] += 1
                    self.due_periodic(due, index)
                else:
                    self.due_change(now, index)
            await asyncio.sleep(TICK_S)

    def due_periodic(self, due: float, index: int) -> None:
        """A periodic report is due: queued, unless the instance's previous one is still pending
        (the SDK reports from one thread: a report waits for the one before it, none piles up)."""
        if self.state[index] == IDLE:
            self.state[index] = QUEUED
            self.queue.put_nowait((due, index))
        else:
            self.skipped += 1

    def due_change(self, now: float, index: int) -> None:
        """A change report is due: queued, or a queued periodic one becomes it (it will carry
        the new version); after a report in flight, it goes as soon as that one is answered."""
        if self.state[index] == IDLE:
            self.queue.put_nowait((self.change_due[index], index))
            self.state[index] = QUEUED_CHANGE
        elif self.state[index] == QUEUED:
            self.state[index] = QUEUED_CHANGE
        elif self.state[index] == IN_FLIGHT:
            heapq.heappush(self.heap, (now + RETRY_S, index, CHANGE))

    async def connection(self) -> None:
        """One connection slot: take the next due report, send it, record the answer."""
        conn: HttpConn | None = None
        while (item := await self.queue.get()) is not None:
            due, index = item
            kind = CHANGE if self.state[index] == QUEUED_CHANGE else PERIODIC
            self.state[index] = IN_FLIGHT
            try:
                conn = await self.send(conn, self.change_due[index] if kind == CHANGE else due, index, kind)
            finally:
                self.state[index] = IDLE
        if conn is not None:
            conn.close()

    async def send(self, conn: HttpConn | None, due: float, index: int, kind: int) -> HttpConn | None:
        """One heartbeat, on ``conn`` if it is still open (else a new connection); once more on
        a new connection if a kept-alive one turns out closed. The connection to use next."""
        loop, data = asyncio.get_running_loop(), self.request(index)
        for attempt in (0, 1):
            fresh = conn is None or not conn.usable or self.spec["close"]
            if fresh:
                if conn is not None:
                    conn.close()
                try:
                    _, conn = await loop.create_connection(HttpConn, HOST, self.spec["port"])
                except OSError as exc:
                    self.failed(self.phase_of(time.monotonic(), kind), kind, f"connect: {type(exc).__name__}")
                    return None
            assert conn is not None
            sent = time.monotonic()
            phase = self.phase_of(sent, kind)
            waiter = conn.request(data)
            timer = loop.call_later(REQUEST_TIMEOUT_S, _expire, waiter)
            try:
                status, head, body = await waiter
            except (OSError, TimeoutError) as exc:
                conn.close()
                conn = None
                if fresh or attempt:
                    self.failed(phase, kind, type(exc).__name__)
                    return None
                continue
            finally:
                timer.cancel()
            self.answered(self.tallies[phase], due, sent, index, kind, status, head, body)
            return conn
        return None

    def answered(
        self,
        tally: PhaseTally,
        due: float,
        sent: float,
        index: int,
        kind: int,
        status: int,
        head: bytes,
        body: bytes,
    ) -> None:
        now = time.monotonic()
        kind_of_answer = answer_kind(status, body)
        tally.answers[kind_of_answer] += 1
        if status != 204 and kind_of_answer not in tally.samples:
            tally.samples[kind_of_answer] = body[:160].decode(errors="replace")
        tally.latency.append((now - sent) * 1000)
        tally.delay.append((now - due) * 1000)
        second = int(now - self.spec["start_at"])
        self.answered_by_s[second] += 1
        if status != 204:
            self.refused_by_s[second] += 1
        else:
            self.known[index] = 1
            self.advised(index, head)
        if kind == CHANGE:
            self.change_done(now)

    def advised(self, index: int, head: bytes) -> None:
        """Adopt the interval and jitter the answer announces, within the SDK's bounds."""
        if match := INTERVAL_RE.search(head):
            before = self.interval[index]
            self.interval[index] = min(max(float(match[1]), INTERVAL_BOUNDS[0]), INTERVAL_BOUNDS[1])
            due = _rescheduled(
                self.next_due[index], before, self.interval[index], time.monotonic(), self.rng.uniform
            )
            if due != self.next_due[index]:
                self.next_due[index] = due
                heapq.heappush(self.heap, (due, index, PERIODIC))
        if match := JITTER_RE.search(head):
            self.jitter[index] = min(max(float(match[1]), JITTER_BOUNDS[0]), JITTER_BOUNDS[1])

    def failed(self, phase: str, kind: int, what: str) -> None:
        self.tallies[phase].errors[what] += 1
        self.refused_by_s[int(time.monotonic() - self.spec["start_at"])] += 1
        if kind == CHANGE:
            self.change_done(math.nan)

    def change_done(self, at: float) -> None:
        self.pending_changes -= 1
        if not math.isnan(at):
            self.last_change_answer = (
                at if math.isnan(self.last_change_answer) else max(self.last_change_answer, at)
            )
        if self.pending_changes == 0:
            self.burst_done.set()

    def stop(self, conns: int) -> None:
        """Stop dispatching, drop what waits for a connection, and end the connection slots."""
        self.stopping = True
        while not self.queue.empty():
            if self.queue.get_nowait() is not None:
                self.backlog_at_stop += 1
        for _ in range(conns):
            self.queue.put_nowait(None)

    def result(self, lag_ms: float) -> dict[str, Any]:
        return {
            "tallies": {name: t.export() for name, t in self.tallies.items()},
            "answered_by_s": dict(self.answered_by_s),
            "due_by_s": dict(self.due_by_s),
            "refused_by_s": dict(self.refused_by_s),
            "last_change_answer": self.last_change_answer,
            "pending_changes": self.pending_changes if self.burst_at < math.inf else None,
            "backlog_at_stop": self.backlog_at_stop,
            "skipped": self.skipped,
            "known": sum(self.known),
            "intervals": sorted(set(self.interval)),
            "jitters": sorted(set(self.jitter)),
            "lag_ms": lag_ms,
        }


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no answer in {REQUEST_TIMEOUT_S:.0f} s"))


async def lag_probe(out: list[float]) -> None:
    """The event loop's worst oversleep (ms): if it grows, the load generator is the bottleneck."""
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        out[0] = max(out[0], (time.monotonic() - t0 - 0.05) * 1000)


async def fleet_main(spec: dict[str, Any], control: Any, results: Any) -> None:
    """Run this process's instances until told to stop; on ``change``, the burst."""
    loop = asyncio.get_running_loop()
    fleet = Fleet(spec)
    fleet.start(spec["start_at"])
    lag = [0.0]
    background = [asyncio.create_task(c) for c in (fleet.dispatch(), lag_probe(lag))]
    slots = [asyncio.create_task(fleet.connection()) for _ in range(spec["conns"])]
    burst_task: asyncio.Task[None] | None = None

    async def report_burst() -> None:
        await fleet.burst_done.wait()
        results.put(("burst_done", spec["first"], fleet.last_change_answer))

    while True:
        message = await loop.run_in_executor(None, control.get)
        if message[0] == "change":
            fleet.change(message[1], message[2])
            burst_task = asyncio.create_task(report_burst())
        elif message[0] == "stop":
            break
    fleet.stop(spec["conns"])
    await asyncio.wait(slots, timeout=REQUEST_TIMEOUT_S + 2)
    for task in [*background, *slots, *([burst_task] if burst_task else [])]:
        task.cancel()
    results.put(("result", spec["first"], fleet.result(lag[0])))


def fleet_process(spec: dict[str, Any], control: Any, results: Any) -> None:
    """Entry point of one load-generator process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the benchmark stops us (SIGTERM)
    raise_fd_limit()
    if spec["nice"]:
        os.nice(spec["nice"])
    try:
        asyncio.run(fleet_main(spec, control, results))
    except Exception as exc:  # noqa: BLE001 - reported by the benchmark
        results.put(("error", spec["first"], f"{type(exc).__name__}: {exc}"))


class LoadGen:
    """The load-generator processes, each with a share of the instances and connections."""

    def __init__(self, spec: dict[str, Any], procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.results: Any = ctx.Queue()
        self.controls: list[Any] = []
        self.procs: list[Any] = []
        n, conns = spec["instances"], spec["conns"]
        for k in range(procs):
            control = ctx.Queue()
            share = {
                **spec,
                "first": n * k // procs,
                "last": n * (k + 1) // procs,
                "conns": max(1, conns * (k + 1) // procs - conns * k // procs),
            }
            proc = ctx.Process(target=fleet_process, args=(share, control, self.results), daemon=True)
            proc.start()
            self.controls.append(control)
            self.procs.append(proc)

    def processes(self) -> list[psutil.Process]:
        out = []
        for proc in self.procs:
            with contextlib.suppress(psutil.Error, ValueError):
                if proc.pid is not None and proc.is_alive():
                    out.append(psutil.Process(proc.pid))
        return out

    def tell(self, *message: Any) -> None:
        for control in self.controls:
            control.put(message)

    def wait_burst(self, timeout: float) -> tuple[bool, float]:
        """Until every process had all its change reports answered (or failed): (all done, the
        last answer's monotonic time)."""
        deadline, done, last = time.monotonic() + timeout, 0, math.nan
        while done < len(self.procs):
            try:
                kind, _, value = self.results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return False, last
            if kind == "error":
                raise RuntimeError(f"load generator failed: {value}")
            done += kind == "burst_done"
            last = value if math.isnan(last) else max(last, value)
        return True, last

    def collect(self) -> list[dict[str, Any]]:
        """Stop the processes and gather their results."""
        self.tell("stop")
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 30
        while len(out) < len(self.procs):
            try:
                kind, _, value = self.results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("the load generator sent no result in time") from None
            if kind == "error":
                raise RuntimeError(f"load generator failed: {value}")
            if kind == "result":
                out.append(value)
        return out

    def kill(self) -> None:
        for proc in self.procs:
            proc.join(5 if not proc.is_alive() else 0.1)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# -- Redis: commands and memory --------------------------------------------------------------------


@dataclass
class RedisMark:
    """Calls per command and bytes sent to clients, at one moment."""

    t: float
    calls: dict[str, int]
    out_bytes: int


def redis_mark(r: redis.Redis) -> RedisMark:
    stats = r.info("commandstats")
    out = int(r.info("stats")["total_net_output_bytes"])
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return RedisMark(time.monotonic(), calls, out)


def calls_between(a: RedisMark, b: RedisMark) -> Counter[str]:
    """Commands between two marks, less this bench's own (2 INFO per mark)."""
    diff = Counter({k: v - a.calls.get(k, 0) for k, v in b.calls.items() if v - a.calls.get(k, 0)})
    diff["info"] -= 2
    return +diff


@dataclass
class CommandFigures:
    """Redis commands with no load: idle per worker per second, per change per worker."""

    label: str
    workers: int
    idle: dict[str, float]  # command -> calls per worker per second
    idle_bytes: float  # bytes to clients per worker per second
    change: dict[str, float] = field(default_factory=dict)  # command -> calls per change per worker
    change_bytes: float = math.nan  # bytes to clients per change per worker
    changes: int = 0
    cpu: CpuUsage | None = None  # while idle

    @property
    def idle_total(self) -> float:
        return sum(self.idle.values())

    @property
    def change_total(self) -> float:
        return sum(self.change.values()) if self.change else math.nan


def idle_commands(server: Server, r: redis.Redis, seconds: float, label: str) -> CommandFigures:
    """Commands per worker per second over ``seconds`` of no load, and the cores used meanwhile."""
    workers = len(all_workers(server))
    with CpuMeter(server) as meter:
        a = redis_mark(r)
        time.sleep(seconds)
        b = redis_mark(r)
    wall = b.t - a.t
    per = {k: v / wall / workers for k, v in calls_between(a, b).items()}
    return CommandFigures(label, workers, per, (b.out_bytes - a.out_bytes) / wall / workers, cpu=meter.usage)


def mean_idle(a: CommandFigures, b: CommandFigures) -> CommandFigures:
    """The idle rates of two counts (before and after the changes), averaged."""
    idle = {k: (a.idle.get(k, 0.0) + b.idle.get(k, 0.0)) / 2 for k in set(a.idle) | set(b.idle)}
    return CommandFigures(a.label, a.workers, idle, (a.idle_bytes + b.idle_bytes) / 2, cpu=a.cpu)


def per_change(fig: CommandFigures, a: RedisMark, b: RedisMark, changes: int) -> CommandFigures:
    """The commands between marks ``a`` and ``b`` beyond the idle rate, per change per worker."""
    wall, w = b.t - a.t, fig.workers
    idle = {k: v * w * wall for k, v in fig.idle.items()}
    calls = calls_between(a, b)
    change = {k: (calls.get(k, 0) - idle.get(k, 0.0)) / changes / w for k in set(calls) | set(idle)}
    fig.change = {k: v for k, v in change.items() if abs(v) >= 0.005}
    fig.change_bytes = (b.out_bytes - a.out_bytes - fig.idle_bytes * w * wall) / changes / w
    fig.changes = changes
    return fig


BUCKET_UNITS = (1, 10, 60, 300, 3600, 86400)  # seconds a numeric part of a key name may count in
FOLD_AT = 5  # groups differing only in their last part fold into one when there are this many


def key_group(name: str, base: str, now: float) -> tuple[str, int | None, int]:
    """A key's group (its name past the environment's prefix, numbers and ids as ``*``) and, for
    a time bucket (a numeric part that counts seconds, minutes, ... near now), its unit and number."""
    parts = name[len(base) + 1 :].split(":")
    unit, number = None, 0
    for part in parts:
        if part.isdigit():
            unit = next((u for u in BUCKET_UNITS if abs(int(part) * u - now) < 2 * 86400), None)
            if unit is not None:
                number = int(part)
                break
    shape = ["*" if p.isdigit() or re.fullmatch(r"[0-9a-f]{8,}", p) else p for p in parts]
    return ":".join(shape), unit, number


@dataclass
class KeyGroup:
    """Keys of one shape: their count and bytes and, for time buckets, the bytes per bucket."""

    keys: int = 0
    bytes: int = 0
    bucket_unit: int | None = None
    buckets: Counter[int] = field(default_factory=Counter)  # bucket number -> bytes
    retained_buckets: int = 0  # from the buckets' TTLs; 0: no TTL (kept until deleted)

    def merge(self, other: KeyGroup) -> None:
        self.keys += other.keys
        self.bytes += other.bytes
        self.bucket_unit = self.bucket_unit or other.bucket_unit
        self.buckets.update(other.buckets)
        self.retained_buckets = max(self.retained_buckets, other.retained_buckets)

    @property
    def largest_bucket(self) -> int:
        return max(self.buckets.values(), default=0)

    @property
    def projected(self) -> float:
        """Its bytes once every retained bucket is as full as the largest one seen."""
        if self.bucket_unit is None:
            return float(self.bytes)
        if not self.retained_buckets:
            return math.inf
        return float(max(self.bytes, self.largest_bucket * self.retained_buckets))


def env_memory(r: redis.Redis, env: str) -> dict[str, KeyGroup]:
    """``MEMORY USAGE`` of every key of ``env`` (SCAN of ``flagsvc:{env}:*``), by group."""
    base, now = EnvKeys(env).base, time.time()
    groups: defaultdict[str, KeyGroup] = defaultdict(KeyGroup)
    for name in r.scan_iter(match=f"{base}:*", count=1000):
        size = r.memory_usage(name, samples=0) or 0
        shape, unit, number = key_group(name, base, now)
        group = groups[shape]
        group.keys += 1
        group.bytes += size
        if unit is not None:
            group.bucket_unit = unit
            group.buckets[number] += size
            ttl = r.ttl(name)
            if ttl > 0:
                kept = math.ceil((ttl + now - number * unit) / unit)
                group.retained_buckets = max(group.retained_buckets, kept)
    return dict(groups)


def fold(groups: dict[str, KeyGroup], names: set[str]) -> dict[str, KeyGroup]:
    """Groups whose names differ only in their last part (among ``names``) fold into one, when
    there are ``FOLD_AT`` of them or more (e.g. one per app or per flag)."""
    siblings = Counter(name.rpartition(":")[0] for name in names if ":" in name)
    out: defaultdict[str, KeyGroup] = defaultdict(KeyGroup)
    for name, group in groups.items():
        parent = name.rpartition(":")[0]
        out[f"{parent}:*" if parent and siblings[parent] >= FOLD_AT else name].merge(group)
    return dict(out)


@dataclass
class Memory:
    """The environment's Redis memory before and after the fleet."""

    before: dict[str, KeyGroup]
    after: dict[str, KeyGroup]
    used_before: int
    used_after: int
    used_peak: int

    def __post_init__(self) -> None:
        names = set(self.before) | set(self.after)
        self.before, self.after = fold(self.before, names), fold(self.after, names)

    def growth(self, projected: bool) -> float:
        """Bytes the fleet added to the environment's keys (the usage data); ``projected``: with
        every bucket kept as full as the largest one seen."""
        total = 0.0
        for name, group in self.after.items():
            was = self.before.get(name, KeyGroup())
            total += (group.projected if projected else group.bytes) - was.bytes
        return total


# -- the operator during the fleet -----------------------------------------------------------------


class Operator(threading.Thread):
    """Through the control listener, one after the other ``gap`` s apart: kill/restore of
    ``bench.kill`` in ``bench`` (production's version stays put) and a dry run of a kill in
    ``production`` (its blast radius). Samples are (monotonic end, ms)."""

    def __init__(self, server: Server, token: str, dry_key: str, gap: float) -> None:
        super().__init__(daemon=True)
        base = f"http://{HOST}:{server.control_port}"
        self.flipper = Flipper(base, token, FLIP_ENV)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.dry_url = f"{base}/api/v1/envs/{PROD}/flags/{dry_key}/kill"
        self.gap, self.stop = gap, threading.Event()
        self.kills: list[tuple[float, float]] = []
        self.dry_runs: list[tuple[float, float]] = []
        self.failures: Counter[str] = Counter()
        self.blast: dict[str, Any] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.kill()
            if self.stop.wait(self.gap):
                break
            self.dry_run()
            self.stop.wait(self.gap)

    def kill(self) -> None:
        try:
            ms = self.flipper.flip()
            self.kills.append((time.monotonic(), ms))
        except (RuntimeError, requests.RequestException) as exc:
            self.failures[f"kill/restore: {str(exc)[:60]}"] += 1
            with contextlib.suppress(RuntimeError, requests.RequestException, ValueError):
                got = call(self.flipper.session, "GET", self.flipper.url, {200})
                self.flipper.enabled = bool(got.json()["enabled"])

    def dry_run(self) -> None:
        body: dict[str, Any] = {"reason": "fleet bench: blast radius", "dry_run": True}
        t0 = time.perf_counter()
        try:
            response = self.session.post(self.dry_url, json=body, timeout=harness.HTTP_TIMEOUT_S)
        except requests.RequestException as exc:
            self.failures[f"dry run: {type(exc).__name__}"] += 1
            return
        ms = (time.perf_counter() - t0) * 1000
        if response.status_code != 200 or response.json().get("dry_run") is not True:
            self.failures[f"dry run: {response.status_code}"] += 1
            return
        self.dry_runs.append((time.monotonic(), ms))
        self.blast = response.json().get("blast_radius") or {}

    def close(self) -> None:
        """Stop (if started) and close the connections; again is harmless."""
        self.stop.set()
        if self.is_alive():
            self.join(harness.HTTP_TIMEOUT_S + 5)
        self.flipper.close()
        self.session.close()


def within(samples: Sequence[tuple[float, float]], start: float, end: float) -> list[float]:
    return [ms for t, ms in samples if start <= t < end]


# -- setup ---------------------------------------------------------------------------------------


@dataclass
class Tokens:
    operator: str  # kills, restores and dry runs, in every environment
    sdk: list[str]  # the fleet's, in production


def token_store(server: Server) -> TokenStore:
    socket_path = running_socket(server.data_dir)
    if socket_path is None:
        raise RuntimeError(f"no embedded Redis running for {server.data_dir}")
    return TokenStore(connect(url_for_socket(socket_path)))


def create_tokens(
    server: Server, prefix: str, n: int, role: Role, threads: int = 1, envs: Sequence[str] = (PROD,)
) -> list[str]:
    """``n`` tokens of ``envs`` (none: every environment) through ``TokenStore.create`` (audited
    and announced, as ``flagsvc token create`` makes them), ``threads`` at a time."""
    secrets_out: list[str] = [""] * n

    def work(k: int) -> None:
        store = token_store(server)
        for i in range(k, n, threads):
            _, secret = store.create(
                name=f"{prefix}-{i:05d}", role=role, envs=list(envs), actor="fleet-bench"
            )
            secrets_out[i] = secret

    pool = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if not all(secrets_out):
        raise RuntimeError(f"only {sum(map(bool, secrets_out))} of {n} tokens were created")
    return secrets_out


def all_workers(server: Server) -> list[psutil.Process]:
    """The gunicorn workers of both listeners: each holds its own snapshot and token caches."""
    out = []
    assert server.proc is not None
    with contextlib.suppress(psutil.Error):
        for master in psutil.Process(server.proc.pid).children():
            out += master.children()
    return out


def probe_heartbeat(server: Server, token: str, version: int) -> tuple[float, float]:
    """One heartbeat from this process: the interval and jitter the answer announces."""
    url = f"{server.base}/api/v1/envs/{PROD}/clients/fleet-bench-probe"
    body: dict[str, Any] = {"app": "fleet-probe", "applied_version": version, "counts": {}}
    answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    if answer.status_code != 204:
        raise RuntimeError(f"probe heartbeat -> {answer.status_code}: {answer.text[:300]}")
    interval = float(answer.headers.get("X-Flagsvc-Report-Interval", 30))
    jitter = float(answer.headers.get("X-Flagsvc-Report-Jitter", 1))
    return interval, jitter


def app_flags(flags: list[str], apps: int, per_app: int, seed: str) -> list[list[str]]:
    """Per app, the flags it evaluates: a fixed random choice of ``per_app`` of the environment's."""
    out = []
    for app in range(apps):
        rng = random.Random(f"{seed}-flags-{app}")
        out.append(sorted(rng.sample(flags, min(per_app, len(flags)))))
    return out


def add_flags(server: Server, admin: requests.Session, count: int) -> int:
    """``count`` more realistic flags in production, 40 per definitions apply (body limit)."""
    url = f"{server.base}/api/v1/envs/{PROD}/definitions/apply"
    extra = [(f"big.{key}", flag) for key, flag in harness.realistic_flags(count)]
    for i in range(0, len(extra), 40):
        body = {"definitions": {"flags": dict(extra[i : i + 40])}, "reason": "fleet bench: a big environment"}
        call(admin, "POST", url, {200}, json=body)
    return len(call(admin, "GET", f"{server.base}/api/v1/envs/{PROD}/flags", {200}).json()["flags"])


# -- the load generator alone ----------------------------------------------------------------------

NGINX_CONF = """worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {root}/nginx-body;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  server {{
    listen {host}:{port};
    location / {{
      add_header X-Flagsvc-Report-Interval {interval:g} always;
      add_header X-Flagsvc-Report-Jitter {jitter:g} always;
      return 204;
    }}
  }}
}}
"""


@dataclass
class SinkFigures:
    """The load generator against nginx answering 204 at once: its own ceiling."""

    wanted: float
    achieved: float
    loadgen_cores: float
    nginx_cores: float
    others: float
    latency: dict[str, float]
    lag_ms: float


@contextlib.contextmanager
def nginx_sink(root: Path, interval: float, jitter: float) -> Iterator[tuple[int, list[psutil.Process]]]:
    """nginx on a free port answering every request 204 with the heartbeat headers; its port and
    processes. Nothing (an empty list) without nginx on this machine."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        yield 0, []
        return
    port = harness.free_port()
    conf = NGINX_CONF.format(root=root, host=HOST, port=port, interval=interval, jitter=jitter)
    (root / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [nginx, "-c", str(root / "nginx.conf"), "-p", str(root)], stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        yield port, [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]
    finally:
        proc.terminate()
        proc.wait(10)


def run_sink(args: argparse.Namespace, root: Path, tag: str) -> SinkFigures | None:
    """The fleet's heartbeats for ``--warmup`` + ``--duration`` s, sent to nginx instead of
    flagsvc: what the load generator alone can send, and what it costs."""
    interval, jitter = announced("INTERVAL"), announced("JITTER")
    with nginx_sink(root, interval, jitter) as (port, nginx):
        if not nginx:
            log(f"{tag} sink: no nginx on this machine; skipped")
            return None
        flags = [f for f, _ in harness.realistic_flags(args.flags)]
        tokens = Tokens(operator="", sdk=[f"fsk_sink{i:02d}_{'x' * 43}" for i in range(args.sdk_tokens)])
        spec = fleet_spec_for(port, args, tokens, flags, 1, interval, jitter)
        loadgen = LoadGen(spec, args.loadgen_procs)
        try:
            time.sleep(max(0.0, spec["measure_at"] - time.monotonic()))
            used = cores_used({"nginx": nginx, "loadgen": loadgen.processes()}, args.duration)
            parts = loadgen.collect()
        finally:
            loadgen.kill()
    answered = sum_by_second(parts, "answered_by_s")
    first, seconds = int(spec["measure_at"] - spec["start_at"]), int(args.duration)
    rate = sum(v for s, v in answered.items() if first <= s < first + seconds) / seconds
    steady = merge_tallies(parts).get("steady", {})
    sink = SinkFigures(
        wanted=args.instances / interval,
        achieved=rate,
        loadgen_cores=used["loadgen"],
        nginx_cores=used["nginx"],
        others=used["others"],
        latency=steady.get("latency", {}),
        lag_ms=max(p["lag_ms"] for p in parts),
    )
    log(
        f"{tag} sink (nginx answering 204): {rate:,.0f}/s answered of {sink.wanted:,.0f}/s wanted; cores: "
        f"load generator {sink.loadgen_cores:.2f} ({sink.loadgen_cores / max(rate, 1e-6) * 1e6:.0f} us per "
        f"heartbeat), nginx {sink.nginx_cores:.2f}, others {sink.others:.2f}; latency {fmt_p(sink.latency)}; "
        f"loop lag max {sink.lag_ms:.0f} ms"
    )
    return sink


def cores_used(groups: dict[str, list[psutil.Process]], seconds: float) -> dict[str, float]:
    """Cores used by each group of processes over ``seconds`` from now, and by the rest of the
    machine ("others")."""
    before = {name: [cpu_seconds(p) for p in procs] for name, procs in groups.items()}
    machine, t0 = machine_seconds(), time.monotonic()
    time.sleep(seconds)
    wall, machine = time.monotonic() - t0, machine_seconds() - machine
    used = {
        name: sum(cpu_seconds(p) - b for p, b in zip(procs, before[name], strict=True)) / wall
        for name, procs in groups.items()
    }
    used["others"] = max(0.0, machine / wall - sum(used.values()))
    return used


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def machine_seconds() -> float:
    """CPU seconds the whole machine used (idle, I/O wait and steal aside)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


def expected_pace(instances: int) -> Pace:
    """What the server tells a fleet of ``instances`` once housekeeping has counted it (the same
    ``FLAGSVC_*`` settings as the server's)."""
    return pace_for(limits_from(service_config()), instances)


def announced(what: str) -> float:
    """The heartbeat interval or jitter ``flagsvc serve`` announces with this environment."""
    return float(service_config()[f"HEARTBEAT_{what}_SECONDS"])


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class FleetFigures:
    """What the fleet phase measured."""

    instances: int
    interval: float
    jitter: float
    tallies: dict[str, dict[str, Any]]  # phase -> answers, errors, latency/delay percentiles
    steady_s: float
    wanted_rate: float
    achieved_rate: float
    burst_drain_s: float  # from the kill's answer to the last change report's answer
    burst_done: bool
    burst_timeline: list[tuple[int, int, int]]  # (second from the kill, answered, refused)
    backlog: int
    known: int  # instances the server accepted a heartbeat of
    skipped: int  # periodic reports due while the instance's previous one was still pending
    kill: dict[str, float]
    dry: dict[str, float]
    kill_burst: dict[str, float]  # kill/restore during the burst
    dry_burst: dict[str, float]
    blast: dict[str, Any]
    operator_failures: dict[str, int]
    memory: Memory
    cpu: CpuUsage | None
    split: dict[str, float]
    loadgen_lag_ms: float
    intervals: list[float]
    hb_cpu_ms: float  # main workers' CPU per heartbeat
    loadgen_us: float  # the load generator's CPU per heartbeat

    @property
    def scale(self) -> float:
        """From the instances the server knows to the whole fleet (1 when every one reported)."""
        return self.instances / self.known if self.known else math.nan

    @property
    def usage_mb(self) -> float:
        """The usage data once every bucket kept is full, scaled to the whole fleet as if it grew
        in proportion to the instances (an upper bound where part of it is per app or per flag)."""
        return self.memory.growth(True) * max(1.0, self.scale) / MiB

    def change_reports(self, answer: Callable[[str], bool]) -> int:
        tally = self.tallies.get("burst, change reports", {})
        return sum(n for kind, n in tally.get("answers", {}).items() if answer(kind))


@dataclass
class RunResult:
    commands: list[CommandFigures] = field(default_factory=list)
    fleet: FleetFigures | None = None
    sink: SinkFigures | None = None
    tokens: int = 0
    token_rate: float = math.nan
    pss_mb: dict[str, float] = field(default_factory=dict)  # moment -> service PSS without Redis
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)


def service_pss(server: Server) -> float:
    """PSS of the service's processes (``flagsvc serve``, gunicorn masters and workers; the
    embedded Redis aside), MiB."""
    total = 0
    for proc in server.processes():
        with contextlib.suppress(psutil.Error):
            if "redis" not in proc.name():
                total += proc.memory_full_info().pss
    return total / MiB


def merge_tallies(parts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The load processes' tallies, per phase: answers, errors, latency and delay percentiles."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for phase, t in part["tallies"].items():
            m = merged.setdefault(
                phase, {"answers": Counter(), "errors": Counter(), "latency": [], "delay": []}
            )
            m["answers"].update(t["answers"])
            m["errors"].update(t["errors"])
            m["samples"] = {**t["samples"], **m.get("samples", {})}
            for series in ("latency", "delay"):
                values = array("f")
                values.frombytes(t[series])
                m[series].extend(values)
    for m in merged.values():
        m["latency"], m["delay"] = percentiles(m["latency"]), percentiles(m["delay"])
        m["answers"], m["errors"] = dict(m["answers"]), dict(m["errors"])
    return merged


def sum_by_second(parts: list[dict[str, Any]], key: str) -> Counter[int]:
    total: Counter[int] = Counter()
    for part in parts:
        total.update({int(k): v for k, v in part[key].items()})
    return total


def fleet_spec(
    server: Server, args: argparse.Namespace, tokens: Tokens, flags: list[str], version: int
) -> dict[str, Any]:
    """What the load-generator processes need: the server, the fleet, its schedule. The fleet is
    one already running at the pace the server gives a fleet of its size (``expected_pace``); the
    server, fresh, has not counted it yet and tells the first reports its starting pace."""
    start_interval, start_jitter = probe_heartbeat(server, tokens.sdk[0], version)
    pace = expected_pace(args.instances)
    spec = fleet_spec_for(server.port, args, tokens, flags, version, pace.interval, pace.jitter)
    return {**spec, "start_interval": start_interval, "start_jitter": start_jitter}


def fleet_spec_for(
    port: int,
    args: argparse.Namespace,
    tokens: Tokens,
    flags: list[str],
    version: int,
    interval: float,
    jitter: float,
) -> dict[str, Any]:
    start_at = time.monotonic() + SPAWN_S
    return {
        "env": PROD,
        "port": port,
        "tokens": tokens.sdk,
        "instances": args.instances,
        "apps": args.apps,
        "app_flags": app_flags(flags, args.apps, args.flags_per_app, str(args.seed)),
        "version": version,
        "interval": interval,
        "jitter": jitter,
        "start_at": start_at,
        "measure_at": start_at + args.warmup,
        "conns": args.conns,
        "close": args.close,
        "nice": args.loadgen_nice,
        "seed": str(args.seed),
        "salt": secrets.token_hex(12),
    }


@dataclass
class FleetMarks:
    """When the parts of the fleet phase happened (monotonic), and what was measured meanwhile."""

    steady_end: float = math.nan  # the burst's kill was sent
    kill_answered: float = math.nan
    burst_end: float = math.nan
    burst_done: bool = False
    last_change_answer: float = math.nan
    cpu: CpuUsage | None = None
    split: dict[str, float] = field(default_factory=dict)


def drive_fleet(
    server: Server, args: argparse.Namespace, spec: dict[str, Any], operator: Operator, tag: str
) -> tuple[FleetMarks, list[dict[str, Any]]]:
    """Warm-up, the steady window with the operator at work, the kill and its burst; the load
    generators' results."""
    marks, loadgen = FleetMarks(), LoadGen(spec, args.loadgen_procs)
    try:
        time.sleep(max(0.0, spec["measure_at"] - time.monotonic()))
        operator.start()
        with CpuMeter(server, loadgen.processes) as meter, ServerSplit(server) as split:
            time.sleep(args.duration)
        marks.cpu, marks.split = meter.usage, split.cores
        marks.steady_end = time.monotonic()
        version = burst_kill(server)
        marks.kill_answered = time.monotonic()
        log(
            f"{tag} burst: kill/restore of {KILL_KEY} in {PROD} (v{version}); every instance reports "
            f"it within the jitter it was told ({spec['jitter']:g} s once counted)"
        )
        loadgen.tell("change", version, marks.kill_answered)
        marks.burst_done, marks.last_change_answer = loadgen.wait_burst(args.burst_timeout)
        time.sleep(1.0)
        marks.burst_end = time.monotonic()
        operator.close()
        return marks, loadgen.collect()
    finally:
        operator.close()
        loadgen.kill()


def burst_kill(server: Server) -> int:
    """Kill or restore ``bench.kill`` in production (admin token, control listener); the
    environment version it made (``X-Flagsvc-Env-Version``: the main listener may be too busy to
    ask)."""
    url = f"http://{HOST}:{server.control_port}/api/v1/envs/{PROD}/flags/{KILL_KEY}"
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {server.token}"
        enabled = call(session, "GET", url, {200}).json()["enabled"]
        action = "kill" if enabled else "restore"
        answer = call(session, "POST", f"{url}/{action}", {200}, json={"reason": "fleet bench: the burst"})
    return int(answer.headers["X-Flagsvc-Env-Version"])


def run_fleet(
    server: Server, args: argparse.Namespace, tokens: Tokens, flags: list[str], tag: str
) -> FleetFigures:
    """The fleet phase (:func:`drive_fleet`), and the environment's Redis memory around it."""
    r = redis_for(server, socket_timeout=60)
    with requests.Session() as admin:
        admin.headers["Authorization"] = f"Bearer {server.token}"
        spec = fleet_spec(server, args, tokens, flags, harness.current_version(server, admin))
    dry_key = Counter(f for chosen in spec["app_flags"] for f in chosen).most_common(1)[0][0]
    log(
        f"{tag} fleet: {args.instances:,} instances of {args.apps} apps over {len(tokens.sdk)} SDK "
        f"tokens, {args.flags_per_app} flag counts each; the server announces an interval of "
        f"{spec['start_interval']:g} s and a jitter of {spec['start_jitter']:g} s to start, "
        f"{spec['interval']:g} s and {spec['jitter']:g} s once it has counted the fleet (the pace the "
        f"fleet starts with): {args.instances / spec['interval']:,.0f} heartbeats/s wanted; {args.conns} "
        f"{'new connections (Connection: close)' if args.close else 'keep-alive connections'} from "
        f"{args.loadgen_procs} asyncio process(es); dry runs of {dry_key!r}"
    )
    memory_before, used_before = env_memory(r, PROD), int(r.info("memory")["used_memory"])
    sampler = MemorySampler(redis_for(server, socket_timeout=60))
    sampler.start()
    operator = Operator(server, tokens.operator, dry_key, args.operator_gap)
    try:
        marks, parts = drive_fleet(server, args, spec, operator, tag)
    finally:
        sampler.stop.set()
    time.sleep(args.settle)  # buffered usage reaches Redis
    used_after = int(r.info("memory")["used_memory"])
    memory = Memory(memory_before, env_memory(r, PROD), used_before, used_after, sampler.peak)
    r.close()
    return fleet_figures(args, spec, marks, parts, operator, memory)


def fleet_figures(
    args: argparse.Namespace,
    spec: dict[str, Any],
    marks: FleetMarks,
    parts: list[dict[str, Any]],
    operator: Operator,
    memory: Memory,
) -> FleetFigures:
    """The fleet phase's figures from what the load generators and the operator recorded."""
    start_at, measure_at = spec["start_at"], spec["measure_at"]
    answered = sum_by_second(parts, "answered_by_s")
    refused = sum_by_second(parts, "refused_by_s")
    due = sum_by_second(parts, "due_by_s")
    first_s, last_s = int(measure_at - start_at), int(marks.steady_end - start_at)
    rate = sum(v for s, v in answered.items() if first_s <= s < last_s) / max(1, last_s - first_s)
    wanted = sum(v for s, v in due.items() if first_s <= s < last_s) / max(1, last_s - first_s)
    kill_s = int(marks.kill_answered - start_at)
    timeline = [
        (s - kill_s, answered.get(s, 0), refused.get(s, 0))
        for s in range(kill_s, int(marks.burst_end - start_at) + 1)
    ]
    cpu = marks.cpu

    def per_heartbeat(cores: float) -> float:
        return cores / rate if rate else math.nan

    return FleetFigures(
        instances=args.instances,
        interval=spec["interval"],
        jitter=spec["jitter"],
        tallies=merge_tallies(parts),
        steady_s=args.duration,
        wanted_rate=wanted,
        achieved_rate=rate,
        burst_drain_s=marks.last_change_answer - marks.kill_answered,
        burst_done=marks.burst_done,
        burst_timeline=timeline,
        backlog=sum(p["backlog_at_stop"] for p in parts),
        known=sum(p["known"] for p in parts),
        skipped=sum(p["skipped"] for p in parts),
        kill=percentiles(within(operator.kills, measure_at, marks.steady_end)),
        dry=percentiles(within(operator.dry_runs, measure_at, marks.steady_end)),
        kill_burst=percentiles(within(operator.kills, marks.kill_answered, marks.burst_end)),
        dry_burst=percentiles(within(operator.dry_runs, marks.kill_answered, marks.burst_end)),
        blast=operator.blast,
        operator_failures=dict(operator.failures),
        memory=memory,
        cpu=cpu,
        split=marks.split,
        loadgen_lag_ms=max(p["lag_ms"] for p in parts),
        intervals=sorted({i for p in parts for i in p["intervals"]}),
        hb_cpu_ms=per_heartbeat(marks.split.get("main", math.nan)) * 1000,
        loadgen_us=per_heartbeat(cpu.loadgen if cpu else math.nan) * 1e6,
    )


def run_commands(
    server: Server, r: redis.Redis, args: argparse.Namespace, operator: str, label: str, tag: str
) -> CommandFigures:
    """With no other load: idle commands, ``--changes`` kill/restores ``--change-gap`` s apart
    in production, idle commands again; per worker per second and per change per worker."""
    workers = len(all_workers(server))
    time.sleep(args.settle)
    before = idle_commands(server, r, args.idle_seconds, label)
    flipper = Flipper(f"http://{HOST}:{server.control_port}", operator, PROD)
    try:
        a = redis_mark(r)
        for _ in range(args.changes):
            flipper.flip()
            time.sleep(args.change_gap)
        b = redis_mark(r)
    finally:
        flipper.close()
    after = idle_commands(server, r, args.idle_seconds, label)
    fig = per_change(mean_idle(before, after), a, b, args.changes)
    log(
        f"{tag} commands ({label}): idle {before.idle_total:.2f} and {after.idle_total:.2f}/s per "
        f"worker ({workers} workers) before and after {args.changes} changes; per change "
        f"{fig.change_total:.1f} per worker, {fig.change_bytes / 1024:.1f} KiB to each worker; "
        f"server {cores(before, 'server')} and others {cores(before, 'others')} cores while idle"
    )
    return fig


def cores(fig: CommandFigures, who: str) -> str:
    return f"{getattr(fig.cpu, who):.2f}" if fig.cpu else "?"


def run_tokens(server: Server, r: redis.Redis, args: argparse.Namespace, tag: str) -> list[CommandFigures]:
    """Idle commands per worker per second with the 10 tokens, then with ``--many-tokens``."""
    workers = len(all_workers(server))
    have = int(r.hlen(SystemKeys().tokens))
    time.sleep(args.settle)
    few = idle_commands(server, r, args.idle_seconds, f"{have} tokens")
    t0, missing = time.monotonic(), max(0, args.many_tokens - have)
    create_tokens(server, "fleet-idle", missing, Role.SDK, TOKEN_THREADS)
    seconds, total = time.monotonic() - t0, int(r.hlen(SystemKeys().tokens))
    log(f"{tag} tokens: {missing:,} created in {seconds:.1f} s ({missing / max(seconds, 1e-6):,.0f}/s)")
    time.sleep(args.settle)
    many = idle_commands(server, r, args.idle_seconds, f"{total:,} tokens")
    log(
        f"{tag} commands: idle {few.idle_total:.2f}/s per worker with {have} tokens, "
        f"{many.idle_total:.2f}/s with {total:,} ({workers} workers); server {cores(few, 'server')} and "
        f"{cores(many, 'server')} cores, others {cores(few, 'others')} and {cores(many, 'others')}"
    )
    return [few, many]


def settings_for(args: argparse.Namespace) -> dict[str, str]:
    """Server settings the fleet needs: the per-token instance cap above each token's share."""
    out = {}
    per_token = math.ceil(args.instances / args.sdk_tokens)
    if per_token > setting("MAX_INSTANCES_PER_TOKEN"):
        out["FLAGSVC_MAX_INSTANCES_PER_TOKEN"] = str(math.ceil(per_token * 1.2))
    return out


def setting(name: str) -> int:
    """A service setting as ``flagsvc serve`` will see it: ``FLAGSVC_<name>`` or the default."""
    return int(float(service_config()[name]))


def run_once(args: argparse.Namespace, tag: str) -> RunResult:
    """The phases asked for, each on a fresh server (no phase leaves work behind for the next)."""
    result = RunResult()
    if "sink" in args.phases:
        with scratch(args, tag) as root:
            result.sink = run_sink(args, root, tag)
    if "commands" in args.phases:
        with served(args, tag, result) as (server, r, tokens, label):
            result.commands.append(run_commands(server, r, args, tokens.operator, label, tag))
            if args.big_flags:
                with requests.Session() as admin:
                    admin.headers["Authorization"] = f"Bearer {server.token}"
                    n = add_flags(server, admin, args.big_flags)
                label = f"{n} flags, {result.tokens} tokens"
                result.commands.append(run_commands(server, r, args, tokens.operator, label, tag))
    if "tokens" in args.phases:
        with served(args, tag, result) as (server, r, tokens, _):
            result.commands += run_tokens(server, r, args, tag)
    if "fleet" in args.phases:
        with served(args, tag, result) as (server, r, tokens, _):
            result.pss_mb["idle"] = service_pss(server)
            flags = sorted(f for f, _ in harness.realistic_flags(args.flags))
            result.fleet = run_fleet(server, args, tokens, flags, tag)
            result.pss_mb["after the fleet"] = service_pss(server)
            print_fleet(tag, result.fleet)
    return result


@contextlib.contextmanager
def scratch(args: argparse.Namespace, tag: str) -> Iterator[Path]:
    """A temporary folder, removed afterwards unless ``--keep-data``."""
    root = Path(tempfile.mkdtemp(prefix="flagsvc-fleet-", dir=args.tmp_dir))
    try:
        yield root
    except BaseException:
        if (root / "server.log").exists():
            log(f"{tag} failed; server log (tail):\n{harness.tail(root / 'server.log')}")
        raise
    finally:
        if args.keep_data:
            log(f"{tag} data and server log kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def served(
    args: argparse.Namespace, tag: str, result: RunResult
) -> Iterator[tuple[Server, redis.Redis, Tokens, str]]:
    """A fresh ``flagsvc serve --control-port`` with the flags and the 10 tokens; its Redis, the
    tokens, and a label (flags, tokens); SIGTERM at the end."""
    with (
        scratch(args, tag) as root,
        Server(root, args.workers, control=True, settings=settings_for(args)) as server,
    ):
        with requests.Session() as admin:
            admin.headers["Authorization"] = f"Bearer {server.token}"
            size, version = harness.setup_flags(server, admin, args.flags)
        tokens = Tokens(
            operator=create_tokens(server, "fleet-operator", 1, Role.OPERATOR, envs=())[0],
            sdk=create_tokens(server, "fleet-sdk", args.sdk_tokens, Role.SDK),
        )
        r = redis_for(server, socket_timeout=60)
        result.tokens = int(r.hlen(SystemKeys().tokens))
        log(
            f"{tag} server up: main :{server.port} ({len(server.worker_pids())} workers, nice 5), "
            f"control :{server.control_port} (1 worker); {len(all_workers(server))} workers in all; "
            f"{args.flags + 1} flags, snapshot {size} bytes, v{version}; {result.tokens} tokens"
        )
        try:
            yield server, r, tokens, f"{args.flags + 1} flags, {result.tokens} tokens"
        finally:
            r.close()
    log(f"{tag} server stopped (SIGTERM, exit code {server.exit_code})")
    if server.exit_code != 0:
        result.problems.append(f"flagsvc serve exited with {server.exit_code} after SIGTERM")


# -- reporting ---------------------------------------------------------------------------------------


def fmt_p(p: dict[str, float], keys: Sequence[str] = ("p50", "p95", "p99", "max")) -> str:
    if not p or not p.get("n"):
        return "no samples"
    return f"n={p['n']} " + " ".join(f"{k} {p[k]:.1f}" for k in keys) + " ms"


def print_fleet(tag: str, f: FleetFigures) -> None:
    """The fleet phase in detail."""
    log(f"{tag} heartbeats, every {f.interval:g} s (latency: send to answer; delay: due to answer):")
    for phase in ("warmup", "steady", "burst, change reports", "burst, periodic"):
        if phase in f.tallies:
            print_tally(tag, phase, f.tallies[phase])
    log(
        f"{tag}   steady window: {f.achieved_rate:,.0f}/s answered of {f.wanted_rate:,.0f}/s "
        f"wanted ({f.achieved_rate / f.wanted_rate:.0%}); intervals adopted {f.intervals}; "
        f"periodic reports skipped (the instance's previous one still pending) {f.skipped:,}; "
        f"queued at the end {f.backlog:,}; load generator loop lag max {f.loadgen_lag_ms:.0f} ms"
    )
    if f.burst_done:
        log(f"{tag}   burst: the last change report answered {f.burst_drain_s:.2f} s after the kill's answer")
    else:
        answered = f.change_reports(lambda k: True)
        log(f"{tag}   burst: NOT every change report answered in time: {answered:,} of {f.instances:,}")
    steps = ", ".join(f"{s}: {a}/{x}" for s, a, x in f.burst_timeline[:40])
    log(f"{tag}   burst by second after the kill (answered/not 204): {steps}")
    quantiles = ("p50", "p95", "max")
    log(
        f"{tag} operator via the control listener: kill/restore {fmt_p(f.kill, quantiles)}; "
        f"dry run {fmt_p(f.dry, quantiles)}"
    )
    log(
        f"{tag}   during the burst: kill/restore {fmt_p(f.kill_burst, quantiles)}; "
        f"dry run {fmt_p(f.dry_burst, quantiles)}"
    )
    apps = f.blast.get("apps") or {}
    instances = sum(v for v in apps.values() if isinstance(v, int))
    log(
        f"{tag}   blast radius in the last dry run: {f.blast.get('evaluations', 0):,} evaluations, "
        f"{len(apps)} apps, {instances:,} instances"
        f"{'; failures ' + str(f.operator_failures) if f.operator_failures else ''}"
    )
    print_memory(tag, f.memory)
    log(
        f"{tag}   the server accepted heartbeats of {f.known:,} of the {f.instances:,} instances; usage data "
        f"with every bucket kept full{' and scaled to the whole fleet' if f.scale > 1 else ''}: "
        f"{f.usage_mb:,.1f} MiB"
    )
    if f.cpu:
        split = ", ".join(f"{k} {v:.2f}" for k, v in f.split.items())
        log(f"{tag} cores in the steady window: {f.cpu}")
        log(
            f"{tag}   server: {split}; main workers' CPU per heartbeat {f.hb_cpu_ms:.2f} ms; load "
            f"generator's {f.loadgen_us:.0f} us"
        )


def print_tally(tag: str, phase: str, t: dict[str, Any]) -> None:
    answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(t["answers"].items()))
    errors = f"; socket errors {t['errors']}" if t["errors"] else ""
    log(f"{tag}   {phase:<22} {sum(t['answers'].values()):>8,} answers ({answers}){errors}")
    log(f"{tag}   {'':<22} latency {fmt_p(t['latency'])}; delay {fmt_p(t['delay'])}")
    for kind, body in t["samples"].items():
        log(f"{tag}   {'':<22} a {kind} answer: {body[:150]!r}")


def print_memory(tag: str, m: Memory) -> None:
    """Redis memory, and the environment's keys by group: those that grew, the rest in one line."""
    log(
        f"{tag} Redis used_memory {m.used_before / MiB:.1f} -> {m.used_after / MiB:.1f} MiB (peak "
        f"{m.used_peak / MiB:.1f}); {PROD}'s keys grew {m.growth(False) / MiB:.2f} MiB, "
        f"{m.growth(True) / MiB:.2f} MiB once every bucket kept is full:"
    )
    rest = [0, 0]
    for name, g in sorted(m.after.items(), key=lambda kv: -kv[1].bytes):
        was = m.before.get(name, KeyGroup()).bytes
        if abs(g.bytes - was) < 1024:
            rest[0] += g.keys
            rest[1] += g.bytes
            continue
        bucket = ""
        if g.bucket_unit:
            kept = f"{g.retained_buckets} kept (TTL)" if g.retained_buckets else "no TTL"
            bucket = (
                f"; buckets of {g.bucket_unit} s, largest {g.largest_bucket / MiB:.2f} MiB, {kept}: "
                f"{g.projected / MiB:.1f} MiB"
            )
        size = f"{g.keys:>6} keys {g.bytes / MiB:>9.2f} MiB (before {was / MiB:.2f})"
        log(f"{tag}   {name:<24} {size}{bucket}")
    log(
        f"{tag}   {'the other keys':<24} {rest[0]:>6} keys {rest[1] / MiB:>9.2f} MiB (each group "
        "grew < 1 KiB)"
    )


@dataclass
class Figure:
    label: str
    get: Callable[[RunResult], float]
    unit: str
    target: tuple[str, float] | None = None  # ("<=", 50.0)


def _fleet(get: Callable[[FleetFigures], float]) -> Callable[[RunResult], float]:
    return lambda r: get(r.fleet) if r.fleet else math.nan


def _tally(phase: str, series: str, q: str) -> Callable[[RunResult], float]:
    return _fleet(lambda f: f.tallies.get(phase, {}).get(series, {}).get(q, math.nan))


def _answers(phase: str, kinds: Callable[[str], bool]) -> Callable[[RunResult], float]:
    def get(f: FleetFigures) -> float:
        t = f.tallies.get(phase, {})
        return sum(v for k, v in t.get("answers", {}).items() if kinds(k)) + sum(t.get("errors", {}).values())

    return _fleet(get)


def _cores(who: str) -> Callable[[RunResult], float]:
    return _fleet(lambda f: float(getattr(f.cpu, who)) if f.cpu else math.nan)


def figures() -> list[Figure]:
    """The fleet phase's figures in the summary, with their targets."""
    steady, change = "steady", "burst, change reports"
    cpu = {k: _cores(k) for k in ("server", "loadgen", "others")}
    return [
        Figure(
            "usage data in Redis: full retention, whole fleet",
            _fleet(lambda f: f.usage_mb),
            "MiB",
            ("<=", TARGET_USAGE_MB),
        ),
        Figure("usage data in Redis: as measured", _fleet(lambda f: f.memory.growth(False) / MiB), "MiB"),
        Figure(
            "Redis used_memory growth",
            _fleet(lambda f: (f.memory.used_after - f.memory.used_before) / MiB),
            "MiB",
        ),
        Figure(
            "instances the server knows, of the fleet", _fleet(lambda f: 100 * f.known / f.instances), "%"
        ),
        Figure(
            "heartbeats answered, of those wanted (steady)",
            _fleet(lambda f: 100 * f.achieved_rate / f.wanted_rate),
            "%",
            (">=", TARGET_RATE_PERCENT),
        ),
        Figure("heartbeats answered per second (steady)", _fleet(lambda f: f.achieved_rate), "/s"),
        Figure("heartbeat answer p50 (steady)", _tally(steady, "latency", "p50"), "ms"),
        Figure(
            "heartbeat answer p95 (steady)",
            _tally(steady, "latency", "p95"),
            "ms",
            ("<=", TARGET_HEARTBEAT_P95_MS),
        ),
        Figure("heartbeat due-to-answer p95 (steady)", _tally(steady, "delay", "p95"), "ms"),
        Figure(
            "heartbeats not 204 (steady: 429, 5xx, errors)",
            _answers(steady, lambda k: k != "204"),
            "",
            ("<=", 0),
        ),
        Figure(
            "burst: change reports answered 204, of the fleet",
            _fleet(lambda f: 100 * f.change_reports(lambda k: k == "204") / f.instances),
            "%",
        ),
        Figure(
            "burst: change reports 429", _fleet(lambda f: f.change_reports(lambda k: k.startswith("429"))), ""
        ),
        Figure("burst: change reports 5xx", _fleet(lambda f: f.change_reports(lambda k: k == "5xx")), ""),
        Figure("burst: change report answer p95", _tally(change, "latency", "p95"), "ms"),
        Figure("burst: change report due-to-answer p95", _tally(change, "delay", "p95"), "ms"),
        Figure("burst: last change report after the kill", _fleet(lambda f: f.burst_drain_s), "s"),
        Figure(
            "dry-run blast radius p95 (steady)",
            _fleet(lambda f: f.dry["p95"]),
            "ms",
            ("<=", TARGET_DRY_RUN_P95_MS),
        ),
        Figure("kill/restore p50 (control listener, steady)", _fleet(lambda f: f.kill["p50"]), "ms"),
        Figure(
            "kill/restore p95 (control listener, steady)",
            _fleet(lambda f: f.kill["p95"]),
            "ms",
            ("<=", TARGET_KILL_P95_MS),
        ),
        Figure("main workers' CPU per heartbeat", _fleet(lambda f: f.hb_cpu_ms), "ms"),
        Figure("cores: server (steady)", cpu["server"], ""),
        Figure("cores: load generator (steady)", cpu["loadgen"], ""),
        Figure("cores: others (steady)", cpu["others"], ""),
    ]


def reproduce(phases: Sequence[str]) -> str:
    """This run's command line, limited to ``phases`` (with the ``FLAGSVC_*`` settings it had)."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--phases="):
            skip = False
            continue
        if arg == "--phases":
            skip = True
            continue
        argv.append(arg)
    cmd = [".venv/bin/python", "bench/fleet.py", "--phases", ",".join(phases), *argv]
    return "".join(reproduce_env()) + shlex.join(cmd)


def verdict(value: float, target: tuple[str, float] | None) -> str:
    if target is None:
        return ""
    op, bound = target
    if math.isnan(value):
        return "n/a"
    ok = value <= bound if op == "<=" else value >= bound
    return "PASS" if ok else "FAIL"


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "unbounded"
    if unit == "":
        return f"{value:,.2f}" if abs(value) < 100 and value != int(value) else f"{value:,.0f}"
    if unit in ("%", "/s"):
        return f"{value:,.0f}{unit}"
    return f"{value:,.1f} {unit}"


Row = tuple[str, str, str, str, str]  # figure, median, each run, target, verdict


def fleet_rows(runs: list[RunResult]) -> list[Row]:
    rows = []
    for fig in figures():
        values = [fig.get(r) for r in runs]
        med = median(values)
        target = f"{fig.target[0]} {fig.target[1]:g} {fig.unit}".strip() if fig.target else ""
        rows.append((fig.label, fmt_value(med, fig.unit), each_run(values), target, verdict(med, fig.target)))
    return rows


def command_rows(runs: list[RunResult]) -> list[Row]:
    """Idle commands per worker per second and commands per change per worker, each case against
    the first (the smallest environment, 10 tokens): "constant" is within 10 % + 1 of it."""
    rows: list[Row] = []
    for what, unit in (
        ("idle_total", "idle commands per worker per second"),
        ("change_total", "commands per change per worker"),
    ):
        reference = math.nan
        for i, fig in enumerate(runs[0].commands):
            values = [getattr(r.commands[i], what) for r in runs if i < len(r.commands)]
            med = median(values)
            if math.isnan(med):
                continue
            if math.isnan(reference):
                reference, target, ok = med, "(reference)", ""
            else:
                bound = reference * CONSTANT_SLACK[0] + CONSTANT_SLACK[1]
                target, ok = f"<= {bound:.1f} (constant)", "PASS" if med <= bound else "FAIL"
            rows.append((f"{unit} ({fig.label})", f"{med:,.2f}", each_run(values), target, ok))
    return rows


def sink_rows(runs: list[RunResult]) -> list[Row]:
    sinks = [r.sink for r in runs if r.sink]
    if not sinks:
        return []
    rate, cores = [s.achieved for s in sinks], [s.loadgen_cores for s in sinks]
    wanted = sinks[0].wanted
    return [
        (
            f"load generator alone: heartbeats/s (of {wanted:,.0f} wanted)",
            f"{median(rate):,.0f}",
            each_run(rate),
            "",
            "",
        ),
        ("load generator alone: cores", f"{median(cores):.2f}", each_run(cores), "", ""),
    ]


def each_run(values: Sequence[float]) -> str:
    return "[" + " ".join(fmt_value(v, "") for v in values) + "]" if len(values) > 1 else ""


def print_summary(runs: list[RunResult], args: argparse.Namespace) -> bool:
    """The figures (medians across runs, each run's value), PASS/FAIL against each target, under
    the command that reproduces them; True unless a target failed."""
    log(f"\n== Summary: medians of {len(runs)} run(s), each run's value in brackets ==")
    command_phases = [p for p in ("commands", "tokens") if p in args.phases]
    groups = [
        (["fleet"], fleet_rows(runs) if "fleet" in args.phases else []),
        (command_phases, command_rows(runs)),
        (["sink"], sink_rows(runs)),
    ]
    ok = True
    for phases, rows in groups:
        if not rows:
            continue
        log(f"\n{' and '.join(phases)}: cd {shlex.quote(os.getcwd())} && {reproduce(phases)}")
        harness.print_table(["figure", "median", "runs", "target", ""], rows)
        ok &= all(row[4] != "FAIL" for row in rows)
    print_details(runs)
    for i, r in enumerate(runs):
        for problem in r.problems:
            log(f"PROBLEM (run {i + 1}): {problem}")
    return ok


def print_details(runs: list[RunResult]) -> None:
    """The commands by name (first run) and the service's memory."""
    if runs[0].commands:
        log("\ncommands by name (first run):")
    for c in runs[0].commands:
        idle = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.idle.items(), key=lambda kv: -kv[1]))
        log(f"  idle, per worker per second ({c.label}): {idle or 'none'}; {c.idle_bytes:,.0f} bytes/s")
        if c.cpu:
            log(f"    cores meanwhile: {c.cpu}")
        if c.change:
            shown = sorted(((k, v) for k, v in c.change.items() if abs(v) >= 0.05), key=lambda kv: -kv[1])
            change = ", ".join(f"{k} {v:.2f}" for k, v in shown)
            kib = c.change_bytes / 1024
            log(f"  per change per worker ({c.label}; {c.changes} changes): {change}; {kib:,.1f} KiB")
    if runs[0].pss_mb:
        pss = "; ".join(
            f"{k} {median([r.pss_mb.get(k, math.nan) for r in runs]):.0f} MiB" for k in runs[0].pss_mb
        )
        log(f"\nservice PSS (flagsvc serve, gunicorn masters and workers; Redis aside): {pss}")


def print_header(args: argparse.Namespace, fd_limit: int) -> None:
    load1, load5, load15 = os.getloadavg()
    log(f"flagsvc fleet benchmark - {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    cores, system = len(os.sched_getaffinity(0)), f"{platform.system()} {platform.release()}"
    log(f"machine : nproc {cores}, {harness.cpu_model()}; {system}")
    log(
        f"          loadavg {load1:.2f} {load5:.2f} {load15:.2f}; {harness.busy_elsewhere():.2f} cores busy "
        f"(others) just before the start; RLIMIT_NOFILE {fd_limit}"
    )
    log(f"python  : {platform.python_version()}; packages: {harness.package_versions()}")
    log(f"code    : {git_describe()}")
    command = shlex.join([".venv/bin/python", *sys.argv])
    log(f"reproduce: cd {shlex.quote(os.getcwd())} && {''.join(reproduce_env())}{command}")
    cap = settings_for(args).get("FLAGSVC_MAX_INSTANCES_PER_TOKEN")
    log(
        f"server  : flagsvc serve --data-dir <tmp> --port <free> --control-port <free>"
        f"{f' --workers {args.workers}' if args.workers else ''}; FLAGSVC_MAX_INSTANCES_PER_TOKEN "
        f"{cap or setting('MAX_INSTANCES_PER_TOKEN')}{' (raised by the bench)' if cap else ''}"
    )
    log(f"phases  : {', '.join(args.phases)}")
    log()


def reproduce_env() -> list[str]:
    return [
        f"{k}={shlex.quote(v)} "
        for k, v in sorted(os.environ.items())
        if k.startswith("FLAGSVC_") and k not in harness.CONFLICTING_ENV
    ]


def git_describe() -> str:
    """The commit, and whether the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty.splitlines()]
    return f"{head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else " (clean)")


def phase_list(value: str) -> list[str]:
    phases = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {unknown}; choose among {PHASES}")
    return phases


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 5,000 instances and short phases")
    p.add_argument(
        "--phases", type=phase_list, default=list(DEFAULT_PHASES), help=f"comma-separated, of {PHASES}"
    )
    p.add_argument("--instances", type=int, default=None, help="simulated SDK instances (100,000)")
    p.add_argument("--duration", type=float, default=None, help="s of the steady window (60)")
    p.add_argument(
        "--warmup", type=float, default=None, help="s before it: every instance reports once (one interval)"
    )
    p.add_argument("--apps", type=int, default=50, help="app names the instances spread over")
    p.add_argument(
        "--flags-per-app", type=int, default=20, help="flags each app evaluates (counts per heartbeat)"
    )
    p.add_argument("--sdk-tokens", type=int, default=8, help="SDK tokens the instances spread over")
    p.add_argument("--conns", type=int, default=256, help="connections of the load generator in all")
    p.add_argument(
        "--close",
        action="store_true",
        help="a new connection per heartbeat (Connection: close), as the Python SDK does",
    )
    p.add_argument("--loadgen-procs", type=int, default=1, help="load-generator processes")
    p.add_argument("--loadgen-nice", type=int, default=0, help="niceness of the load-generator processes")
    p.add_argument(
        "--operator-gap", type=float, default=0.25, help="s between the operator's kill/restores and dry runs"
    )
    p.add_argument("--burst-timeout", type=float, default=None, help="s to wait for the burst (60)")
    p.add_argument("--idle-seconds", type=float, default=None, help="s of each idle command count (10)")
    p.add_argument("--changes", type=int, default=None, help="kill/restores counted per command phase (20)")
    p.add_argument("--change-gap", type=float, default=0.5, help="s between them")
    p.add_argument(
        "--big-flags", type=int, default=None, help="flags added for the second command count (1,000)"
    )
    p.add_argument(
        "--many-tokens", type=int, default=None, help="tokens in all for the tokens phase (50,000)"
    )
    p.add_argument("--settle", type=float, default=None, help="s of quiet before each count (2)")
    p.add_argument("--flags", type=int, default=50, help="realistic flags besides the kill switch")
    p.add_argument("--workers", type=int, default=None, help="main gunicorn workers (default: the service's)")
    p.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh server; medians reported")
    p.add_argument("--seed", type=int, default=16, help="random seed of the fleet (apps, flags, phases)")
    p.add_argument("--tmp-dir", default=None, help="where the data folders go; none: the system temp dir")
    p.add_argument("--keep-data", action="store_true", help="keep each run's data folder and server log")
    args = p.parse_args(argv)
    quick = {
        "instances": 5000,
        "duration": 10.0,
        "warmup": 5.0,
        "idle_seconds": 5.0,
        "changes": 10,
        "big_flags": 100,
        "many_tokens": 500,
        "settle": 1.0,
        "burst_timeout": 15.0,
    }
    full = {
        "instances": 100_000,
        "duration": 60.0,
        "warmup": None,
        "idle_seconds": 10.0,
        "changes": 20,
        "big_flags": 1000,
        "many_tokens": 50_000,
        "settle": 2.0,
        "burst_timeout": None,
    }
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    pace = expected_pace(args.instances)
    if args.warmup is None:
        # Every instance reports once. A fresh server tells the first reports its starting pace,
        # and longer ones as it counts the fleet; each instance takes a random place in each
        # longer interval, so the reports settle to the fleet's rate about two intervals later.
        start = announced("INTERVAL")
        args.warmup = start if pace.interval <= start else start + 2 * pace.interval
    if args.burst_timeout is None:
        args.burst_timeout = max(60.0, pace.jitter + 30)
    if min(args.instances, args.sdk_tokens, args.conns, args.loadgen_procs, args.apps, args.repeat) < 1:
        p.error("--instances, --sdk-tokens, --conns, --loadgen-procs, --apps and --repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    fd_limit = raise_fd_limit()
    print_header(args, fd_limit)
    started = time.monotonic()
    runs = [run_once(args, f"[{k + 1}/{args.repeat}]") for k in range(args.repeat)]
    ok = print_summary(runs, args)
    log(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
