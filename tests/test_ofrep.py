"""OFREP: the real openfeature-provider-ofrep against the server; every vector; every error code."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from flagsvc.keys import EnvKeys
from flagsvc_client.engine import evaluate

from .helpers import ENV_URL, SAMPLE_FLAGS, wait_for

VECTORS = json.loads((Path(__file__).parent.parent / "client/spec/evaluation-cases.json").read_text())[
    "cases"
]


@pytest.fixture
def ofrep_token(make_token):
    return make_token("sdk", name="php-checkout", envs=["production"])


@pytest.fixture
def seeded(client, auth):
    for key, body in SAMPLE_FLAGS.items():
        assert client.put(f"{ENV_URL}/flags/{key}", json=body, headers=auth("admin")).status_code == 201


def post(client, path, token, body=None, **headers):
    return client.post(
        f"/ofrep/v1{path}",
        json=body if body is not None else {},
        headers={"Authorization": f"Bearer {token}", **headers},
    )


def test_the_real_ofrep_provider_evaluates_every_type(server, client, auth, seeded, ofrep_token):
    api.set_provider(OFREPProvider(base_url=server.url, headers_factory=lambda: {"X-API-Key": ofrep_token}))
    flags = client
    client = api.get_client()
    try:
        assert client.get_boolean_value("recs", False) is True
        fr = client.get_boolean_details("search.v2", False, EvaluationContext("u1", {"country": "FR"}))
        assert (fr.value, fr.variant, fr.reason) == (True, "on", Reason.TARGETING_MATCH)
        theme = client.get_string_details("checkout.theme", "red", EvaluationContext("user-42"))
        stored = flags.get(f"{ENV_URL}/flags/checkout.theme", headers=auth("reader")).json
        local = evaluate("checkout.theme", stored, {"targeting_key": "user-42"})
        assert (theme.value, theme.variant, theme.reason) == (local.value, local.variant, Reason.SPLIT)
        assert client.get_integer_value("payments.timeout-ms", 1) == 3000
        assert client.get_float_value("payments.ratio", 1.0) == 0.25
        assert client.get_object_value("limits", {}) == {"rps": 100, "burst": [1, 2]}
        missing = client.get_boolean_details("nope", True)
        assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
        no_key = client.get_string_details("checkout.theme", "red", EvaluationContext(None, {}))
        assert (no_key.value, no_key.error_code) == ("red", ErrorCode.TARGETING_KEY_MISSING)
    finally:
        api.shutdown()


def test_results_equal_the_python_sdk_for_every_vector(client, auth, ofrep_token):
    compared = 0
    for i, case in enumerate(VECTORS):
        if not isinstance(case["flag"], dict):
            continue
        key = f"case-{i}"
        body = {"kind": "release", **case["flag"]}
        body.pop("version", None)
        if body.get("salt") is None:
            body["salt"] = case["flag_key"]  # buckets are salted by the flag's key by default
        if client.put(f"{ENV_URL}/flags/{key}", json=body, headers=auth("admin")).status_code != 201:
            continue  # a malformed flag the server refuses to store (the engine's PARSE_ERROR cases)
        stored = client.get(f"{ENV_URL}/flags/{key}", headers=auth("reader")).json
        context = case["context"]
        ofrep_context = dict(context) if isinstance(context, dict) else context
        if isinstance(ofrep_context, dict) and "targeting_key" in ofrep_context:
            ofrep_context["targetingKey"] = ofrep_context.pop("targeting_key")
        resp = post(client, f"/evaluate/flags/{key}", ofrep_token, {"context": ofrep_context})
        local = evaluate(key, stored, context if isinstance(context, dict) else None)
        if not isinstance(context, dict):
            assert resp.status_code == 400 and resp.json["errorCode"] == "INVALID_CONTEXT", case["name"]
        elif local.error_code:
            assert resp.status_code == 400, case["name"]
            assert resp.json == {
                "key": key,
                "errorCode": local.error_code,
                "errorDetails": local.error_message,
            }
        else:
            assert resp.status_code == 200, (case["name"], resp.json)
            got = resp.json
            assert (got["value"], got["variant"], got["reason"]) == (
                local.value,
                local.variant,
                local.reason,
            ), case["name"]
            assert type(got["value"]) is type(local.value)
            expected = case["expected"]
            if expected["reason"] != "ERROR":
                assert (got["value"], got["variant"], got["reason"]) == (
                    expected["value"],
                    expected["variant"],
                    expected["reason"],
                ), case["name"]
        compared += 1
    assert compared >= 150


def test_bulk_evaluation_with_etag(client, auth, seeded, ofrep_token):
    ctx = {"context": {"targetingKey": "u1", "country": "FR"}}
    first = post(client, "/evaluate/flags", ofrep_token, ctx)
    assert first.status_code == 200
    results = {f["key"]: f for f in first.json["flags"]}
    assert set(results) == set(SAMPLE_FLAGS)
    assert results["search.v2"]["value"] is True and results["recs"]["reason"] == "STATIC"
    etag = first.headers["ETag"]
    assert post(client, "/evaluate/flags", ofrep_token, ctx, **{"If-None-Match": etag}).status_code == 304
    other = post(
        client, "/evaluate/flags", ofrep_token, {"context": {"targetingKey": "u2"}}, **{"If-None-Match": etag}
    )
    assert other.status_code == 200, "another context is another answer"
    client.post(f"{ENV_URL}/flags/recs/kill", json={"reason": "r"}, headers=auth("operator"))
    changed = post(client, "/evaluate/flags", ofrep_token, ctx, **{"If-None-Match": etag})
    assert changed.status_code == 200
    assert {f["key"]: f for f in changed.json["flags"]}["recs"]["reason"] == "DISABLED"


def test_error_codes_over_plain_http(client, auth, seeded, ofrep_token, r):
    missing = post(client, "/evaluate/flags/nope", ofrep_token)
    assert (
        missing.status_code == 404
        and missing.json["errorCode"] == "FLAG_NOT_FOUND"
        and missing.json["key"] == "nope"
    )
    bad_context = post(client, "/evaluate/flags/recs", ofrep_token, {"context": ["not", "an", "object"]})
    assert bad_context.status_code == 400 and bad_context.json["errorCode"] == "INVALID_CONTEXT"
    assert bad_context.json["key"] == "recs", "every error of a flag's evaluation names the flag"
    garbage = client.post(
        "/ofrep/v1/evaluate/flags/recs",
        data="{nope",
        content_type="application/json",
        headers={"Authorization": f"Bearer {ofrep_token}"},
    )
    assert garbage.status_code == 400 and garbage.json == {
        "key": "recs",
        "errorCode": "PARSE_ERROR",
        "errorDetails": "the body is not valid JSON",
    }
    no_key = post(client, "/evaluate/flags/checkout.theme", ofrep_token, {"context": {}})
    assert no_key.status_code == 400 and no_key.json["errorCode"] == "TARGETING_KEY_MISSING"
    ill_typed = post(client, "/evaluate/flags/search.v2", ofrep_token, {"context": {"country": ["FR"]}})
    assert ill_typed.status_code == 400 and ill_typed.json["errorCode"] == "INVALID_CONTEXT"
    # A flag stored by something other than this API's validation (an old version, a hand edit).
    keys = EnvKeys("production")
    r.hset(
        keys.flags, "broken", json.dumps({"key": "broken", "kind": "release", "enabled": "yes", "version": 1})
    )
    r.incr(keys.version)
    deadline = time.monotonic() + 5  # no notification was published: the periodic check finds it
    while (broken := post(client, "/evaluate/flags/broken", ofrep_token)).status_code == 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert broken.status_code == 400 and broken.json["errorCode"] == "PARSE_ERROR"


def test_auth_and_configuration(client, seeded, ofrep_token, tokens, make_token):
    assert client.post("/ofrep/v1/evaluate/flags/recs", json={}).status_code == 401
    assert post(client, "/evaluate/flags/recs", "fsk_000000000000_x").status_code == 401
    by_api_key = client.post("/ofrep/v1/evaluate/flags/recs", json={}, headers={"X-API-Key": ofrep_token})
    assert by_api_key.status_code == 200 and by_api_key.json["value"] is True
    everywhere = post(client, "/evaluate/flags/recs", tokens["sdk"])
    assert everywhere.status_code == 403 and "exactly one environment" in everywhere.json["errorDetails"]
    assert everywhere.json["key"] == "recs"
    config = client.get("/ofrep/v1/configuration", headers={"X-API-Key": ofrep_token}).json
    assert config["capabilities"]["cacheInvalidation"]["polling"] == {
        "enabled": True,
        "minPollingIntervalMs": 1000,
    }


def test_ofrep_consumers_appear_in_the_blast_radius_and_the_clients_view(client, auth, seeded, ofrep_token):
    """A Node app evaluating over OFREP is as much a user of a flag as an SDK instance: a dry run
    shows it, and /clients lists it as an OFREP consumer (it holds no version to wait for)."""
    for _ in range(3):
        assert (
            post(
                client, "/evaluate/flags/recs", ofrep_token, {}, **{"X-Flagsvc-App": "node-search"}
            ).status_code
            == 200
        )
    assert (
        post(client, "/evaluate/flags", ofrep_token, {"context": {"targetingKey": "u1"}}).status_code == 200
    )
    assert post(client, "/evaluate/flags/nope", ofrep_token).status_code == 404
    bad_app = post(client, "/evaluate/flags/recs", ofrep_token, {}, **{"X-Flagsvc-App": "a b"})
    assert bad_app.status_code == 400 and "X-Flagsvc-App" in bad_app.json["errorDetails"]

    reader, operator = auth("reader"), auth("operator")

    def blast_radius():
        body = {"reason": "x", "dry_run": True}
        return client.post(f"{ENV_URL}/flags/recs/kill", json=body, headers=operator).json["blast_radius"]

    wait_for(lambda: blast_radius()["evaluations"], 5, "the counts written by the change listener")
    assert blast_radius() == {"evaluations": 4, "apps": {"node-search": 1, "php-checkout": 1}}
    view = client.get(f"{ENV_URL}/clients", headers=reader).json
    assert view["instances"] == [] and view["summary"]["live"] == 0, "no version to wait for"
    consumers = {c["consumer"]: c for c in view["ofrep"]}
    assert set(consumers) == {"ofrep:php-checkout:node-search", "ofrep:php-checkout:php-checkout"}
    assert consumers["ofrep:php-checkout:node-search"]["live"] is True
    assert consumers["ofrep:php-checkout:node-search"]["token"] == "php-checkout"
