"""The per-worker change listener: it stops when told, without waiting out its read."""

from __future__ import annotations

import threading
import time
from typing import Any

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
