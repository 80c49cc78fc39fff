"""High availability: no acknowledged kill lost in a Redis failover, rollbacks detected and moved
past, SDKs that never take flags back, and the whole write path on a Redis Cluster.

Every Redis here is a real ``redis-server`` started by the test: a master with two replicas and
three sentinels (tests/redis_topology.py), a 3-master cluster, or a single server whose data the
test rolls back by hand.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import requests
from prometheus_client import REGISTRY

from flagsvc.audit import AuditLog
from flagsvc.connection import ClusterDurability, connect, durability_of
from flagsvc.envs import EnvStore
from flagsvc.errors import OutcomeUnknown
from flagsvc.flags import FlagStore, Mutation
from flagsvc.history import MAX_VERSIONS_LOST
from flagsvc.keys import EnvKeys
from flagsvc.writes import WriteContext
from flagsvc_client import FlagClient
from flagsvc_client._snapshot import Snapshot

from .conftest import RestartableServer
from .helpers import ENV, ENV_URL, FLAGS_URL, heartbeats_written
from .redis_server import RedisServer
from .redis_topology import Cluster, SentinelSet, wait_until
from .test_propagation import Stack, close_stream, next_event, open_stream

KEYS = EnvKeys(ENV)


# -- rollbacks --------------------------------------------------------------------------------


WRITE = WriteContext(actor="test", reason="a commit with a replica stopped")


def env_keys(redis_url: str) -> dict[bytes, bytes]:
    """Every key of the environment, serialized: a backup to restore later."""
    raw = redis.Redis.from_url(redis_url)
    return {key: raw.dump(key) for key in raw.scan_iter(match=f"{KEYS.base}:*")}


def restore(redis_url: str, backup: dict[bytes, bytes]) -> None:
    """Put the environment back as it was in ``backup``: Redis' data rolled back."""
    raw = redis.Redis.from_url(redis_url)
    for key in raw.scan_iter(match=f"{KEYS.base}:*"):
        raw.delete(key)
    for key, value in backup.items():
        raw.restore(key, 0, value)


def rollbacks_counted() -> float:
    return REGISTRY.get_sample_value("flagsvc_history_rollbacks_total", {"env": ENV}) or 0.0


@pytest.fixture
def sdk_and_server(app: Any, auth: Any, client: Any) -> Iterator[tuple[FlagClient, RestartableServer]]:
    client.put(f"{FLAGS_URL}/recs", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    server = RestartableServer(app).start()
    sdk = FlagClient(server.url, auth("sdk")["Authorization"].removeprefix("Bearer "), ENV, mode="poll",
                     poll_interval=0.1)  # fmt: skip
    try:
        yield sdk, server
    finally:
        sdk.close()
        server.stop()


def test_a_rollback_is_detected_and_moved_past(app, client, auth, r, redis_url, sdk_and_server):
    sdk, _ = sdk_and_server
    counted_before = rollbacks_counted()
    backup = env_keys(redis_url)  # version 1: recs on
    assert (
        client.post(f"{FLAGS_URL}/recs/kill", json={"reason": "INC-1"}, headers=auth("operator")).status_code
        == 200
    )
    wait_until(lambda: not sdk.is_enabled("recs", default=True), 5, "the SDK applied the kill (version 2)")
    restore(redis_url, backup)  # Redis loses the kill: back at version 1
    wait_until(lambda: int(r.get(KEYS.version)) == 3, 5, "the version moved past every version seen")
    entry = [f for _, f in r.xrange(KEYS.audit) if f["action"] == "env.rollback_detected"][-1]
    assert entry["actor"] == "system" and "went back" in entry["reason"]
    assert client.get("/readyz").json["rollbacks"][ENV].startswith("version 2 -> 1")
    assert rollbacks_counted() == counted_before + 1
    # The SDK held version 2 (recs off); the history it now follows never had it.
    wait_until(lambda: sdk.status().version == 3, 5, "the SDK applied the state after the rollback")
    assert sdk.is_enabled("recs", default=False) is True


def test_an_sdk_ahead_of_redis_reveals_a_rollback_no_process_saw(
    app, client, auth, r, redis_url, sdk_and_server
):
    sdk, server = sdk_and_server
    backup = env_keys(redis_url)
    assert (
        client.post(f"{FLAGS_URL}/recs/kill", json={"reason": "INC-2"}, headers=auth("operator")).status_code
        == 200
    )
    wait_until(lambda: not sdk.is_enabled("recs", default=True), 5, "the SDK applied version 2")
    server.stop()
    app.extensions["flagsvc"].close()  # once its change listener stopped: it sees nothing from here on
    restore(redis_url, backup)  # rolled back while no process of the service was running
    from flagsvc import create_app

    fresh = create_app({"REDIS_URL": redis_url, "TESTING": True})
    again = RestartableServer(fresh)
    again.port, again.url = server.port, server.url
    again.start()
    try:

        def reported() -> bool:
            sdk._reporter.poke()  # a heartbeat now (the first may meet the old keep-alive connection)
            time.sleep(0.2)
            return int(r.get(KEYS.version)) >= 3

        # Its heartbeat reports version 2, which Redis does not have.
        wait_until(reported, 10, "the heartbeat revealed the rollback")
        wait_until(lambda: sdk.is_enabled("recs", default=False), 5, "the SDK follows the new history")
    finally:
        again.stop()
        fresh.extensions["flagsvc"].close()


def test_an_sdk_claiming_a_version_far_ahead_is_not_believed(app, client, tokens, r, caplog):
    """A heartbeat is authenticated by an sdk token only: a claim more than MAX_VERSIONS_LOST
    versions ahead of Redis is logged, and neither alarms nor moves the version."""
    sdk = {"Authorization": f"Bearer {tokens['sdk']}"}
    stored = int(r.get(KEYS.version) or 0)
    now = {"app": "shop", "applied_version": stored}
    assert client.post(f"{ENV_URL}/clients/i-far", json=now, headers=sdk).status_code == 204
    heartbeats_written(app)
    audit_before = r.xlen(KEYS.audit)
    far = {"app": "shop", "applied_version": stored + MAX_VERSIONS_LOST + 1}
    assert client.post(f"{ENV_URL}/clients/i-far", json=far, headers=sdk).status_code == 204
    heartbeats_written(app)  # a claim is checked once written
    assert int(r.get(KEYS.version) or 0) == stored and r.xlen(KEYS.audit) == audit_before
    assert "not believed" in caplog.text and "went back" not in caplog.text
    beyond = {"app": "shop", "applied_version": 2**53}
    refused = client.post(f"{ENV_URL}/clients/i-far", json=beyond, headers=sdk)
    assert refused.status_code == 422 and refused.json["errors"][0]["field"] == "applied_version"


def snapshot(version: int, history: str, source: str = "server") -> Snapshot:
    return Snapshot.from_wire({"env": ENV, "version": version, "history": history, "flags": {}}, source)


def test_an_sdk_takes_newer_versions_and_reused_numbers_never_older_ones():
    held = snapshot(57, "a" * 12)
    assert snapshot(58, "b" * 12).supersedes(held)
    assert snapshot(57, "c" * 12).supersedes(held), "the same number in another history"
    assert not snapshot(57, "a" * 12).supersedes(held)
    assert not snapshot(56, "a" * 12).supersedes(held), "a lagging host"
    assert not snapshot(56, "d" * 12).supersedes(held), "older: the service moves past a rollback"
    assert snapshot(3, "e" * 12).supersedes(snapshot(57, "a" * 12, source="cache"))


# -- Redis Cluster -----------------------------------------------------------------------------


@pytest.mark.slow
def test_changes_reach_sdks_through_a_redis_cluster(tmp_path, cluster_url):
    connect(cluster_url).flushdb()
    stack = Stack(tmp_path, redis_url=cluster_url)
    sdk = None
    try:
        stack.put("a", {"kind": "kill_switch", "enabled": True})
        resp, events = open_stream(stack)
        assert json.loads(next_event(events).data)["flags"]["a"]["enabled"] is True
        sdk = FlagClient(stack.url, stack.tokens["sdk"], ENV, mode="stream")
        assert sdk.is_enabled("a", default=False)
        assert stack.flip("a", "kill").status_code == 200
        assert json.loads(next_event(events).data)["flags"]["a"]["enabled"] is False
        wait_until(lambda: not sdk.is_enabled("a", default=True), 5, "the SDK applied the kill")
        close_stream(resp)
        audit = requests.get(f"{stack.url}/api/v1/envs/{ENV}/audit", headers=stack.admin, timeout=5).json()
        assert [e["action"] for e in audit["entries"][:2]] == ["flag.kill", "flag.create"]
    finally:
        if sdk is not None:
            sdk.close()
        stack.close()


def test_a_kill_on_a_cluster_is_acknowledged_once_a_replica_of_its_master_has_it(tmp_path):
    """On a cluster a commit waits for a replica on its own connection to the master of its
    environment's slot; a replica that does not confirm in time makes the answer 503
    outcome-unknown (the kill is on the master, not known to survive a failover), never 200."""
    cluster = Cluster(tmp_path / "cluster", replicas=1).start()
    stack = None
    try:
        stack = Stack(tmp_path, redis_url=cluster.url)
        index = cluster.master_of(EnvKeys(ENV).flags)
        master, replica = cluster.client(cluster.servers[index]), cluster.replicas[index][0]

        def waits() -> int:
            return int(master.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))

        stack.put("a", {"kind": "kill_switch", "enabled": True})
        before = waits()
        assert stack.flip("a", "kill").status_code == 200
        assert waits() > before, "the kill waited for the replica on the master that holds it"

        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            answer = stack.flip("a", "restore")
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        assert answer.status_code == 503 and answer.json()["type"].endswith("outcome-unknown"), answer.text
        flag = requests.get(f"{stack.url}{FLAGS_URL}/a", headers=stack.admin, timeout=5).json()
        assert flag["enabled"] is True, "the restore is on the master: its outcome was unknown, not nothing"
    finally:
        if stack is not None:
            stack.close()
        cluster.stop()


def test_a_master_counted_without_replicas_is_counted_again_before_a_commit(tmp_path):
    """The replicas are counted once a second; a master counted with none (a replica just
    promoted, say) is counted again before each commit, so a commit made once a replica has
    joined waits for it: a replica that does not confirm makes the outcome unknown, not done."""
    master, replica = (RedisServer(tmp_path / name).start() for name in ("master", "replica"))
    try:
        client = connect(master.url, wait_timeout_ms=300)
        EnvStore(client).create(ENV, actor="test-setup")
        rules = durability_of(client)
        assert rules is not None
        rules.refresh()  # the change listener's count: no replica yet
        assert not rules.active or rules.wanted() == 0
        follower = redis.Redis.from_url(replica.url, decode_responses=True)
        follower.replicaof("127.0.0.1", master.port)
        wait_until(
            lambda: follower.info("replication")["master_link_status"] == "up", 10, "the replica synced"
        )
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            create = Mutation("flag.create", {"kind": "kill_switch", "enabled": True})
            with pytest.raises(OutcomeUnknown):
                FlagStore(client).write(ENV, "a", lambda _: create, WRITE)
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        assert client.hexists(EnvKeys(ENV).flags, "a"), "the commit is on the master: unknown, not undone"
    finally:
        replica.kill()
        master.kill()


def test_a_cluster_master_failed_over_and_gone_is_forgotten_by_the_replica_counts(tmp_path):
    """After a failover the old master's count failed every second (it is dead) and came before
    the new master's, which then stayed at the none it had as a replica."""
    cluster = Cluster(tmp_path / "cluster", replicas=1).start()
    try:
        client = connect(cluster.url)
        rules = durability_of(client)
        assert isinstance(rules, ClusterDurability)
        key = EnvKeys(ENV).flags
        index = cluster.master_of(key)
        old, promoted = cluster.servers[index], cluster.replicas[index][0]
        assert rules.for_key(key).wanted() == 1
        cluster.client(promoted).execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        wait_until(
            lambda: cluster.client(promoted).info("replication")["role"] == "master", 20, "the failover"
        )

        def learnt() -> bool:  # the client learns the new master, as on a MOVED
            client.nodes_manager.initialize()
            return client.get_node_from_key(key).port == promoted.port

        wait_until(learnt, 20, "the cluster names the promoted master")
        old.kill()  # the old master, a replica now, is gone

        rules.refresh()  # the change listener's, once a second: no error from the dead node

        assert rules.for_key(key).client.connection_pool.connection_kwargs["port"] == promoted.port
        assert rules.for_key(key).wanted() == 0, "the promoted master has no replica: its old master is dead"
    finally:
        cluster.stop()


# -- Sentinel failovers ------------------------------------------------------------------------


@dataclass
class KillLoad:
    """Kill and restore ``a`` as fast as the service answers, each with its own Idempotency-Key,
    retried (same key) until acknowledged; records what was acknowledged and when writes failed."""

    stack: Stack
    acknowledged: list[str] = field(default_factory=list)  # request ids
    failures: list[float] = field(default_factory=list)  # when a write was not acknowledged
    successes: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> KillLoad:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        for action in itertools.cycle(["kill", "restore"]):
            if self.stop.is_set():
                return
            request_id = uuid.uuid4().hex
            headers = {
                **self.stack.headers("operator"),
                "Idempotency-Key": request_id,
                "X-Request-ID": request_id,
            }
            while not self.stop.is_set():
                try:
                    resp = requests.post(f"{self.stack.url}{FLAGS_URL}/a/{action}", json={"reason": "load"},
                                         headers=headers, timeout=5)  # fmt: skip
                except requests.RequestException:
                    resp = None
                if resp is not None and resp.status_code == 200:
                    self.acknowledged.append(request_id)
                    self.successes.append(time.monotonic())
                    break
                self.failures.append(time.monotonic())
                time.sleep(0.05)
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        time.sleep(0.5)

    def longest_outage(self, after: float) -> float:
        """The longest time writes failed, from a failure to the next acknowledged write."""
        longest = 0.0
        for failed in (f for f in self.failures if f >= after):
            recovered = next((s for s in self.successes if s > failed), None)
            if recovered is not None:
                first = min(f for f in self.failures if f >= after and f <= recovered)
                longest = max(longest, recovered - first)
        return longest


@pytest.fixture
def sentinel_stack(tmp_path) -> Iterator[tuple[SentinelSet, Stack]]:
    topology = SentinelSet(tmp_path / "redis").start()
    try:
        stack = Stack(tmp_path, redis_url=topology.url)
    except BaseException:
        topology.stop()
        raise
    try:
        stack.put("a", {"kind": "kill_switch", "enabled": True})
        yield topology, stack
    finally:
        stack.close()
        topology.stop()


def check_nothing_lost(stack: Stack, load: KillLoad) -> None:
    """Every acknowledged write is in the audit log of the current master, whose chain verifies."""
    client = connect(stack.redis_url)
    try:
        logged = {f["request_id"] for _, f in client.xrange(KEYS.audit)}
        lost = [rid for rid in load.acknowledged if rid not in logged]
        assert not lost, f"{len(lost)} of {len(load.acknowledged)} acknowledged writes lost"
        assert AuditLog(client, KEYS).verify().ok
    finally:
        client.close()


def versions_applied(sdk: FlagClient) -> list[int]:
    applied: list[int] = []
    sdk.on_change(lambda change: applied.append(change.new_version))
    return applied


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "graceful"])
def test_a_failover_loses_no_acknowledged_write(sentinel_stack, how):
    topology, stack = sentinel_stack
    sdk = FlagClient(stack.url, stack.tokens["sdk"], ENV, mode="poll", poll_interval=0.1)
    applied = versions_applied(sdk)
    load = KillLoad(stack).start()
    try:
        wait_until(lambda: len(load.acknowledged) >= 20, 20, "writes acknowledged before the failover")
        old = topology.master()
        began = time.monotonic()
        if how == "sigkill":
            old.kill()
            topology.wait_for_new_master(old)
        else:
            topology.failover()
        count = len(load.acknowledged)
        wait_until(lambda: len(load.acknowledged) >= count + 20, 30, "writes acknowledged after the failover")
        load.finish()
        outage = load.longest_outage(began)
        assert outage <= 5.0, f"writes failed for {outage:.1f} s; the sentinel saw:\n{topology.log()}"
        check_nothing_lost(stack, load)
        assert applied == sorted(applied), "the SDK never applied an older state"
    finally:
        load.finish()
        sdk.close()


@pytest.mark.slow
def test_the_old_master_back_after_a_failover_takes_no_write(sentinel_stack):
    topology, stack = sentinel_stack
    old = topology.master()
    old.kill()
    new = topology.wait_for_new_master(old)
    old.start()  # its old data, its old role: it believes it is the master
    probe = SentinelSet.client(old)
    with pytest.raises(redis.ResponseError, match=r"NOREPLICAS|READONLY"):
        probe.set("flagsvc:{production}:probe", "x")  # min-replicas-to-write fences it
    load = KillLoad(stack).start()
    try:
        wait_until(lambda: len(load.acknowledged) >= 10, 20, "writes acknowledged with the old master back")
        load.finish()
        wait_until(lambda: probe.info("replication")["role"] == "slave", 60, "the sentinels demote it")
        check_nothing_lost(stack, load)
        assert topology.master().port == new.port
    finally:
        load.finish()
        probe.close()
