"""Memory of ``flagsvc serve --control-port``: RSS, PSS and USS of each of its processes.

Each run starts ``flagsvc serve --data-dir <tmp> --port <free> --control-port <free>`` as
``bench/api.py`` does (``harness.Server``: embedded Redis, the admin token from
``<data-dir>/admin-token``), waits until both listeners answer ``/readyz``, then drives a small
but complete load through both of them, so that every module a request path imports lazily is
imported in every worker:

- 50 realistic flags in ``production`` and ``bench`` (one ``definitions/apply`` each), flags
  created with ``PUT`` (in ``bench``: production's version stays put), listed, read;
- kill and restore through the control listener and through the main one;
- snapshot polls (``200`` and ``304``), one event stream held open across a kill, SDK heartbeats,
  OFREP evaluations (one flag, and bulk), with an SDK token scoped to ``production``;
- the audit log, the propagation view, ``/metrics``, ``/readyz``, the console's sign-in page.

Every request goes out on a fresh connection, ``--rounds`` times from 3 threads at once, so that
each gunicorn worker serves each kind. After ``--settle`` seconds the benchmark reads
``/proc/<pid>/smaps_rollup`` of every process of the service and prints per process: its role,
RSS, PSS (proportional set size: a page shared by N processes counts 1/N in each) and USS
(private pages), then the total PSS of the service, the embedded redis-server aside (shown, not
counted). ``--repeat K`` runs K fresh servers and reports medians. Example::

    .venv/bin/python bench/memory.py --repeat 3

PSS also shares pages with processes outside the service (e.g. the python binary's pages with
another Python program running the same interpreter), so it moves a little with what else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests
from harness import (
    CONFLICTING_ENV,
    FLIP_ENV,
    HOST,
    PROD,
    Flipper,
    Server,
    busy_elsewhere,
    call,
    cpu_model,
    current_etag,
    exit_on_sigterm,
    flagsvc_command,
    log,
    median,
    package_versions,
    print_table,
    setup_flags,
)

TARGET_PSS_MB = 160.0
LOAD_THREADS = 3
STREAM_WAIT_S = 10.0
MB = 1024.0  # smaps_rollup counts kB


@dataclass(frozen=True)
class Memory:
    """One process's memory, in kB, from ``/proc/<pid>/smaps_rollup``."""

    rss: int
    pss: int
    uss: int


@dataclass(frozen=True)
class Sample:
    """One process of the service: what it is for, and its memory."""

    role: str
    pid: int
    memory: Memory


def read_memory(pid: int) -> Memory:
    """RSS, PSS and USS (private clean + private dirty) of ``pid``."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    return Memory(
        rss=fields["Rss"],
        pss=fields["Pss"],
        uss=fields["Private_Clean"] + fields["Private_Dirty"],
    )


# -- which process is which ---------------------------------------------------------------------


def _listeners(proc: psutil.Process, server: Server) -> str:
    """The listeners whose listening socket ``proc`` holds: ``main``, ``control`` or both."""
    ports = {c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    listeners = (("main", server.port), ("control", server.control_port))
    names = [name for name, port in listeners if port in ports]
    return "+".join(names) or "none"


def role_of(proc: psutil.Process, top: int, workers: set[int], server: Server) -> str:
    """What ``proc`` is for: the ``flagsvc serve`` parent, a gunicorn arbiter or worker (with the
    listeners it holds), or a helper."""
    if proc.pid == top:
        return "flagsvc serve (supervisor)"
    if proc.pid in workers:
        return f"gunicorn worker ({_listeners(proc, server)})"
    if any("gunicorn" in part for part in proc.cmdline()):
        return f"gunicorn arbiter ({_listeners(proc, server)})"
    return f"helper: {shlex.join(proc.cmdline())[:60]}"


def service_processes(server: Server) -> tuple[list[Sample], Sample | None]:
    """Every process of the service with its role and memory, and the embedded redis-server's."""
    assert server.proc is not None
    top = psutil.Process(server.proc.pid)
    redis_pid = server.redis.pid if server.redis is not None else None
    workers = {w.pid for w in server.gunicorn_workers()}
    samples: list[Sample] = []
    for proc in [top, *top.children(recursive=True)]:
        if proc.pid == redis_pid:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            samples.append(Sample(role_of(proc, top.pid, workers, server), proc.pid, read_memory(proc.pid)))
    redis_sample = None
    if redis_pid is not None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            redis_sample = Sample("embedded redis-server (not counted)", redis_pid, read_memory(redis_pid))
    return sorted(samples, key=lambda s: (s.role, s.pid)), redis_sample


# -- the load -----------------------------------------------------------------------------------


def create_sdk_token(data_dir: Path) -> str:
    """An SDK token scoped to ``production`` (OFREP needs exactly one environment)."""
    cmd = [*flagsvc_command(), "token", "create", "--name", "memory-sdk", "--role", "sdk"]
    cmd += ["--env", PROD, "--data-dir", str(data_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()[0].strip()


def sdk_requests(base: str, sdk: str, etag: str, n: int) -> None:
    """What an SDK (or an OFREP client) sends, each on a fresh connection."""
    env = f"{base}/api/v1/envs/{PROD}"
    auth = {"Authorization": f"Bearer {sdk}"}
    with requests.Session() as s:
        s.headers.update(auth)
        call(s, "GET", f"{env}/snapshot", {200})
    with requests.Session() as s:
        s.headers.update(auth)
        call(s, "GET", f"{env}/snapshot", {304}, headers={"If-None-Match": etag})
    with requests.Session() as s:
        s.headers.update(auth)
        body = {"app": "memory-bench", "applied_version": int(etag.strip('"').split("-")[0])}
        call(s, "POST", f"{env}/clients/memory-{n:03d}", {204}, json=body)
    with requests.Session() as s:
        s.headers.update({"X-API-Key": sdk, "X-Flagsvc-App": "memory-bench"})
        ctx = {"context": {"targetingKey": f"user-{n}", "country": "FR"}}
        call(s, "POST", f"{base}/ofrep/v1/evaluate/flags/search.release-01", {200}, json=ctx)
        call(s, "POST", f"{base}/ofrep/v1/evaluate/flags", {200}, json=ctx)


def operator_requests(base: str, admin: str, n: int) -> None:
    """What an operator's tools read, each on a fresh connection."""
    env = f"{base}/api/v1/envs/{PROD}"
    for path in (
        f"{env}/flags",
        f"{env}/flags/checkout.kill-00",
        f"{env}/audit?limit=20",
        f"{env}/clients",
        f"{base}/api/v1/envs",
    ):
        with requests.Session() as s:
            s.headers["Authorization"] = f"Bearer {admin}"
            call(s, "GET", path, {200})
    with requests.Session() as s:
        call(s, "GET", f"{base}/metrics", {200})
        call(s, "GET", f"{base}/readyz", {200})
        call(s, "GET", f"{base}/ui/signin", {200})
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {admin}"
        flag = {"kind": "kill_switch", "enabled": True, "owner": "team-memory"}
        other = f"{base}/api/v1/envs/{FLIP_ENV}"  # production's version stays, its polls stay 304s
        call(s, "PUT", f"{other}/flags/memory.switch-{n:03d}", {200, 201}, json=flag)


def stream_across_a_kill(server: Server, sdk: str, admin: str) -> None:
    """Open an event stream on the main listener, kill and restore through the control listener,
    and wait for the stream to carry the kill."""
    url = f"{server.base}/api/v1/envs/{PROD}/stream"
    headers = {"Authorization": f"Bearer {sdk}", "Accept": "text/event-stream"}
    with requests.get(url, headers=headers, stream=True, timeout=STREAM_WAIT_S) as stream:
        lines = stream.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line.startswith("id:"))
        flipper = Flipper(f"http://{HOST}:{server.control_port}", admin, PROD)
        try:
            flipper.flip()
            flipper.flip()
        finally:
            flipper.close()
        deadline = time.monotonic() + STREAM_WAIT_S
        for line in lines:
            if line.startswith("id:") and line != first:
                return
            if time.monotonic() > deadline:
                break
        raise RuntimeError("the stream did not carry the kill")


def in_threads(tasks: Sequence[Callable[[], None]], threads: int) -> None:
    """Run ``tasks`` on ``threads`` threads at once; the first error is raised."""
    pending = list(tasks)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                task = pending.pop()
            try:
                task()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                with lock:
                    errors.append(exc)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


def exercise(server: Server, n_flags: int, rounds: int) -> None:
    """The load of the module docstring, through both listeners."""
    admin = requests.Session()
    admin.headers["Authorization"] = f"Bearer {server.token}"
    setup_flags(server, admin, n_flags)
    sdk = create_sdk_token(server.data_dir)
    etag = current_etag(server, admin)
    bases = [server.base, f"http://{HOST}:{server.control_port}"]
    for base in bases:
        flipper = Flipper(base, server.token, PROD)
        try:
            flipper.flip()
            flipper.flip()
        finally:
            flipper.close()
    stream_across_a_kill(server, sdk, server.token)
    etag = current_etag(server, admin)
    admin.close()
    tasks: list[Callable[[], None]] = []
    for n in range(rounds):
        for base in bases:
            tasks.append(lambda b=base, n=n: sdk_requests(b, sdk, etag, n))
            tasks.append(lambda b=base, n=n: operator_requests(b, server.token, n))
    in_threads(tasks, LOAD_THREADS)


# -- runs and report ----------------------------------------------------------------------------


@dataclass
class RunResult:
    samples: list[Sample]
    redis: Sample | None

    @property
    def total_pss(self) -> int:
        return sum(s.memory.pss for s in self.samples)


def mb(kb: float) -> str:
    return f"{kb / MB:.1f}"


def print_run(run: RunResult) -> None:
    rows = [[s.role, str(s.pid), mb(s.memory.rss), mb(s.memory.pss), mb(s.memory.uss)] for s in run.samples]
    if run.redis is not None:
        r = run.redis
        rows.append([r.role, str(r.pid), mb(r.memory.rss), mb(r.memory.pss), mb(r.memory.uss)])
    print_table(["process", "pid", "RSS MB", "PSS MB", "USS MB"], rows)
    log(f"total PSS of the service (redis-server aside): {mb(run.total_pss)} MB")


def run_once(args: argparse.Namespace, tag: str) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix="flagsvc-memory-", dir=args.tmp_dir))
    try:
        with Server(root, args.workers, control=True) as server:
            log(f"{tag} server up on :{server.port}, control listener :{server.control_port}")
            try:
                exercise(server, args.flags, args.rounds)
            except Exception:
                log(f"{tag} the load failed; the server log ends with:\n{server.log_tail()}")
                raise
            time.sleep(args.settle)
            samples, redis_sample = service_processes(server)
            run = RunResult(samples, redis_sample)
            log(f"{tag} {len(samples)} processes, others busy {busy_elsewhere(0.5):.2f} cores")
            print_run(run)
            log()
            return run
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_summary(runs: Sequence[RunResult]) -> None:
    """Medians across runs, per role (roles with several processes: per process, in pid order)."""
    by_role: dict[str, list[list[Memory]]] = {}
    for run in runs:
        seen: dict[str, int] = {}
        for s in run.samples:
            k = seen.get(s.role, 0)
            seen[s.role] = k + 1
            slots = by_role.setdefault(s.role, [])
            while len(slots) <= k:
                slots.append([])
            slots[k].append(s.memory)
    rows = []
    for role, slots in sorted(by_role.items()):
        for k, mems in enumerate(slots):
            label = f"{role} #{k + 1}" if len(slots) > 1 else role
            rows.append(
                [
                    label,
                    mb(median([m.rss for m in mems])),
                    mb(median([m.pss for m in mems])),
                    mb(median([m.uss for m in mems])),
                ]
            )
    log(f"summary: medians of {len(runs)} run(s)")
    print_table(["process", "RSS MB", "PSS MB", "USS MB"], rows)
    totals = [run.total_pss for run in runs]
    total = median(totals)
    verdict = "met" if total / MB <= TARGET_PSS_MB else "NOT met"
    log(
        f"total PSS (redis-server aside): {mb(total)} MB (runs: {', '.join(mb(t) for t in totals)}); "
        f"target <= {TARGET_PSS_MB:g} MB: {verdict}"
    )
    redis_pss = [run.redis.memory.pss for run in runs if run.redis is not None]
    if redis_pss:
        log(f"embedded redis-server PSS (not counted): {mb(median(redis_pss))} MB")


def print_header(args: argparse.Namespace) -> None:
    load1, load5, load15 = os.getloadavg()
    log(f"flagsvc memory benchmark - {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    log(f"machine : nproc {len(os.sched_getaffinity(0))}, {cpu_model()}")
    log(f"          {platform.system()} {platform.release()} {platform.machine()}")
    log(
        f"          loadavg {load1:.2f} {load5:.2f} {load15:.2f}; "
        f"others busy {busy_elsewhere():.2f} cores just before the start"
    )
    log(f"python  : {platform.python_version()} ({sys.executable})")
    log(f"packages: {package_versions()}")
    log(f"reproduce: cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}")
    if os.environ.get("PYTHONPATH"):
        log(f"          with PYTHONPATH={os.environ['PYTHONPATH']}")
    tmp = Path(args.tmp_dir or tempfile.gettempdir()).resolve()
    server = [*flagsvc_command(), "serve", "--data-dir", f"{tmp}/flagsvc-memory-XXXX/data"]
    server += ["--host", HOST, "--port", "<free>", "--control-port", "<free>"]
    server += ["--workers", str(args.workers)] if args.workers else []
    log(f"server  : {' '.join(server)}")
    passed = sorted(k for k in os.environ if k.startswith("FLAGSVC_") and k not in CONFLICTING_ENV)
    settings = " ".join(f"{k}={os.environ[k]}" for k in passed)
    log(f"settings: {settings or 'none'} (FLAGSVC_* variables of this environment, passed on)")
    log(
        f"load    : {args.flags} flags; kills via both listeners; a stream across a kill; then "
        f"{args.rounds} rounds x 2 listeners of SDK and operator requests, {LOAD_THREADS} threads, "
        f"fresh connections; {args.settle:g} s settle"
    )
    log("memory  : /proc/<pid>/smaps_rollup: Rss, Pss, USS = Private_Clean + Private_Dirty")
    log()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers of the main listener")
    parser.add_argument("--repeat", type=int, default=1, help="fresh servers; the summary takes medians")
    parser.add_argument("--flags", type=int, default=50, help="flags besides the kill switch")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of requests per listener")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between the load and the reading")
    parser.add_argument("--tmp-dir", default=None, help="where the data folders go (default: the temp dir)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.repeat < 1 or args.rounds < 1 or args.flags < 2 or args.settle < 0:
        parser.error("--workers, --repeat, --rounds >= 1; --flags >= 2; --settle >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    print_header(args)
    runs = [run_once(args, f"[{k + 1}/{args.repeat}]") for k in range(args.repeat)]
    print_summary(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
