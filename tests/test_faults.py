"""Redis hung, paused or gone: SDK reads do not wait, a write in flight says its outcome is unknown,
a temporary change stays scheduled until it is reverted, and no answer discloses internals."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from flagsvc import create_app
from flagsvc.envs import EnvStore
from flagsvc.errors import WriteContention
from flagsvc.keys import EnvKeys
from flagsvc.playbooks import PlaybookStore
from flagsvc.scheduler import Scheduler
from flagsvc.tokens import Role, TokenStore

from .conftest import RestartableServer
from .helpers import ENV, ENV_URL, wait_for
from .redis_proxy import SlowReplies
from .redis_server import RedisServer


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may pause (SIGSTOP)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


@pytest.fixture
def hung_stack(own_redis: RedisServer) -> Iterator[dict[str, Any]]:
    """The app on its own Redis, over HTTP, with an sdk token it has already seen."""
    direct = redis.Redis.from_url(own_redis.url, decode_responses=True)
    app = create_app({"REDIS_URL": own_redis.url, "TESTING": True, "TOKEN_CACHE_SECONDS": 0.2})
    EnvStore(direct).create(ENV, actor="test")
    _, secret = TokenStore(direct).create(name="sdk", role=Role.SDK, envs=[ENV], actor="test")
    server = RestartableServer(app).start()
    try:
        yield {"url": server.url, "sdk": {"Authorization": f"Bearer {secret}"}, "redis": own_redis}
    finally:
        if own_redis.proc is not None:
            own_redis.proc.send_signal(signal.SIGCONT)
        server.stop()
        app.extensions["flagsvc"].close()
        direct.close()


def timed(call: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def test_sdk_reads_never_wait_on_a_hung_redis(hung_stack):
    url, sdk = hung_stack["url"], hung_stack["sdk"]
    snapshot = requests.get(f"{url}{ENV_URL}/snapshot", headers=sdk, timeout=5)
    assert snapshot.status_code == 200
    etag = snapshot.headers["ETag"]
    time.sleep(0.5)  # the token's cache entry is older than TOKEN_CACHE_SECONDS
    assert hung_stack["redis"].proc is not None
    hung_stack["redis"].proc.send_signal(signal.SIGSTOP)
    reads = {
        "poll (fast path)": lambda: requests.get(
            f"{url}{ENV_URL}/snapshot", headers={**sdk, "If-None-Match": etag}, timeout=3
        ),
        "poll (Flask view)": lambda: requests.get(f"{url}{ENV_URL}/snapshot?full=1", headers=sdk, timeout=3),
        "OFREP": lambda: requests.post(
            f"{url}/ofrep/v1/evaluate/flags", json={"context": {"targetingKey": "u"}}, headers=sdk, timeout=3
        ),
        "stream": lambda: requests.get(f"{url}{ENV_URL}/stream", headers=sdk, stream=True, timeout=3),
    }
    for name, read in reads.items():
        resp, seconds = timed(read)
        assert resp.status_code in (200, 304), (name, resp.status_code)
        assert seconds < 1.0, f"{name} waited {seconds:.1f} s on a hung Redis"
        if name == "stream":
            assert next(resp.iter_lines()).startswith(b"retry:")
            resp.close()


@pytest.fixture
def slow_commits(r: redis.Redis, redis_url: str) -> Iterator[tuple[Any, SlowReplies]]:
    """An app that gives up on Redis after 0.5 s, behind a proxy that can hold the replies to
    commits (EVALSHA) for 1.5 s: the commit is applied, its answer comes too late."""
    proxy = SlowReplies(
        redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"], b"EVALSHA", 1.5
    )
    app = create_app({"REDIS_URL": proxy.url, "TESTING": True, "REDIS_SOCKET_TIMEOUT": 0.5})
    EnvStore(r).create(ENV, actor="test-setup")
    try:
        yield app, proxy
    finally:
        app.extensions["flagsvc"].close()
        proxy.close()


def test_a_commit_whose_answer_is_lost_is_answered_outcome_unknown(slow_commits, r, make_token):
    app, proxy = slow_commits
    client = app.test_client()
    admin = {"Authorization": f"Bearer {make_token('admin')}"}
    operator = {"Authorization": f"Bearer {make_token('operator')}", "Idempotency-Key": "inc-9-recs"}
    created = client.put(
        f"{ENV_URL}/flags/recs", json={"kind": "kill_switch", "enabled": True}, headers=admin
    )
    assert created.status_code == 201
    proxy.holding.set()
    resp = client.post(f"{ENV_URL}/flags/recs/kill", json={"reason": "INC-9"}, headers=operator)
    proxy.holding.clear()
    assert resp.status_code == 503 and resp.mimetype == "application/problem+json"
    assert resp.json["type"].endswith("outcome-unknown"), resp.json
    assert "Idempotency-Key" in resp.json["detail"]
    assert json.loads(r.hget(EnvKeys(ENV).flags, "recs"))["enabled"] is False, "the kill was applied"
    retry = client.post(f"{ENV_URL}/flags/recs/kill", json={"reason": "INC-9"}, headers=operator)
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    kills = [f for _, f in r.xrange(EnvKeys(ENV).audit) if f["action"] == "flag.kill"]
    assert len(kills) == 1


class ContendedPlaybooks(PlaybookStore):
    """A playbook store whose reverts always lose to other writers."""

    def revert(self, *args: Any, **kwargs: Any) -> Any:
        raise WriteContention("the environment kept changing; nothing was written")


def test_contention_leaves_a_temporary_playbook_scheduled(client, auth, r):
    for key in ("a", "b"):
        client.put(
            f"{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
        )
    client.put(f"{ENV_URL}/playbooks/p", json={"changes": {"a": {"enabled": False}}}, headers=auth("admin"))
    body = {"reason": "contain", "incident": "INC-3", "for": "1h"}
    assert client.post(f"{ENV_URL}/playbooks/p/apply", json=body, headers=auth("operator")).status_code == 200
    scheduler = Scheduler(r)
    scheduler._playbooks = ContendedPlaybooks(r)
    assert scheduler.run_once(now=time.time() + 3601) == 0
    assert r.zcard(EnvKeys(ENV).reverts) == 1, "the revert stays scheduled"
    assert Scheduler(r).run_once(now=time.time() + 3602) == 1
    assert client.get(f"{ENV_URL}/flags/a", headers=auth("reader")).json["enabled"] is True


def test_reverts_are_due_on_redis_clock_not_the_hosts(client, auth, r, monkeypatch):
    client.put(f"{ENV_URL}/flags/recs", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    body = {"reason": "INC-4", "for": "90s"}
    assert client.post(f"{ENV_URL}/flags/recs/kill", json=body, headers=auth("operator")).status_code == 200
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 91)  # this host's clock runs 91 s fast
    assert Scheduler(r).run_once() == 0, "not due on Redis' clock"
    monkeypatch.undo()
    assert client.get(f"{ENV_URL}/flags/recs", headers=auth("reader")).json["enabled"] is False


def test_a_redis_failure_never_discloses_where_redis_is(tmp_path):
    socket_path = str(tmp_path / "hidden-redis.sock")
    app = create_app({"REDIS_URL": f"unix://{socket_path}", "TESTING": True, "REDIS_SOCKET_TIMEOUT": 0.2})
    client = app.test_client()
    token = {"Authorization": "Bearer fsk_000000000000_secret"}
    try:
        for resp in (client.get("/api/v1/envs", headers=token), client.get("/readyz")):
            assert resp.status_code == 503
            text = resp.get_data(as_text=True)
            assert "hidden-redis" not in text and str(tmp_path) not in text, text
    finally:
        app.extensions["flagsvc"].close()


@pytest.mark.parametrize("replicas", [0, 1])
def test_a_master_that_refuses_writes_is_a_503_and_nothing_is_written(tmp_path, own_redis, replicas):
    """``NOREPLICAS`` (min-replicas-to-write not met) or ``READONLY`` (a demoted master) comes
    back inside the error of the commit script, and of the pipeline that carries its ``WAIT``
    when the master has replicas: it was taken for a bug, a 500."""
    followers = [RedisServer(tmp_path / f"replica-{i}").start() for i in range(replicas)]
    direct = redis.Redis.from_url(own_redis.url, decode_responses=True)
    app = create_app({"REDIS_URL": own_redis.url, "TESTING": True})
    try:
        for follower in followers:
            replica = redis.Redis.from_url(follower.url, decode_responses=True)
            replica.replicaof("127.0.0.1", own_redis.port)
            synced = lambda r=replica: r.info("replication")["master_link_status"] == "up"  # noqa: E731
            wait_for(synced, 10, "the replica synced")
        EnvStore(direct).create(ENV, actor="test")
        _, secret = TokenStore(direct).create(name="admin", role=Role.ADMIN, envs=[], actor="test")
        direct.config_set("min-replicas-to-write", replicas + 1)
        answer = app.test_client().put(
            f"{ENV_URL}/flags/recs",
            json={"kind": "kill_switch", "enabled": True},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert answer.status_code == 503 and answer.json["type"].endswith("store-unavailable"), answer.json
        assert not direct.hexists(EnvKeys(ENV).flags, "recs")
    finally:
        app.extensions["flagsvc"].close()
        direct.close()
        for follower in followers:
            follower.stop()
