"""Happy paths of every route, through the Flask test client on a real Redis."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from flagsvc.audit import AuditLog
from flagsvc.keys import EnvKeys

from .helpers import ENV_URL, TIMEOUT_FLAG


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.slow)])
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every happy path on one Redis server and on a 3-master Redis Cluster."""
    return str(
        request.getfixturevalue(f"{request.param}_redis_url" if request.param == "single" else "cluster_url")
    )


RELEASE = {
    "kind": "release",
    "type": "boolean",
    "enabled": True,
    "variants": {"on": True, "off": False},
    "default_variant": "off",
    "off_variant": "off",
    "rules": [
        {"conditions": [{"attribute": "country", "operator": "in", "values": ["FR", "BE"]}], "variant": "on"},
        {"conditions": [], "rollout": [{"variant": "on", "weight": 25}, {"variant": "off", "weight": 75}]},
    ],
    "description": "new search",
    "owner": "team-search",
    "tags": ["search"],
}


def put_flag(client, auth, key, body, **headers):
    return client.put(f"{ENV_URL}/flags/{key}", json=body, headers={**auth("admin"), **headers})


def test_health_and_readiness(client):
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_openapi_document_lists_the_routes(client):
    spec = client.get("/api/v1/openapi.json").json
    paths = spec["paths"]
    assert "/api/v1/envs/{env}/flags/{key}/kill" in paths
    assert "/api/v1/envs/{env}/snapshot" in paths
    assert set(paths["/api/v1/envs/{env}/flags/{key}"]) >= {"get", "put", "patch", "delete"}


def test_the_document_built_on_first_read_is_whole_and_the_same_for_concurrent_readers(app):
    """The document is completed when first read: every API route is in it, with the problem
    responses, and readers racing for that first read all get the one whole document."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: app.test_client().get("/api/v1/openapi.json").json, range(8)))
    assert all(answer == answers[0] for answer in answers)
    documented = {
        (path, method.upper())
        for path, operations in answers[0]["paths"].items()
        for method in operations
        if method != "parameters"
    }
    served = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/") and not rule.rule.endswith("openapi.json")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == documented
    assert "DEFAULT_ERROR" in answers[0]["components"]["responses"]


def test_envs_list_and_create(client, auth):
    assert client.get("/api/v1/envs", headers=auth("reader")).json == {"envs": ["production"]}
    created = client.put("/api/v1/envs/staging", headers=auth("admin"))
    assert created.status_code == 201 and created.json["created"] is True
    again = client.put("/api/v1/envs/staging", headers=auth("admin"))
    assert again.status_code == 200 and again.json["created"] is False
    assert client.get("/api/v1/envs", headers=auth("reader")).json == {"envs": ["production", "staging"]}


def test_minimal_boolean_flag_gets_defaults(client, auth):
    resp = put_flag(client, auth, "checkout.recs", {"kind": "kill_switch", "enabled": True})
    assert resp.status_code == 201
    flag = resp.json
    assert flag["variants"] == {"on": True, "off": False}
    assert (flag["default_variant"], flag["off_variant"], flag["rules"]) == ("on", "off", [])
    assert flag["version"] == 1 and flag["updated_by"] == "admin"
    assert resp.headers["ETag"] == '"1"'


def test_create_get_replace_and_list(client, auth):
    assert put_flag(client, auth, "search.v2", RELEASE).status_code == 201
    put_flag(client, auth, "payments.kill", {"kind": "kill_switch", "enabled": True})
    put_flag(
        client,
        auth,
        "payments.timeout-ms",
        TIMEOUT_FLAG,
    )
    got = client.get(f"{ENV_URL}/flags/search.v2", headers=auth("reader"))
    assert got.status_code == 200 and got.headers["ETag"] == '"1"'
    assert got.json["rules"][1]["bucket_by"] == "targeting_key"
    assert got.json["rules"][0]["conditions"][0]["values"] == ["FR", "BE"]

    replaced = put_flag(client, auth, "search.v2", {**RELEASE, "description": "v2"}, **{"If-Match": '"1"'})
    assert replaced.status_code == 200 and replaced.json["version"] == 2

    listed = client.get(f"{ENV_URL}/flags", headers=auth("reader")).json["flags"]
    assert [f["key"] for f in listed] == ["payments.kill", "payments.timeout-ms", "search.v2"]


def test_identical_put_changes_nothing(client, auth, r):
    put_flag(client, auth, "a", RELEASE)
    before = r.xlen(EnvKeys("production").audit)
    again = put_flag(client, auth, "a", RELEASE)
    assert again.status_code == 200 and again.json["version"] == 1
    assert r.xlen(EnvKeys("production").audit) == before


def test_patch_changes_only_given_fields(client, auth):
    put_flag(client, auth, "search.v2", RELEASE)
    resp = client.patch(
        f"{ENV_URL}/flags/search.v2", json={"default_variant": "on", "tags": []}, headers=auth("admin")
    )
    assert resp.status_code == 200
    assert resp.json["default_variant"] == "on" and resp.json["tags"] == []
    assert (
        resp.json["rules"] == client.get(f"{ENV_URL}/flags/search.v2", headers=auth("reader")).json["rules"]
    )
    assert resp.json["description"] == "new search" and resp.json["version"] == 2


def test_kill_and_restore_with_reason_are_audited(client, auth):
    put_flag(client, auth, "checkout.recs", {"kind": "kill_switch", "enabled": True})
    body = {"reason": "INC-42: checkout p95 at 9s", "incident": "INC-42"}
    killed = client.post(f"{ENV_URL}/flags/checkout.recs/kill", json=body, headers=auth("operator"))
    assert killed.status_code == 200 and killed.json["enabled"] is False and killed.json["version"] == 2
    again = client.post(f"{ENV_URL}/flags/checkout.recs/kill", json=body, headers=auth("operator"))
    assert again.status_code == 200 and again.json["version"] == 2, "killing a killed flag changes nothing"
    restored = client.post(
        f"{ENV_URL}/flags/checkout.recs/restore",
        json={"reason": "fixed", "incident": "INC-42"},
        headers=auth("operator"),
    )
    assert restored.json["enabled"] is True and restored.json["version"] == 3

    entries = client.get(f"{ENV_URL}/audit?flag=checkout.recs", headers=auth("reader")).json["entries"]
    assert [e["action"] for e in entries] == ["flag.restore", "flag.kill", "flag.create"]
    kill = entries[1]
    assert kill["actor"] == "operator" and kill["reason"] == body["reason"] and kill["incident"] == "INC-42"
    assert kill["before"]["enabled"] is True and kill["after"]["enabled"] is False
    assert kill["request_id"] == killed.headers["X-Request-ID"]
    assert kill["source"] == "127.0.0.1" and kill["env_version"] == 2


def test_delete_archives_the_flag(client, auth, r):
    put_flag(client, auth, "old.flag", {"kind": "release", "enabled": True})
    deleted = client.delete(f"{ENV_URL}/flags/old.flag", headers=auth("admin"))
    assert deleted.status_code == 200 and deleted.json["archived"] is True
    assert client.get(f"{ENV_URL}/flags/old.flag", headers=auth("reader")).status_code == 404
    assert "old.flag" not in client.get(f"{ENV_URL}/snapshot", headers=auth("sdk")).json["flags"]
    assert client.get(f"{ENV_URL}/flags", headers=auth("reader")).json["flags"] == []
    archived = client.get(f"{ENV_URL}/flags?include_archived=true", headers=auth("reader")).json["flags"]
    assert [f["key"] for f in archived] == ["old.flag"]
    assert client.get(f"{ENV_URL}/audit?flag=old.flag", headers=auth("reader")).json["entries"][0][
        "action"
    ] == ("flag.delete")
    recreated = put_flag(client, auth, "old.flag", {"kind": "release", "enabled": False})
    assert recreated.status_code == 201 and recreated.json["version"] == 3
    assert AuditLog(r, EnvKeys("production")).verify().ok


def test_snapshot_etag_and_304(client, auth):
    put_flag(client, auth, "a", {"kind": "kill_switch", "enabled": True})
    put_flag(client, auth, "b", RELEASE)
    snap = client.get(f"{ENV_URL}/snapshot", headers=auth("sdk"))
    assert snap.status_code == 200 and snap.json["version"] == 2
    assert snap.headers["ETag"] == f'"2-{snap.json["history"]}"', "the ETag is the snapshot's identity"
    body = snap.json
    assert body["env"] == "production" and body["version"] == 2
    assert list(body["flags"]) == ["a", "b"]
    assert set(body["flags"]["b"]) == {
        "kind",
        "type",
        "enabled",
        "variants",
        "default_variant",
        "off_variant",
        "rules",
        "salt",
        "version",
    }
    not_modified = client.get(f"{ENV_URL}/snapshot", headers={**auth("sdk"), "If-None-Match": '"2"'})
    assert not_modified.status_code == 304 and not_modified.data == b""
    client.post(f"{ENV_URL}/flags/a/kill", json={"reason": "r"}, headers=auth("operator"))
    changed = client.get(f"{ENV_URL}/snapshot", headers={**auth("sdk"), "If-None-Match": '"2"'})
    assert changed.status_code == 200 and changed.json["version"] == 3
    assert changed.json["flags"]["a"]["enabled"] is False


def test_audit_pagination_newest_first(client, auth):
    put_flag(client, auth, "a", {"kind": "kill_switch", "enabled": True})
    for i in range(6):
        action = "kill" if i % 2 == 0 else "restore"
        client.post(f"{ENV_URL}/flags/a/{action}", json={"reason": f"r{i}"}, headers=auth("operator"))
    seen, cursor = [], None
    while True:
        url = f"{ENV_URL}/audit?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=auth("reader")).json
        seen += [e["seq"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [7, 6, 5, 4, 3, 2, 1]


def test_unknown_environment_is_404(client, auth):
    resp = client.get("/api/v1/envs/nope/flags", headers=auth("reader"))
    assert resp.status_code == 404 and resp.mimetype == "application/problem+json"


def test_request_id_is_echoed(client, auth):
    resp = client.get(f"{ENV_URL}/flags", headers={**auth("reader"), "X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
