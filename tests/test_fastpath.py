"""Snapshot polls answered before Flask: the same answers as the Flask view, and only for
requests the view would answer 200 or 304."""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

from flagsvc.fastpath import Heartbeats, SnapshotPolls
from flagsvc.tokens import TokenStore

from .helpers import heartbeats_written

SNAPSHOT = "/api/v1/envs/production/snapshot"


@pytest.fixture
def flask_calls(app: Any) -> list[str]:
    """Paths of the requests that reached Flask."""
    calls: list[str] = []

    @app.before_request
    def _count() -> None:
        from flask import request

        calls.append(request.path)

    return calls


@pytest.fixture
def version(client: Any, auth: Any, flask_calls: list[str]) -> str:
    """The current snapshot identity (``<version>-<history>``, its ETag), after a flag was created
    (these requests are not counted)."""
    client.put(
        "/api/v1/envs/production/flags/pay",
        json={"kind": "kill_switch", "enabled": True},
        headers=auth("admin"),
    )
    current = str(client.get(SNAPSHOT, headers=auth("sdk")).headers["ETag"].strip('"'))
    flask_calls.clear()
    return current


def both(
    app: Any, **request: Any
) -> tuple[tuple[str, dict[str, str], bytes], tuple[str, dict[str, str], bytes]]:
    """The answer of the middleware and of the Flask app behind it, to the same request."""
    middleware = app.wsgi_app
    assert isinstance(middleware, SnapshotPolls)
    answers = []
    for wsgi in (middleware, middleware.app):
        environ = EnvironBuilder(**request).get_environ()
        body, status, headers = run_wsgi_app(wsgi, environ, buffered=True)
        answers.append((status, dict(headers), b"".join(body)))
    return answers[0], answers[1]


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [
        ("current", 304),
        ('W/"current"', 304),
        ('"current", "1"', 304),
        ("older", 200),
        (None, 200),
        ("not-an-etag", 200),
    ],
)
def test_polls_get_the_flask_views_answer_without_reaching_flask(
    app: Any, auth: Any, version: str, flask_calls: list[str], if_none_match: str | None, status: int
) -> None:
    headers = {**auth("sdk"), "X-Request-ID": "req-1"}
    if if_none_match is not None:
        older = int(version.partition("-")[0]) - 1
        tag = if_none_match.replace("current", version).replace("older", f'"{older}"')
        headers["If-None-Match"] = tag if '"' in tag or tag.startswith("not") else f'"{tag}"'
    fast, flask = both(app, path=SNAPSHOT, headers=headers)
    assert fast == flask
    assert fast[0].startswith(str(status))
    assert fast[1]["ETag"] == f'"{version}"' and fast[1]["X-Request-ID"] == "req-1"
    assert flask_calls == [SNAPSHOT]  # only the direct call to the Flask app reached it


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.5", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0, *", False),
        ("identity", False),
        ("deflate, br", False),
        (None, False),
    ],
)
def test_gzip_when_asked_in_both_paths(
    app: Any, auth: Any, version: str, flask_calls: list[str], accept_encoding: str | None, gzipped: bool
) -> None:
    headers = {**auth("sdk"), "X-Request-ID": "req-1"}
    if accept_encoding is not None:
        headers["Accept-Encoding"] = accept_encoding
    fast, flask = both(app, path=SNAPSHOT, headers=headers)
    assert fast == flask and flask_calls == [SNAPSHOT]
    status, answer, body = fast
    assert status.startswith("200") and int(answer["Content-Length"]) == len(body)
    assert answer["Vary"] == "Authorization, Accept-Encoding"
    assert answer["ETag"] == f'"{version}"', "the ETag names the snapshot in either encoding"
    assert answer.get("Content-Encoding") == ("gzip" if gzipped else None)
    document = json.loads(gzip.decompress(body) if gzipped else body)
    assert document["flags"]["pay"]["enabled"] is True


def test_a_conditional_poll_answers_304_in_either_encoding(app: Any, auth: Any, version: str) -> None:
    for encoding in ("gzip", "identity"):
        headers = {
            **auth("sdk"),
            "If-None-Match": f'"{version}"',
            "Accept-Encoding": encoding,
            "X-Request-ID": "r",
        }
        fast, flask = both(app, path=SNAPSHOT, headers=headers)
        assert fast == flask and fast[0].startswith("304") and fast[2] == b""
        assert "Content-Encoding" not in fast[1] and fast[1]["Vary"] == "Authorization, Accept-Encoding"


def test_a_bad_request_id_is_replaced_as_flask_replaces_it(app: Any, auth: Any, version: str) -> None:
    fast, flask = both(app, path=SNAPSHOT, headers={**auth("sdk"), "X-Request-ID": "bad id\t!"})
    assert len(fast[1]["X-Request-ID"]) == len(flask[1]["X-Request-ID"]) == 32
    assert fast[1]["X-Request-ID"] != "bad id\t!"


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"headers": {}}, 401),
        ({"headers": {"Authorization": "Bearer fsk_nope_nope"}}, 401),
        ({"headers": {"Authorization": "Basic abc"}}, 401),
        ({"path": "/api/v1/envs/nowhere/snapshot"}, 404),
        ({"path": "/api/v1/envs/Bad!/snapshot"}, 422),
        ({"method": "POST"}, 405),
        ({"query_string": "x=1"}, 200),
    ],
)
def test_anything_else_is_answered_by_flask(
    app: Any, auth: Any, version: str, flask_calls: list[str], request_kwargs: dict[str, Any], status: int
) -> None:
    request = {"path": SNAPSHOT, "headers": auth("sdk"), **request_kwargs}
    resp = app.test_client().open(**request)
    assert resp.status_code == status
    assert flask_calls == [request["path"]]
    if status >= 400:
        assert resp.content_type == "application/problem+json"
        assert resp.headers["Cache-Control"] == "no-store", "no cache keeps a refusal"


def test_a_token_of_another_environment_is_refused(
    app: Any, make_token: Any, version: str, flask_calls: list[str]
) -> None:
    staging_only = make_token("sdk", envs=["staging"])
    resp = app.test_client().get(SNAPSHOT, headers={"Authorization": f"Bearer {staging_only}"})
    assert resp.status_code == 403 and flask_calls == [SNAPSHOT]
    assert resp.headers["Cache-Control"] == "no-store"


def test_a_revoked_token_stops_polling_within_a_second(
    r: Any, client: Any, make_token: Any, version: str
) -> None:
    secret = make_token("sdk", name="soon-revoked")
    headers = {"Authorization": f"Bearer {secret}", "If-None-Match": f'"{version}"'}
    assert client.get(SNAPSHOT, headers=headers).status_code == 304
    TokenStore(r).revoke("soon-revoked", actor="test")
    deadline = time.monotonic() + 2.0
    while client.get(SNAPSHOT, headers=headers).status_code == 304:
        assert time.monotonic() < deadline, "a revoked token still polls after 2 s"
        time.sleep(0.05)
    assert client.get(SNAPSHOT, headers=headers).status_code == 401


def test_polls_are_counted_as_before(app: Any, auth: Any, version: str) -> None:
    from prometheus_client import REGISTRY

    def count(outcome: str) -> float:
        value = REGISTRY.get_sample_value(
            "flagsvc_snapshot_polls_total", {"env": "production", "outcome": outcome}
        )
        return value or 0.0

    before = count("304"), count("200")
    client = app.test_client()
    for _ in range(3):
        client.get(SNAPSHOT, headers={**auth("sdk"), "If-None-Match": f'"{version}"'})
    client.get(SNAPSHOT, headers=auth("sdk"))
    assert (count("304") - before[0], count("200") - before[1]) == (3, 1)
    requests = REGISTRY.get_sample_value(
        "flagsvc_http_requests_total",
        {"route": "/api/v1/envs/<env>/snapshot", "method": "GET", "status": "304"},
    )
    assert requests and requests >= 3


def test_a_read_right_after_a_write_in_the_same_process_sees_the_write(
    app: Any, client: Any, auth: Any
) -> None:
    """Read-your-writes: the snapshot a process serves right after its own write includes it,
    without waiting for the change notification."""
    client.put(
        "/api/v1/envs/production/flags/pay",
        json={"kind": "kill_switch", "enabled": True},
        headers=auth("admin"),
    )
    for n in range(50):
        action = "kill" if n % 2 == 0 else "restore"
        done = client.post(
            f"/api/v1/envs/production/flags/pay/{action}", json={"reason": "r"}, headers=auth("operator")
        )
        version = done.headers["X-Flagsvc-Env-Version"]
        snap = client.get(SNAPSHOT, headers=auth("sdk"))
        assert snap.headers["ETag"].startswith(f'"{version}-')
        assert snap.json["flags"]["pay"]["enabled"] is (action == "restore")


# -- heartbeats --------------------------------------------------------------------------------

BEAT = "/api/v1/envs/production/clients/i-1"
HEARTBEAT = {"app": "shop", "applied_version": 1, "sdk": "python/0.1", "counts": {"pay": 3}}


def beat_both(app: Any, **request: Any) -> tuple[tuple[str, dict[str, str], bytes], ...]:
    """The answer of the heartbeat middleware and of the Flask app behind it, to the same request."""
    middleware = app.wsgi_app.app
    assert isinstance(middleware, Heartbeats)
    answers = []
    for wsgi in (middleware, middleware.app):
        body, status, headers = run_wsgi_app(wsgi, EnvironBuilder(**request).get_environ(), buffered=True)
        answers.append((status, dict(headers), b"".join(body)))
    return answers[0], answers[1]


def stored_record(app: Any, r: Any) -> dict[str, Any]:
    heartbeats_written(app)
    record: dict[str, Any] = json.loads(r.hget("flagsvc:{production}:clients", "i-1"))
    for moving in ("seen_at", "seen_ts", "address"):  # (the test client's, or none)
        record.pop(moving)
    return record


def test_heartbeats_get_the_flask_views_answer_without_reaching_flask(
    app: Any, auth: Any, r: Any, version: str, flask_calls: list[str]
) -> None:
    request = {"path": BEAT, "method": "POST", "json": HEARTBEAT, "headers": auth("sdk")}
    (fast_status, fast_headers, fast_body), (flask_status, flask_headers, flask_body) = beat_both(
        app, **request
    )
    assert flask_calls == [BEAT], "only the second reached Flask"
    assert fast_status == flask_status == "204 NO CONTENT" and fast_body == flask_body == b""
    for name in ("X-Flagsvc-Report-Interval", "X-Flagsvc-Report-Jitter"):
        assert fast_headers[name] == flask_headers[name]
    by_flask = stored_record(app, r)
    app.test_client().post(BEAT, json=HEARTBEAT, headers=auth("sdk"))
    assert flask_calls == [BEAT], "a plain heartbeat never reaches Flask"
    assert stored_record(app, r) == by_flask, "the same record, defaults included"


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({**HEARTBEAT, "counts": {"pay": True}}, {}, 422),
        ({**HEARTBEAT, "counts": {"Bad Key": 1}}, {}, 422),
        ({**HEARTBEAT, "extra": 1}, {}, 422),
        ({"applied_version": 1}, {}, 422),
        (HEARTBEAT, {"Authorization": "Bearer fsk_000000000000_nope"}, 401),
    ],
)
def test_any_other_heartbeat_is_answered_by_flask(
    app: Any, auth: Any, version: str, flask_calls: list[str], body: Any, headers: Any, status: int
) -> None:
    resp = app.test_client().post(BEAT, json=body, headers={**auth("sdk"), **headers})
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert flask_calls == [BEAT]


def test_a_refusal_by_the_limits_comes_from_flask_and_counts_once(
    app: Any, auth: Any, version: str, flask_calls: list[str]
) -> None:
    limit = app.config["HEARTBEATS_PER_MINUTE"]
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)  # all in one minute
    statuses = [
        app.test_client().post(BEAT, json=HEARTBEAT, headers=auth("sdk")).status_code
        for _ in range(limit + 1)
    ]
    assert statuses == [204] * limit + [429]
    assert flask_calls == [BEAT]
    assert app.extensions["flagsvc"].clients.sent("production", "i-1") == limit


def test_counts_the_schema_takes_are_taken_the_same_way(app: Any, auth: Any, r: Any, version: str) -> None:
    as_floats = {**HEARTBEAT, "counts": {"pay": 3.0}}  # JSON integers written as 3.0
    assert app.test_client().post(BEAT, json=as_floats, headers=auth("sdk")).status_code == 204
    assert stored_record(app, r)["applied_version"] == 1
    minute = int(time.time() // 60)
    buckets = [f"flagsvc:{{production}}:evals:{m}" for m in (minute - 1, minute)]
    assert sum(int(r.hget(bucket, "pay|shop") or 0) for bucket in buckets) == 3
