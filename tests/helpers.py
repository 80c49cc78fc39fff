"""What many test modules share: the test environment's URLs, a sample flag, waiting."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest

ENV = "production"
"""The environment every test app is created with (the ``app`` fixture)."""
ENV_URL = f"/api/v1/envs/{ENV}"
FLAGS_URL = f"{ENV_URL}/flags"

#: An ops flag of type number: a timeout that a playbook or a kill shortens.
TIMEOUT_FLAG = {
    "kind": "ops",
    "type": "number",
    "enabled": True,
    "variants": {"normal": 3000, "short": 800},
    "default_variant": "normal",
    "off_variant": "short",
}


#: One flag of each kind and type, as the SDK, OpenFeature and OFREP tests evaluate them.
SAMPLE_FLAGS = {
    "recs": {"kind": "kill_switch", "enabled": True},
    "search.v2": {
        "kind": "release",
        "enabled": True,
        "default_variant": "off",
        "rules": [
            {"conditions": [{"attribute": "country", "operator": "in", "values": ["FR"]}], "variant": "on"}
        ],
    },
    "checkout.theme": {
        "kind": "experiment",
        "type": "string",
        "enabled": True,
        "variants": {"blue": "blue", "green": "green"},
        "default_variant": "blue",
        "off_variant": "blue",
        "rules": [
            {
                "conditions": [],
                "rollout": [{"variant": "blue", "weight": 50}, {"variant": "green", "weight": 50}],
            }
        ],
    },
    "payments.timeout-ms": TIMEOUT_FLAG,
    "payments.ratio": {
        "kind": "ops",
        "type": "number",
        "enabled": True,
        "variants": {"a": 0.25},
        "default_variant": "a",
        "off_variant": "a",
    },
    "limits": {
        "kind": "ops",
        "type": "json",
        "enabled": True,
        "variants": {"std": {"rps": 100, "burst": [1, 2]}},
        "default_variant": "std",
        "off_variant": "std",
    },
}


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.01,
    ignoring: tuple[type[BaseException], ...] = (),
) -> float:
    """Seconds until ``predicate()`` is true; fails the test after ``timeout`` seconds.
    ``ignoring``: exceptions that count as "not yet" (a Redis still starting)."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(*ignoring):
            if predicate():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def heartbeats_written(app: Any) -> None:
    """Write the heartbeats ``app``'s process gathered now, as its change listener does every second."""
    app.extensions["flagsvc"].clients.refresh()
