"""The per-worker change listener: it stops when told, without waiting out its read, and a
subscriber that fails does not keep the others from refreshing."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from flagsvc.changes import ChangeListener


class Recorder:
    """A subscriber that notes each refresh."""

    def __init__(self) -> None:
        self.refreshed = threading.Event()

    def reset(self) -> None:
        pass

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        pass

    def refresh(self) -> None:
        self.refreshed.set()


def test_stop_returns_at_once_though_the_next_refresh_is_half_a_minute_away(r):
    recorder = Recorder()
    listener = ChangeListener(r, [recorder], interval=30)
    listener.start()
    assert recorder.refreshed.wait(5), "the listener subscribed and refreshed once"
    started = time.monotonic()
    listener.stop()
    waited = time.monotonic() - started
    assert waited < 5, f"stop() waited {waited:.1f} s: for the listener's read to time out"
    assert not any(t.name == "flagsvc-change-listener" and t.is_alive() for t in threading.enumerate())


class Failing(Recorder):
    """A subscriber whose refresh fails, as one whose Redis node is gone."""

    def refresh(self) -> None:
        raise redis.ConnectionError("its node is gone")


def test_a_subscriber_that_fails_does_not_keep_the_others_from_refreshing(r):
    """The replica counts come after the snapshots: a snapshot refresh that failed left the
    counts as they were, and a count that failed (a dead node of a cluster) kept coming first."""
    recorder = Recorder()
    listener = ChangeListener(r, [Failing(), recorder], interval=0.05)
    listener.start()
    try:
        assert recorder.refreshed.wait(5), "refreshed after the one that failed"
    finally:
        listener.stop()
