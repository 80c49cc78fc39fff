"""Benchmark of the read tier: the origin's load behind the shipped nginx cache as the SDK poll rate grows.

``flagsvc serve`` (2 gevent workers, embedded Redis), started as an operator starts it, behind
nginx running ``ops/nginx/flagsvc.conf`` as shipped (plain HTTP on a free port instead of TLS, the
cache in a temporary folder). Simulated SDKs poll ``GET /api/v1/envs/{env}/snapshot`` through
nginx at each rate of ``--rates`` in turn (paced, open loop: processes x threads, one keep-alive
``http.client`` connection each), with ``If-None-Match`` and ``Accept-Encoding: gzip`` as the
Python SDK sends them, spread over ``--tokens`` sdk tokens in each of ``--envs`` environments.
For each rate it prints the polls per second the clients got answered through nginx, the polls
per second the origin answered (its ``flagsvc_snapshot_polls_total``), and nginx's cache
statuses. ``--direct`` adds the same rates straight to the origin, for comparison. Each environment holds
``--flags`` realistic flags (``harness.realistic_flags``).

    .venv/bin/python bench/read_tier.py                          # 100/s, then 1,000/s: ~1 minute
    .venv/bin/python bench/read_tier.py --rates 100,300,1000,2000 --tokens 4 --envs 2 --direct
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
from harness import (
    HOST,
    PROD,
    Server,
    create_token,
    exit_on_sigterm,
    free_port,
    log,
    package_versions,
    percentiles,
    print_table,
    raise_fd_limit,
    realistic_flags,
)

SITE = Path(__file__).resolve().parent.parent / "ops/nginx/flagsvc.conf"
NGINX = next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), "nginx")
#: The cache folder of the shipped site, replaced by one under the run's temporary folder.
CACHE_DIR = "/var/cache/nginx/flagsvc"


@dataclass(frozen=True)
class Target:
    """One kind of SDK: an environment, a token, the snapshot it holds."""

    path: str
    token: str
    etag: str


@dataclass(frozen=True)
class LoadSpec:
    port: int
    targets: tuple[Target, ...]
    rate: float  #: polls per second, all threads together
    threads: int  #: per process
    processes: int
    start: float  #: time.time() at which the measured window opens (after the warm-up)
    end: float


# -- nginx ---------------------------------------------------------------------------------------


def nginx_site(listen: int, origin: int, cache: Path) -> str:
    """The shipped site on plain HTTP, in front of ``origin`` for every upstream."""
    site = SITE.read_text().replace("listen 443 ssl http2;", f"listen {HOST}:{listen};")
    site = "\n".join(line for line in site.splitlines() if "ssl_certificate" not in line)
    for shipped in ("127.0.0.1:8000", "127.0.0.1:8001"):
        site = site.replace(shipped, f"{HOST}:{origin}")
    return site.replace(CACHE_DIR, str(cache))


class Nginx:
    """nginx with the shipped site, its files (logs, cache) under ``root``."""

    def __init__(self, root: Path, origin: int) -> None:
        self.root, self.port = root, free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.access_log = root / "access.log"
        (root / "site.conf").write_text(nginx_site(self.port, origin, root / "cache"))
        user = "user root;\n" if os.geteuid() == 0 else ""  # else workers run as nobody
        (root / "nginx.conf").write_text(
            f"{user}pid {root}/nginx.pid;\nerror_log {root}/error.log;\ndaemon off;\n"
            "events { worker_connections 4096; }\n"
            f"http {{\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n"
            "  log_format tier '$msec $status $upstream_cache_status';\n"
            f"  access_log {self.access_log} tier;\n  include {root}/site.conf;\n}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        command = [NGINX, "-p", str(self.root), "-c", str(self.root / "nginx.conf")]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(f"{self.base}/healthz", timeout=1)
                return self
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(
                        f"nginx did not start: {(self.root / 'error.log').read_text()}"
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cache_statuses(self, start: float, end: float) -> Counter[str]:
        """``$upstream_cache_status`` of the snapshot answers nginx logged within [start, end)."""
        statuses: Counter[str] = Counter()
        for line in self.access_log.read_text().splitlines():
            stamp, _, cache = line.split(" ")
            if start <= float(stamp) < end:
                statuses[cache] += 1
        return statuses


# -- the load ------------------------------------------------------------------------------------


def poller(spec: LoadSpec, offset: int, out: list[tuple[int, float]]) -> None:
    """One connection polling at ``spec.rate / (threads x processes)``, until ``spec.end``."""
    every = spec.threads * spec.processes / spec.rate
    conn = http.client.HTTPConnection(HOST, spec.port, timeout=10)
    due, n = time.time() + every * offset / (spec.threads * spec.processes), offset
    while due < spec.end:
        time.sleep(max(0.0, due - time.time()))
        target = spec.targets[n % len(spec.targets)]
        headers = {"Authorization": f"Bearer {target.token}", "If-None-Match": target.etag}
        sent = time.time()
        try:
            conn.request("GET", f"{target.path}/snapshot", headers={**headers, "Accept-Encoding": "gzip"})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(HOST, spec.port, timeout=10)
            status = 0
        if spec.start <= sent < spec.end:
            out.append((status, time.time() - sent))
        due, n = due + every, n + spec.threads * spec.processes


def load_process(spec: LoadSpec, index: int, results: mp.Queue) -> None:
    samples: list[tuple[int, float]] = []
    threads = [
        threading.Thread(target=poller, args=(spec, index * spec.threads + t, samples))
        for t in range(spec.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(samples)


def run_load(spec: LoadSpec) -> list[tuple[int, float]]:
    results: mp.Queue = mp.Queue()
    procs = [mp.Process(target=load_process, args=(spec, i, results)) for i in range(spec.processes)]
    for proc in procs:
        proc.start()
    try:
        samples = [sample for _ in procs for sample in results.get(timeout=spec.end - time.time() + 60)]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return samples


# -- the measurement -----------------------------------------------------------------------------


def origin_polls(server: Server, envs: Sequence[str]) -> int:
    """Snapshot polls the origin answered in ``envs``, all workers together (its /metrics)."""
    text = requests.get(f"{server.base}/metrics", timeout=10).text
    prefixes = tuple(f'flagsvc_snapshot_polls_total{{env="{env}",' for env in envs)
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(prefixes))


@dataclass
class Phase:
    via: str
    rate: float
    answered: float  #: polls/s the clients got a 200 or 304 for
    failed: int
    origin: float  #: polls/s the origin answered
    p50_ms: float
    p99_ms: float
    cache: Counter[str]


def measure(
    server: Server, nginx: Nginx | None, targets: tuple[Target, ...], rate: float, args: argparse.Namespace
) -> Phase:
    port = nginx.port if nginx else server.port
    processes = args.processes
    threads = max(1, min(args.threads, int(rate // processes) or 1))
    start = time.time() + args.warmup
    spec = LoadSpec(port, targets, rate, threads, processes, start, start + args.duration)
    envs = sorted({t.path.rsplit("/", 1)[1] for t in targets})
    counted: list[tuple[float, int]] = []  # (when, origin polls so far)

    def count_window() -> None:
        for moment in (spec.start, spec.end):
            time.sleep(max(0.0, moment - time.time()))
            asked = time.time()
            polls = origin_polls(server, envs)
            counted.append(((asked + time.time()) / 2, polls))

    counter = threading.Thread(target=count_window)
    counter.start()
    samples = run_load(spec)
    counter.join()
    ok = [seconds for status, seconds in samples if status in (200, 304)]
    latency = percentiles(ok) if ok else {"p50": 0.0, "p99": 0.0}
    return Phase(
        via="nginx" if nginx else "direct",
        rate=rate,
        answered=len(ok) / args.duration,
        failed=len(samples) - len(ok),
        origin=(counted[1][1] - counted[0][1]) / (counted[1][0] - counted[0][0]),
        p50_ms=latency["p50"] * 1000,
        p99_ms=latency["p99"] * 1000,
        cache=nginx.cache_statuses(spec.start, spec.end) if nginx else Counter(),
    )


def setup(server: Server, args: argparse.Namespace) -> tuple[Target, ...]:
    """``--envs`` environments of ``--flags`` kill switches, ``--tokens`` sdk tokens in each."""
    admin = requests.Session()
    admin.headers["Authorization"] = f"Bearer {server.token}"
    targets = []
    for e in range(args.envs):
        env = PROD if e == 0 else f"bench-{e}"
        api = f"{server.base}/api/v1/envs/{env}"
        admin.put(api, timeout=10).raise_for_status()
        flags = dict(realistic_flags(args.flags))
        body: dict[str, Any] = {"definitions": {"flags": flags}, "reason": "bench setup"}
        admin.post(f"{api}/definitions/apply", json=body, timeout=30).raise_for_status()
        for t in range(args.tokens):
            token = create_token(server.data_dir, f"read-tier-{env}-{t}", "sdk")
            etag = requests.get(f"{api}/snapshot", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            targets.append(Target(f"/api/v1/envs/{env}", token, etag.headers["ETag"]))
    log(f"snapshot of {args.flags} flags: {snapshot_sizes(server, targets[0])}")
    return tuple(targets)


def snapshot_sizes(server: Server, target: Target) -> str:
    """The snapshot's size as sent, in identity and in gzip."""
    sizes = []
    for encoding in ("identity", "gzip"):
        headers = {"Authorization": f"Bearer {target.token}", "Accept-Encoding": encoding}
        with requests.get(
            f"{server.base}{target.path}/snapshot", headers=headers, timeout=10, stream=True
        ) as resp:
            sizes.append(f"{len(resp.raw.read(decode_content=False)):,} bytes {encoding}")
    return ", ".join(sizes)


def report(phases: list[Phase], variants: int) -> None:
    rows = []
    for p in phases:
        cache = " ".join(f"{k}:{v}" for k, v in sorted(p.cache.items()) if k != "-") or "-"
        rows.append(
            [
                p.via,
                f"{p.rate:,.0f}",
                f"{p.answered:,.0f}",
                str(p.failed),
                f"{p.origin:,.1f}",
                f"{p.p50_ms:.1f} / {p.p99_ms:.1f}",
                cache,
            ]
        )
    header = ["via", "target /s", "answered /s", "failed", "origin polls /s", "p50 / p99 ms", "nginx cache"]
    print_table(header, rows)
    log(f"\ncache entries (environments x tokens; every poll asks for gzip): {variants}")
    through = [p for p in phases if p.via == "nginx"]
    if len(through) >= 2:
        low, high = through[0], through[-1]
        log(
            f"client polls x{high.answered / max(low.answered, 1e-9):.1f} "
            f"({low.answered:,.0f}/s -> {high.answered:,.0f}/s): "
            f"origin polls {low.origin:.1f}/s -> {high.origin:.1f}/s"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="100,1000", help="client polls per second, one phase each")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--tokens", type=int, default=2, help="sdk tokens per environment")
    parser.add_argument("--envs", type=int, default=1, help="environments polled")
    parser.add_argument("--flags", type=int, default=50, help="realistic flags per environment")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--threads", type=int, default=8, help="connections per load process")
    parser.add_argument("--direct", action="store_true", help="also poll the origin directly at each rate")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    raise_fd_limit()
    log(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")
    log(f"{platform.node()}: {psutil.cpu_count()} CPUs, {platform.python_version()}; {package_versions()}")
    log(subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip())
    log(f"loadavg before: {os.getloadavg()[0]:.2f} (other jobs on this machine skew the direct rows)")
    with tempfile.TemporaryDirectory(prefix="flagsvc-read-tier-") as tmp:
        root = Path(tmp)
        (root / "nginx").mkdir()
        (root / "server").mkdir()
        with Server(root / "server", workers=2) as server, Nginx(root / "nginx", server.port) as nginx:
            targets = setup(server, args)
            phases = []
            for rate in args.rates:
                phases.append(measure(server, nginx, targets, rate, args))
                log(f"  nginx {rate:,.0f}/s: origin {phases[-1].origin:.1f}/s")
                if args.direct:
                    phases.append(measure(server, None, targets, rate, args))
                    log(f"  direct {rate:,.0f}/s: origin {phases[-1].origin:.1f}/s")
            report(phases, len(targets))
    log(f"loadavg after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
