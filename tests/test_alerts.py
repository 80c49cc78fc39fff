"""Alert-driven containment: Alertmanager's notifications apply and revert playbooks, within their
guardrails, every decision audited; malformed bodies and other roles refused, nothing written."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from flagsvc import create_app
from flagsvc.keys import EnvKeys

from .conftest import UNLIMITED_WRITES, bearer, create_token
from .helpers import ENV, ENV_URL, FLAGS_URL, TIMEOUT_FLAG

ALERTS_URL = f"{ENV_URL}/alerts/alertmanager"
BOOK_URL = f"{ENV_URL}/playbooks/checkout-degraded"
BOOK = {
    "description": "shed load when checkout is slow",
    "changes": {"checkout.recs": {"enabled": False}, "payments.timeout-ms": {"default_variant": "short"}},
    "triggers": [{"match": {"alertname": "CheckoutP95High", "service": "checkout"}}],
    "auto": True,
    "incident_label": "incident",
}


def alert(status: str = "firing", started: str = "2026-11-26T14:00:00.123456789Z", **labels: str) -> dict:
    """One alert as Alertmanager sends it (Go's zero time as the end of a firing one)."""
    return {
        "status": status,
        "labels": {"alertname": "CheckoutP95High", "service": "checkout", "incident": "INC-7", **labels},
        "annotations": {"summary": "checkout p95 at 9 s", "description": "over 2 s for 5 minutes"},
        "startsAt": started,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-26T14:30:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=checkout_p95",
        "fingerprint": "5b2a7c9d1e3f4a6b",
    }


def notification(*alerts: dict) -> dict:
    """Alertmanager's webhook body (version 4) carrying ``alerts``."""
    return {
        "version": "4",
        "groupKey": '{}/{service="checkout"}:{alertname="CheckoutP95High"}',
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": "flagsvc-production",
        "groupLabels": {"alertname": "CheckoutP95High"},
        "commonLabels": {"service": "checkout"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def seed(client: Any, auth: Any, **book: Any) -> None:
    admin = auth("admin")
    recs = {"kind": "kill_switch", "enabled": True}
    assert client.put(f"{FLAGS_URL}/checkout.recs", json=recs, headers=admin).status_code == 201
    assert client.put(f"{FLAGS_URL}/payments.timeout-ms", json=TIMEOUT_FLAG, headers=admin).status_code == 201
    saved = client.put(BOOK_URL, json={**BOOK, **book}, headers=admin)
    assert saved.status_code == 201, saved.json


def post(client: Any, auth: Any, *alerts: dict, role: str = "operator") -> Any:
    return client.post(ALERTS_URL, json=notification(*alerts), headers=auth(role))


def decided(resp: Any) -> list[tuple[str | None, str]]:
    assert resp.status_code == 200, resp.json
    return [(d["playbook"], d["outcome"]) for d in resp.json["decisions"]]


def contained(client: Any, auth: Any) -> bool:
    flags = {f["key"]: f for f in client.get(FLAGS_URL, headers=auth("reader")).json["flags"]}
    recs, timeout = flags["checkout.recs"], flags["payments.timeout-ms"]
    assert (recs["enabled"] is False) == (timeout["default_variant"] == "short"), "all or nothing"
    return recs["enabled"] is False


def audit(client: Any, auth: Any, action: str | None = None) -> list[dict]:
    query = f"?action={action}&limit=100" if action else "?limit=100"
    return client.get(f"{ENV_URL}/audit{query}", headers=auth("reader")).json["entries"]


def outcomes(client: Any, auth: Any) -> list[str]:
    """The outcomes of the ``alert.decision`` entries, oldest first."""
    return [e["after"]["outcome"] for e in reversed(audit(client, auth, "alert.decision"))]


def test_a_matching_firing_alert_applies_the_playbook(client, auth):
    seed(client, auth)
    version = client.get(f"{ENV_URL}/snapshot", headers=auth("sdk")).json["version"]
    resp = post(client, auth, alert())
    assert decided(resp) == [("checkout-degraded", "applied")]
    decision = resp.json["decisions"][0]
    assert decision["incident"] == "INC-7" and decision["env_version"] == version + 1
    assert contained(client, auth)
    assert client.get(f"{ENV_URL}/snapshot", headers=auth("sdk")).json["version"] == version + 1

    applied = audit(client, auth, "playbook.apply")[0]
    assert applied["actor"] == "alertmanager:operator" and applied["incident"] == "INC-7"
    assert applied["reason"] == (
        "alert CheckoutP95High firing: checkout p95 at 9 s - over 2 s for 5 minutes "
        "(http://prometheus:9090/graph?g0.expr=checkout_p95)"
    )
    [entry] = audit(client, auth, "alert.decision")
    assert entry["operation"] == applied["operation"] == decision["operation"]
    assert entry["playbook"] == "checkout-degraded" and entry["actor"] == "alertmanager:operator"
    assert entry["after"]["outcome"] == "applied" and entry["after"]["alert"]["name"] == "CheckoutP95High"
    assert {c["flag"] for c in entry["after"]["changed"]} == {"checkout.recs", "payments.timeout-ms"}
    shown = client.get(BOOK_URL, headers=auth("reader")).json["applied"]
    assert shown["applied_by"] == "alertmanager:operator" and shown["incident"] == "INC-7"


def test_an_alert_that_triggers_nothing_is_audited_and_changes_nothing(client, auth):
    seed(client, auth)
    other = alert(alertname="DiskFull")
    wrong_service = alert(service="search")
    assert decided(post(client, auth, other, wrong_service)) == [(None, "no_match"), (None, "no_match")]
    assert not contained(client, auth)
    entries = audit(client, auth, "alert.decision")
    assert [e["after"]["outcome"] for e in entries] == ["no_match", "no_match"]
    assert entries[0]["incident"] == "CheckoutP95High-5b2a7c9d1e3f4a6b", "no incident_label: the default"


def test_a_resolved_alert_reverts_the_playbook_with_revert_on_resolve(client, auth):
    seed(client, auth, revert_on_resolve=True)
    assert decided(post(client, auth, alert())) == [("checkout-degraded", "applied")]
    other = alert(started="2026-11-26T14:01:00Z", instance="b")
    other["fingerprint"] = "0000aaaa1111bbbb"
    resolved = post(client, auth, alert("resolved"), other)
    assert decided(resolved) == [
        ("checkout-degraded", "still_firing"),
        ("checkout-degraded", "already_applied"),
    ]
    assert contained(client, auth), "another alert of the group still fires"

    reverted = post(client, auth, alert("resolved"))
    assert decided(reverted) == [("checkout-degraded", "reverted")]
    assert not contained(client, auth)
    revert = audit(client, auth, "playbook.revert")[0]
    assert revert["actor"] == "alertmanager:operator" and revert["incident"] == "INC-7"
    assert revert["reason"].startswith("alert CheckoutP95High resolved: checkout p95 at 9 s")
    assert reverted.json["decisions"][0]["operation"] == revert["operation"]
    assert decided(post(client, auth, alert("resolved"))) == [("checkout-degraded", "not_applied")]
    assert outcomes(client, auth) == ["applied", "still_firing", "already_applied", "reverted", "not_applied"]


def test_without_revert_on_resolve_the_playbook_stays_applied(client, auth):
    seed(client, auth)
    post(client, auth, alert())
    assert decided(post(client, auth, alert("resolved"))) == [("checkout-degraded", "no_revert")]
    assert contained(client, auth)
    assert outcomes(client, auth) == ["applied", "no_revert"]


def test_a_resolved_alert_leaves_an_application_made_by_a_person(client, auth):
    seed(client, auth, revert_on_resolve=True)
    body = {"reason": "INC-7 by hand", "incident": "INC-7"}
    assert client.post(f"{BOOK_URL}/apply", json=body, headers=auth("operator")).status_code == 200
    assert decided(post(client, auth, alert())) == [("checkout-degraded", "already_applied")]
    assert decided(post(client, auth, alert("resolved"))) == [("checkout-degraded", "applied_by_other")]
    assert contained(client, auth)


def test_a_playbook_that_is_not_auto_is_refused_and_audited(client, auth, snapshot_redis):
    seed(client, auth, auto=False, revert_on_resolve=False)
    book = client.get(BOOK_URL, headers=auth("reader")).json
    assert "auto" not in book and "revert_on_resolve" not in book, "defaults are not stored"
    resp = post(client, auth, alert())
    assert decided(resp) == [("checkout-degraded", "not_auto")]
    assert "not auto" in resp.json["decisions"][0]["detail"]
    assert not contained(client, auth)
    assert audit(client, auth, "playbook.apply") == []
    [entry] = audit(client, auth, "alert.decision")
    assert entry["after"]["outcome"] == "not_auto" and entry["incident"] == "INC-7"
    assert entry["reason"].startswith("not_auto: the playbook is not auto")
    assert entry["reason"].endswith(
        ". alert CheckoutP95High firing: checkout p95 at 9 s - over 2 s for 5 minutes "
        "(http://prometheus:9090/graph?g0.expr=checkout_p95)"
    )


def test_the_cooldown_holds_then_lets_the_next_alert_apply(client, auth, r):
    seed(client, auth, cooldown="30m", revert_on_resolve=True)
    post(client, auth, alert())
    post(client, auth, alert("resolved"))
    again = post(client, auth, alert(started="2026-11-26T15:00:00Z"))
    assert decided(again) == [("checkout-degraded", "cooldown")]
    assert "cooldown 30m: not again before" in again.json["decisions"][0]["detail"]
    assert not contained(client, auth)

    key = EnvKeys(ENV).alert_applies
    record = json.loads(r.hget(key, "checkout-degraded"))
    record["at_ms"] -= 31 * 60 * 1000  # the last application by an alert was 31 minutes ago
    r.hset(key, "checkout-degraded", json.dumps(record))
    assert decided(post(client, auth, alert(started="2026-11-26T15:00:00Z"))) == [
        ("checkout-degraded", "applied")
    ]
    assert outcomes(client, auth) == ["applied", "reverted", "cooldown", "applied"]


def test_the_daily_cap_holds(client, auth, r):
    seed(client, auth, max_auto_applies_per_day=2, revert_on_resolve=True)
    for hour in ("14", "15"):
        assert decided(post(client, auth, alert(started=f"2026-11-26T{hour}:00:00Z")))[0][1] == "applied"
        assert decided(post(client, auth, alert("resolved")))[0][1] == "reverted"
    third = post(client, auth, alert(started="2026-11-26T16:00:00Z"))
    assert decided(third) == [("checkout-degraded", "daily_cap")]
    assert "max_auto_applies_per_day is 2" in third.json["decisions"][0]["detail"]
    assert not contained(client, auth)
    assert len(audit(client, auth, "playbook.apply")) == 2
    assert json.loads(r.hget(EnvKeys(ENV).alert_applies, "checkout-degraded"))["count"] == 2


def test_an_alert_firing_again_while_applied_changes_nothing(client, auth, r):
    seed(client, auth)
    first = post(client, auth, alert())
    k = EnvKeys(ENV)
    state = (r.hgetall(k.flags), r.get(k.version), r.get(k.playbook_applied("checkout-degraded")))
    again = post(client, auth, alert(), alert())
    assert decided(again) == [("checkout-degraded", "already_applied")] * 2
    assert first.json["decisions"][0]["operation"] in again.json["decisions"][0]["detail"]
    assert (r.hgetall(k.flags), r.get(k.version), r.get(k.playbook_applied("checkout-degraded"))) == state
    assert len(audit(client, auth, "playbook.apply")) == 1
    assert outcomes(client, auth) == ["applied", "already_applied", "already_applied"]


def test_dry_run_mode_records_what_it_would_do_and_applies_nothing(client, auth, r):
    seed(client, auth, mode="dry_run", revert_on_resolve=True)
    resp = post(client, auth, alert())
    assert decided(resp) == [("checkout-degraded", "would_apply")]
    assert resp.json["decisions"][0]["operation"] is None
    assert not contained(client, auth)
    assert client.get(BOOK_URL, headers=auth("reader")).json["applied"] is None
    assert audit(client, auth, "playbook.apply") == [] and not r.exists(EnvKeys(ENV).alert_applies)
    [entry] = audit(client, auth, "alert.decision")
    assert entry["after"]["outcome"] == "would_apply"
    assert {c["flag"] for c in entry["after"]["would_change"]} == {"checkout.recs", "payments.timeout-ms"}
    assert decided(post(client, auth, alert("resolved"))) == [("checkout-degraded", "would_revert")]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**notification(alert()), "version": "3"}, "version"),
        ({k: v for k, v in notification(alert()).items() if k != "alerts"}, "alerts"),
        (notification({**alert(), "status": "burning"}), "alerts.0.status"),
        (notification({**alert(), "startsAt": "yesterday"}), "alerts.0.startsAt"),
        (notification({**alert(), "labels": ["alertname"]}), "alerts.0.labels"),
        (notification({**alert(), "labels": {}}), "alerts.0.labels"),
        (notification({**alert(), "annotations": {"summary": 3}}), "alerts.0.annotations.summary.value"),
        ({**notification(alert()), "alerts": "CheckoutP95High"}, "alerts"),
    ],
)
def test_a_malformed_notification_is_422_naming_the_field_and_writes_nothing(
    client, auth, snapshot_redis, body, field
):
    seed(client, auth)
    before = snapshot_redis()
    resp = client.post(ALERTS_URL, json=body, headers=auth("operator"))
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json", resp.json
    assert field in {e["field"] for e in resp.json["errors"]}, resp.json
    assert snapshot_redis() == before


def test_fields_a_later_alertmanager_adds_are_ignored(client, auth):
    seed(client, auth)
    body = notification({**alert(), "silencedBy": []})
    body["newField"] = {"x": 1}
    assert decided(client.post(ALERTS_URL, json=body, headers=auth("operator"))) == [
        ("checkout-degraded", "applied")
    ]


@pytest.mark.parametrize(("role", "status"), [("reader", 403), ("sdk", 403), (None, 401)])
def test_only_an_operator_token_may_notify(client, auth, snapshot_redis, role, status):
    seed(client, auth)
    before = snapshot_redis()
    headers = auth(role) if role else {}
    resp = client.post(ALERTS_URL, json=notification(alert()), headers=headers)
    assert resp.status_code == status and resp.mimetype == "application/problem+json"
    assert snapshot_redis() == before


def test_a_token_of_another_environment_gets_403(client, auth, make_token):
    seed(client, auth)
    staging = bearer(make_token("operator", name="staging-alerts", envs=["staging"]))
    assert client.post(ALERTS_URL, json=notification(alert()), headers=staging).status_code == 403
    assert (
        client.post(
            "/api/v1/envs/nowhere/alerts/alertmanager", json=notification(alert()), headers=auth("operator")
        ).status_code
        == 404
    )


@pytest.mark.parametrize(
    ("fields", "at_fault"),
    [
        ({"cooldown": "soon"}, "cooldown"),
        ({"cooldown": "8d"}, "cooldown"),
        ({"mode": "yolo"}, "mode"),
        ({"auto": "yes"}, "auto"),
        ({"max_auto_applies_per_day": 0}, "max_auto_applies_per_day"),
        ({"triggers": [{"match": {}}]}, "triggers.0.match"),
        ({"triggers": [{"labels": {"a": "b"}}]}, "triggers.0.match"),
        ({"triggers": [], "auto": True}, "triggers"),
        ({"triggers": None}, "triggers"),
    ],
)
def test_a_playbook_with_bad_alert_fields_is_422_naming_the_field(
    client, auth, snapshot_redis, fields, at_fault
):
    seed(client, auth)
    before = snapshot_redis()
    resp = client.put(BOOK_URL, json={**BOOK, **fields}, headers=auth("admin"))
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
    assert at_fault in {e["field"] for e in resp.json["errors"]}, resp.json
    assert snapshot_redis() == before


def test_alert_fields_need_triggers(client, auth):
    seed(client, auth)
    plain = {"changes": BOOK["changes"]}
    refused = client.put(BOOK_URL, json={**plain, "auto": True}, headers=auth("admin"))
    assert refused.status_code == 422 and refused.json["errors"][0]["field"] == "auto"
    defaults = {**plain, "auto": False, "mode": "apply", "revert_on_resolve": False}
    saved = client.put(BOOK_URL, json=defaults, headers=auth("admin"))
    assert saved.status_code == 200 and not set(saved.json) & {"auto", "mode", "revert_on_resolve"}


def test_the_alert_fields_are_exported_and_defaults_left_out(client, auth):
    seed(client, auth, cooldown="30m", max_auto_applies_per_day=3, mode="apply", revert_on_resolve=False)
    exported = client.get(f"{ENV_URL}/definitions", headers=auth("reader")).json["playbooks"]
    assert exported["checkout-degraded"] == {
        "description": BOOK["description"],
        "changes": BOOK["changes"],
        "triggers": BOOK["triggers"],
        "auto": True,
        "cooldown": "30m",
        "max_auto_applies_per_day": 3,
        "incident_label": "incident",
    }
    document = client.get(f"{ENV_URL}/definitions", headers=auth("reader")).json
    plan = client.post(
        f"{ENV_URL}/definitions/apply", json={"definitions": document, "dry_run": True}, headers=auth("admin")
    ).json
    assert plan["changes"] == [], "the export applies back as it is"


def test_workers_receiving_the_same_alert_at_once_apply_it_once(r, redis_url, auth):
    """Two apps (two workers) on the same Redis, four notifications at once: one application."""
    seed_app = create_app({"REDIS_URL": redis_url, "TESTING": True, **UNLIMITED_WRITES})
    apps = [seed_app, create_app({"REDIS_URL": redis_url, "TESTING": True, **UNLIMITED_WRITES})]
    try:
        from flagsvc.envs import EnvStore

        EnvStore(r).create(ENV, actor="test-setup")
        seed(seed_app.test_client(), auth, cooldown="1h")
        operator = bearer(create_token(r, "operator", name="am"))
        barrier = threading.Barrier(4)
        answers: list[Any] = []

        def notify(app: Any) -> None:
            barrier.wait()
            answers.append(app.test_client().post(ALERTS_URL, json=notification(alert()), headers=operator))

        threads = [threading.Thread(target=notify, args=(apps[i % 2],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        found = sorted(decided(a)[0][1] for a in answers)
        assert found.count("applied") == 1 and len(found) == 4, found
        assert set(found) <= {"applied", "already_applied", "cooldown"}
        k = EnvKeys(ENV)
        applies = [f for _, f in r.xrange(k.audit) if f["action"] == "playbook.apply"]
        assert len(applies) == 1
        assert json.loads(r.hget(k.alert_applies, "checkout-degraded"))["count"] == 1
    finally:
        for app in apps:
            app.extensions["flagsvc"].close()


def test_a_redis_failure_is_503_and_the_retry_applies_once(r, redis_url, auth, make_token):
    """Redis stops taking writes for 1.5 s: 503 (Alertmanager retries), then the retry finds the
    playbook applied once, whether or not the first commit landed."""
    app = create_app(
        {"REDIS_URL": redis_url, "TESTING": True, "REDIS_SOCKET_TIMEOUT": 0.3, **UNLIMITED_WRITES}
    )
    try:
        from flagsvc.envs import EnvStore

        EnvStore(r).create(ENV, actor="test-setup")
        client = app.test_client()
        seed(client, auth)
        operator = bearer(make_token("operator", name="am"))
        client.get(FLAGS_URL, headers=operator)  # the token is cached: only the write waits on Redis
        r.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        failed = client.post(ALERTS_URL, json=notification(alert()), headers=operator)
        assert failed.status_code == 503 and failed.mimetype == "application/problem+json", failed.json
        r.execute_command("CLIENT", "UNPAUSE")
        retried = client.post(ALERTS_URL, json=notification(alert()), headers=operator)
        assert decided(retried)[0][1] in ("applied", "already_applied")
        assert contained(client, auth)
        k = EnvKeys(ENV)
        assert len([f for _, f in r.xrange(k.audit) if f["action"] == "playbook.apply"]) == 1
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        app.extensions["flagsvc"].close()


def test_a_notification_may_be_larger_than_other_bodies(client, auth):
    """A hundred alerts with their annotations exceed the API's 64 KiB; up to 1 MiB is taken."""
    seed(client, auth)
    many = [
        {
            **alert(alertname=f"Noise{i}"),
            "annotations": {"description": "x" * 2000},
            "fingerprint": f"{i:016x}",
        }
        for i in range(100)
    ]
    resp = post(client, auth, alert(), *many)
    assert len(str(notification(alert(), *many))) > 200 * 1024
    assert decided(resp) == [("checkout-degraded", "applied")] + [(None, "no_match")] * 100
    huge = [{**a, "annotations": {"description": "x" * 16_000}} for a in many]
    too_large = client.post(ALERTS_URL, json=notification(*huge), headers=auth("operator"))
    assert too_large.status_code == 413 and too_large.mimetype == "application/problem+json"
    other = client.put(f"{ENV_URL}/playbooks/big", json={"description": "x" * 70_000}, headers=auth("admin"))
    assert other.status_code == 413, "other bodies keep their 64 KiB"
