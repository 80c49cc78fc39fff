"""FLAGSVC_LOG_FORMAT=json: one JSON line per request, with the request id the audit entry has."""

from __future__ import annotations

import json
import logging

from flagsvc import create_app
from flagsvc.keys import EnvKeys
from flagsvc.logs import JsonFormatter


def test_json_request_log_carries_the_request_id_of_the_audit_entry(app, redis_url, auth, r, caplog):
    json_app = create_app({"REDIS_URL": redis_url, "LOG_FORMAT": "json"})
    client = json_app.test_client()
    try:
        client.put(
            "/api/v1/envs/production/flags/a",
            json={"kind": "kill_switch", "enabled": True},
            headers=auth("admin"),
        )
        with caplog.at_level(logging.INFO, logger="flagsvc.requests"):
            resp = client.post(
                "/api/v1/envs/production/flags/a/kill",
                json={"reason": "r"},
                headers={**auth("operator"), "X-Request-ID": "req-42"},
            )
        assert resp.status_code == 200
        [record] = [
            rec
            for rec in caplog.records
            if rec.name == "flagsvc.requests" and getattr(rec, "path", "").endswith("/kill")
        ]
        line = json.loads(JsonFormatter().format(record))
        assert line["request_id"] == "req-42" and line["status"] == 200 and line["actor"] == "operator"
        assert line["path"] == "/api/v1/envs/production/flags/a/kill" and line["duration_ms"] > 0
        entry = r.xrevrange(EnvKeys("production").audit, count=1)[0][1]
        assert entry["request_id"] == "req-42"
        assert "fsk_" not in json.dumps(line), "no secret in logs"
    finally:
        json_app.extensions["flagsvc"].snapshots.stop()
        root = logging.getLogger()
        root.handlers[:] = [h for h in root.handlers if type(h).__name__ != "_FlagsvcHandler"]


def test_polls_answered_before_flask_log_the_same_fields(app, redis_url, auth, caplog):
    json_app = create_app({"REDIS_URL": redis_url, "LOG_FORMAT": "json"})
    client = json_app.test_client()
    try:
        version = client.get("/api/v1/envs/production/snapshot", headers=auth("sdk")).headers["ETag"]
        with caplog.at_level(logging.INFO, logger="flagsvc.requests"):
            resp = client.get(
                "/api/v1/envs/production/snapshot",
                headers={**auth("sdk"), "If-None-Match": version, "X-Request-ID": "poll-7"},
            )
        assert resp.status_code == 304
        [record] = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "poll-7"]
        line = json.loads(JsonFormatter().format(record))
        assert line["request_id"] == "poll-7" and line["status"] == 304 and line["actor"] == "sdk"
        assert line["path"] == "/api/v1/envs/production/snapshot" and line["method"] == "GET"
        assert line["duration_ms"] >= 0 and "fsk_" not in json.dumps(line)
    finally:
        json_app.extensions["flagsvc"].snapshots.stop()
        root = logging.getLogger()
        root.handlers[:] = [h for h in root.handlers if type(h).__name__ != "_FlagsvcHandler"]
