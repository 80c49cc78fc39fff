"""Playbooks: atomic apply with one operation id, exact revert, refusals that change nothing."""

from __future__ import annotations

from flagsvc.audit import AuditLog
from flagsvc.keys import EnvKeys

from .helpers import ENV_URL, TIMEOUT_FLAG, heartbeats_written

PLAYBOOK = {
    "description": "INC runbook: checkout degraded",
    "changes": {
        "checkout.recs": {"enabled": False},
        "exports": {"enabled": False},
        "payments.timeout-ms": {"default_variant": "short"},
        "already.off": {"enabled": False},
    },
}
ACTION = {"reason": "p95 at 9 s", "incident": "INC-42"}


def seed(client, auth):
    admin = auth("admin")
    for key in ("checkout.recs", "exports"):
        assert (
            client.put(
                f"{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True}, headers=admin
            ).status_code
            == 201
        )
    client.put(f"{ENV_URL}/flags/already.off", json={"kind": "kill_switch", "enabled": False}, headers=admin)
    client.put(f"{ENV_URL}/flags/payments.timeout-ms", json=TIMEOUT_FLAG, headers=admin)
    created = client.put(f"{ENV_URL}/playbooks/checkout-degraded", json=PLAYBOOK, headers=admin)
    assert created.status_code == 201, created.json


def flags(client, auth):
    return {f["key"]: f for f in client.get(f"{ENV_URL}/flags", headers=auth("reader")).json["flags"]}


def test_define_list_and_show(client, auth):
    seed(client, auth)
    listed = client.get(f"{ENV_URL}/playbooks", headers=auth("reader")).json["playbooks"]
    assert [p["name"] for p in listed] == ["checkout-degraded"] and listed[0]["applied"] is False
    shown = client.get(f"{ENV_URL}/playbooks/checkout-degraded", headers=auth("reader")).json
    assert shown["changes"] == PLAYBOOK["changes"] and shown["version"] == 1 and shown["applied"] is None
    assert client.put(f"{ENV_URL}/playbooks/x", json=PLAYBOOK, headers=auth("operator")).status_code == 403
    bad = client.put(f"{ENV_URL}/playbooks/x", json={"changes": {"a": {}}}, headers=auth("admin"))
    assert bad.status_code == 422


def test_a_playbook_naming_a_missing_flag_or_variant_is_refused_when_saved(client, auth, snapshot_redis):
    """Found when the playbook is written, not when an on-call engineer applies it."""
    seed(client, auth)
    client.delete(f"{ENV_URL}/flags/exports", headers=auth("admin"))  # archived: as good as missing
    before = snapshot_redis()
    broken = {
        "changes": {
            "checkout.recs": {"enabled": False},
            "no.such.flag": {"enabled": False},
            "exports": {"enabled": False},
            "payments.timeout-ms": {"default_variant": "shortest"},
        }
    }
    refused = client.put(f"{ENV_URL}/playbooks/broken", json=broken, headers=auth("admin"))
    assert refused.status_code == 422 and refused.mimetype == "application/problem+json"
    assert {(e["field"], e["location"]) for e in refused.json["errors"]} == {
        ("changes.no.such.flag", "body"),
        ("changes.exports", "body"),
        ("changes.payments.timeout-ms.default_variant", "body"),
    }
    assert "it has normal, short" in refused.json["detail"]
    assert snapshot_redis() == before
    fixed = {
        "changes": {"checkout.recs": {"enabled": False}, "payments.timeout-ms": {"default_variant": "short"}}
    }
    assert client.put(f"{ENV_URL}/playbooks/broken", json=fixed, headers=auth("admin")).status_code == 201


def test_dry_run_previews_with_blast_radius_and_changes_nothing(app, client, auth, snapshot_redis):
    seed(client, auth)
    for instance, app_name in (("i1", "checkout"), ("i2", "checkout"), ("i3", "search")):
        report = {"app": app_name, "applied_version": 5, "counts": {"checkout.recs": 10, "exports": 1}}
        assert (
            client.post(f"{ENV_URL}/clients/{instance}", json=report, headers=auth("sdk")).status_code == 204
        )
    heartbeats_written(app)
    before = snapshot_redis()
    preview = client.post(
        f"{ENV_URL}/playbooks/checkout-degraded/apply",
        json={**ACTION, "dry_run": True},
        headers=auth("operator"),
    )
    assert preview.status_code == 200, preview.json
    body = preview.json
    assert body["dry_run"] is True
    assert {c["flag"] for c in body["changed"]} == {"checkout.recs", "exports", "payments.timeout-ms"}
    assert body["unchanged"] == ["already.off"]
    assert body["blast_radius"]["checkout.recs"] == {"evaluations": 30, "apps": {"checkout": 2, "search": 1}}
    assert body["blast_radius"]["payments.timeout-ms"] == {"evaluations": 0, "apps": {}}
    assert snapshot_redis() == before


def test_apply_is_atomic_audited_and_refused_twice(client, auth, r, snapshot_redis):
    seed(client, auth)
    version = client.get(f"{ENV_URL}/snapshot", headers=auth("sdk")).json["version"]
    applied = client.post(
        f"{ENV_URL}/playbooks/checkout-degraded/apply", json=ACTION, headers=auth("operator")
    )
    assert applied.status_code == 200, applied.json
    assert applied.json["env_version"] == version + 1, "a playbook is one change of the environment"
    state = flags(client, auth)
    assert not state["checkout.recs"]["enabled"] and not state["exports"]["enabled"]
    assert state["payments.timeout-ms"]["default_variant"] == "short"
    assert state["already.off"]["version"] == 1, "a flag already in the target state is not touched"

    entries = client.get(f"{ENV_URL}/audit?limit=4", headers=auth("reader")).json["entries"]
    operation = applied.json["operation"]
    assert {e["operation"] for e in entries} == {operation}
    assert sorted(e["action"] for e in entries) == ["flag.kill", "flag.kill", "flag.update", "playbook.apply"]
    assert all(e["incident"] == "INC-42" and e["reason"] == ACTION["reason"] for e in entries)
    assert AuditLog(r, EnvKeys("production")).verify().ok

    before = snapshot_redis()
    again = client.post(f"{ENV_URL}/playbooks/checkout-degraded/apply", json=ACTION, headers=auth("operator"))
    assert again.status_code == 409 and "already applied" in again.json["detail"]
    assert snapshot_redis() == before


def test_a_missing_flag_or_a_stale_if_match_applies_nothing(client, auth, snapshot_redis):
    seed(client, auth)
    client.delete(f"{ENV_URL}/flags/exports", headers=auth("admin"))
    before = snapshot_redis()
    refused = client.post(
        f"{ENV_URL}/playbooks/checkout-degraded/apply", json=ACTION, headers=auth("operator")
    )
    assert refused.status_code == 409 and "'exports' does not exist" in refused.json["detail"]
    assert snapshot_redis() == before, "nothing of the playbook is applied"

    client.put(
        f"{ENV_URL}/flags/exports", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
    )
    before = snapshot_redis()
    stale = client.post(
        f"{ENV_URL}/playbooks/checkout-degraded/apply",
        json=ACTION,
        headers={**auth("operator"), "If-Match": '"7"'},
    )
    assert stale.status_code == 412
    assert snapshot_redis() == before


def test_revert_restores_exact_prior_states_and_skips_flags_changed_since(client, auth, r):
    seed(client, auth)
    prior = flags(client, auth)
    client.post(f"{ENV_URL}/playbooks/checkout-degraded/apply", json=ACTION, headers=auth("operator"))
    # Someone restores exports by hand during the incident: the revert must leave it alone.
    client.post(
        f"{ENV_URL}/flags/exports/restore", json={"reason": "exports needed"}, headers=auth("operator")
    )
    client.post(f"{ENV_URL}/flags/exports/kill", json={"reason": "no, off again"}, headers=auth("operator"))

    preview = client.post(
        f"{ENV_URL}/playbooks/checkout-degraded/revert",
        json={"reason": "fixed", "dry_run": True},
        headers=auth("operator"),
    )
    assert {c["flag"] for c in preview.json["changed"]} == {"checkout.recs", "payments.timeout-ms"}
    reverted = client.post(
        f"{ENV_URL}/playbooks/checkout-degraded/revert", json={"reason": "fixed"}, headers=auth("operator")
    )
    assert reverted.status_code == 200, reverted.json
    assert [s["flag"] for s in reverted.json["skipped"]] == ["exports"]
    now = flags(client, auth)
    for key in ("checkout.recs", "payments.timeout-ms"):
        assert now[key]["enabled"] == prior[key]["enabled"]
        assert now[key]["default_variant"] == prior[key]["default_variant"]
    assert now["exports"]["enabled"] is False, "the manual change since the apply is kept"
    summary = client.get(f"{ENV_URL}/audit?limit=3", headers=auth("reader")).json["entries"]
    revert_entry = next(e for e in summary if e["action"] == "playbook.revert")
    assert revert_entry["after"]["skipped"][0]["flag"] == "exports"
    assert revert_entry["incident"] == "INC-42", "the revert belongs to the incident of the apply"
    assert (
        client.get(f"{ENV_URL}/playbooks/checkout-degraded", headers=auth("reader")).json["applied"] is None
    )
    again = client.post(
        f"{ENV_URL}/playbooks/checkout-degraded/revert", json={"reason": "x"}, headers=auth("operator")
    )
    assert again.status_code == 409 and again.json["title"] == "The playbook is not applied"
    assert "is not applied: there is nothing to revert" in again.json["detail"]
    assert AuditLog(r, EnvKeys("production")).verify().ok


def test_roles_and_required_fields(client, auth):
    seed(client, auth)
    url = f"{ENV_URL}/playbooks/checkout-degraded/apply"
    assert client.post(url, json=ACTION, headers=auth("reader")).status_code == 403
    missing = client.post(url, json={"reason": "r"}, headers=auth("operator"))
    assert missing.status_code == 422 and missing.json["errors"][0]["field"] == "incident"
    assert (
        client.post(f"{ENV_URL}/playbooks/nope/apply", json=ACTION, headers=auth("operator")).status_code
        == 404
    )
    assert client.delete(f"{ENV_URL}/playbooks/checkout-degraded", headers=auth("admin")).status_code == 204


def test_kill_dry_run_previews_and_changes_nothing(app, client, auth, snapshot_redis):
    seed(client, auth)
    client.post(
        f"{ENV_URL}/clients/i1",
        json={"app": "checkout", "applied_version": 1, "counts": {"exports": 4}},
        headers=auth("sdk"),
    )
    heartbeats_written(app)
    before = snapshot_redis()
    preview = client.post(
        f"{ENV_URL}/flags/exports/kill", json={"reason": "r", "dry_run": True}, headers=auth("operator")
    )
    assert preview.status_code == 200
    assert preview.json == {
        "dry_run": True,
        "flag": "exports",
        "changed": True,
        "before": {"enabled": True, "version": 1},
        "after": {"enabled": False},
        "blast_radius": {"evaluations": 4, "apps": {"checkout": 1}},
    }
    assert snapshot_redis() == before


def test_replacing_an_applied_playbook_shows_its_application(client, auth):
    client.put(f"{ENV_URL}/flags/a", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    client.put(f"{ENV_URL}/playbooks/p", json={"changes": {"a": {"enabled": False}}}, headers=auth("admin"))
    client.post(
        f"{ENV_URL}/playbooks/p/apply", json={"reason": "r", "incident": "I"}, headers=auth("operator")
    )
    replaced = client.put(
        f"{ENV_URL}/playbooks/p",
        json={"description": "d", "changes": {"a": {"enabled": False}}},
        headers=auth("admin"),
    )
    assert replaced.status_code == 200 and replaced.json["applied"]["applied_by"] == "operator"
