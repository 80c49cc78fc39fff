"""What keeps a ``FlagClient`` current: the parts its two data sources share.

A data source (:mod:`._stream` or :mod:`._poll`) runs one daemon thread that cannot die: each
fetch goes through :meth:`DataSource._guarded`, which records any failure in the one
:class:`Sink` and never lets it out. A source pauses after failures as the one :class:`Backoff`
says. Whatever it fetches reaches the client through the sink's one callback that applies a
snapshot. A refused token or an unknown environment stops the source for good. The sink's
``ready`` event is set by the first answer or the first failure, whichever comes first, so
start-up never waits on a service that is down.
"""

from __future__ import annotations

import abc
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._http import FetchError, SnapshotFetcher
from ._snapshot import Snapshot

log = logging.getLogger("flagsvc_client")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


class Backoff:
    """Exponential backoff with jitter, so that a restarted server is not hit by every client at
    once: 0.5 s doubling with each failure in a row, capped at 4 poll intervals and 30 s."""

    def __init__(self, interval: float) -> None:
        self._cap = min(BACKOFF_CAP, 4 * interval)
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure in a row; the pause before trying again."""
        self.failures += 1
        delay = min(self._cap, BACKOFF_BASE * 2.0 ** min(self.failures, 16))
        return max(delay * random.uniform(0.5, 1.0), 0.05)

    def reset(self) -> None:
        self.failures = 0


def _newer(patch: Mapping[str, Any], held: Snapshot) -> bool:
    """Does ``patch`` make a snapshot that would replace ``held`` (``Snapshot.supersedes``)?"""
    version = patch["version"]
    return bool(version > held.version or (version == held.version and patch.get("history") != held.history))


class Sink:
    """Where a data source's results go: the one callback that applies a snapshot, and the one
    record of how fetching goes (what ``FlagClient.status()`` reports)."""

    def __init__(self, env: str, current: Callable[[], Snapshot], apply: Callable[[Snapshot], None]) -> None:
        self.env = env
        self._current = current
        self._apply = apply
        self.ready = threading.Event()
        self.last_success: float | None = None  # wall-clock time of the last good answer
        self.last_error: str | None = None
        self.failing = False
        self.fatal = False
        self.on_health: Callable[[], None] = lambda: None  # health changed: fetching works, fails, stopped

    def after_fork(self) -> None:
        """In a forked child: a new event (the parent's may be locked), set: the warm snapshot serves."""
        self.ready = threading.Event()
        self.ready.set()

    def known_identity(self) -> str | None:
        """The snapshot to name in ``If-None-Match`` or ``Last-Event-ID``: only one the server sent."""
        snapshot = self._current()
        return snapshot.identity if snapshot.source == "server" else None

    def apply_document(self, document: Any) -> None:
        """Apply a snapshot document from the server; ``FetchError`` if it is not one of ``env``."""
        try:
            snapshot = Snapshot.from_wire(document, source="server")
        except ValueError as exc:
            raise FetchError(f"flagsvc sent an invalid snapshot: {exc}") from None
        if snapshot.env != self.env:
            raise FetchError(f"flagsvc sent environment {snapshot.env!r}, not {self.env!r}", fatal=True)
        self._apply(snapshot)

    def apply_patch(self, patch: Any) -> bool:
        """Apply a ``patch`` event to the snapshot held. ``False`` when it patches another snapshot
        into a newer one: the stream is to be reopened, which sends the whole snapshot (nothing
        failed). A patch to a version no newer than the one held is ignored: the worker that
        sent it lags behind the one, or the poll, that brought the version held. ``FetchError``
        if it is not a patch."""
        if not isinstance(patch, Mapping) or not isinstance(patch.get("version"), int):
            raise FetchError("flagsvc sent an invalid patch")
        held = self._current()
        if held.source != "server":
            return False
        if not _newer(patch, held):
            return True
        if patch.get("base") != held.identity:
            return False
        try:
            snapshot = held.patched(patch)
        except ValueError as exc:
            raise FetchError(f"flagsvc sent a patch this client cannot apply: {exc}") from None
        self._apply(snapshot)
        return True

    def succeeded(self) -> None:
        changed = self.failing or self.last_success is None
        self.last_success = time.time()
        self.last_error = None
        if self.failing:
            log.info("flagsvc: service reachable again (version %d)", self._current().version)
            self.failing = False
        self.ready.set()
        if changed:
            self.on_health()

    def failed(self, message: str) -> None:
        """Record a failure; only the first of a series is logged."""
        self.last_error = message
        first = not self.failing
        if first:
            self.failing = True
            snapshot = self._current()
            log.warning(
                "flagsvc: %s; serving %s version %d until it recovers",
                message,
                snapshot.source,
                snapshot.version,
            )
        self.ready.set()  # start-up does not wait on a service that is down
        if first and not self.fatal:
            self.on_health()

    def stopped(self, exc: FetchError) -> None:
        """Updates stop for good (token refused, environment unknown)."""
        self.fatal = True
        self.failed(str(exc))
        log.error("flagsvc: %s; updates stopped, serving the last known values", exc)
        self.on_health()


def fetch_snapshot(fetcher: SnapshotFetcher, sink: Sink, *, keep_alive: bool = True) -> None:
    """Fetch the snapshot once (``If-None-Match``) and apply it if it is new; raises ``FetchError``."""
    fetched = fetcher.fetch(sink.known_identity(), keep_alive=keep_alive)
    if not fetched.not_modified:
        sink.apply_document(fetched.document or {})
    sink.succeeded()


class DataSource(abc.ABC):
    """One daemon thread keeping the snapshot current until :meth:`stop`. Subclasses write
    :meth:`_run` from :meth:`_guarded` calls and pauses on ``self._stop``."""

    _keep_alive = True  # whether polls keep their connection open for the next one

    def __init__(self, fetcher: SnapshotFetcher, sink: Sink, poll_interval: float, env: str) -> None:
        self._fetcher = fetcher
        self._sink = sink
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._backoff = Backoff(poll_interval)
        self.thread = threading.Thread(target=self._run, name=f"flagsvc-poller-{env}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to stop; it stops within a moment (see :meth:`join`)."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the thread (not from the thread itself: a listener may close)."""
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @abc.abstractmethod
    def _run(self) -> None:
        """The thread: until ``self._stop`` is set."""

    def _guarded(self, fetch: Callable[[], None], doing: str) -> bool:
        """Run one fetch; ``False`` if it failed. A failure is recorded, never raised; a fatal one
        (401, 403, 404, another environment) also stops this source. ``doing``: for the log."""
        try:
            fetch()
            return True
        except FetchError as exc:
            if exc.fatal:
                self._sink.stopped(exc)
                self._stop.set()
            else:
                self._sink.failed(str(exc))
        except Exception as exc:  # the loop must not die, whatever happened
            self._sink.failed(f"{type(exc).__name__}: {exc}")
            log.exception("flagsvc: unexpected error %s", doing)
        return False

    def _poll(self) -> None:
        fetch_snapshot(self._fetcher, self._sink, keep_alive=self._keep_alive)
