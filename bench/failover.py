"""Benchmark of Redis failovers under a kill/restore load: how long writes fail, and what is lost.

Each round starts a fresh Sentinel set as ``ops/redis/sentinel/`` ships it (a master with AOF
``appendfsync always`` and ``min-replicas-to-write 1``, 2 replicas, 3 sentinels with quorum 2 and
``down-after-milliseconds 1000``; ``tests/redis_topology.py``) and ``flagsvc serve`` (2 gevent
workers) on ``redis+sentinel://``. One operator kills and restores a kill switch as fast as the
service answers, each request with its own ``Idempotency-Key``, retried with the same key until it
is acknowledged. After 50 acknowledged writes the master is either SIGKILLed or handed over with
``SENTINEL FAILOVER``; the round ends 50 acknowledged writes later and measures:

- the write outage: from the first refused or failed write to the next acknowledged one;
- lost writes: acknowledged request ids missing from the audit log of the new master;
- whether ``flagsvc audit verify`` accepts the chain.

A last phase measures what fencing costs: kill/restore latency (sequential, after a warm-up) with
``FLAGSVC_REDIS_WAIT_REPLICAS`` at its default (``auto``: a commit waits for a replica's
acknowledgement) and at ``0`` (no WAIT), on the same topology. Example::

    .venv/bin/python bench/failover.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests
from harness import (
    HOST,
    KILL_KEY,
    PROD,
    Server,
    call,
    cpu_model,
    exit_on_sigterm,
    flagsvc_command,
    log,
    percentiles,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flagsvc.audit import AuditLog  # noqa: E402
from flagsvc.connection import connect  # noqa: E402
from flagsvc.keys import EnvKeys  # noqa: E402
from tests.redis_topology import SentinelSet, wait_until  # noqa: E402

WRITES_AROUND_FAILOVER = 50
MAX_OUTAGE_S = 5.0  # what the README promises a failover costs writes


@dataclass
class KillLoad:
    """Kill and restore ``KILL_KEY`` as fast as the service answers (see the module docstring)."""

    url: str
    token: str
    acknowledged: list[str] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)
    acknowledged_at: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> KillLoad:
        self._thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with requests.Session() as session:  # closed: an idle keep-alive delays a worker's exit
            for action in itertools.cycle(["kill", "restore"]):
                if self.stop.is_set():
                    return
                self._until_acknowledged(session, action)

    def _until_acknowledged(self, session: requests.Session, action: str) -> None:
        request_id = uuid.uuid4().hex
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Idempotency-Key": request_id,
            "X-Request-ID": request_id,
        }
        url = f"{self.url}/api/v1/envs/{PROD}/flags/{KILL_KEY}/{action}"
        while not self.stop.is_set():
            try:
                answer = session.post(url, json={"reason": "failover bench"}, headers=headers, timeout=5)
                if answer.status_code == 200:
                    self.acknowledged.append(request_id)
                    self.acknowledged_at.append(time.monotonic())
                    return
            except requests.RequestException:
                pass
            self.failed_at.append(time.monotonic())
            time.sleep(0.02)

    def outage(self, after: float) -> float:
        """Seconds from the first failure after ``after`` to the next acknowledged write."""
        failures = [f for f in self.failed_at if f >= after]
        if not failures:
            return 0.0
        recovered = next((a for a in self.acknowledged_at if a > failures[0]), time.monotonic())
        return recovered - failures[0]


@dataclass
class Round:
    how: str
    outage_s: float
    acknowledged: int
    lost: int
    chain_ok: bool


def service(root: Path, topology: SentinelSet, wait_replicas: str = "auto") -> Server:
    """``flagsvc serve`` (2 workers) on ``topology``, to start with ``with``."""
    settings = {"FLAGSVC_REDIS_URL": topology.url, "FLAGSVC_REDIS_WAIT_REPLICAS": wait_replicas}
    root.mkdir(parents=True, exist_ok=True)
    return Server(root, 2, settings=settings)


@contextlib.contextmanager
def sentinel_set(root: Path) -> Iterator[SentinelSet]:
    topology = SentinelSet(root).start()
    try:
        yield topology
    finally:
        topology.stop()


def operator_token(topology: SentinelSet) -> str:
    command = [*flagsvc_command(), "token", "create", "--name", f"bench-{uuid.uuid4().hex[:6]}"]
    command += ["--role", "operator", "--redis-url", topology.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.splitlines()[0].strip()


def lost_writes(topology: SentinelSet, load: KillLoad) -> tuple[int, bool]:
    """How many acknowledged writes the new master's audit log lacks; whether its chain verifies."""
    client = connect(topology.url)
    try:
        keys = EnvKeys(PROD)
        logged = {fields["request_id"] for _, fields in client.xrange(keys.audit)}
        lost = sum(1 for request_id in load.acknowledged if request_id not in logged)
        return lost, AuditLog(client, keys).verify().ok
    finally:
        client.close()


def audit_verify_cli(topology: SentinelSet) -> bool:
    command = [*flagsvc_command(), "audit", "verify", "--env", PROD, "--redis-url", topology.url]
    return subprocess.run(command, capture_output=True, timeout=60).returncode == 0


def run_round(root: Path, how: str) -> Round:
    with sentinel_set(root / "redis") as topology, service(root / "service", topology) as server:
        with requests.Session() as admin:
            admin.headers["Authorization"] = f"Bearer {server.token}"
            flag = f"{server.base}/api/v1/envs/{PROD}/flags/{KILL_KEY}"
            call(admin, "PUT", flag, {201}, json={"kind": "kill_switch", "enabled": True})
        load = KillLoad(server.base, operator_token(topology)).start()
        try:
            wait_until(lambda: len(load.acknowledged) >= WRITES_AROUND_FAILOVER, 60, "writes before")
            began = time.monotonic()
            fail_over(topology, how)
            before = len(load.acknowledged)
            wait_until(lambda: len(load.acknowledged) >= before + WRITES_AROUND_FAILOVER, 60, "writes after")
        finally:
            load.finish()
        lost, chain_ok = lost_writes(topology, load)
        chain_ok = chain_ok and audit_verify_cli(topology)
        return Round(how, load.outage(began), len(load.acknowledged), lost, chain_ok)


def fail_over(topology: SentinelSet, how: str) -> None:
    """SIGKILL the master (``sigkill``) or hand it over (``graceful``); return once every
    sentinel names the new master."""
    if how == "sigkill":
        old = topology.master()
        old.kill()
        topology.wait_for_new_master(old)
    else:
        topology.failover()


def flip_latencies(root: Path, wait_replicas: str, flips: int) -> list[float]:
    """Milliseconds of ``flips`` sequential kills/restores after 50 unmeasured ones."""
    with (
        sentinel_set(root / "redis") as topology,
        service(root / "service", topology, wait_replicas) as server,
        requests.Session() as session,
    ):
        return timed_flips(session, server, flips)


def timed_flips(session: requests.Session, server: Server, flips: int) -> list[float]:
    session.headers["Authorization"] = f"Bearer {server.token}"
    flag = f"{server.base}/api/v1/envs/{PROD}/flags/{KILL_KEY}"
    call(session, "PUT", flag, {201}, json={"kind": "kill_switch", "enabled": True})
    samples = []
    for i in range(flips + 50):
        started = time.perf_counter()
        call(session, "POST", f"{flag}/{('kill', 'restore')[i % 2]}", {200}, json={"reason": "bench"})
        if i >= 50:
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def print_rounds(rounds: list[Round]) -> bool:
    log(f"{'failover':<10} {'round':>5} {'outage s':>9} {'acknowledged':>13} {'lost':>5} {'chain':>6}")
    for i, r in enumerate(rounds, 1):
        chain = "ok" if r.chain_ok else "BROKEN"
        log(f"{r.how:<10} {i:>5} {r.outage_s:>9.2f} {r.acknowledged:>13} {r.lost:>5} {chain:>6}")
    good = True
    for how in sorted({r.how for r in rounds}):
        mine = [r for r in rounds if r.how == how]
        outages = [r.outage_s for r in mine]
        lost = sum(r.lost for r in mine)
        ok = lost == 0 and max(outages) <= MAX_OUTAGE_S and all(r.chain_ok for r in mine)
        good = good and ok
        log(
            f"{how}: outage median {statistics.median(outages):.2f} s, max {max(outages):.2f} s "
            f"(target <= {MAX_OUTAGE_S:.0f}); {lost} of {sum(r.acknowledged for r in mine)} acknowledged "
            f"writes lost (target 0)  {'PASS' if ok else 'FAIL'}"
        )
    return good


def print_wait_cost(on: list[float], off: list[float]) -> bool:
    p_on, p_off = percentiles(on), percentiles(off)
    log(f"kill/restore ms, WAIT for a replica (auto): p50 {p_on['p50']:.2f}  p95 {p_on['p95']:.2f}")
    log(f"kill/restore ms, no WAIT (0)              : p50 {p_off['p50']:.2f}  p95 {p_off['p95']:.2f}")
    ratio = p_on["p95"] / p_off["p95"]
    log(f"p95 with WAIT / without: {ratio:.2f}x (target <= 2)  {'PASS' if ratio <= 2 else 'FAIL'}")
    return ratio <= 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="failovers of each kind (default: 3)")
    parser.add_argument(
        "--flips", type=int, default=500, help="measured flips per WAIT setting (default: 500)"
    )
    parser.add_argument("--how", choices=["sigkill", "graceful", "both"], default="both")
    return parser.parse_args()


def main() -> int:
    exit_on_sigterm()
    args = parse_args()
    log(f"flagsvc failover benchmark - {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    log(f"machine : nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, loadavg {os.getloadavg()[0]:.2f}")
    log(f"command : cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}")
    log(f"topology: master + 2 replicas + 3 sentinels on {HOST}; flagsvc serve, 2 workers, redis+sentinel://")
    kinds = ["sigkill", "graceful"] if args.how == "both" else [args.how]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="flagsvc-failover-") as tmp:
        for i, how in enumerate(k for k in kinds for _ in range(args.rounds)):
            rounds.append(run_round(Path(tmp) / f"round-{i}", how))
            log(f"  {how} round: outage {rounds[-1].outage_s:.2f} s, {rounds[-1].lost} lost")
        on = flip_latencies(Path(tmp) / "wait-on", "auto", args.flips)
        off = flip_latencies(Path(tmp) / "wait-off", "0", args.flips)
    log()
    good = print_rounds(rounds)
    good = print_wait_cost(on, off) and good
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
