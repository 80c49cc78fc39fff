"""Audit entry times and stream ids agree, so a time window is exact, even across skewed clocks."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

import pytest

from flagsvc.audit import AuditFilter, AuditLog, decode_entry
from flagsvc.commit import Committer
from flagsvc.keys import EnvKeys

from .helpers import ENV_URL

NS = EnvKeys("production")


def entry_ms(entry: dict) -> int:
    return int(datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp() * 1000)


def all_entries(r) -> list[dict]:
    return [decode_entry(sid, f) for sid, f in r.xrange(NS.audit)]


def test_every_stream_id_carries_its_entry_time(client, auth, r):
    admin, operator = auth("admin"), auth("operator")
    for i in range(5):
        client.put(f"{ENV_URL}/flags/k{i}", json={"kind": "kill_switch", "enabled": True}, headers=admin)
    client.put(
        f"{ENV_URL}/playbooks/all-off",
        json={"changes": {f"k{i}": {"enabled": False} for i in range(5)}},
        headers=admin,
    )
    resp = client.post(
        f"{ENV_URL}/playbooks/all-off/apply", json={"reason": "r", "incident": "I"}, headers=operator
    )
    assert resp.status_code == 200, resp.json
    entries = all_entries(r)
    assert len(entries) >= 11
    ids = [tuple(map(int, e["id"].split("-"))) for e in entries]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for entry, (ms, _) in zip(entries, ids, strict=True):
        assert ms == entry_ms(entry), entry
    applied = [e for e in entries if e["operation"] and e["action"] != "playbook.create"]
    assert len({e["time"] for e in applied}) == 1  # one commit, one time


def test_a_clock_behind_the_newest_entry_commits_at_the_newest_time_and_the_chain_holds(r, app, caplog):
    ahead_ms = time.time_ns() // 1_000_000 + 5_000
    ahead = Committer(r, clock_ms=lambda: ahead_ms)  # e.g. a primary's clock, before a failover
    behind = Committer(r)
    head = r.get(NS.audit_head)
    ahead.commit(NS, head, ops=[], audit={"actor": "host-a", "action": "test.write"})
    with caplog.at_level(logging.WARNING, logger="flagsvc.commit"):
        done = behind.commit(
            NS, r.get(NS.audit_head), ops=[], audit=[{"actor": "host-b", "action": "test.write"}] * 2
        )
    assert "behind the newest audit entry" in caplog.text
    a, b1, b2 = all_entries(r)[-3:]
    assert entry_ms(a) == entry_ms(b1) == entry_ms(b2) == ahead_ms
    assert [a["id"], b1["id"], b2["id"]] == [f"{ahead_ms}-0", f"{ahead_ms}-1", f"{ahead_ms}-2"]
    assert done.stream_id == b2["id"]
    assert AuditLog(r, NS).verify().ok
    moment = datetime.fromisoformat(a["time"].replace("Z", "+00:00"))
    window = AuditFilter(since=moment, until=moment)
    for oldest_first in (False, True):
        page = AuditLog(r, NS).query(window, oldest_first=oldest_first)
        seqs = [e["seq"] for e in page.entries]
        assert seqs == sorted([a["seq"], b1["seq"], b2["seq"]], reverse=not oldest_first)


@pytest.fixture(scope="module")
def spread(shared) -> list[dict]:
    """60 kills and restores by two operators, spread over a few ms each; all entries. Written
    once: the tests that take it only read."""
    client, auth, make_token, r = shared.client, shared.auth, shared.make_token, shared.r
    ops = {n: {"Authorization": f"Bearer {make_token('operator', name=n)}"} for n in ("ana", "bo")}
    for key in ("x", "y"):
        client.put(
            f"{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
        )
    for i in range(60):
        key, who = ("x", "y")[i % 2], ("ana", "bo")[(i // 3) % 2]
        action = "kill" if (i // 2) % 2 == 0 else "restore"
        body = {"reason": f"step {i}", "incident": f"INC-{i % 3}"}
        assert client.post(f"{ENV_URL}/flags/{key}/{action}", json=body, headers=ops[who]).status_code == 200
        if i % 10 == 0:
            time.sleep(0.003)
    return all_entries(r)


@pytest.mark.parametrize("query", ["", "actor=bo", "flag=x&actor=ana", "incident=INC-1&action=flag.kill"])
@pytest.mark.parametrize("order", ["newest", "oldest"])
@pytest.mark.parametrize("bounds", [(10, 40), (0, 5), (33, 33), (45, 70)])
def test_windows_with_filters_return_exactly_the_entries_in_them(shared, spread, query, order, bounds):
    """Window edges are entry times themselves: an entry at exactly ``since`` or ``until`` is in."""
    client, auth = shared.client, shared.auth
    lo, hi = spread[bounds[0]], spread[min(bounds[1], len(spread) - 1)]
    since, until = entry_ms(lo), entry_ms(hi)
    predicates = dict(p.split("=") for p in query.split("&") if p)
    expected = [
        e for e in spread if since <= entry_ms(e) <= until and all(e[k] == v for k, v in predicates.items())
    ]
    if order == "newest":
        expected.reverse()
    got, cursor = [], None
    while True:
        url = f"{ENV_URL}/audit?limit=4&order={order}&since={lo['time']}&until={hi['time']}&{query}"
        resp = client.get(url + (f"&cursor={cursor}" if cursor else ""), headers=auth("reader"))
        assert resp.status_code == 200, resp.json
        got += resp.json["entries"]
        if not (cursor := resp.json["next_cursor"]):
            break
    assert [e["seq"] for e in got] == [e["seq"] for e in expected]
    if not query:
        assert lo in expected and hi in expected  # both edges are in the window


def test_a_window_just_past_the_newest_entry_is_empty(shared, spread):
    client, auth = shared.client, shared.auth
    after = datetime.fromisoformat(spread[-1]["time"].replace("Z", "+00:00")) + timedelta(milliseconds=1)
    resp = client.get(
        f"{ENV_URL}/audit?since={after.isoformat().replace('+', '%2B')}", headers=auth("reader")
    )
    assert resp.json == {"entries": [], "next_cursor": None}


def test_an_intersection_spanning_many_index_reads_returns_exactly_the_matches(r, app):
    """Two large indexes that overlap little: the walk reads past the per-call budget."""
    committer = Committer(r)
    for start in range(0, 5000, 1000):
        entries = [
            {
                "actor": "x" if n < 2600 or 2990 <= n < 3000 else f"other-{n % 7}",
                "action": "y" if n >= 2400 else "z",
                "reason": str(n),
            }
            for n in range(start, start + 1000)
        ]
        committer.commit(NS, r.get(NS.audit_head), ops=[], audit=entries)
    everything = all_entries(r)
    expected = [e["seq"] for e in everything if e["actor"] == "x" and e["action"] == "y"]
    assert len(expected) == 210
    log = AuditLog(r, NS)
    for oldest_first in (True, False):
        got, cursor = [], None
        while True:
            page = log.query(
                AuditFilter(actor="x", action="y"), limit=64, cursor=cursor, oldest_first=oldest_first
            )
            got += [e["seq"] for e in page.entries]
            if not (cursor := page.next_cursor):
                break
        assert got == (expected if oldest_first else expected[::-1])
