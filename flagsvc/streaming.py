"""Server-Sent Events: the snapshot on connect and on every change, heartbeats between.

Each stream is a generator served by a gevent greenlet (see ``gunicorn_conf.py``): it waits on
the process's :class:`~flagsvc.snapshots.SnapshotCache` for a new version, so a change reaches
every stream of a worker from one Redis read. When the worker shuts down (gunicorn sets
``worker.alive = False``), streams send a ``shutdown`` event and end; clients reconnect. Once its
token is revoked or expires, a stream sends a ``revoked`` event and ends within a second. A token
may hold :class:`StreamLimiter`'s number of streams open in one worker process.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from .metrics import OPEN_STREAMS
from .snapshots import Published, SnapshotCache, holds

HEARTBEAT_SECONDS = 15.0
#: How often a waiting stream wakes to check for shutdown.
WAKE_SECONDS = 1.0
#: Suggested reconnection delay for EventSource clients, in milliseconds.
RETRY_MS = 2000

_worker: Any = None
_shutdown = threading.Event()


def set_worker(worker: Any) -> None:
    """Called by gunicorn's ``post_worker_init`` hook: streams watch ``worker.alive``."""
    global _worker
    _worker = worker


def end_streams() -> None:
    """End every open stream of this process within ~1 s (a server embedding the app stops)."""
    _shutdown.set()


def allow_streams() -> None:
    """Undo :func:`end_streams` (the embedding server starts again)."""
    _shutdown.clear()


def shutting_down() -> bool:
    return _shutdown.is_set() or (_worker is not None and not _worker.alive)


class StreamLimiter:
    """Counts the open streams of each token in this process, up to ``per_token``."""

    def __init__(self, per_token: int) -> None:
        self.per_token = per_token
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, token_id: str) -> bool:
        """Count one more stream of ``token_id``; ``False`` (nothing counted) at the limit."""
        with self._lock:
            if self._open[token_id] >= self.per_token:
                return False
            self._open[token_id] += 1
            return True

    def release(self, token_id: str) -> None:
        with self._lock:
            self._open[token_id] -= 1
            if self._open[token_id] <= 0:
                del self._open[token_id]


class EventStream:
    """The WSGI body of one event stream. Servers call :meth:`close` when the response ends,
    whether or not it was ever iterated: that is when ``on_close`` runs, once."""

    def __init__(self, events: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._events = events
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> bytes:
        return next(self._events)

    def close(self) -> None:
        close_events = getattr(self._events, "close", None)
        if close_events is not None:
            close_events()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


def snapshot_event(published: Published) -> bytes:
    return b"id: %s\nevent: snapshot\ndata: %s\n\n" % (published.identity.encode(), published.body)


def peer_gone(sock: socket.socket | None) -> bool:
    """Whether the client closed its end: an SSE client sends nothing after its request, so a
    readable socket means end of file. Checked at every wake, so a closed stream is let go of
    within a second instead of at the next heartbeat write. ``poll``, not ``select``: a worker
    holding thousands of streams has descriptors past ``select``'s limit of 1024."""
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0)) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def events(
    cache: SnapshotCache,
    env: str,
    first: Published,
    last_event_id: str | None,
    sock: socket.socket | None = None,
    *,
    still_allowed: Callable[[], bool] = lambda: True,
) -> Iterator[bytes]:
    """The event stream of ``env`` for a client that already has ``last_event_id``, for as long
    as ``still_allowed()`` (checked at every wake: the token is not revoked or expired)."""
    OPEN_STREAMS.inc()
    try:
        yield from _events(cache, env, first, last_event_id, sock, still_allowed)
    finally:
        OPEN_STREAMS.dec()


def _events(
    cache: SnapshotCache,
    env: str,
    first: Published,
    last_event_id: str | None,
    sock: socket.socket | None,
    still_allowed: Callable[[], bool],
) -> Iterator[bytes]:
    yield b"retry: %d\n\n" % RETRY_MS
    current = first
    if not holds(current, last_event_id):
        yield snapshot_event(current)
    last_sent = time.monotonic()
    while not shutting_down():
        if peer_gone(sock):
            return
        if not still_allowed():
            yield b'event: revoked\ndata: {"detail": "the token was revoked or has expired"}\n\n'
            return
        changed = cache.wait_for_change(env, current.identity, WAKE_SECONDS)
        if changed is not None:
            current = changed
            yield snapshot_event(current)
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= HEARTBEAT_SECONDS:
            yield b": heartbeat stale\n\n" if cache.stale else b": heartbeat\n\n"
            last_sent = time.monotonic()
    yield b"event: shutdown\ndata: {}\n\n"
