"""Temporary changes (`for`): automatic reverts, exactly once, skipped after a manual change."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flagsvc.keys import EnvKeys
from flagsvc.scheduler import Scheduler

from .helpers import ENV_URL


def kill(client, auth, key, **extra):
    body = {"reason": "INC-7 hot path", "incident": "INC-7", **extra}
    resp = client.post(f"{ENV_URL}/flags/{key}/kill", json=body, headers=auth("operator"))
    assert resp.status_code == 200, resp.json
    return resp.json


def auto_reverts(r):
    return [f for _, f in r.xrange(EnvKeys("production").audit) if f["action"] == "flag.auto_revert"]


def test_a_temporary_kill_reverts_itself(client, auth, r):
    client.put(f"{ENV_URL}/flags/recs", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    flag = kill(client, auth, "recs", **{"for": "30m"})
    assert flag["enabled"] is False and flag["revert_at"].endswith("Z")
    scheduler = Scheduler(r)
    assert scheduler.run_once() == 0, "not due yet"
    assert scheduler.run_once(now=time.time() + 1801) == 1
    restored = client.get(f"{ENV_URL}/flags/recs", headers=auth("reader")).json
    assert restored["enabled"] is True and "revert_at" not in restored and restored["updated_by"] == "system"
    [entry] = auto_reverts(r)
    assert entry["actor"] == "system" and entry["incident"] == "INC-7"
    assert (
        "automatic revert of flag.kill by operator" in entry["reason"] and "INC-7 hot path" in entry["reason"]
    )
    assert scheduler.run_once(now=time.time() + 3600) == 0, "done once"


def test_a_manual_change_in_between_skips_the_revert_and_says_so(client, auth, r):
    client.put(f"{ENV_URL}/flags/recs", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    kill(client, auth, "recs", **{"for": "30m"})
    client.post(f"{ENV_URL}/flags/recs/restore", json={"reason": "fixed early"}, headers=auth("operator"))
    kill(client, auth, "recs")  # killed again by hand, for good
    assert Scheduler(r).run_once(now=time.time() + 1801) == 1
    assert client.get(f"{ENV_URL}/flags/recs", headers=auth("reader")).json["enabled"] is False
    [entry] = auto_reverts(r)
    assert entry["reason"].startswith("skipped: changed by hand since") and entry["after"] == ""


@pytest.mark.parametrize("bad", ["0m", "forever", "8d", 30])
def test_bad_durations_are_refused(client, auth, bad, snapshot_redis):
    client.put(f"{ENV_URL}/flags/recs", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    before = snapshot_redis()
    resp = client.post(
        f"{ENV_URL}/flags/recs/kill", json={"reason": "r", "for": bad}, headers=auth("operator")
    )
    assert resp.status_code == 422 and resp.json["errors"][0]["field"] == "for"
    assert snapshot_redis() == before


@pytest.mark.slow  # 3 worker processes
def test_three_competing_workers_revert_each_change_exactly_once(client, auth, r, redis_url):
    keys = [f"feature-{i}" for i in range(15)]
    for key in keys:
        client.put(
            f"{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
        )
        kill(client, auth, key, **{"for": "1s"})
    time.sleep(1.2)  # all due before any scheduler runs: late reverts happen when one starts
    command = [sys.executable, "-m", "flagsvc.cli", "worker", "--interval", "0.05", "--redis-url", redis_url]
    workers = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(3)]
    try:
        deadline = time.monotonic() + 20
        while r.zcard(EnvKeys("production").reverts) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let any duplicate attempt land, if there were one
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=10)
    entries = auto_reverts(r)
    assert sorted(e["flag"] for e in entries) == sorted(keys), "each due revert happened exactly once"
    flags = {
        f["key"]: f["enabled"] for f in client.get(f"{ENV_URL}/flags", headers=auth("reader")).json["flags"]
    }
    assert all(flags[k] for k in keys)


def test_a_temporary_playbook_reverts_itself_and_a_manual_revert_cancels_it(client, auth, r):
    for key in ("a", "b"):
        client.put(
            f"{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
        )
    playbook = {"changes": {"a": {"enabled": False}, "b": {"enabled": False}}}
    client.put(f"{ENV_URL}/playbooks/p", json=playbook, headers=auth("admin"))
    body = {"reason": "contain", "incident": "INC-9", "for": "2h"}
    applied = client.post(f"{ENV_URL}/playbooks/p/apply", json=body, headers=auth("operator"))
    assert applied.status_code == 200, applied.json
    assert client.get(f"{ENV_URL}/playbooks/p", headers=auth("reader")).json["applied"]["revert_at"]
    assert Scheduler(r).run_once(now=time.time() + 7201) == 1
    flags = {f["key"]: f for f in client.get(f"{ENV_URL}/flags", headers=auth("reader")).json["flags"]}
    assert flags["a"]["enabled"] and flags["b"]["enabled"]
    entries = client.get(f"{ENV_URL}/audit?limit=3", headers=auth("reader")).json["entries"]
    summary = next(e for e in entries if e["action"] == "playbook.revert")
    assert summary["actor"] == "system" and "automatic revert of playbook.apply" in summary["reason"]

    client.post(f"{ENV_URL}/playbooks/p/apply", json=body, headers=auth("operator"))
    client.post(f"{ENV_URL}/playbooks/p/revert", json={"reason": "done"}, headers=auth("operator"))
    assert r.zcard(EnvKeys("production").reverts) == 0, "a manual revert cancels the scheduled one"
