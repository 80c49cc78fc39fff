"""Audit-log benchmark: filtered queries and exports over 1,000,000 entries.

    .venv/bin/python bench/audit.py                      # full size, about 15-20 minutes
    .venv/bin/python bench/audit.py --entries 50000 --repeat 1 --samples 50   # quick run

It starts its own redis-server (``tests/redis_server.py``, loopback, no persistence). It creates
the environment ``bench`` and fills it through the real write path, ``Committer.commit``: batches
of ``--batch`` chained entries per commit, with the audit head read before each one. The entries
spread over 5,000 flags, 20 actors and 2,000 incidents (85 % of entries have one; an incident's
entries are close together in time). Each has a ~300-byte flag JSON as before and after, plus a
reason. It then starts the app exactly as in production (gunicorn, ``flagsvc.gunicorn_conf``,
gevent workers) and measures:

1. a first page of 100 and up to ``--pages`` deeper pages (following ``next_cursor``) per filter
   with random values: by flag, incident, actor, a time window (newest and oldest first),
   flag+actor and actor+rare action. Each is measured in-process (``AuditLog.query``) and over
   HTTP (``GET /api/v1/envs/bench/audit``, one keep-alive session, a reader token);
2. NDJSON and CSV export throughput of a busy filter (one actor) and of the whole log, with the
   peak RSS of the gunicorn workers sampled during the export.

Stream ids are assigned at write time, so the "1-hour window" is a slice of the fill: a random
window in the middle half of it, 1/``--window-share`` of the fill's duration (the fill standing
for a day, the window for one hour of it). Percentiles are medians over ``--repeat`` runs on the
same data. The target is p95 <= 50 ms for a page of 100 over HTTP, on the first and deeper pages.
"""

from __future__ import annotations

import argparse
import bisect
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from flagsvc.audit import AuditFilter, AuditLog
from flagsvc.commit import Committer
from flagsvc.envs import EnvStore
from flagsvc.extensions import connect
from flagsvc.keys import EnvKeys
from flagsvc.tokens import Role, TokenStore

REPO = Path(__file__).resolve().parents[1]
ENV = "bench"
PAGE = 100
TARGET_P95_MS = 50.0
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
ACTORS = (
    [f"oncall-{name}" for name in NAMES]
    + [f"deploy-bot-{n}" for n in range(5)]
    + [f"sre-{n}" for n in range(5)]
)
ACTIONS = (
    "flag.update",
    "flag.kill",
    "flag.restore",
    "flag.create",
    "playbook.apply",
    "playbook.revert",
    "flag.auto_revert",
    "flag.delete",
)
ACTION_WEIGHTS = (50, 15, 15, 5, 5, 4, 5, 1)
RARE_ACTION = "flag.delete"  # 1 % of entries
REASONS = (
    "payments 5xx spike, cutting the blast radius",
    "rollback after latency regression on checkout p99",
    "vendor API degraded; falling back to the cached path",
    "planned rollout step approved in change review",
    "restoring after the incident was mitigated and verified",
    "search v2 error budget burned, disabling for EU traffic",
)
FLAG_JSON = (
    '{{"kind":"{kind}","type":"boolean","enabled":{enabled},"variants":{{"on":true,"off":false}},'
    '"default_variant":"on","off_variant":"off","rules":[{{"conditions":[{{"attribute":"country",'
    '"operator":"in","values":["FR","BE","DE"]}}],"variant":"on"}},{{"conditions":[],"rollout":'
    '[{{"variant":"on","weight":{w}}},{{"variant":"off","weight":{rest}}}],"bucket_by":"targeting_key"}}],'
    '"owner":"team-{team}","version":{version}}}'
)
KINDS = ("flag", "incident", "actor", "window", "window, oldest first", "flag+actor", "actor+action")


def flag_key(i: int) -> str:
    return f"flag-{i:05d}"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the value itself for a single sample."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# --- fill -----------------------------------------------------------------------------------


@dataclass
class Fill:
    entries: int
    seconds: float
    marks: list[tuple[int, int]]  # (ms of a commit's last stream id, entries written by then)
    truncated: bool

    def count_at(self, ms: int) -> int:
        """Entries whose stream id is at or before ``ms`` (to within one batch)."""
        i = bisect.bisect_right([m for m, _ in self.marks], ms)
        return self.marks[i - 1][1] if i else 0

    def window(self, rng: random.Random, share: float) -> tuple[int, int]:
        """A random window of 1/share of the fill's duration, in its middle half."""
        t0, t1 = self.marks[0][0], self.marks[-1][0]
        width = (t1 - t0) / share
        start = rng.uniform(t0 + 0.25 * (t1 - t0), t0 + 0.75 * (t1 - t0) - width)
        return int(start), int(start + width)


def make_entries(
    rng: random.Random, first: int, count: int, args: argparse.Namespace
) -> list[dict[str, str]]:
    """``count`` realistic audit entries, the ``first``-th onwards."""
    out = []
    for i in range(first, first + count):
        action = rng.choices(ACTIONS, ACTION_WEIGHTS)[0]
        before_on, after_on = action != "flag.restore", action not in ("flag.kill", "flag.delete")
        version, w = rng.randrange(1, 500), rng.randrange(0, 101)
        shape = {"kind": "release", "w": w, "rest": 100 - w, "team": i % 40}
        incident = f"INC-{1 + i * args.incidents // args.entries}" if rng.random() < 0.85 else ""
        actor = rng.choice(ACTORS)
        out.append(
            {
                "actor": actor,
                "action": action,
                "flag": flag_key(rng.randrange(args.flags)),
                "token": f"tok-{ACTORS.index(actor):02d}",
                "before": FLAG_JSON.format(enabled=str(before_on).lower(), version=version, **shape),
                "after": FLAG_JSON.format(enabled=str(after_on).lower(), version=version + 1, **shape),
                "reason": f"{incident or 'CHG-' + str(i % 9000)}: {rng.choice(REASONS)}",
                "incident": incident,
                "request_id": f"{rng.getrandbits(64):016x}",
                "source": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}",
                "env_version": str(i + 1),
                "playbook": f"contain-{i % 30}" if action.startswith("playbook.") else "",
            }
        )
    return out


def fill(client: redis.Redis, args: argparse.Namespace) -> Fill:
    """Write ``args.entries`` entries, ``args.batch`` per commit, reading the head before each."""
    keys, committer, rng = EnvKeys(ENV), Committer(client), random.Random(args.seed)
    written, marks, start, step = 0, [], time.perf_counter(), max(args.entries // 10, 1)
    while written < args.entries:
        if time.perf_counter() - start > args.fill_timeout:
            print(f"  fill stopped after {args.fill_timeout:.0f} s (--fill-timeout): {written:,} entries")
            break
        batch = make_entries(rng, written, min(args.batch, args.entries - written), args)
        head = client.get(keys.audit_head)
        committed = committer.commit(keys, head, ops=[], audit=batch)
        if not marks:  # the first mark is where the fill starts
            marks.append((int(committed.stream_id.split("-")[0]), 0))
        written += len(batch)
        marks.append((int(committed.stream_id.split("-")[0]), written))
        if written // step != (written - len(batch)) // step:
            elapsed = time.perf_counter() - start
            print(
                f"  {written:>9,} entries  {elapsed:6.1f} s  {written / elapsed:7,.0f} entries/s", flush=True
            )
    return Fill(written, time.perf_counter() - start, marks, written < args.entries)


# --- queries --------------------------------------------------------------------------------

Pager = Callable[[dict[str, str], str | None], tuple[int, str | None]]


def sample_params(kind: str, rng: random.Random, fl: Fill, args: argparse.Namespace) -> dict[str, str]:
    """Query parameters (as the HTTP API takes them) for one random query of ``kind``."""
    flag, actor = flag_key(rng.randrange(args.flags)), rng.choice(ACTORS)
    if kind.startswith("window"):
        lo, hi = fl.window(rng, args.window_share)
        return {"since": iso(lo), "until": iso(hi)} | ({"order": "oldest"} if "oldest" in kind else {})
    return {
        "flag": {"flag": flag},
        "incident": {"incident": f"INC-{rng.randrange(1, args.incidents + 1)}"},
        "actor": {"actor": actor},
        "flag+actor": {"flag": flag, "actor": actor},
        "actor+action": {"actor": actor, "action": RARE_ACTION},
    }[kind]


def to_filter(params: dict[str, str]) -> tuple[AuditFilter, bool]:
    """HTTP query parameters -> (AuditFilter, oldest_first), as the API view builds them."""

    def moment(name: str) -> datetime | None:
        return datetime.fromisoformat(params[name].replace("Z", "+00:00")) if name in params else None

    names = ("flag", "actor", "action", "incident")
    crit = AuditFilter(**{n: params.get(n) for n in names}, since=moment("since"), until=moment("until"))
    return crit, params.get("order") == "oldest"


def in_process_pager(log: AuditLog) -> Pager:
    def page(params: dict[str, str], cursor: str | None) -> tuple[int, str | None]:
        crit, oldest = to_filter(params)
        result = log.query(crit, limit=PAGE, cursor=cursor, oldest_first=oldest)
        return len(result.entries), result.next_cursor

    return page


def http_pager(session: requests.Session, base: str) -> Pager:
    def page(params: dict[str, str], cursor: str | None) -> tuple[int, str | None]:
        query = params | {"limit": str(PAGE)} | ({"cursor": cursor} if cursor else {})
        resp = session.get(f"{base}/api/v1/envs/{ENV}/audit", params=query, timeout=60)
        resp.raise_for_status()
        body = resp.json()
        return len(body["entries"]), body["next_cursor"]

    return page


@dataclass
class Sample:
    first: list[float]  # ms
    deep: list[float]  # ms
    rows: list[int]  # entries on the first page


def measure(pager: Pager, kind: str, rng: random.Random, fl: Fill, args: argparse.Namespace) -> Sample:
    """First page and up to ``args.pages`` deeper pages of ``args.samples`` random queries."""
    for _ in range(3):  # warm-up
        pager(sample_params(kind, rng, fl, args), None)
    out, deadline = Sample([], [], []), time.monotonic() + args.max_filter_seconds
    for _ in range(args.samples):
        if time.monotonic() > deadline:
            break
        params = sample_params(kind, rng, fl, args)
        t = time.perf_counter()
        rows, cursor = pager(params, None)
        out.first.append((time.perf_counter() - t) * 1000)
        out.rows.append(rows)
        for _ in range(args.pages):
            if not cursor:
                break
            t = time.perf_counter()
            _, cursor = pager(params, cursor)
            out.deep.append((time.perf_counter() - t) * 1000)
    return out


def all_ids(log: AuditLog, crit: AuditFilter, oldest_first: bool) -> list[str]:
    """Every matching id, page by page through ``next_cursor``."""
    ids: list[str] = []
    cursor = None
    while True:
        page = log.query(crit, limit=PAGE, cursor=cursor, oldest_first=oldest_first)
        ids += [e["id"] for e in page.entries]
        if not (cursor := page.next_cursor):
            return ids


def check_consistency(client: redis.Redis, fl: Fill, args: argparse.Namespace) -> None:
    """Paginate a flag, an incident and a window to the end both ways; compare with Redis directly."""
    keys, rng = EnvKeys(ENV), random.Random(args.seed + 99)
    log = AuditLog(client, keys)
    for kind in ("flag", "incident", "window"):
        params = sample_params(kind, rng, fl, args)
        crit, _ = to_filter(params)
        newest, oldest = all_ids(log, crit, False), all_ids(log, crit, True)
        if kind == "window":  # independent count: the entries' own time, compared as text, from the start
            lo, hi = params["since"], params["until"]
            low, high = "-", "+"
            expected = 0
            while batch := client.xrange(keys.audit, min=low, max=high, count=1000):
                expected += sum(lo <= f["time"] <= hi for _, f in batch)
                low = f"({batch[-1][0]}"
                if batch[-1][1]["time"] > hi:
                    break
        else:
            expected = client.zcard(keys.audit_index(kind, params[kind]))
        ok = newest == oldest[::-1] and len(set(newest)) == len(newest) == expected
        print(
            f"  {kind:<8} {params}: {len(newest)} newest-first, {len(oldest)} oldest-first, "
            f"{expected} expected -> {'OK' if ok else 'MISMATCH'}"
        )


# --- HTTP server and exports ----------------------------------------------------------------


@contextmanager
def gunicorn(redis_url: str, workers: int, log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The production server (``flagsvc.gunicorn_conf``: gevent workers) on a free loopback port."""
    from tests.redis_server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGSVC_")}
    env |= {
        "FLAGSVC_REDIS_URL": redis_url,
        "FLAGSVC_BIND": f"127.0.0.1:{port}",
        "FLAGSVC_WORKERS": str(workers),
        "FLAGSVC_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:flagsvc.gunicorn_conf", "flagsvc:create_app()"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start; see {log_path}")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_rss_mb(master: int) -> float:
    """The largest RSS among the gunicorn workers, MB."""
    try:
        return max((c.memory_info().rss for c in psutil.Process(master).children()), default=0) / 2**20
    except psutil.Error:
        return float("nan")


def export(
    session: requests.Session, base: str, params: dict[str, str], accept: str, master: int, cap_s: float
) -> dict[str, Any]:
    """Stream one export (up to ``cap_s`` seconds): entries/s, MB/s, worker RSS before and peak."""
    peak, stop = [worker_rss_mb(master)], threading.Event()
    before = peak[0]

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], worker_rss_mb(master))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    nbytes = lines = 0
    t = time.perf_counter()
    with session.get(
        f"{base}/api/v1/envs/{ENV}/audit", params=params, headers={"Accept": accept}, stream=True, timeout=60
    ) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_content(64 * 1024):
            nbytes, lines = nbytes + len(chunk), lines + chunk.count(b"\n")
            if time.perf_counter() - t > cap_s:
                break
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    entries = lines - (1 if accept == "text/csv" else 0)
    time.sleep(1)  # let a worker cut short by the cap notice the closed connection
    return {
        "entries": entries,
        "mb": nbytes / 2**20,
        "s": seconds,
        "rss0": before,
        "rss": peak[0],
        "capped": seconds > cap_s,
    }


def run_exports(
    session: requests.Session, base: str, master: int, client: redis.Redis, args: argparse.Namespace
) -> list[tuple[str, dict[str, Any]]]:
    """NDJSON and CSV exports of a busy filter (one actor) and of the whole log."""
    print("\nexports: busy filter = one actor, whole log = no filter")
    exports = []
    for label, params in (("actor", {"actor": ACTORS[0]}), ("whole log", {})):
        for fmt, accept in (("NDJSON", "application/x-ndjson"), ("CSV", "text/csv")):
            e = export(session, base, params, accept, master, args.export_seconds)
            exports.append((f"{fmt} {label}", e))
            print(f"  {fmt} {label}: {e['entries']:,} entries, {e['s']:.1f} s", flush=True)
    expected, total = (
        client.zcard(EnvKeys(ENV).audit_index("actor", ACTORS[0])),
        client.xlen(EnvKeys(ENV).audit),
    )
    print(f"  (index by-actor:{ACTORS[0]} holds {expected:,} entries; the whole log {total:,})")
    return exports


# --- report ---------------------------------------------------------------------------------


def machine() -> str:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return f"nproc {os.cpu_count()}, {model}, Python {platform.python_version()}"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def triple(values: list[float]) -> tuple[float, float, float]:
    return pct(values, 50), pct(values, 95), pct(values, 99)


def median_triples(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))  # type: ignore[return-value]


def run_queries(pagers: dict[str, Pager], fl: Fill, args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """Every (mode, filter) ``args.repeat`` times; medians of the per-run percentiles."""
    runs: dict[tuple[str, str], list[Sample]] = {}
    for run in range(args.repeat):
        rng = random.Random(args.seed + 1000 + run)
        for mode, pager in pagers.items():
            for kind in KINDS:
                runs.setdefault((mode, kind), []).append(measure(pager, kind, rng, fl, args))
        print(f"  run {run + 1}/{args.repeat} done (loadavg {loadavg()})", flush=True)
    out = {}
    for key, samples in runs.items():
        out[key] = {
            "n": sum(len(s.first) for s in samples),
            "first": median_triples([triple(s.first) for s in samples]),
            "deep": median_triples([triple(s.deep) for s in samples if s.deep])
            if any(s.deep for s in samples)
            else (float("nan"),) * 3,
            "rows": statistics.mean(r for s in samples for r in s.rows),
            "p95_runs": [pct(s.first, 95) for s in samples],
        }
    return out


def report_fill(client: redis.Redis, fl: Fill, args: argparse.Namespace) -> None:
    """Fill rate, Redis memory, and what a typical window holds."""
    mem = client.info("memory")
    rate, commits = fl.entries / fl.seconds, fl.entries / args.batch / fl.seconds
    print(
        f"  filled {fl.entries:,} entries in {fl.seconds:.1f} s = {rate:,.0f} entries/s"
        f" ({commits:.1f} commits/s); XLEN {client.xlen(EnvKeys(ENV).audit):,};"
        f" {client.dbsize():,} keys; used_memory {mem['used_memory_human']}"
        f" (rss {mem['used_memory_rss_human']}); loadavg {loadavg()}"
    )
    lo, hi = fl.window(random.Random(args.seed), args.window_share)
    rate = fl.entries / max((fl.marks[-1][0] - fl.marks[0][0]) / 1000, 1e-3)
    print(
        f"  window: {(hi - lo) / 1000:.1f} s of the {fl.seconds:.0f} s fill (1/{args.window_share:g}), "
        f"~{fl.count_at(hi) - fl.count_at(lo):,} entries, e.g. {iso(lo)} .. {iso(hi)}, at {rate:,.0f}/s"
    )


def print_results(res: dict[tuple[str, str], Any], exports: list[tuple[str, dict[str, Any]]]) -> None:
    fmt = "{:<11} {:<21} {:>5} {:>22} {:>22} {:>6}"
    print(fmt.format("mode", "filter", "n", "page 1 p50/p95/p99 ms", "deeper p50/p95/p99 ms", "rows"))
    for (mode, kind), r in res.items():
        f, d = ("/".join(f"{v:.1f}" for v in r[x]) for x in ("first", "deep"))
        print(fmt.format(mode, kind, r["n"], f, d, f"{r['rows']:.0f}"))
    print("\nexports (HTTP):")
    for label, e in exports:
        print(
            f"  {label:<34} {e['entries']:>9,} entries in {e['s']:6.1f} s  {e['entries'] / e['s']:8,.0f} "
            f"entries/s  {e['mb'] / e['s']:6.1f} MB/s  worker RSS {e['rss0']:.0f} -> peak {e['rss']:.0f} MB"
            f"{'  (stopped at the time cap)' if e['capped'] else ''}"
        )


def print_summary(res: dict[tuple[str, str], Any]) -> None:
    print(f"\nsummary: target p95 <= {TARGET_P95_MS:.0f} ms for a page of {PAGE} (HTTP, page 1 and deeper)")
    fmt = "  {:<21} {:>13} {:>13} {:>15}  {:<8} {}"
    print(
        fmt.format(
            "filter", "HTTP p95 p1", "HTTP p95 deep", "in-proc p95 p1", "verdict", "HTTP p95 p1 per run"
        )
    )
    for kind in KINDS:
        h, p = res[("http", kind)], res[("in-process", kind)]
        worst = max(h["first"][1], h["deep"][1] if h["deep"][1] == h["deep"][1] else 0)
        verdict = "PASS" if worst <= TARGET_P95_MS else "FAIL"
        print(
            fmt.format(
                kind,
                f"{h['first'][1]:.1f} ms",
                f"{h['deep'][1]:.1f} ms",
                f"{p['first'][1]:.1f} ms",
                verdict,
                ", ".join(f"{v:.0f}" for v in h["p95_runs"]),
            )
        )


# --- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--flags", type=int, default=5000)
    p.add_argument("--incidents", type=int, default=2000)
    p.add_argument("--batch", type=int, default=200, help="audit entries per commit")
    p.add_argument("--samples", type=int, default=200, help="random queries per filter and run")
    p.add_argument("--pages", type=int, default=3, help="deeper pages followed per query")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--window-share", type=float, default=24.0, help="window = fill duration / this")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    p.add_argument("--max-filter-seconds", type=float, default=30.0, help="time cap per filter/mode/run")
    p.add_argument("--export-seconds", type=float, default=60.0, help="time cap per export")
    p.add_argument("--fill-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(REPO))
    from tests.redis_server import RedisServer

    print(f"machine : {machine()}, loadavg {loadavg()}")
    print(f"command : cd {REPO} && .venv/bin/python {shlex.join(sys.argv)}")
    tmp = Path(tempfile.mkdtemp(prefix="flagsvc-audit-bench-"))
    server = None
    try:
        server = RedisServer(tmp / "redis", durable=False).start()
        client = connect(server.url, socket_timeout=120)
        print(f"redis   : {client.info('server')['redis_version']} on {server.url} (no persistence)")
        EnvStore(client).create(ENV, actor="bench")
        _, secret = TokenStore(client).create(name="bench", role=Role.READER, envs=[], actor="bench")

        print(
            f"\nfill: {args.entries:,} entries, {args.flags:,} flags, {len(ACTORS)} actors, "
            f"{args.incidents:,} incidents, {args.batch} entries per commit"
        )
        fl = fill(client, args)
        report_fill(client, fl, args)

        print("\nconsistency (in-process, every page to the end):")
        check_consistency(client, fl, args)

        with gunicorn(server.url, args.workers, tmp / "gunicorn.log") as (base, proc):
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {secret}"
            pagers = {
                "in-process": in_process_pager(AuditLog(client, EnvKeys(ENV))),
                "http": http_pager(session, base),
            }
            print(
                f"\nqueries: {args.samples} random queries per filter, page of {PAGE} + {args.pages} deeper "
                f"pages, {args.repeat} run(s); HTTP via gunicorn gevent x{args.workers} at {base}"
            )
            res = run_queries(pagers, fl, args)
            exports = run_exports(session, base, proc.pid, client, args)
        print()
        print_results(res, exports)
        print_summary(res)
        print(f"\nloadavg at the end: {loadavg()}")
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
