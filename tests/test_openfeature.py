"""The OpenFeature provider, driven through the openfeature-sdk client API."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import requests
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.provider import ProviderStatus

import flagsvc_client
from flagsvc_client import FlagClient
from flagsvc_client.openfeature import FlagsvcProvider

from .helpers import FLAGS_URL, SAMPLE_FLAGS, wait_for


@pytest.fixture
def of_client(server, auth, tokens):
    for key, body in SAMPLE_FLAGS.items():
        assert requests.put(f"{server.url}{FLAGS_URL}/{key}", json=body, headers=auth("admin"), timeout=5).ok
    provider = FlagsvcProvider(FlagClient(server.url, tokens["sdk"], "production", poll_interval=0.2))
    api.set_provider(provider)
    yield api.get_client()
    api.shutdown()


def test_reasons_and_error_codes_are_openfeatures():
    for reason in flagsvc_client.Reason:
        assert Reason(reason) is Reason[reason.name] and Reason[reason.name] == reason
    for code in flagsvc_client.ErrorCode:
        assert ErrorCode(code) is ErrorCode[code.name] and ErrorCode[code.name] == code


def test_typed_resolution_with_reasons(of_client):
    assert of_client.get_boolean_value("recs", False) is True
    fr = of_client.get_boolean_details("search.v2", False, EvaluationContext("u1", {"country": "FR"}))
    assert (fr.value, fr.variant, fr.reason) == (True, "on", Reason.TARGETING_MATCH)
    us = of_client.get_boolean_details("search.v2", True, EvaluationContext("u1", {"country": "US"}))
    assert (us.value, us.variant, us.reason) == (False, "off", Reason.DEFAULT)
    theme = of_client.get_string_details("checkout.theme", "red", EvaluationContext("user-42"))
    assert theme.reason == Reason.SPLIT and theme.value in ("blue", "green")
    assert of_client.get_integer_value("payments.timeout-ms", 1) == 3000
    assert of_client.get_float_value("payments.ratio", 1.0) == 0.25
    assert of_client.get_float_value("payments.timeout-ms", 1.0) == 3000.0
    assert of_client.get_object_value("limits", {}) == {"rps": 100, "burst": [1, 2]}
    assert of_client.get_boolean_details("recs", False).flag_metadata == {"version": 1}


def test_errors_give_the_default_with_a_code(of_client):
    missing = of_client.get_boolean_details("nope", True)
    assert (missing.value, missing.reason, missing.error_code) == (
        True,
        Reason.ERROR,
        ErrorCode.FLAG_NOT_FOUND,
    )
    mismatch = of_client.get_string_details("recs", "x")
    assert (mismatch.value, mismatch.error_code) == ("x", ErrorCode.TYPE_MISMATCH)
    not_int = of_client.get_integer_details("payments.ratio", 7)
    assert (not_int.value, not_int.error_code) == (7, ErrorCode.TYPE_MISMATCH)
    no_key = of_client.get_string_details("checkout.theme", "red", EvaluationContext(None, {}))
    assert (no_key.value, no_key.error_code) == ("red", ErrorCode.TARGETING_KEY_MISSING)


def test_configuration_changed_event_on_kill(of_client, server, auth):
    seen = threading.Event()
    changed: list[list[str]] = []

    def handler(details):
        changed.append(details.flags_changed)
        seen.set()

    of_client.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, handler)
    resp = requests.post(
        f"{server.url}{FLAGS_URL}/recs/kill", json={"reason": "r"}, headers=auth("operator"), timeout=5
    )
    assert resp.ok
    assert seen.wait(5), "no PROVIDER_CONFIGURATION_CHANGED event"
    assert ["recs"] in changed
    killed = of_client.get_boolean_details("recs", True)
    assert (killed.value, killed.reason) == (False, Reason.DISABLED)


NARROWED = """
import sys
from openfeature import api
from flagsvc_client import FlagClient
from flagsvc_client.openfeature import FlagsvcProvider

assert sys.flags.optimize == 2, "docstrings are stripped"
api.set_provider(FlagsvcProvider(FlagClient(sys.argv[1], sys.argv[2], "production", mode="poll")))
client = api.get_client()
print(client.get_integer_details("payments.ratio", 7).error_message)
print(client.get_object_details("payments.timeout-ms", {}).error_message)
api.shutdown()
"""


@pytest.mark.slow  # a python -OO subprocess
def test_narrowed_type_mismatch_messages_survive_stripped_docstrings(of_client, server, tokens):
    """Under ``python -OO`` (no docstrings) the integer and object mismatches still say what they are."""
    done = subprocess.run(
        [sys.executable, "-OO", "-c", NARROWED, server.url, tokens["sdk"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "flag 'payments.ratio' is not an integer",
        "flag 'payments.timeout-ms' is not an object or a list",
    ]


def test_the_provider_state_follows_the_service_through_an_outage(server, auth, tokens):
    """READY while the service answers, STALE while it is down (the last snapshot serves), READY
    again when it is back; evaluations keep the snapshot's values throughout."""
    recs = f"{server.url}{FLAGS_URL}/recs"
    assert requests.put(recs, json=SAMPLE_FLAGS["recs"], headers=auth("admin"), timeout=5).ok
    sdk = FlagClient(server.url, tokens["sdk"], "production", poll_interval=0.1, mode="poll")
    api.set_provider_and_wait(FlagsvcProvider(sdk))
    client = api.get_client()
    try:
        assert client.get_provider_status() == ProviderStatus.READY
        server.stop()
        wait_for(lambda: client.get_provider_status() == ProviderStatus.STALE, 5, "STALE in the outage")
        assert client.get_boolean_details("recs", False).value is True, "the last snapshot serves"
        server.start()
        wait_for(lambda: client.get_provider_status() == ProviderStatus.READY, 5, "READY once it is back")
    finally:
        api.shutdown()


def test_without_a_snapshot_the_provider_is_in_error_and_says_why(tokens):
    """The service unreachable from the start: ERROR, and evaluations answer PROVIDER_NOT_READY with
    the reason, not FLAG_NOT_FOUND for flags that may well exist."""
    sdk = FlagClient("http://127.0.0.1:9", tokens["sdk"], "production", init_timeout=0.5, mode="poll")
    api.set_provider(FlagsvcProvider(sdk))
    client = api.get_client()
    try:
        wait_for(lambda: client.get_provider_status() == ProviderStatus.ERROR, 5, "ERROR without a snapshot")
        details = client.get_boolean_details("recs", True)
        assert (details.value, details.error_code) == (True, ErrorCode.PROVIDER_NOT_READY)
        assert "has not sent a snapshot yet" in details.error_message
    finally:
        api.shutdown()


def test_a_refused_token_makes_the_provider_fatal(server):
    sdk = FlagClient(server.url, "fsk_000000000000_wrong", "production", init_timeout=2, mode="poll")
    api.set_provider(FlagsvcProvider(sdk))
    client = api.get_client()
    try:
        wait_for(lambda: client.get_provider_status() == ProviderStatus.FATAL, 5, "FATAL on a 401")
        details = client.get_boolean_details("recs", True)
        assert details.value is True and details.error_code == ErrorCode.PROVIDER_FATAL
    finally:
        api.shutdown()
