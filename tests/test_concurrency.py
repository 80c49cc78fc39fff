"""Optimistic concurrency over real HTTP: If-Match writes from many threads lose nothing."""

from __future__ import annotations

import threading

import pytest
import requests

from flagsvc.audit import AuditLog
from flagsvc.keys import EnvKeys

pytestmark = pytest.mark.slow  # 20 threads, 50 writes each, over HTTP

THREADS = 20
CHANGES_PER_THREAD = 50
FLAGS = 4  # 5 threads race on each flag; all 20 race on the environment's audit chain


def test_if_match_writers_lose_no_update(live_server, auth, r):
    base = f"{live_server}/api/v1/envs/production/flags"
    admin = auth("admin")
    for n in range(FLAGS):
        created = requests.put(
            f"{base}/counter-{n}",
            json={"kind": "ops", "enabled": True, "description": "0"},
            headers=admin,
            timeout=5,
        )
        assert created.status_code == 201
    env_version_before = int(r.get(EnvKeys("production").version))
    audit_before = r.xlen(EnvKeys("production").audit)
    conflicts = [0] * THREADS
    errors: list[str] = []

    def worker(i: int) -> None:
        session = requests.Session()
        url = f"{base}/counter-{i % FLAGS}"
        done = 0
        while done < CHANGES_PER_THREAD:
            current = session.get(url, headers=admin, timeout=10)
            counter = int(current.json()["description"])
            resp = session.patch(
                url,
                json={"description": str(counter + 1)},
                headers={**admin, "If-Match": current.headers["ETag"]},
                timeout=10,
            )
            if resp.status_code == 200:
                done += 1
            elif resp.status_code == 412:
                conflicts[i] += 1
            else:
                errors.append(f"{resp.status_code} {resp.text}")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    successes = THREADS * CHANGES_PER_THREAD

    # No lost update: each flag's counter counts every successful write made to it.
    for n in range(FLAGS):
        flag = requests.get(f"{base}/counter-{n}", headers=admin, timeout=5).json()
        assert int(flag["description"]) == successes // FLAGS
        assert flag["version"] == 1 + successes // FLAGS
    # audit entries == successful changes == environment version delta
    assert r.xlen(EnvKeys("production").audit) - audit_before == successes
    assert int(r.get(EnvKeys("production").version)) - env_version_before == successes
    assert sum(conflicts) > 0, "the race never happened: the test would not catch a lost update"
    log = AuditLog(r, EnvKeys("production"))
    updates = [e for _, e in log.iter_all() if e["action"] == "flag.update"]
    assert len(updates) == successes
    assert log.verify().ok
