"""Propagation: the in-memory snapshot cache, SSE streams, heartbeats, `--wait`, Redis outages.

The service runs as `flagsvc serve` does (gunicorn, gevent workers) on a Redis server of the
test's own, which some tests kill and restart.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
from typing import Any

import pytest
import redis
import requests

from flagsvc.audit import AuditLog
from flagsvc.connection import connect
from flagsvc.keys import EnvKeys
from flagsvc.tokens import Role, TokenStore
from flagsvc_client import FlagClient
from flagsvc_client import _sse as sse
from flagsvc_client._stream import interrupt
from flagsvc_client.flagctl import main as flagctl

from .helpers import FLAGS_URL, wait_for
from .redis_server import RedisServer
from .served import Served

pytestmark = pytest.mark.slow  # gunicorn workers on their own Redis


class Stack:
    """A durable Redis of the test's own and `flagsvc serve` (2 gevent workers) on it."""

    def __init__(self, tmp_path, redis_url: str | None = None) -> None:
        """``redis_url``: on that Redis (a cluster, a Sentinel set...) instead of one of its own."""
        self.served: Served | None = None
        self.direct: Any = None
        self.redis = None if redis_url else RedisServer(tmp_path / "redis", durable=True).start()
        try:
            self._start(tmp_path, redis_url or self.redis.url)
        except BaseException:
            self.close()  # what did start is stopped: nothing outlives a failed setup
            raise

    def _start(self, tmp_path, redis_url: str) -> None:
        self.served = Served(tmp_path / "data", env={"FLAGSVC_REDIS_URL": redis_url})
        self.url = self.served.url
        self.admin = {"Authorization": f"Bearer {self.served.admin_token()}"}
        self.redis_url = redis_url
        self.direct = connect(redis_url)
        self.tokens: dict[str, str] = {}
        for role in ("sdk", "operator", "reader"):
            _, self.tokens[role] = TokenStore(self.direct).create(  # straight in Redis, as the CLI does
                name=f"test-{role}", role=Role.parse(role), envs=[], actor="test"
            )

    def wait_for_workers(self, workers: int = 2) -> None:
        """Until every gunicorn worker has booted: each subscribes to change notifications."""
        wait_for(lambda: sum("P" in c["flags"] for c in self.direct.client_list()) >= workers, timeout=20)
        time.sleep(0.5)  # and ran its first preload and refresh

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def put(self, key: str, body: dict) -> None:
        resp = requests.put(f"{self.url}{FLAGS_URL}/{key}", json=body, headers=self.admin, timeout=10)
        assert resp.status_code in (200, 201), resp.text

    def flip(self, key: str, action: str) -> requests.Response:
        return requests.post(
            f"{self.url}{FLAGS_URL}/{key}/{action}",
            json={"reason": "test"},
            headers=self.headers("operator"),
            timeout=10,
        )

    def close(self) -> None:
        try:
            if self.served is not None:
                self.served.stop()
        finally:
            if self.direct is not None:
                self.direct.close()
            if self.redis is not None:
                self.redis.kill()


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


@pytest.fixture
def clients():
    made: list[FlagClient] = []
    yield made
    for c in made:
        c.close()


def test_change_reaches_a_streaming_client_without_waiting_for_a_poll(stack, clients):
    stack.put("checkout.recs", {"kind": "kill_switch", "enabled": True})
    client = FlagClient(stack.url, stack.tokens["sdk"], "production", mode="stream", poll_interval=60)
    clients.append(client)
    assert client.is_enabled("checkout.recs")
    wait_for(lambda: client._source.connected)
    for action, expected in (("kill", False), ("restore", True), ("kill", False)):
        start = time.monotonic()
        assert stack.flip("checkout.recs", action).status_code == 200
        elapsed = wait_for(
            lambda expected=expected: client.is_enabled("checkout.recs") is expected, timeout=5
        )
        assert time.monotonic() - start < 2.0, (
            "a streamed change arrives in well under the 60 s poll interval"
        )
        assert elapsed < 1.0


def read_events(resp: requests.Response, into: queue.Queue) -> None:
    try:
        for event in sse.parse(resp.iter_lines(chunk_size=None)):
            into.put(event)
    except Exception as exc:  # noqa: BLE001 - the reader reports how the stream ended
        into.put(exc)


def open_stream(
    stack: Stack, last_event_id: str | None = None, *, patches: bool = False
) -> tuple[requests.Response, queue.Queue]:
    headers = {**stack.headers("sdk"), "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    resp = requests.get(
        f"{stack.url}/api/v1/envs/production/stream",
        params={"patches": "true"} if patches else None,
        headers=headers,
        stream=True,
        timeout=30,
    )
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    events: queue.Queue = queue.Queue()
    threading.Thread(target=read_events, args=(resp, events), daemon=True).start()
    return resp, events


def close_stream(resp: requests.Response) -> None:
    """Close a stream another thread is reading (a plain close would wait for its next read)."""
    interrupt(resp)
    resp.close()


def next_event(events: queue.Queue, timeout: float = 5.0) -> sse.Event:
    item = events.get(timeout=timeout)
    assert isinstance(item, sse.Event), item
    return item


def test_stream_sends_the_snapshot_then_changes_and_honours_last_event_id(stack):
    stack.put("a", {"kind": "kill_switch", "enabled": True})
    resp, events = open_stream(stack)
    first = next_event(events)
    assert first.type == "snapshot" and json.loads(first.data)["flags"]["a"]["enabled"] is True
    identity = first.id
    version = int(identity.partition("-")[0])
    assert identity == f"{version}-{json.loads(first.data)['history']}", "event id = snapshot identity"
    close_stream(resp)

    # A client that already has the current snapshot gets none until something changes.
    resp, events = open_stream(stack, last_event_id=identity)
    with pytest.raises(queue.Empty):
        events.get(timeout=1.5)
    assert stack.flip("a", "kill").status_code == 200
    change = next_event(events)
    assert change.type == "snapshot" and change.id.startswith(f"{version + 1}-")
    assert json.loads(change.data)["flags"]["a"]["enabled"] is False
    close_stream(resp)

    # One that is behind gets the current snapshot at once.
    resp, events = open_stream(stack, last_event_id=identity)
    assert next_event(events).id.startswith(f"{version + 1}-")
    close_stream(resp)


def test_a_change_streams_as_a_patch_and_the_sdk_holds_exactly_the_servers_snapshot(stack, clients):
    for i in range(20):
        stack.put(f"feature.{i}", {"kind": "kill_switch", "enabled": True, "description": "x" * 200})
    snapshot_url = f"{stack.url}/api/v1/envs/production/snapshot"
    client = FlagClient(stack.url, stack.tokens["sdk"], "production", mode="stream", poll_interval=60)
    clients.append(client)
    wait_for(lambda: client._source.connected)
    resp, events = open_stream(stack, patches=True)
    held = next_event(events)
    assert held.type == "snapshot"

    assert stack.flip("feature.3", "kill").status_code == 200
    patch = next_event(events)
    data = json.loads(patch.data)
    assert (
        patch.type == "patch"
        and data["base"] == held.id
        and patch.id == f"{data['version']}-{data['history']}"
    )
    assert list(data["flags"]) == ["feature.3"] and data["flags"]["feature.3"]["enabled"] is False
    assert len(patch.data) < len(held.data) / 10, "a kill costs its flag, not the environment"
    close_stream(resp)

    # A client reconnecting with the version before gets the patch at once; further back, the snapshot.
    resp, events = open_stream(stack, last_event_id=held.id, patches=True)
    assert next_event(events).data == patch.data
    close_stream(resp)
    assert requests.delete(f"{stack.url}{FLAGS_URL}/feature.5", headers=stack.admin, timeout=10).ok
    resp, events = open_stream(stack, last_event_id=held.id, patches=True)
    assert next_event(events).type == "snapshot"
    close_stream(resp)

    stack.put("feature.7", {"kind": "kill_switch", "enabled": False, "description": "changed"})
    current = requests.get(snapshot_url, headers=stack.headers("sdk"), timeout=5)
    wait_for(lambda: client.status().version == current.json()["version"], 5, "the SDK has every change")
    assert client._snapshot.raw == current.json(), "patched, the SDK holds the snapshot the server serves"
    assert client.is_enabled("feature.3") is False and client.is_enabled("feature.7") is False
    assert client.is_enabled("feature.5", default=True) is True, "a deleted flag takes the default"

    for value in ("maybe", "1"):
        stream = f"{stack.url}/api/v1/envs/production/stream?patches={value}"
        refused = requests.get(stream, headers=stack.headers("sdk"), timeout=5)
        assert refused.status_code == 422, refused.text
        assert "patches" in {e["field"] for e in refused.json()["errors"]}, refused.text


def test_streams_end_cleanly_on_shutdown_and_clients_reconnect(stack, clients):
    stack.put("a", {"kind": "kill_switch", "enabled": True})
    _, events = open_stream(stack)
    assert next_event(events).type == "snapshot"
    client = FlagClient(stack.url, stack.tokens["sdk"], "production", mode="stream", poll_interval=0.5)
    clients.append(client)
    start = time.monotonic()
    assert stack.served.stop() == 0
    assert time.monotonic() - start < 8, "open streams do not hold the shutdown for the graceful timeout"
    assert next_event(events).type == "shutdown"
    wait_for(lambda: client.status().stale, timeout=10)
    assert client.is_enabled("a") is True, "the last known values keep serving"

    stack.served = Served(
        stack.served.data_dir, env={"FLAGSVC_REDIS_URL": stack.redis.url}, port=stack.served.port
    )
    assert stack.flip("a", "kill").status_code == 200
    wait_for(lambda: client.is_enabled("a") is False, timeout=15)
    wait_for(lambda: client._source.connected, timeout=15)
    assert not client.status().stale


def test_heartbeats_feed_the_propagation_view_and_wait(stack, clients, capsys):
    stack.put("a", {"kind": "kill_switch", "enabled": True})
    for app in ("checkout", "search"):
        clients.append(FlagClient(stack.url, stack.tokens["sdk"], "production", mode="stream", app_name=app))
    for c in clients:
        c.is_enabled("a")
    view_url = f"{stack.url}/api/v1/envs/production/clients"

    def view():
        return requests.get(view_url, headers=stack.headers("reader"), timeout=5).json()

    wait_for(lambda: view()["summary"]["applied_current"] == 2)
    v = view()
    assert v["summary"] == {"live": 2, "applied_current": 2, "lagging": 0, "silent": 0}
    assert {i["app"] for i in v["instances"]} == {"checkout", "search"}
    assert all(i["mode"] == "stream" and i["sdk"].startswith("python/") for i in v["instances"])

    code = flagctl(["--url", stack.url, "--token", stack.tokens["operator"], "kill", "a", "--reason", "INC-1",
                    "--wait", "--timeout-wait", "10s"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "confirmed: 2/2 live SDK instances run version" in out
    assert all(i["applied_version"] == v["version"] + 1 for i in view()["instances"])

    # A lagging instance (alive, reporting, but its updates stopped) makes --wait time out and name
    # it. (A closed client is not one: it said goodbye, see test_goodbye.py.)
    clients[1]._source.stop()
    clients[1]._source.join(5)
    code = flagctl(["--url", stack.url, "--token", stack.tokens["operator"], "restore", "a", "--reason", "ok",
                    "--wait", "--timeout-wait", "2s"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 8
    assert "lagging: search" in captured.out and "timed out: 1/2" in captured.err


def command_counts(client: redis.Redis) -> dict[str, int]:
    return {name: int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def test_conditional_polls_make_no_redis_round_trip(stack):
    stack.put("a", {"kind": "kill_switch", "enabled": True})
    url = f"{stack.url}/api/v1/envs/production/snapshot"
    session = requests.Session()
    session.headers.update(stack.headers("sdk"))
    stack.wait_for_workers()
    etag = session.get(url, timeout=5).headers["ETag"]
    for _ in range(50):  # warm every worker's cache and token cache
        session.get(url, headers={"If-None-Match": etag}, timeout=5)
    before = command_counts(stack.direct)
    start = time.monotonic()
    for _ in range(1000):
        assert session.get(url, headers={"If-None-Match": etag}, timeout=5).status_code == 304
    elapsed = time.monotonic() - start
    after = command_counts(stack.direct)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    delta.pop("cmdstat_info", None)
    # What the workers do on their own, whatever the number of polls: once a second each lists
    # the environments and reads each one's version, version mark and audit head (SMEMBERS, GET x3:
    # new versions and rollbacks), follows the token changes in the system log and Redis' clock
    # (TIME, XREVRANGE) - a token missing from a worker's cache costs an HGET - and its scheduler
    # looks for due reverts
    # (TIME, SMEMBERS, ZRANGEBYSCORE), and its webhook deliverer lists each environment's
    # subscriptions (SMEMBERS, HKEYS): 11 commands. Nothing may scale with the polls.
    allowed = 2 * 11 * (int(elapsed) + 2)
    assert sum(delta.values()) <= allowed, f"{delta} for 1000 polls in {elapsed:.1f}s (allowed {allowed})"
    # (hello, client: a worker's connection pool opening one more connection.)
    periodic = {"get", "hget", "xrevrange", "hkeys", "time", "ping", "smembers", "zrangebyscore"}
    periodic |= {"xrange", "hmget"}  # a token cache following a change of the system log
    periodic |= {"hello", "client"}
    assert set(delta) <= {f"cmdstat_{c}" for c in periodic}, delta


def test_a_dropped_notification_is_healed_by_the_periodic_check(stack):
    stack.put("a", {"kind": "kill_switch", "enabled": True})
    url = f"{stack.url}/api/v1/envs/production/snapshot"
    version = requests.get(url, headers=stack.headers("sdk"), timeout=5).json()["version"]
    # Change the flag behind the service's back: no pub/sub message at all.
    keys = EnvKeys("production")
    flag = json.loads(stack.direct.hget(keys.flags, "a"))
    flag["enabled"] = False
    stack.direct.hset(keys.flags, "a", json.dumps(flag))
    stack.direct.set(keys.version, version + 1)

    def seen() -> bool:
        snap = requests.get(url, headers=stack.headers("sdk"), timeout=5).json()
        return snap["version"] == version + 1 and snap["flags"]["a"]["enabled"] is False

    assert wait_for(seen, timeout=5, interval=0.1) < 3.0


def test_redis_outage_serves_stale_reads_refuses_writes_then_recovers(stack, clients):
    stack.put("a", {"kind": "kill_switch", "enabled": True})
    stack.put("b", {"kind": "kill_switch", "enabled": True})
    client = FlagClient(stack.url, stack.tokens["sdk"], "production", mode="stream", poll_interval=0.5)
    clients.append(client)
    snap_url = f"{stack.url}/api/v1/envs/production/snapshot"
    stack.wait_for_workers()  # every worker has preloaded the snapshot and the tokens
    entries_before = stack.direct.xlen(EnvKeys("production").audit)

    stack.redis.kill(signal.SIGKILL)
    wait_for(lambda: requests.get(f"{stack.url}/readyz", timeout=5).status_code == 503)
    assert requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200
    stale = requests.get(snap_url, headers=stack.headers("sdk"), timeout=10)
    assert stale.status_code == 200 and stale.json()["flags"]["a"]["enabled"] is True
    wait_for(
        lambda: (
            requests.get(snap_url, headers=stack.headers("sdk"), timeout=10).headers.get("X-Flagsvc-Stale")
            == "true"
        )
    )
    refused = stack.flip("a", "kill")
    assert refused.status_code == 503 and refused.headers["Content-Type"] == "application/problem+json"
    assert client.is_enabled("a") is True

    stack.redis.start()  # same port, same append-only file
    wait_for(lambda: requests.get(f"{stack.url}/readyz", timeout=5).status_code == 200)
    wait_for(lambda: stack.flip("b", "kill").status_code == 200)
    wait_for(lambda: client.is_enabled("b") is False, timeout=10)
    assert client.is_enabled("a") is True, "the refused kill was not applied"

    def fresh() -> bool:
        answer = requests.get(snap_url, headers=stack.headers("sdk"), timeout=5)
        return "X-Flagsvc-Stale" not in answer.headers

    wait_for(fresh, timeout=5)
    direct = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    log = AuditLog(direct, EnvKeys("production"))
    assert direct.xlen(EnvKeys("production").audit) == entries_before + 1, "no lost or duplicated entry"
    assert log.verify().ok
    direct.close()
