"""Request logs: a JSON line with the request id the audit entry has; text lines a request cannot forge."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

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
        json_app.extensions["flagsvc"].close()
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
        json_app.extensions["flagsvc"].close()
        root = logging.getLogger()
        root.handlers[:] = [h for h in root.handlers if type(h).__name__ != "_FlagsvcHandler"]


# A request path werkzeug decodes into a line feed, a carriage return, a terminal escape and a
# right-to-left override: written raw, it would forge a second log line.
FORGED = "/api/v1/envs/x%0Aforged%20line%0D%1B%5B2J%E2%80%AEgnp.exe/flags"
DECODED = "/api/v1/envs/x\nforged line\r\x1b[2J\u202egnp.exe/flags"
ESCAPED = "/api/v1/envs/x\\nforged line\\r\\x1b[2J\\u202egnp.exe/flags"


@pytest.fixture
def text_log(app, redis_url) -> Iterator[tuple[Any, io.StringIO]]:
    """An app logging with ``FLAGSVC_LOG_FORMAT=text``: its test client, and what it writes."""
    text_app = create_app({"REDIS_URL": redis_url, "LOG_FORMAT": "text"})
    [handler] = [h for h in logging.getLogger().handlers if type(h).__name__ == "_FlagsvcHandler"]
    stream = io.StringIO()
    handler.setStream(stream)
    yield text_app.test_client(), stream
    text_app.extensions["flagsvc"].close()
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h).__name__ != "_FlagsvcHandler"]


def test_text_log_of_a_forged_path_is_one_line_escaped(text_log):
    client, stream = text_log
    assert client.get(FORGED).status_code == 401
    [line] = stream.getvalue().splitlines()
    assert line.endswith(f" INFO flagsvc.requests GET {ESCAPED} 401")


def test_text_log_keeps_a_traceback_but_escapes_the_message(text_log):
    _, stream = text_log
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("flagsvc.errors").exception("unhandled error on %s", DECODED)
    first, *traceback = stream.getvalue().splitlines()
    assert first.endswith(f" ERROR flagsvc.errors unhandled error on {ESCAPED}")
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "ValueError: boom"
