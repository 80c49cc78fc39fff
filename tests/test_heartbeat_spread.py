"""Heartbeats spread out: the service sets the interval and the spread after a change, and a
change's report does not reset the periodic timer (a fleet that applied one change together
must not report together ever after)."""

from __future__ import annotations

import time

import pytest
import requests

from flagsvc_client import FlagClient
from flagsvc_client._report import _rescheduled

from .helpers import FLAGS_URL, wait_for

pytestmark = pytest.mark.slow  # seconds of heartbeats


@pytest.fixture(autouse=True)
def one_minute() -> None:
    """The service counts heartbeats per minute: run the test within one."""
    if time.time() % 60 > 50:
        time.sleep(60 - time.time() % 60 + 0.1)


def heartbeats(app, instance: str) -> int:
    """How many heartbeats ``instance`` sent this minute, as the service (one process) counted them."""
    return app.extensions["flagsvc"].clients.sent("production", instance)


@pytest.mark.app_config(HEARTBEAT_INTERVAL_SECONDS=3, HEARTBEAT_JITTER_SECONDS=0)
def test_the_service_sets_the_interval_and_a_change_does_not_reset_the_timer(app, server, tokens, auth, r):
    admin = auth("admin")
    requests.put(
        f"{server.url}{FLAGS_URL}/a", json={"kind": "kill_switch", "enabled": True}, headers=admin, timeout=5
    )
    client = FlagClient(
        server.url, tokens["sdk"], "production", mode="poll", poll_interval=0.1, init_timeout=5
    )
    try:
        instance = client._reporter.instance_id
        wait_for(lambda: heartbeats(app, instance) >= 1, 5, "the first heartbeat")
        started = time.monotonic()
        assert client._reporter.interval == 3.0, "the SDK's default (30 s) gave way to the service's"
        time.sleep(1.0)
        before = heartbeats(app, instance)  # the first, and the report of the version start-up applied
        requests.post(
            f"{server.url}{FLAGS_URL}/a/kill", json={"reason": "x"}, headers=auth("operator"), timeout=5
        )
        wait_for(lambda: heartbeats(app, instance) == before + 1, 3, "the report of the change")
        # The periodic report comes 3 s after the first (the shorter interval at once, not after
        # the SDK's 30 s), not 3 s after the change's: the change did not reset the timer.
        remaining = 3.5 - (time.monotonic() - started)
        time.sleep(max(0.0, remaining))
        assert heartbeats(app, instance) == before + 2
    finally:
        client.close()


@pytest.mark.app_config(HEARTBEAT_INTERVAL_SECONDS=60, HEARTBEAT_JITTER_SECONDS=2)
def test_a_changes_report_is_spread_within_the_jitter(app, server, tokens, auth, r):
    admin = auth("admin")
    requests.put(
        f"{server.url}{FLAGS_URL}/a", json={"kind": "kill_switch", "enabled": True}, headers=admin, timeout=5
    )
    fleet = [
        FlagClient(server.url, tokens["sdk"], "production", mode="poll", poll_interval=0.1) for _ in range(8)
    ]
    try:
        ids = [c._reporter.instance_id for c in fleet]
        wait_for(lambda: all(heartbeats(app, i) >= 1 for i in ids), 5, "every first heartbeat")
        time.sleep(2.5)  # the reports of the first snapshot applied, spread over the jitter, are in
        base = {i: heartbeats(app, i) for i in ids}
        requests.post(
            f"{server.url}{FLAGS_URL}/a/kill", json={"reason": "x"}, headers=auth("operator"), timeout=5
        )
        wait_for(lambda: all(c.is_enabled("a") is False for c in fleet), 5, "the fleet applied the kill")
        applied = time.monotonic()
        seen: dict[str, float] = {}
        while len(seen) < len(ids) and time.monotonic() - applied < 4:
            for i in ids:
                if i not in seen and heartbeats(app, i) == base[i] + 1:
                    seen[i] = time.monotonic() - applied
            time.sleep(0.02)
        assert len(seen) == len(ids), "every instance reported the change within the jitter"
        assert max(seen.values()) - min(seen.values()) > 0.3, f"spread, not together: {sorted(seen.values())}"
    finally:
        for c in fleet:
            c.close()


def test_a_fleet_told_a_longer_interval_spreads_over_it():
    """Instances that adopt a longer interval together (the service stretched it for a large
    fleet) each take a random place in it: their reports spread instead of keeping the burst of
    their old, denser phases. A shorter interval brings the next report closer."""
    now = time.monotonic()
    placed = [_rescheduled(now + 30, 30, 100, now) - now for _ in range(400)]
    assert all(0 <= p <= 100.5 for p in placed)
    assert min(placed) < 10 and max(placed) > 90, "spread over the whole new interval"
    assert sum(1 for p in placed if p < 50) in range(140, 261), "uniformly"
    assert _rescheduled(now + 30, 30, 3, now) == now + 3, "a shorter interval: the next report sooner"
    assert _rescheduled(now + 30, 30, 30, now) == now + 30, "the same interval: the timer is left alone"
