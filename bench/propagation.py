"""Propagation benchmark of flagsvc: how fast a kill switch reaches N simulated SDK clients.

One ``flagsvc serve`` (started as an operator starts it, through :class:`harness.Server`: fresh data
folder, free port on 127.0.0.1, admin token from ``<data-dir>/admin-token``, SIGTERM at the end)
with the kill switch ``bench.kill`` and ~50 realistic flags in ``production`` and ``bench``.

1. ``--streams N,...``: N Server-Sent Events clients (asyncio protocols over raw sockets, chunked
   decoding and SSE parsing by hand), spread over ``--client-procs`` processes;
2. ``--pollers P,...``: P poll-mode clients, one keep-alive connection each, a conditional GET
   (``If-None-Match``) every ``--poll-interval`` s, phases jittered.
   In 1 and 2, ``--flips`` kill/restore calls 1-2 s apart on their own keep-alive connection;
   delay = (time a client has the new version) - (time the write's response arrived);
3. ``--ceiling C,...``: ``wrk -cC`` conditional polls (304) as fast as possible (``C``) or paced
   (``C@R``: R polls/s in all), and meanwhile kill/restore in the ``bench`` environment every
   ``--ceiling-flip-gap`` s (the polled production version stays put: 100 % 304).

The clients take turns over SDK tokens of up to ``STREAMS_PER_TOKEN`` (1,000) clients each (a
token may hold ``MAX_STREAMS_PER_TOKEN`` streams per worker), and gunicorn's
``FLAGSVC_WORKER_CONNECTIONS`` is raised above the largest client count. The main workers' RSS
and PSS are read before the clients connect and once they all hold a snapshot: the memory per
client.

Stream clients ask for patches (``?patches=true``, as the SDK does): a flip reaches them as a
``patch`` event of the killed flag; ``--full-events`` makes them take the whole snapshot on every
change instead (what an SDK older than patches gets).

Verification: a client's SSE ``id`` / ETag (``<version>-<history mark>``) must name the
``version`` in the JSON it got, and a patch's ``base`` the version the client holds; every
``--sample-every``-th client parses the whole snapshot or patch and checks the kill switch's
state against the state the flip set for that version; missed and skipped versions are counted.
Example::

    .venv/bin/python bench/propagation.py --streams 100,1000 --pollers 1000 --flips 20
    .venv/bin/python bench/propagation.py --streams 10000 --pollers '' --ceiling '' --flips 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import api
import harness
import psutil
import requests
from api import LoadSpec
from fleet import git_describe
from harness import FLIP_ENV, HOST, KILL_KEY, PROD, Server, create_token, percentiles, raise_fd_limit

TARGET_N, TARGET_STREAM_P99_MS, TARGET_STREAM_MAX_MS = 1000, 250.0, 1000.0
TARGET_10K_N, TARGET_10K_P99_MS = 10_000, 500.0  # issue 16: 10,000 streams on this machine
STREAMS_PER_TOKEN = 1000  # streams opened with one SDK token (the cap is per token and worker)
TARGET_POLLS_PER_S, TARGET_FLIP_P95_MS = 5000.0, 50.0
READY_TIMEOUT_S = 60.0
VERSION_RE = re.compile(rb'"version":(\d+)')
BASE_RE = re.compile(rb'"base":"([^"]*)"')
STOPPING = threading.Event()  # set in a client process when its clients must end


def log(message: str = "") -> None:
    print(message, flush=True)


# -- simulated SDK clients (in the client processes) -------------------------------------------


def version_of(identity: bytes) -> int:
    """The version in a snapshot's identity (``<version>-<history mark>``, or a bare version)."""
    try:
        return int(identity.split(b"-", 1)[0])
    except ValueError:
        return -1


@dataclass
class ClientView:
    """What one simulated SDK client saw: the first arrival of each version, and any trouble."""

    index: int
    sample: bool  # parse the whole snapshot and record the kill switch's state
    seen: dict[int, float] = field(default_factory=dict)  # version -> monotonic arrival
    checks: list[tuple[int, bool]] = field(default_factory=list)  # (version, bench.kill enabled)
    last: int = 0
    identity: str = ""  # the newest snapshot's SSE id / ETag: ``<version>-<history mark>``
    kill_enabled: bool = True  # the kill switch's state in the snapshot held (sampled clients)
    bad: int = 0  # id/ETag differing from the JSON's version, truncated payload, odd status
    reconnects: int = 0
    shutdowns: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def observe(self, identity: bytes, data: bytes, now: float, *, patch: bool = False) -> None:
        """A snapshot (or a ``patch`` of the one held) named ``identity`` (its SSE id or ETag,
        ``<version>-<mark>``) arrived at ``now``."""
        version = version_of(identity)
        match = VERSION_RE.search(data, 0, 256)
        base = BASE_RE.search(data) if patch else None
        if match is None or int(match[1]) != version or not data.endswith(b"}"):
            self.bad += 1
            return
        if patch and (base is None or base[1].decode() != self.identity):
            self.bad += 1  # a patch of another version than the one held: an SDK would reconnect
            return
        self.seen.setdefault(version, now)
        if version >= self.last:
            self.last, self.identity = version, identity.decode()
        if self.sample:
            flags = json.loads(data)["flags"]
            if KILL_KEY in flags:
                self.kill_enabled = bool(flags[KILL_KEY]["enabled"])
            self.checks.append((version, self.kill_enabled))

    def on_event(self, block: bytes, now: float) -> None:
        """One complete SSE event (the lines before a blank line); comments are heartbeats. Only
        the lines before the first ``data:`` are split: a snapshot's data is one long line."""
        if block.startswith(b"data:"):
            head, data = b"", block[5:]
        else:
            head, found, data = block.partition(b"\ndata:")
            data = data if found else b""
        if b"\n" in data:  # more data lines (a one-byte search: memchr, fast on a long line)
            data = b"\n".join(line.removeprefix(b" ") for line in data.split(b"\ndata:"))
        data = data.removeprefix(b" ")
        fields: dict[bytes, bytes] = {}
        for line in head.split(b"\n"):
            if line and not line.startswith(b":"):
                name, _, value = line.partition(b":")
                fields[name] = value.removeprefix(b" ")
        if fields.get(b"event") in (b"snapshot", b"patch"):
            self.observe(fields.get(b"id", b"-1"), data, now, patch=fields[b"event"] == b"patch")
        elif fields.get(b"event") == b"shutdown":
            self.shutdowns += 1

    def status(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1


def blank_lines(buffer: bytearray, pos: int) -> Iterator[int]:
    """Where each blank line (an SSE event's end) starts in ``buffer``, searching from ``pos`` by
    newlines: a one-byte search runs at memory speed, a snapshot's long data line in one step."""
    while (newline := buffer.find(b"\n", pos)) >= 0 and newline + 1 < len(buffer):
        if buffer[newline + 1] == 0x0A:
            yield newline
            pos = newline + 2
        else:
            pos = newline + 1


class SseProtocol(asyncio.Protocol):
    """One SSE connection: the response head, then chunked decoding and event splitting as bytes
    arrive. An event's arrival time is when the read that completed it was handled."""

    def __init__(self, view: ClientView, request: bytes) -> None:
        self.view, self.request = view, request
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head = self.raw = b""
        self.sse = bytearray()
        self.in_body = self.chunked = self.crlf = False
        self.left = 0  # bytes left in the current chunk
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            code = int(head.split(b" ", 2)[1])
            self.view.status(code)
            if code != 200:
                self.view.errors.append(f"stream: HTTP {code}")
                self.transport.close()
                return
            self.chunked, self.in_body = b"transfer-encoding: chunked" in head.lower(), True
        scanned = max(0, len(self.sse) - 1)  # the bytes held before had no blank line
        self.sse += self.dechunk(data) if self.chunked else data
        start = 0
        for end in blank_lines(self.sse, scanned):
            self.view.on_event(bytes(self.sse[start:end]), now)
            start = end + 2
        del self.sse[:start]

    def dechunk(self, data: bytes) -> bytes:
        """Incremental ``Transfer-Encoding: chunked`` decoding: the payload bytes in ``data``."""
        raw, pos, out = self.raw + data, 0, []
        while pos < len(raw):
            if self.left:
                piece = raw[pos : pos + self.left]
                out.append(piece)
                pos += len(piece)
                self.left -= len(piece)
                self.crlf = self.left == 0
            elif self.crlf:
                if len(raw) - pos < 2:
                    break
                pos, self.crlf = pos + 2, False
            else:
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                self.left, pos = int(raw[pos:end].split(b";", 1)[0], 16), end + 2
                if self.left == 0:  # the last chunk: the server ended the stream
                    break
        self.raw = raw[pos:]
        return b"".join(out)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def http_get(cfg: dict[str, Any], path: str, extra: str = "", client: int = 0) -> bytes:
    """A GET with the SDK token of client number ``client`` (the tokens take turns)."""
    token = cfg["tokens"][client % len(cfg["tokens"])]
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{cfg['port']}\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    ).encode()


async def stream_client(view: ClientView, cfg: dict[str, Any], gate: asyncio.Semaphore) -> None:
    """Hold an SSE stream open; when it ends, reconnect with ``Last-Event-ID`` as an SDK does."""
    loop = asyncio.get_running_loop()
    while not STOPPING.is_set():
        last = f"Last-Event-ID: {view.identity}\r\n" if view.identity else ""
        request = http_get(
            cfg,
            f"/api/v1/envs/{PROD}/{cfg['stream_path']}",
            f"Accept: text/event-stream\r\n{last}",
            view.index,
        )
        try:
            async with gate:
                connecting = loop.create_connection(partial(SseProtocol, view, request), HOST, cfg["port"])
                transport, proto = await asyncio.wait_for(connecting, 10)
        except (OSError, TimeoutError) as exc:
            view.errors.append(f"connect: {exc!r}")
            await asyncio.sleep(1)
            continue
        try:
            await proto.done
        finally:
            transport.close()
        view.reconnects += 1
        await asyncio.sleep(0.5 + random.random())


async def poll_once(view: ClientView, cfg: dict[str, Any], reader: Any, writer: Any) -> bool:
    """One poll on a keep-alive connection (conditional once a version is known); False if the
    server closes the connection."""
    inm = f'If-None-Match: "{view.identity}"\r\n' if view.identity else ""
    writer.write(http_get(cfg, f"/api/v1/envs/{PROD}/snapshot", inm, view.index))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    length = int(headers.get(b"content-length", b"0"))
    body = await reader.readexactly(length) if length else b""
    code, etag = int(lines[0].split(b" ", 2)[1]), headers.get(b"etag", b'"-1"').strip(b'"')
    view.status(code)
    if code == 200:
        view.observe(etag, body, time.monotonic())
    elif code != 304 or etag.decode() != view.identity:
        view.bad += 1
    return headers.get(b"connection", b"").lower() != b"close"


async def poll_client(view: ClientView, cfg: dict[str, Any], gate: asyncio.Semaphore) -> None:
    """Poll every ``poll_interval`` s on one keep-alive connection, on a fixed schedule whose
    phase is random; the first poll, right after connecting, is unconditional."""
    writer: Any = None
    next_at: float | None = None
    try:
        while not STOPPING.is_set():
            try:
                if writer is None:
                    async with gate:
                        opening = asyncio.open_connection(HOST, cfg["port"])
                        reader, writer = await asyncio.wait_for(opening, 10)
                if next_at is not None:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += cfg["poll_interval"]
                if not await poll_once(view, cfg, reader, writer):
                    writer.close()
                    writer, view.reconnects = None, view.reconnects + 1
                if next_at is None:
                    next_at = time.monotonic() + random.uniform(0, cfg["poll_interval"])
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                view.errors.append(f"poll: {exc!r}")
                if writer is not None:
                    writer.close()
                writer, view.reconnects = None, view.reconnects + 1
                await asyncio.sleep(1)
    finally:
        if writer is not None:
            writer.close()


async def lag_monitor(out: dict[str, float]) -> None:
    """The client event loop's worst oversleep (ms): if it grows, the clients are a bottleneck."""
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.05)
        out["max_ms"] = max(out["max_ms"], (time.monotonic() - t - 0.05) * 1000)


async def client_main(cfg: dict[str, Any], ready_q: Any, stop: Any, result_q: Any) -> None:
    """Connect this process's share of clients, report readiness, run until ``stop``, report."""
    views = [ClientView(i, sample=i % cfg["sample_every"] == 0) for i in range(cfg["first"], cfg["last"])]
    gate = asyncio.Semaphore(64)  # concurrent connection attempts: stay well under the listen backlog
    run = stream_client if cfg["mode"] == "stream" else poll_client
    tasks = [asyncio.create_task(run(v, cfg, gate)) for v in views]
    deadline, lag = time.monotonic() + cfg["ready_s"] - 5, {"max_ms": 0.0}
    while any(not v.last for v in views) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ready_q.put(sum(1 for v in views if v.last))
    tasks.append(asyncio.create_task(lag_monitor(lag)))
    await asyncio.get_running_loop().run_in_executor(None, stop.wait, cfg["max_seconds"])
    STOPPING.set()  # as well as cancelling: asyncio.wait_for can swallow a cancellation (3.11)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=10)
    result_q.put({"views": [asdict(v) for v in views], "lag_ms": lag["max_ms"]})


def client_process(cfg: dict[str, Any], ready_q: Any, stop: Any, result_q: Any) -> None:
    raise_fd_limit()
    asyncio.run(client_main(cfg, ready_q, stop, result_q))


# -- the benchmark process: flips, CPU, analysis -----------------------------------------------


@dataclass
class Flip:
    version: int  # X-Flagsvc-Env-Version: the environment version that includes the write
    enabled: bool
    sent: float
    answered: float  # t0: the write's response has arrived

    @property
    def ms(self) -> float:
        return (self.answered - self.sent) * 1000


class Flipper:
    """Alternate kill and restore of ``bench.kill`` in ``env`` over one keep-alive connection."""

    def __init__(self, port: int, token: str, env: str) -> None:
        self.env, self.retries = env, 0
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)
        self.enabled = bool(
            json.loads(self.request("GET", f"/api/v1/envs/{env}/flags/{KILL_KEY}")[1])["enabled"]
        )

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, Any]:
        self.conn.request(method, path, body=body, headers=self.headers)
        response = self.conn.getresponse()
        return response.status, response.read(), response.headers

    def flip(self) -> Flip:
        """One kill or restore; fails unless it answered 200 with the flag switched."""
        action = "kill" if self.enabled else "restore"
        path, body = f"/api/v1/envs/{self.env}/flags/{KILL_KEY}/{action}", b'{"reason":"bench"}'
        sent = time.monotonic()
        try:
            status, data, headers = self.request("POST", path, body)
        except (ConnectionError, http.client.RemoteDisconnected):  # keep-alive closed by the server
            self.retries += 1
            self.conn.close()
            sent = time.monotonic()
            status, data, headers = self.request("POST", path, body)
        answered = time.monotonic()
        if status != 200 or json.loads(data)["enabled"] is self.enabled:
            raise RuntimeError(f"{action} -> {status}: {data[:300]!r}")
        self.enabled = not self.enabled
        return Flip(int(headers["X-Flagsvc-Env-Version"]), self.enabled, sent, answered)


def machine_busy() -> float:
    """Machine-wide CPU seconds used since boot (/proc/stat; idle, iowait and steal excluded)."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """CPU time of ``procs`` at nanosecond resolution (every thread's /proc schedstat; psutil's
    user+system tick at 10 ms per process, too coarse for the second after a flip)."""
    total = 0.0
    for proc in procs:
        try:
            for task in os.listdir(f"/proc/{proc.pid}/task"):
                with open(f"/proc/{proc.pid}/task/{task}/schedstat") as fh:
                    total += int(fh.read().split()[0]) / 1e9
        except (OSError, ValueError):
            with contextlib.suppress(psutil.Error):
                total += sum(proc.cpu_times()[:2])
    return total


class Meter:
    """CPU marks (server tree, client processes, this process, machine) and peak server RSS,
    sampled every 0.25 s while in the ``with`` block."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak_rss = server, 0
        self.clients: list[psutil.Process] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        total = 0
        for proc in self.server.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.rss())

    def mark(self) -> dict[str, float]:
        return {
            "t": time.monotonic(),
            "server": cpu_seconds(self.server.processes()),
            "clients": cpu_seconds(self.clients),
            "self": sum(os.times()[:2]),
            "machine": machine_busy(),
        }

    def __enter__(self) -> Meter:
        self.peak_rss = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fanout_beyond_idle(m0: dict[str, float], m1: dict[str, float], m2: dict[str, float], flips: int) -> float:
    """Server CPU per flip (ms) over the whole flip phase (``m1``..``m2``) beyond the rate of the
    idle window before it (``m0``..``m1``): whatever a delivery takes, even past the next flip."""
    idle = (m1["server"] - m0["server"]) / max(1e-6, m1["t"] - m0["t"])
    extra = m2["server"] - m1["server"] - idle * (m2["t"] - m1["t"])
    return extra / max(1, flips) * 1000


def cores(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Average cores used between two marks, by whom ("others": the rest of the machine)."""
    wall = max(b["t"] - a["t"], 1e-6)
    out = {k: (b[k] - a[k]) / wall for k in ("server", "clients", "self", "machine")}
    out["others"] = max(0.0, out.pop("machine") - out["server"] - out["clients"] - out["self"])
    return out


def analyse(views: list[dict[str, Any]], flips: list[Flip], start: tuple[int, bool]) -> dict[str, Any]:
    """Per client and flip, the delay until the client had that version or a later one: from the
    write's response (what the targets use) and from the moment the write was sent."""
    delays: list[float] = []
    from_sent: list[float] = []
    missed = skipped = unknown = wrong = checked = 0
    expected = {start[0]: start[1], **{f.version: f.enabled for f in flips}}
    statuses: Counter[int] = Counter()
    for view in views:
        seen = sorted(view["seen"].items())
        for flip in flips:
            arrival = min((t for version, t in seen if version >= flip.version), default=None)
            if arrival is None:
                missed += 1
                continue
            delays.append((arrival - flip.answered) * 1000)
            from_sent.append((arrival - flip.sent) * 1000)
            skipped += flip.version not in view["seen"]
        unknown += sum(1 for version, _ in seen if version not in expected)
        checked += len(view["checks"])
        wrong += sum(1 for version, enabled in view["checks"] if expected.get(version) is not enabled)
        statuses.update(view["statuses"])
    return {
        "delay": percentiles(delays),
        "min": min(delays, default=float("nan")),
        "from_sent": percentiles(from_sent),
        "missed": missed,
        "skipped": skipped,
        "unknown": unknown,
        "checked": checked,
        "wrong": wrong,
        "bad": sum(v["bad"] for v in views),
        "reconnects": sum(v["reconnects"] for v in views),
        "shutdowns": sum(v["shutdowns"] for v in views),
        "errors": dict(Counter(e[:70] for v in views for e in v["errors"])),
        "statuses": dict(statuses),
    }


def spawn_clients(cfg: dict[str, Any], n: int, procs: int) -> tuple[list[Any], Any, Any, Any]:
    """Start the client processes with ``n`` clients between them."""
    ctx = mp.get_context("spawn")
    ready_q, result_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = max(1, min(procs, n))
    bounds = [n * i // procs for i in range(procs + 1)]
    children = [
        ctx.Process(
            target=client_process,
            args=({**cfg, "first": bounds[i], "last": bounds[i + 1]}, ready_q, stop, result_q),
            daemon=True,
        )
        for i in range(procs)
    ]
    for child in children:
        child.start()
    return children, ready_q, result_q, stop


def drain_seconds(args: argparse.Namespace, n: int) -> float:
    """How long the last flip is given to reach every client (``--drain``, else by N)."""
    if args.drain is not None:
        return float(args.drain)
    return max(1.0, args.poll_interval + 0.5, n / 1000)


def ready_seconds(n: int) -> float:
    """How long N clients may take to connect and get their first snapshot."""
    return max(READY_TIMEOUT_S, n / 100)


def worker_memory(server: Server) -> dict[str, int]:
    """RSS and PSS (shared pages counted once) of the main listener's gunicorn workers, and the
    PSS of every process of the service (the embedded Redis aside), in bytes."""
    out = {"rss": 0, "pss": 0, "service_pss": 0}
    workers = set(server.worker_pids())
    for proc in server.processes():
        with contextlib.suppress(psutil.Error):
            if "redis" in proc.name():
                continue
            mem = proc.memory_full_info()
            out["service_pss"] += mem.pss
            if proc.pid in workers:
                out["rss"] += mem.rss
                out["pss"] += mem.pss
    return out


def run_phase(
    server: Server, args: argparse.Namespace, sdk_tokens: list[str], mode: str, n: int
) -> dict[str, Any]:
    """N clients of ``mode``; an idle window; ``--flips`` flips 1-2 s apart; a drain; the results."""
    cfg = {
        "mode": mode,
        "port": server.port,
        "tokens": sdk_tokens,
        "poll_interval": args.poll_interval,
        "sample_every": args.sample_every,
        "stream_path": "stream" if args.full_events else "stream?patches=true",
        "ready_s": ready_seconds(n),
        "max_seconds": ready_seconds(n) + args.flips * 2 + args.idle + drain_seconds(args, n) + 60,
    }
    tag, meter, t_connect = f"[{mode} N={n}]", Meter(server), time.monotonic()
    rss_before, mem_before = meter.rss(), worker_memory(server)
    children, ready_q, result_q, stop = spawn_clients(cfg, n, args.client_procs)
    try:
        meter.clients = [psutil.Process(c.pid) for c in children]
        connected = sum(ready_q.get(timeout=cfg["ready_s"]) for _ in children)
        connect_s = time.monotonic() - t_connect
        spread = sorted((len(p) for p in server.connections_by_worker().values()), reverse=True)
        log(f"{tag} {connected}/{n} clients have a snapshot after {connect_s:.1f} s; conns/worker {spread}")
        time.sleep(1.0)  # the last streams' first snapshots are out
        mem_after = worker_memory(server)
        flipper = Flipper(server.control_port or server.port, server.token, PROD)
        etag = flipper.request("GET", f"/api/v1/envs/{PROD}/snapshot")[2]["ETag"]
        start = (int(etag.strip('"').split("-")[0]), flipper.enabled)  # the version before the first flip
        flips: list[Flip] = []
        after: list[tuple[dict[str, float], dict[str, float]]] = []  # the second from each flip's send
        with meter:
            m0 = meter.mark()
            time.sleep(args.idle)
            m1 = meter.mark()
            for i in range(args.flips):
                before = meter.mark()
                flips.append(flipper.flip())
                time.sleep(max(0.0, before["t"] + 1.0 - time.monotonic()))
                after.append((before, meter.mark()))
                # 1-2 s between flips; after the last, time for it to reach every client
                time.sleep(random.uniform(0, 1) if i + 1 < args.flips else drain_seconds(args, n))
            m2 = meter.mark()
        flipper.conn.close()
        stop.set()
        results = [result_q.get(timeout=60) for _ in children]
    finally:
        stop.set()
        for child in children:
            child.join(15)
            if child.is_alive():
                child.terminate()
    # fan-out: server CPU in the second after each flip beyond the rate of the quiet time around it
    post_cpu, post_t = (sum(b[k] - a[k] for a, b in after) for k in ("server", "t"))
    quiet = (m2["server"] - m0["server"] - post_cpu) / max(1e-6, m2["t"] - m0["t"] - post_t)
    result = {
        "mode": mode,
        "n": n,
        "connected": connected,
        "flips": percentiles([f.ms for f in flips]),
        "retries": flipper.retries,
        "versions": (start[0], flips[-1].version),
        "busy": cores(m1, m2),
        "quiet": quiet,
        "post": post_cpu / post_t,
        "fanout_ms": (post_cpu - quiet * post_t) / len(flips) * 1000,
        "idle_cores": cores(m0, m1)["server"],
        "fanout_all_ms": fanout_beyond_idle(m0, m1, m2, len(flips)),
        "rss_before": rss_before,
        "rss_peak": meter.peak_rss,
        "mem_before": mem_before,
        "mem_after": mem_after,
        "spread": spread,
        "lag_ms": max(r["lag_ms"] for r in results),
        **analyse([v for r in results for v in r["views"]], flips, start),
    }
    polls = sum(result["statuses"].values())
    result["polls_per_s"] = polls / (m2["t"] - t_connect) if mode == "poll" else None
    print_phase(tag, result)
    return result


def per_client_kib(r: dict[str, Any], what: str) -> float:
    """The main workers' memory growth (``rss`` or ``pss``) per connected client, KiB."""
    if not r["connected"]:
        return math.nan
    return (r["mem_after"][what] - r["mem_before"][what]) / r["connected"] / 1024


def print_phase(tag: str, r: dict[str, Any]) -> None:
    """The detailed lines of one propagation phase."""
    d, f, s, b = r["delay"], r["flips"], r["from_sent"], r["busy"]
    log(
        f"{tag} propagation after the write's response (ms): n={d['n']} p50 {d['p50']:.1f} "
        f"p99 {d['p99']:.1f} max {d['max']:.1f} (min {r['min']:.1f}); after the write's send: "
        f"p50 {s['p50']:.1f} p99 {s['p99']:.1f} max {s['max']:.1f}"
    )
    log(
        f"{tag} verification: missed {r['missed']}, skipped versions {r['skipped']}, unknown versions "
        f"{r['unknown']}, bad payloads {r['bad']}, kill-switch state wrong {r['wrong']}/{r['checked']} "
        f"sampled, "
        f"reconnects {r['reconnects']}, shutdown events {r['shutdowns']}, statuses {r['statuses']}, "
        f"errors {r['errors'] or 0}"
    )
    log(
        f"{tag} kill/restore latency (ms): n={f['n']} p50 {f['p50']:.1f} p95 {f['p95']:.1f} "
        f"max {f['max']:.1f} (retries {r['retries']}); versions {r['versions'][0]}..{r['versions'][1]}"
    )
    polls = f"; {r['polls_per_s']:.0f} polls/s" if r["polls_per_s"] else ""
    log(
        f"{tag} server cores {r['quiet']:.2f} quiet, {r['post']:.2f} in the second after a flip "
        f"(fan-out {r['fanout_ms']:.0f} ms CPU per flip); phase: server {b['server']:.2f}, clients "
        f"{b['clients']:.2f}, bench {b['self']:.2f}, others {b['others']:.2f}; client loop lag max "
        f"{r['lag_ms']:.0f} ms{polls}"
    )
    extra = (r["rss_peak"] - r["rss_before"]) / r["n"] / 1024
    log(
        f"{tag} server RSS {r['rss_before'] / 2**20:.0f} MiB before connecting, peak "
        f"{r['rss_peak'] / 2**20:.0f} MiB ({extra:+.0f} KiB per client)"
    )
    idle_us = r["idle_cores"] / max(1, r["connected"]) * 1e6
    log(
        f"{tag} server cores with the clients connected and no flip (the --idle window): "
        f"{r['idle_cores']:.2f} ({idle_us:.1f} us per client per second); fan-out over the whole flip "
        f"phase beyond that: {r['fanout_all_ms']:.0f} ms CPU per flip"
    )
    a, b = r["mem_before"], r["mem_after"]
    log(
        f"{tag} main workers with the clients connected and idle: RSS {a['rss'] / 2**20:.0f} -> "
        f"{b['rss'] / 2**20:.0f} MiB, PSS {a['pss'] / 2**20:.0f} -> {b['pss'] / 2**20:.0f} MiB: "
        f"{per_client_kib(r, 'rss'):+.1f} KiB RSS, {per_client_kib(r, 'pss'):+.1f} KiB PSS per client; "
        f"the service's PSS {a['service_pss'] / 2**20:.0f} -> {b['service_pss'] / 2**20:.0f} MiB"
    )


# -- the poll ceiling (wrk) --------------------------------------------------------------------


class PollLoad(api.WrkLoad):
    """``wrk`` conditional polls, counted by api.py's Lua script. With ``rate`` (polls/s in all),
    each connection waits a random 0..2x(conns/rate) s before each poll, like SDKs on a timer,
    instead of re-polling as soon as the answer arrives (closed loop)."""

    def __init__(self, spec: LoadSpec, rate: float | None) -> None:  # replaces WrkLoad.__init__
        self.spec, self.seconds = spec, max(1, round(spec.seconds))
        pace = (
            f"function delay() return math.random(0, {2000 * spec.connections / rate:.0f}) end"
            if rate
            else ""
        )
        script = spec.workdir / "wrk-polls.lua"
        lua = f"wrk.headers[\"If-None-Match\"] = '{spec.etag}'\n{pace}"
        script.write_text(api.WRK_SCRIPT.replace("@TOKEN@", spec.token).replace("@INM@", lua))
        self.command = [
            "wrk",
            f"-t{spec.threads}",
            f"-c{spec.connections}",
            f"-d{self.seconds}s",
            "--timeout",
        ]
        self.command += ["5s", "--latency", "-s", str(script), f"http://{HOST}:{spec.port}{spec.path}"]
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        self.steady_at, self.end_at = started + 1.0, started + self.seconds


def run_ceiling(server: Server, args: argparse.Namespace, sdk_token: str, load_spec: str, root: Path) -> dict:
    """wrk conditional polls, closed loop (``C``) or paced (``C@R``); kill/restore in ``bench``
    every ``--ceiling-flip-gap`` s meanwhile."""
    conns, _, rate_text = load_spec.partition("@")
    rate = float(rate_text) if rate_text else None
    tag = f"[wrk -c{conns} {f'paced {rate:.0f}/s' if rate else 'closed loop'}]"
    url, auth = f"{server.base}/api/v1/envs/{PROD}/snapshot", {"Authorization": f"Bearer {sdk_token}"}
    with requests.get(url, headers=auth, timeout=10) as response:
        etag = response.headers["ETag"]
    flipper = Flipper(server.control_port or server.port, server.token, FLIP_ENV)
    meter, flips = Meter(server), []
    with meter:
        load = PollLoad(LoadSpec(server.port, sdk_token, etag, args.duration, int(conns), 2, 2, root), rate)
        try:
            meter.clients = [psutil.Process(load.proc.pid)]
            marks: list[dict[str, float]] = []  # on timers: a flip may still be waiting when wrk ends
            timers = [
                threading.Timer(max(0.0, t - time.monotonic()), lambda: marks.append(meter.mark()))
                for t in (load.steady_at, load.end_at - 0.3)
            ]
            for timer in timers:
                timer.start()
            time.sleep(max(0.0, load.steady_at - time.monotonic()))
            while time.monotonic() < load.end_at - 0.5:
                flips.append(flipper.flip())
                time.sleep(args.ceiling_flip_gap)
            for timer in timers:
                timer.join()
        except BaseException:
            load.kill()
            raise
        finally:
            flipper.conn.close()
        result = load.wait()
    cpu, f, lat = cores(*marks), percentiles([x.ms for x in flips]), result.latency_ms
    log(f"{tag} {shlex.join(load.command)}")
    log(
        f"{tag} {result.rps:.0f} conditional polls/s ({result.check()}); poll latency p50 {lat['p50']:.1f} "
        f"p99 {lat['p99']:.1f} max {lat['max']:.1f} ms"
    )
    log(
        f"{tag} kill/restore ({FLIP_ENV}) meanwhile (ms): n={f['n']} p50 {f['p50']:.1f} p95 {f['p95']:.1f} "
        f"p99 {f['p99']:.1f} max {f['max']:.1f}"
    )
    log(
        f"{tag} cores: server {cpu['server']:.2f}, wrk {cpu['clients']:.2f}, bench {cpu['self']:.2f}, "
        f"others {cpu['others']:.2f}; server RSS peak {meter.peak_rss / 2**20:.0f} MiB"
    )
    return dict(tag=tag[1:-1], paced=bool(rate), rps=result.rps, bad=result.bad, flips=f, cpu=cpu, lat=lat)


# -- report and main ---------------------------------------------------------------------------


def stream_targets(r: dict[str, Any], p99_ms: float, max_ms: float | None) -> list[tuple[str, str, bool]]:
    """The target rows of one streaming phase: p99 (and max) delay, every version everywhere."""
    p99, top, label = r["delay"]["p99"], r["delay"]["max"], f"N={r['n']} streams"
    rows = [(f"{label}: p99 <= {p99_ms:.0f} ms", f"{p99:.1f} ms", p99 <= p99_ms)]
    if max_ms is not None:
        rows.append((f"{label}: max <= {max_ms:.0f} ms", f"{top:.1f} ms", top <= max_ms))
    ok = r["missed"] == r["wrong"] == r["bad"] == r["unknown"] == 0 and r["connected"] == r["n"]
    rows.append((f"{label}: every client got every version", f"missed {r['missed']}", ok))
    return rows


def summary(phases: list[dict[str, Any]], ceil: list[dict[str, Any]]) -> None:
    """The tables, the targets with PASS/FAIL, and a note where other processes took CPU."""
    log("\n== Propagation (ms from the write's response until the client has the new version) ==")
    log(
        f"{'mode':<7}{'N':>6} {'p50':>7} {'p99':>7} {'max':>7} {'missed':>7} {'reconn':>7} {'flip p95':>9} "
        f"{'srv cores':>10} {'fan-out/flip':>13} {'RSS peak':>9} {'PSS/client':>11}"
    )
    for r in phases:
        d = r["delay"]
        log(
            f"{r['mode']:<7}{r['n']:>6} {d['p50']:>7.1f} {d['p99']:>7.1f} {d['max']:>7.1f} {r['missed']:>7} "
            f"{r['reconnects']:>7} {r['flips']['p95']:>9.1f} {r['busy']['server']:>10.2f} "
            f"{r['fanout_ms']:>10.0f} ms {r['rss_peak'] / 2**20:>5.0f} MiB "
            f"{per_client_kib(r, 'pss'):>7.1f} KiB"
        )
    log("\n== Conditional polls (304, wrk) and kill/restore (env bench) meanwhile, ms ==")
    log(
        f"{'load':<26}{'polls/s':>8} {'poll p99':>9} {'flips':>6} {'flip p50':>9} {'p95':>8} {'max':>8} "
        f"{'srv cores':>10}"
    )
    for c in ceil:
        f = c["flips"]
        log(
            f"{c['tag']:<26}{c['rps']:>8.0f} {c['lat']['p99']:>9.1f} {f['n']:>6} {f['p50']:>9.1f} "
            f"{f['p95']:>8.1f} {f['max']:>8.1f} {c['cpu']['server']:>10.2f}"
        )
    log("\n== Targets ==")
    rows: list[tuple[str, str, bool]] = []
    for r in (r for r in phases if r["mode"] == "stream" and r["n"] == TARGET_N):
        rows += stream_targets(r, TARGET_STREAM_P99_MS, TARGET_STREAM_MAX_MS)
    for r in (r for r in phases if r["mode"] == "stream" and r["n"] == TARGET_10K_N):
        rows += stream_targets(r, TARGET_10K_P99_MS, None)
    for c in ceil:
        label, p95, rps = c["tag"], c["flips"]["p95"], c["rps"]
        if not c["paced"]:
            ok = rps >= TARGET_POLLS_PER_S and c["bad"] == 0
            rows.append((f"{label}: 304 polls >= {TARGET_POLLS_PER_S:,.0f}/s", f"{rps:,.0f}/s", ok))
        value = f"{p95:.1f} ms (n={c['flips']['n']})"
        rows.append(
            (f"{label}: kill/restore p95 <= {TARGET_FLIP_P95_MS:.0f} ms", value, p95 <= TARGET_FLIP_P95_MS)
        )
    if not any(r["mode"] == "stream" and r["n"] == TARGET_N for r in phases):
        log(f"  (no --streams run with N={TARGET_N}: the streaming targets were not evaluated)")
    for label, value, ok in rows:
        log(f"  {label:<52} {value:>18}  {'PASS' if ok else 'FAIL'}")
    noisy = [(f"{r['mode']} N={r['n']}", r["busy"]["others"]) for r in phases]
    for phase, others in noisy + [(c["tag"], c["cpu"]["others"]) for c in ceil]:
        if others > 0.2:
            log(f"  NOTE: other processes on this machine used {others:.2f} cores during {phase}")


def create_sdk_tokens(server: Server, n: int) -> list[str]:
    """``n`` tokens made with ``flagsvc token create --role sdk`` against the running server's data
    folder: a token may hold ``MAX_STREAMS_PER_TOKEN`` streams per worker, so large runs spread
    their clients over ``STREAMS_PER_TOKEN`` per token."""
    return [create_token(server.data_dir, f"bench-sdk-{i}" if i else "bench-sdk", "sdk") for i in range(n)]


def server_settings(args: argparse.Namespace) -> dict[str, str]:
    """gunicorn's ``worker_connections`` (4,000 per worker by default) raised above the largest
    client count, in case one worker accepts most of them."""
    most = max([*args.streams, *args.pollers, 0])
    return {"FLAGSVC_WORKER_CONNECTIONS": str(most + 1000)} if most + 1000 > 4000 else {}


def int_list(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--streams", type=int_list, default=[100, 1000], help="stream-mode client counts")
    p.add_argument("--pollers", type=int_list, default=[1000], help="poll-mode client counts")
    p.add_argument("--poll-interval", type=float, default=1.0, help="poll-mode interval, s")
    p.add_argument("--flips", type=int, default=20, help="kill/restore flips per phase, 1-2 s apart")
    p.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: the service's)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk poll load")
    p.add_argument(
        "--ceiling",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=["64", "1000", "1000@2000", "1000@5000"],
        help="wrk poll loads: C (closed loop, C connections) or C@R (paced, R polls/s in all); '' skips",
    )
    p.add_argument("--ceiling-flip-gap", type=float, default=0.1, help="s between flips during wrk")
    p.add_argument(
        "--flip-via",
        choices=("control", "main"),
        default="control",
        help="send kill/restore to the control listener (flagsvc serve --control-port, the "
        "operators' port) or to the main one that SDKs poll",
    )
    p.add_argument("--client-procs", type=int, default=2, help="processes for the simulated clients")
    p.add_argument("--idle", type=float, default=2.0, help="s with clients connected before the flips")
    p.add_argument(
        "--drain", type=float, default=None, help="s after the last flip (default: 1.5, or N/1000 if more)"
    )
    p.add_argument("--flags", type=int, default=50, help="flags besides the kill switch")
    p.add_argument(
        "--full-events", action="store_true", help="stream clients take the whole snapshot on every change"
    )
    p.add_argument("--sample-every", type=int, default=50, help="every k-th client parses the whole JSON")
    p.add_argument("--seed", type=int, default=None, help="random seed (flip gaps, poll phases)")
    args = p.parse_args(argv)
    if min(args.flips, args.client_procs, args.sample_every, *args.streams, *args.pollers, 1) < 1:
        p.error("--flips, --client-procs, --sample-every and client counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    fd_limit = raise_fd_limit()  # before the server starts: gunicorn inherits it
    log(f"flagsvc propagation benchmark - {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    log(f"machine : nproc {cores}, {harness.cpu_model()}, loadavg {load:.2f}")
    log(f"command : cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}")
    log(f"code    : {git_describe()}")
    log(
        f"setup   : flagsvc serve --data-dir <tmp> --host {HOST} --port <free> "
        f"{f'--workers {args.workers}' if args.workers else '(default workers)'}"
        f"{' --control-port <free> (kill/restore sent there)' if args.flip_via == 'control' else ''}; "
        f"{args.flags + 1} flags; streams take {'whole snapshots' if args.full_events else 'patches'}; "
        f"{args.client_procs} client processes (asyncio); RLIMIT_NOFILE {fd_limit}; wrk {shutil.which('wrk')}"
    )
    root = Path(tempfile.mkdtemp(prefix="flagsvc-prop-"))
    phases: list[dict[str, Any]] = []
    ceil: list[dict[str, Any]] = []
    try:
        settings = server_settings(args)
        with Server(root, args.workers, control=args.flip_via == "control", settings=settings) as server:
            with requests.Session() as admin:
                admin.headers["Authorization"] = f"Bearer {server.token}"
                size, version = harness.setup_flags(server, admin, args.flags)
            most = max([*args.streams, *args.pollers, 1])
            tokens = create_sdk_tokens(server, -(-most // STREAMS_PER_TOKEN))
            workers = server.worker_pids()
            log(
                f"server  : :{server.port}, {len(workers)} gevent workers, snapshot {size} bytes, "
                f"v{version}; "
                f"{len(tokens)} SDK token(s), up to {STREAMS_PER_TOKEN} clients each"
                f"{''.join(f'; {k}={v}' for k, v in settings.items())}"
            )
            phases += [run_phase(server, args, tokens, "stream", n) for n in args.streams]
            phases += [run_phase(server, args, tokens, "poll", n) for n in args.pollers]
            ceil += [run_ceiling(server, args, tokens[0], spec, root) for spec in args.ceiling]
            if sorted(server.worker_pids()) != sorted(workers):
                log(f"WARNING: gunicorn workers changed during the run: {workers} -> {server.worker_pids()}")
        log(f"server stopped: SIGTERM, exit code {server.exit_code}")
    except BaseException:
        log(f"failed; server log (tail):\n{harness.tail(root / 'server.log')}")
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary(phases, ceil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
