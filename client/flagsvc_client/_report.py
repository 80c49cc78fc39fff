"""Heartbeats: what this SDK instance applied and evaluated, for the propagation view.

Sent at start, soon after a new version is applied, and every ``interval`` seconds, from a
thread of its own with its own HTTP session. After a change the report waits a random moment
within ``jitter`` seconds, and the periodic timer is not reset: a fleet that applied one change
together does not report together ever after. The service may set both (``X-Flagsvc-Report-
Interval``, ``X-Flagsvc-Report-Jitter`` on its answers), so a large fleet can be slowed without a
release. When the client closes (or the process exits), the
instance says goodbye, so that it does not count as live, nor as lagging, once it is gone. A
failed report is logged at debug level only: the flag values never depend on it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ._http import FetchError, SnapshotFetcher
from ._version import __version__

log = logging.getLogger("flagsvc_client")

#: The interval and spread the service may ask for are kept within these bounds (seconds).
INTERVAL_BOUNDS = (1.0, 3600.0)
JITTER_BOUNDS = (0.0, 600.0)


def default_app_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


class Reporter:
    """Posts heartbeats built by ``build()`` until stopped."""

    def __init__(
        self, fetcher: SnapshotFetcher, build: Callable[[], dict[str, Any] | None], interval: float
    ) -> None:
        self._fetcher = fetcher
        self._build = build
        self.interval = interval
        self.jitter = 1.0
        self.instance_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._init_thread_state()

    def _init_thread_state(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._soon: float | None = None  # monotonic time of a report asked for by a change
        self._session = self._fetcher.new_session()
        self._thread: threading.Thread | None = None
        self._reported = False  # the service knows this instance: it must hear the goodbye

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flagsvc-reporter", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Report now (this process forked)."""
        self._soon = time.monotonic()
        self._wake.set()

    def changed(self) -> None:
        """A new version was applied: report it within ``jitter`` seconds (the periodic timer runs
        on unchanged)."""
        soon = time.monotonic() + random.uniform(0, self.jitter)
        if self._soon is None or soon < self._soon:
            self._soon = soon
        self._wake.set()

    def stop(self) -> None:
        """Stop reporting and say goodbye (once the last heartbeat is out: none may follow it)."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._fetcher.timeout + 1)
        self.goodbye()

    def goodbye(self) -> None:
        """Tell the service this instance is gone, if it ever reported."""
        if self._reported:
            self._reported = False
            try:
                self._fetcher.forget(self.instance_id)
            except FetchError as exc:
                log.debug("flagsvc: goodbye not sent: %s", exc)

    def after_fork(self) -> None:
        """A forked child is a new instance: new id, new session, new thread."""
        self.instance_id = uuid.uuid4().hex
        self._init_thread_state()

    def send(self) -> None:
        """One heartbeat, or a goodbye when ``build()`` says this process is not an instance."""
        built = self._build()
        if built is None:
            self.goodbye()
            return
        body = {"host": self.host, "pid": os.getpid(), "sdk": f"python/{__version__}", **built}
        try:
            headers = self._fetcher.report(self._session, self.instance_id, body)
            self._reported = True
        except FetchError as exc:
            log.debug("flagsvc: heartbeat not sent: %s", exc)
            return
        self.interval = _advised(headers, "X-Flagsvc-Report-Interval", INTERVAL_BOUNDS, self.interval)
        self.jitter = _advised(headers, "X-Flagsvc-Report-Jitter", JITTER_BOUNDS, self.jitter)

    def _run(self) -> None:
        next_periodic = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            due_soon = self._soon is not None and now >= self._soon
            if now >= next_periodic or due_soon:
                if due_soon:
                    self._soon = None
                if now >= next_periodic:
                    next_periodic = now + self.interval
                told = self.interval
                try:
                    self.send()
                except Exception:
                    log.debug("flagsvc: heartbeat failed", exc_info=True)
                next_periodic = _rescheduled(next_periodic, told, self.interval, time.monotonic())
                continue
            until = min(next_periodic, self._soon if self._soon is not None else next_periodic)
            self._wake.wait(max(0.0, until - time.monotonic()))
            self._wake.clear()
        self._session.close()


def _rescheduled(
    next_periodic: float,
    before: float,
    interval: float,
    now: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """The next periodic report once the service told a new ``interval`` (``before``: the one
    ``next_periodic`` was set with): a shorter one brings it closer; a longer one (a large fleet
    slowed down) puts it at a random moment within the new interval, so that instances told
    together spread over it instead of keeping their old, denser phases."""
    if interval < before:
        return min(next_periodic, now + interval)
    if interval > before:
        return now + uniform(0, interval)
    return next_periodic


def _advised(headers: Mapping[str, str], name: str, bounds: tuple[float, float], current: float) -> float:
    """The seconds the service asks for in header ``name``, within ``bounds``; else ``current``."""
    try:
        value = float(headers.get(name, ""))
    except ValueError:
        return current
    return min(max(value, bounds[0]), bounds[1]) if value == value else current
