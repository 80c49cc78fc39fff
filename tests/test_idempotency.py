"""Idempotency-Key on every write: a retry replays the first answer, nothing happens twice."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import requests

from flagsvc.keys import EnvKeys, SystemKeys

from .helpers import FLAGS_URL


def kill_entries(r):
    return [f for _, f in r.xrange(EnvKeys("production").audit) if f["action"] == "flag.kill"]


def setup_flag(client, auth):
    client.put(f"{FLAGS_URL}/a", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))


def test_retried_kill_is_recorded_once(client, auth, r):
    setup_flag(client, auth)
    headers = {**auth("operator"), "Idempotency-Key": "kill-a-1"}
    body = {"reason": "INC-7", "incident": "INC-7"}
    first = client.post(f"{FLAGS_URL}/a/kill", json=body, headers=headers)
    second = client.post(f"{FLAGS_URL}/a/kill", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json == second.json
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert len(kill_entries(r)) == 1
    assert int(r.get(EnvKeys("production").version)) == 2


def test_retry_after_a_later_change_replays_instead_of_killing_again(client, auth, r):
    setup_flag(client, auth)
    headers = {**auth("operator"), "Idempotency-Key": "k"}
    client.post(f"{FLAGS_URL}/a/kill", json={"reason": "r"}, headers=headers)
    client.post(f"{FLAGS_URL}/a/restore", json={"reason": "fixed"}, headers=auth("operator"))
    late_retry = client.post(f"{FLAGS_URL}/a/kill", json={"reason": "r"}, headers=headers)
    assert late_retry.status_code == 200 and late_retry.headers["Idempotent-Replayed"] == "true"
    assert client.get(f"{FLAGS_URL}/a", headers=auth("reader")).json["enabled"] is True
    assert len(kill_entries(r)) == 1


def test_same_key_with_another_body_is_422(client, auth, r, snapshot_redis):
    setup_flag(client, auth)
    headers = {**auth("operator"), "Idempotency-Key": "k"}
    client.post(f"{FLAGS_URL}/a/kill", json={"reason": "r"}, headers=headers)
    before = snapshot_redis()
    other = client.post(f"{FLAGS_URL}/a/kill", json={"reason": "another reason"}, headers=headers)
    assert other.status_code == 422 and other.mimetype == "application/problem+json"
    other_route = client.post(f"{FLAGS_URL}/a/restore", json={"reason": "r"}, headers=headers)
    assert other_route.status_code == 422
    assert snapshot_redis() == before


def test_keys_are_scoped_per_token(client, auth, make_token, r):
    setup_flag(client, auth)
    second_operator = {"Authorization": f"Bearer {make_token('operator', name='oncall-2')}"}
    client.post(
        f"{FLAGS_URL}/a/kill", json={"reason": "r"}, headers={**auth("operator"), "Idempotency-Key": "k"}
    )
    client.post(f"{FLAGS_URL}/a/restore", json={"reason": "r"}, headers={**auth("operator")})
    theirs = client.post(
        f"{FLAGS_URL}/a/kill", json={"reason": "r"}, headers={**second_operator, "Idempotency-Key": "k"}
    )
    assert "Idempotent-Replayed" not in theirs.headers and theirs.json["enabled"] is False
    assert len(kill_entries(r)) == 2


def test_concurrent_retries_change_once(live_server, auth, r):
    url = f"{live_server}{FLAGS_URL}/a"
    requests.put(url, json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"), timeout=5)
    headers = {**auth("operator"), "Idempotency-Key": "storm"}
    statuses: list[int] = []
    barrier = threading.Barrier(10)

    def retry() -> None:
        barrier.wait()
        statuses.append(
            requests.post(f"{url}/kill", json={"reason": "r"}, headers=headers, timeout=10).status_code
        )

    threads = [threading.Thread(target=retry) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 10
    assert len(kill_entries(r)) == 1


def test_malformed_key_is_rejected(client, auth, snapshot_redis):
    setup_flag(client, auth)
    before = snapshot_redis()
    resp = client.post(
        f"{FLAGS_URL}/a/kill",
        json={"reason": "r"},
        headers={**auth("operator"), "Idempotency-Key": "x" * 300},
    )
    assert resp.status_code == 422 and resp.json["errors"][0]["field"] == "Idempotency-Key"
    assert snapshot_redis() == before


#: Every kind of write: (role, method, path, body). The flag ``a`` and playbook ``p`` exist first.
WRITES = {
    "flag-put": ("admin", "PUT", f"{FLAGS_URL}/b", {"kind": "kill_switch", "enabled": True}),
    "flag-patch": ("admin", "PATCH", f"{FLAGS_URL}/a", {"description": "recommendations"}),
    "flag-delete": ("admin", "DELETE", f"{FLAGS_URL}/a", None),
    "playbook-put": (
        "admin",
        "PUT",
        "/api/v1/envs/production/playbooks/q",
        {"changes": {"a": {"enabled": False}}},
    ),
    "playbook-delete": ("admin", "DELETE", "/api/v1/envs/production/playbooks/p", None),
    "playbook-apply": (
        "operator",
        "POST",
        "/api/v1/envs/production/playbooks/p/apply",
        {"reason": "r", "incident": "INC-1"},
    ),
    "env-put": ("admin", "PUT", "/api/v1/envs/staging", None),
}


def audit_length(r: Any) -> int:
    return r.xlen(EnvKeys("production").audit) + r.xlen(SystemKeys().audit)


@pytest.mark.parametrize("write", WRITES, ids=list(WRITES))
def test_every_write_replays_a_retry_with_the_same_key(client, auth, r, write):
    setup_flag(client, auth)
    client.put(
        "/api/v1/envs/production/playbooks/p",
        json={"changes": {"a": {"enabled": False}}},
        headers=auth("admin"),
    )
    role, method, path, body = WRITES[write]
    headers = {**auth(role), "Idempotency-Key": f"once-{write}"}
    first = client.open(path, method=method, json=body, headers=headers)
    assert first.status_code in (200, 201, 204), first.get_data(as_text=True)
    entries = audit_length(r)
    second = client.open(path, method=method, json=body, headers=headers)
    assert (second.status_code, second.get_data()) == (first.status_code, first.get_data())
    assert second.headers["Idempotent-Replayed"] == "true"
    assert audit_length(r) == entries, "nothing happened twice"
    if body is not None:
        changed = (
            {**body, "description": "another"} if write != "playbook-apply" else {**body, "reason": "other"}
        )
        reused = client.open(path, method=method, json=changed, headers=headers)
        assert reused.status_code == 422 and reused.json["type"].endswith("idempotency-key-reused")


def test_a_playbook_revert_is_replayed_too(client, auth, r):
    setup_flag(client, auth)
    client.put(
        "/api/v1/envs/production/playbooks/p",
        json={"changes": {"a": {"enabled": False}}},
        headers=auth("admin"),
    )
    client.post(
        "/api/v1/envs/production/playbooks/p/apply",
        json={"reason": "r", "incident": "I"},
        headers=auth("operator"),
    )
    headers = {**auth("operator"), "Idempotency-Key": "revert-once"}
    path = "/api/v1/envs/production/playbooks/p/revert"
    first = client.post(path, json={"reason": "fixed"}, headers=headers)
    second = client.post(path, json={"reason": "fixed"}, headers=headers)
    assert first.status_code == second.status_code == 200 and first.json == second.json
    assert second.headers["Idempotent-Replayed"] == "true"
    reused = client.post(path, json={"reason": "another"}, headers=headers)
    assert reused.status_code == 422 and reused.json["type"].endswith("idempotency-key-reused")
