"""What one token can do to the service: instances, heartbeats, streams and idempotency records
are bounded, and beyond the bounds the answer is a 429 problem+json, with nothing written."""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from flagsvc import create_app
from flagsvc.clients import FORGET_SECONDS, LIVE_SECONDS, ClientRegistry
from flagsvc.envs import EnvStore
from flagsvc.keys import EnvKeys
from flagsvc.scheduler import Scheduler
from flagsvc.tokens import TokenStore
from flagsvc.writes import IDEMPOTENCY_RECORDS_PER_TOKEN
from flagsvc_client._stream import interrupt

from .conftest import RestartableServer, dataset
from .helpers import ENV, ENV_URL, heartbeats_written

KEYS = EnvKeys(ENV)


@pytest.fixture
def limited(r: redis.Redis, redis_url: str) -> Iterator[Any]:
    """An app with small limits: 3 instances per token, 4 heartbeats a minute, 2 streams,
    writes in bursts of 5 then 1 every 10 seconds."""
    app = create_app(
        {
            "REDIS_URL": redis_url,
            "TESTING": True,
            "MAX_INSTANCES_PER_TOKEN": 3,
            "HEARTBEATS_PER_MINUTE": 4,
            "MAX_STREAMS_PER_TOKEN": 2,
            "WRITES_PER_SECOND_PER_TOKEN": 0.1,
            "WRITE_BURST_PER_TOKEN": 5,
        }
    )
    EnvStore(r).create(ENV, actor="test-setup")
    yield app
    app.extensions["flagsvc"].close()


def beat(client: Any, headers: dict[str, str], instance: str, **body: Any) -> Any:
    return client.post(
        f"{ENV_URL}/clients/{instance}", json={"app": "shop", "applied_version": 1, **body}, headers=headers
    )


def assert_429(resp: Any) -> None:
    assert resp.status_code == 429, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    assert int(resp.headers["Retry-After"]) >= 1


def test_a_token_reports_a_bounded_number_of_instances(limited, r, make_token, snapshot_redis):
    client = limited.test_client()
    sdk = {"Authorization": f"Bearer {make_token('sdk', name='shop')}"}
    other = {"Authorization": f"Bearer {make_token('sdk', name='billing')}"}
    for i in range(3):
        assert beat(client, sdk, f"i-{i}").status_code == 204
    heartbeats_written(limited)
    before = snapshot_redis()
    assert beat(client, sdk, "i-3").status_code == 204, "taken in memory; refused when written"
    heartbeats_written(limited)
    assert snapshot_redis() == before, "a refused instance is not written"
    assert_429(beat(client, sdk, "i-3"))
    assert beat(client, sdk, "i-0").status_code == 204, "known instances keep reporting"
    assert beat(client, other, "j-0").status_code == 204, "the cap is per token"
    heartbeats_written(limited)
    assert set(r.hkeys(KEYS.clients)) == {"i-0", "i-1", "i-2", "j-0"}


def test_a_new_instance_takes_the_place_of_one_gone_silent(limited, r, make_token):
    client = limited.test_client()
    sdk = {"Authorization": f"Bearer {make_token('sdk', name='shop')}"}
    for i in range(3):
        assert beat(client, sdk, f"i-{i}").status_code == 204
    heartbeats_written(limited)
    token_id = TokenStore(r).list()[-1].id
    r.zadd(KEYS.clients_of_token(token_id), {"i-0": time.time() - LIVE_SECONDS - 1})  # i-0 went silent
    assert beat(client, sdk, "i-3").status_code == 204
    heartbeats_written(limited)
    assert not r.hexists(KEYS.clients, "i-0") and r.hexists(KEYS.clients, "i-3")


def test_an_instance_told_a_longer_interval_stays_live_between_its_reports(r, redis_url, make_token):
    app = create_app(
        {
            "REDIS_URL": redis_url,
            "TESTING": True,
            "MAX_INSTANCES_PER_TOKEN": 3,
            "HEARTBEAT_INTERVAL_SECONDS": 120,
        }
    )
    EnvStore(r).create(ENV, actor="test-setup")
    try:
        client = app.test_client()
        sdk = {"Authorization": f"Bearer {make_token('sdk', name='shop')}"}
        for i in range(3):
            assert beat(client, sdk, f"i-{i}").headers["X-Flagsvc-Report-Interval"] == "120"
        heartbeats_written(app)
        token_id = TokenStore(r).list()[-1].id
        missed_one = time.time() - 200  # one 120 s report late, not two
        r.zadd(KEYS.clients_of_token(token_id), {"i-0": missed_one})
        r.zadd(KEYS.clients_seen, {"i-0": missed_one})

        first = beat(client, sdk, "i-3")
        heartbeats_written(app)
        assert_429(beat(client, sdk, "i-3") if first.status_code == 204 else first)
        assert r.hexists(KEYS.clients, "i-0") and not r.hexists(KEYS.clients, "i-3")
        Scheduler(r, clients=app.extensions["flagsvc"].clients).housekeep()
        reader = {"Authorization": f"Bearer {make_token('reader')}"}
        summary = client.get(f"{ENV_URL}/clients", headers=reader).get_json()["summary"]
        assert summary["live"] == 3 and summary["silent"] == 0, summary
    finally:
        app.extensions["flagsvc"].close()


def test_an_instance_sends_a_bounded_number_of_heartbeats_a_minute(limited, make_token):
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)  # all in one minute
    client = limited.test_client()
    sdk = {"Authorization": f"Bearer {make_token('sdk', name='shop')}"}
    statuses = [beat(client, sdk, "busy").status_code for _ in range(4)]
    assert statuses == [204] * 4
    assert_429(beat(client, sdk, "busy"))
    assert beat(client, sdk, "calm").status_code == 204, "the rate is per instance"


def test_counts_are_kept_only_for_flags_that_exist(app, client, auth, r):
    client.put(f"{ENV_URL}/flags/real", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    counts = {"real": 5, **{f"ghost-{i}": 1 for i in range(500)}}
    assert beat(client, auth("sdk"), "i-1", counts=counts).status_code == 204
    heartbeats_written(app)
    minute = int(time.time() // 60)
    stored = {**r.hgetall(KEYS.evaluations(minute)), **r.hgetall(KEYS.evaluations(minute - 1))}
    assert stored == {"real|shop": "5"}
    preview = client.post(
        f"{ENV_URL}/flags/real/kill", json={"reason": "r", "dry_run": True}, headers=auth("operator")
    )
    assert preview.json["blast_radius"] == {"evaluations": 5, "apps": {"shop": 1}}


def test_silent_instances_are_purged_without_anyone_reading_clients(app, client, auth, r):
    assert beat(client, auth("sdk"), "old").status_code == 204
    assert beat(client, auth("sdk"), "new").status_code == 204
    heartbeats_written(app)
    r.zadd(KEYS.clients_seen, {"old": time.time() - FORGET_SECONDS - 1})  # silent for a day
    Scheduler(r).housekeep()
    assert r.hkeys(KEYS.clients) == ["new"]
    assert r.zrange(KEYS.clients_seen, 0, -1) == ["new"]


def command_calls(r: redis.Redis) -> int:
    return sum(v["calls"] for k, v in r.info("commandstats").items() if k != "cmdstat_info")


def test_a_metrics_scrape_costs_the_same_whatever_the_fleet(client, auth, r):
    registry = ClientRegistry(r)
    client.get("/metrics")  # the app's first connection to Redis says hello: not part of a scrape
    costs = []
    for fleet in (10, 2_000):
        for i in range(fleet):
            registry.report(
                ENV,
                f"i-{i}",
                {"app": "shop", "applied_version": 1},
                source="",
                token_id=f"t{i % 7}",
                flags=(),
            )
        registry.refresh()
        Scheduler(r).housekeep()
        before = command_calls(r)
        text = client.get("/metrics").get_data(as_text=True)
        costs.append(command_calls(r) - before)
        assert f'flagsvc_sdk_instances_live{{env="{ENV}"}} {fleet}.0' in text
    assert costs[0] == costs[1], costs


@pytest.mark.slow  # 1,050 kills
def test_no_op_kills_keep_a_bounded_number_of_idempotency_records(client, auth, r):
    client.put(f"{ENV_URL}/flags/a", json={"kind": "kill_switch", "enabled": False}, headers=auth("admin"))
    for i in range(IDEMPOTENCY_RECORDS_PER_TOKEN + 50):
        headers = {**auth("operator"), "Idempotency-Key": f"k-{i}"}
        assert (
            client.post(f"{ENV_URL}/flags/a/kill", json={"reason": "r"}, headers=headers).status_code == 200
        )
    records = list(r.scan_iter(match=KEYS.idempotency("operator", "*"), count=1000))
    assert len(records) == IDEMPOTENCY_RECORDS_PER_TOKEN
    newest = {**auth("operator"), "Idempotency-Key": f"k-{IDEMPOTENCY_RECORDS_PER_TOKEN + 49}"}
    replay = client.post(f"{ENV_URL}/flags/a/kill", json={"reason": "r"}, headers=newest)
    assert replay.headers.get("Idempotent-Replayed") == "true", "the newest records are kept"


@pytest.fixture
def limited_server(limited) -> Iterator[RestartableServer]:
    server = RestartableServer(limited).start()
    yield server
    server.stop()


def test_a_token_holds_a_bounded_number_of_streams(limited_server, make_token):
    sdk = {"Authorization": f"Bearer {make_token('sdk', name='shop')}"}
    other = {"Authorization": f"Bearer {make_token('sdk', name='billing')}"}
    url = f"{limited_server.url}{ENV_URL}/stream"
    opened = [requests.get(url, headers=sdk, stream=True, timeout=5) for _ in range(2)]
    try:
        assert [s.status_code for s in opened] == [200, 200]
        refused = requests.get(url, headers=sdk, stream=True, timeout=5)
        assert refused.status_code == 429 and refused.headers["Content-Type"] == "application/problem+json"
        refused.close()
        theirs = requests.get(url, headers=other, stream=True, timeout=5)
        assert theirs.status_code == 200, "the cap is per token"
        theirs.close()
        opened.pop().close()

        def reopened() -> bool:
            again = requests.get(url, headers=sdk, stream=True, timeout=5)
            again.close()
            return again.status_code == 200

        deadline = time.monotonic() + 5
        while not reopened():  # the server lets the closed stream go within a second
            assert time.monotonic() < deadline, "a closed stream still counts"
            time.sleep(0.1)
    finally:
        for s in opened:
            s.close()


@pytest.mark.slow  # opens 1,100 descriptors
def test_a_stream_on_a_descriptor_past_1024_stays_open(limited_server, make_token):
    """``select`` cannot watch descriptors past 1024: a busy worker's streams must not end early."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip("the file descriptor limit is under 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    ballast = [socket.socket() for _ in range(1100)]  # the server's next sockets get descriptors > 1024
    sdk = {"Authorization": f"Bearer {make_token('sdk', name='shop')}"}
    ended = threading.Event()
    try:
        resp = requests.get(f"{limited_server.url}{ENV_URL}/stream", headers=sdk, stream=True, timeout=5)
        assert resp.status_code == 200

        def read() -> None:
            with contextlib.suppress(requests.RequestException):  # our own interrupt, at the end
                for _ in resp.iter_lines():
                    pass
            ended.set()

        threading.Thread(target=read, daemon=True).start()
        assert not ended.wait(2.5), "the server ended the stream"
        interrupt(resp)
        resp.close()
    finally:
        for sock in ballast:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_heartbeat_the_limits_refuse_is_evidence_of_nothing(limited, make_token, r):
    """A refused heartbeat writes nothing, even one claiming a version Redis does not have (it would
    otherwise count as a rollback and move the environment's version)."""
    client = limited.test_client()
    sdk = {"Authorization": f"Bearer {make_token('sdk', name='shop')}"}
    version = int(r.get(EnvKeys(ENV).version) or 0)
    for n in range(3):
        assert beat(client, sdk, f"i-{n}", applied_version=version).status_code == 204
    heartbeats_written(limited)
    before = dataset(r)
    for _ in range(2):  # taken in memory and refused when written, then refused at once
        beat(client, sdk, "i-3", applied_version=version + 5)
        heartbeats_written(limited)
    assert_429(beat(client, sdk, "i-3", applied_version=version + 5))
    assert dataset(r) == before


@pytest.mark.slow  # each refused write is held a second
def test_an_operator_token_writes_within_its_budget_and_others_are_not_slowed(limited, make_token, r):
    """A runaway script with an operator token cannot keep the (control) worker busy: beyond its
    burst it gets 429 with Retry-After, nothing written, while another token's kill goes through."""
    client = limited.test_client()
    admin = {"Authorization": f"Bearer {make_token('admin')}"}
    assert (
        client.put(
            f"{ENV_URL}/flags/a", json={"kind": "kill_switch", "enabled": True}, headers=admin
        ).status_code
        == 201
    )
    runaway = {"Authorization": f"Bearer {make_token('operator', name='runaway')}"}
    answers = [
        client.post(
            f"{ENV_URL}/flags/a/{'kill' if i % 2 else 'restore'}", json={"reason": "loop"}, headers=runaway
        )
        for i in range(6)
    ]
    assert [a.status_code for a in answers] == [200] * 5 + [429], "the admin's PUT was not the runaway's"
    assert_429(answers[-1])
    assert "runaway" in answers[-1].json["detail"]
    before = dataset(r)
    assert client.post(f"{ENV_URL}/flags/a/kill", json={"reason": "x"}, headers=runaway).status_code == 429
    assert dataset(r) == before, "a refused write writes nothing"
    assert client.get(f"{ENV_URL}/flags/a", headers=runaway).status_code == 200, "reads are not budgeted"
    oncall = {"Authorization": f"Bearer {make_token('operator', name='oncall')}"}
    assert client.post(f"{ENV_URL}/flags/a/kill", json={"reason": "INC-1"}, headers=oncall).status_code == 200
    sdk = {"Authorization": f"Bearer {make_token('sdk')}"}
    assert all(beat(client, sdk, f"i{n}").status_code == 204 for n in range(3)), (
        "heartbeats have their own limits"
    )
