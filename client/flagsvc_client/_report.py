"""Heartbeats: what this SDK instance applied and evaluated, for the propagation view.

Sent at start, right after a new version is applied, and every ``interval`` seconds, from a
thread of its own with its own HTTP session. When the client closes (or the process exits), the
instance says goodbye, so that it does not count as live, nor as lagging, once it is gone. A
failed report is logged at debug level only: the flag values never depend on it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

from ._http import FetchError, SnapshotFetcher
from ._version import __version__

log = logging.getLogger("flagsvc_client")


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
        self.instance_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._init_thread_state()

    def _init_thread_state(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._session = self._fetcher.new_session()
        self._thread: threading.Thread | None = None
        self._reported = False  # the service knows this instance: it must hear the goodbye

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flagsvc-reporter", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Report now (a new version was applied)."""
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
            self._fetcher.report(self._session, self.instance_id, body)
            self._reported = True
        except FetchError as exc:
            log.debug("flagsvc: heartbeat not sent: %s", exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send()
            except Exception:
                log.debug("flagsvc: heartbeat failed", exc_info=True)
            self._wake.wait(self.interval)
            self._wake.clear()
        self._session.close()
