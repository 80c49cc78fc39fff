"""The streaming data source: holds the Server-Sent Events stream; while it is down, polls.

The server sends the snapshot on connect (unless ``Last-Event-ID`` is current) and on every
change, as a ``patch`` of the flags that changed when it applies to the snapshot held; a
heartbeat comment between; an event ``shutdown`` when it restarts. A patch of another snapshot
than the one held, into a newer one, ends the stream and a new one starts at once from a whole
snapshot; a patch into a version no newer than the one held is ignored. A stream that breaks is
reopened with backoff and jitter (counted from its last event), with a poll every
``poll_interval`` meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time

import requests

from . import _sse as sse
from ._datasource import DataSource, Sink
from ._http import FetchError, SnapshotFetcher


class StreamingSource(DataSource):
    """Holds the event stream; :meth:`stop` wakes a read blocked on it."""

    _keep_alive = False  # fallback polls leave no idle connection open beside the stream

    def __init__(
        self, fetcher: SnapshotFetcher, sink: Sink, poll_interval: float, env: str, read_timeout: float
    ) -> None:
        super().__init__(fetcher, sink, poll_interval, env)
        self._read_timeout = read_timeout
        self._lock = threading.Lock()  # orders stop() against a stream that is being opened
        self._response: requests.Response | None = None
        self._reopen = False  # the stream ended to start again from a whole snapshot

    @property
    def connected(self) -> bool:
        """Whether a stream is open."""
        return self._response is not None

    def stop(self) -> None:
        with self._lock:
            super().stop()
            if self._response is not None:
                interrupt(self._response)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._reopen = False
            if self._guarded(self._consume, "in the event stream"):
                self._backoff.reset()
                # A patch of another snapshot: again now. The server ended it (a restart): spread
                # the reconnects of its clients.
                delay = random.uniform(0.0, 0.1) if self._reopen else random.uniform(0.1, 1.0)
            else:
                delay = self._backoff.next_delay()
            self._poll_until(time.monotonic() + delay)

    def _poll_until(self, deadline: float) -> None:
        """Poll every ``poll_interval`` until ``deadline`` or :meth:`stop`."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.wait(min(self.poll_interval, remaining)):
                return
            if time.monotonic() >= deadline:
                return
            self._guarded(self._poll, "while polling")

    def _consume(self) -> None:
        """Read the stream until it ends: normally on ``shutdown`` or :meth:`stop`; else ``FetchError``."""
        response = self._fetcher.open_stream(self._sink.known_identity(), self._read_timeout)
        with self._lock:
            if self._stop.is_set():
                response.close()  # stop() ran while the stream opened: nothing to read
                return
            self._response = response
        try:
            self._read(response)
        finally:
            with self._lock:
                self._response = None
            response.close()

    def _read(self, response: requests.Response) -> None:
        try:
            for event in sse.parse(sse.lines(response.iter_content(chunk_size=None))):
                if self._stop.is_set() or event.type == "shutdown":
                    return
                if event.type == "snapshot":
                    self._sink.apply_document(json.loads(event.data))
                elif event.type == "patch" and not self._sink.apply_patch(json.loads(event.data)):
                    self._reopen = True
                    return
                if event.type in ("snapshot", "patch", "comment"):
                    self._sink.succeeded()
                    self._backoff.reset()  # a stream that breaks later is a first failure again
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - requests and urllib3 raise various errors on a cut stream
            if self._stop.is_set():
                return  # stop() shut it down
            if isinstance(exc, ValueError):
                raise FetchError(f"flagsvc sent an invalid event: {exc}") from None
            raise FetchError(f"event stream broken: {type(exc).__name__}") from None
        if not self._stop.is_set():
            raise FetchError("the event stream ended")


def interrupt(response: requests.Response) -> None:
    """Wake the thread blocked reading ``response`` from another thread (closing the response
    would wait for that read): urllib3's ``HTTPResponse.shutdown()`` (urllib3 2.3 and later)
    ends the socket's reads, and the reader closes the response itself. With an older urllib3
    the reader wakes at its next heartbeat or read timeout."""
    shutdown = getattr(response.raw, "shutdown", None)
    if shutdown is None:
        return
    # OSError: the peer closed it first. RuntimeError, ValueError: urllib3 let go of the
    # connection or the response was closed: the stream had ended anyway.
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        shutdown()
