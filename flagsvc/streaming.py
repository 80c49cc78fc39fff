"""Server-Sent Events: the snapshot on connect and on every change, heartbeats between.

Each stream is a generator served by a gevent greenlet (see ``gunicorn_conf.py``) that sleeps
until something concerns it: :class:`OpenStreams` wakes the streams of an environment when the
process's :class:`~flagsvc.snapshots.SnapshotCache` publishes a new version (one Redis read for
every stream of a worker), and one sweep a second wakes those whose client hung up or whose token
was revoked or expired, and all of them when the worker shuts down (gunicorn sets
``worker.alive = False``). An idle stream costs no CPU between heartbeats. A woken stream sends
the new snapshot, or to a client that asked for patches and holds the version before, a ``patch``
of the flags that changed (the bytes of either built once per version); or a ``revoked`` or
``shutdown`` event and ends; clients reconnect. A token may hold ``per_token`` streams open in
one worker process.
"""

from __future__ import annotations

import logging
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
#: How often the sweep looks for closed connections, revoked tokens and shutdown.
SWEEP_SECONDS = 1.0
#: Suggested reconnection delay for EventSource clients, in milliseconds.
RETRY_MS = 2000
REVOKED_EVENT = b'event: revoked\ndata: {"detail": "the token was revoked or has expired"}\n\n'
SHUTDOWN_EVENT = b"event: shutdown\ndata: {}\n\n"

log = logging.getLogger(__name__)
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


class Stream:
    """One open event stream: what the sweep checks, and the event that wakes it."""

    __slots__ = ("env", "hung_up", "last_sent", "revoked", "sock", "still_allowed", "token_id", "wake")

    def __init__(
        self, env: str, token_id: str, sock: socket.socket | None, still_allowed: Callable[[], bool]
    ) -> None:
        self.env, self.token_id, self.sock, self.still_allowed = env, token_id, sock, still_allowed
        self.wake = threading.Event()
        self.hung_up = False
        self.revoked = False
        self.last_sent = time.monotonic()

    def heartbeat_due(self, now: float) -> bool:
        return now - self.last_sent >= HEARTBEAT_SECONDS


class OpenStreams:
    """The open event streams of this process, at most ``per_token`` per token.

    :meth:`publish` wakes the streams of one environment; a sweep every ``sweep_seconds`` (a
    background thread, running while any stream is open) wakes the streams whose client hung up
    (one ``poll()`` over every socket), whose token no longer passes its check (once per token)
    or whose heartbeat is due, and every stream when the process shuts down. A stream waits for
    its wake alone: no timer per stream."""

    def __init__(self, per_token: int, *, sweep_seconds: float = SWEEP_SECONDS) -> None:
        self.per_token = per_token
        self._sweep_seconds = sweep_seconds
        self._per_token: Counter[str] = Counter()
        self._by_env: dict[str, set[Stream]] = {}
        self._lock = threading.Lock()
        self._sweeping = False

    def open(
        self, env: str, token_id: str, sock: socket.socket | None, still_allowed: Callable[[], bool]
    ) -> Stream | None:
        """Register one more stream of ``token_id`` on ``env``; ``None`` (nothing registered) when
        the token already holds ``per_token`` streams here."""
        with self._lock:
            if self._per_token[token_id] >= self.per_token:
                return None
            self._per_token[token_id] += 1
            stream = Stream(env, token_id, sock, still_allowed)
            self._by_env.setdefault(env, set()).add(stream)
            start_sweep, self._sweeping = not self._sweeping, True
        if start_sweep:
            threading.Thread(target=self._sweep_while_open, name="flagsvc-stream-sweep", daemon=True).start()
        return stream

    def close(self, stream: Stream) -> None:
        with self._lock:
            streams = self._by_env.get(stream.env)
            if streams is None or stream not in streams:
                return
            streams.discard(stream)
            if not streams:
                del self._by_env[stream.env]
            self._per_token[stream.token_id] -= 1
            if self._per_token[stream.token_id] <= 0:
                del self._per_token[stream.token_id]

    def publish(self, env: str) -> None:
        """``env`` has a new version: wake its streams."""
        with self._lock:
            streams = list(self._by_env.get(env, ()))
        for stream in streams:
            stream.wake.set()

    def sweep(self) -> None:
        """Wake every stream that has something other than a new version to act on."""
        with self._lock:
            streams = [s for group in self._by_env.values() for s in group]
        if shutting_down():
            for stream in streams:
                stream.wake.set()
            return
        for stream in hung_up(streams):
            stream.hung_up = True
            stream.wake.set()
        verdicts: dict[str, bool] = {}
        now = time.monotonic()
        for stream in streams:
            if stream.heartbeat_due(now):
                stream.wake.set()
            allowed = verdicts.get(stream.token_id)
            if allowed is None:
                allowed = verdicts[stream.token_id] = stream.still_allowed()
            if not allowed:
                stream.revoked = True
                stream.wake.set()

    def _sweep_while_open(self) -> None:
        while True:
            time.sleep(self._sweep_seconds)
            with self._lock:
                if not self._by_env:
                    self._sweeping = False
                    return
            try:
                self.sweep()
            except Exception:  # streams wait for the sweep: it must outlive any one failure
                log.exception("the sweep of open event streams failed; retrying")


def _unpatched_poll() -> Callable[[], Any]:
    """``select.poll`` as the OS gives it: gevent's replacement starts a watcher per descriptor at
    every call. A ``poll(0)`` never blocks, so the original is safe in a greenlet."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency of the service
        return select.poll
    poll: Callable[[], Any] = monkey.get_original("select", "poll")
    return poll


_poll = _unpatched_poll()
_CLOSED = select.POLLHUP | select.POLLERR | select.POLLNVAL


def hung_up(streams: list[Stream]) -> list[Stream]:
    """The streams whose client closed its end, found with one ``poll()`` of all their sockets:
    an SSE client sends nothing after its request, so a readable socket means end of file.
    ``poll``, not ``select``: a worker holding thousands of streams has descriptors past
    ``select``'s limit of 1024."""
    poller, by_fd, gone = _poll(), {}, []
    for stream in streams:
        fd = _fileno(stream.sock)
        if fd is None:
            continue
        if fd < 0:
            gone.append(stream)
            continue
        by_fd[fd] = stream
        poller.register(fd, select.POLLIN)
    for fd, flags in poller.poll(0):
        stream = by_fd[fd]
        if flags & _CLOSED or _at_end_of_file(stream.sock):
            gone.append(stream)
    return gone


def _fileno(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    try:
        return sock.fileno()
    except (OSError, ValueError):
        return -1


def _at_end_of_file(sock: Any) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK) == b"")
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


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


def events(
    cache: SnapshotCache,
    stream: Stream,
    first: Published,
    last_event_id: str | None,
    *,
    patches: bool = False,
) -> Iterator[bytes]:
    """The event stream of ``stream.env`` for a client that already has ``last_event_id``, until
    the client hangs up, the token fails its check or the process shuts down. With ``patches``,
    a change the client can apply to the version it holds comes as a ``patch`` event."""
    OPEN_STREAMS.inc()
    try:
        yield from _events(cache, stream, first, last_event_id, patches)
    finally:
        OPEN_STREAMS.dec()


def _events(
    cache: SnapshotCache, stream: Stream, first: Published, last_event_id: str | None, patches: bool
) -> Iterator[bytes]:
    yield b"retry: %d\n\n" % RETRY_MS
    current = first
    if not holds(current, last_event_id):
        yield current.event_after(last_event_id) if patches else current.event
    stream.last_sent = time.monotonic()
    while True:
        stream.wake.clear()  # before looking: a wake from now on is not lost
        if shutting_down():
            yield SHUTDOWN_EVENT
            return
        if stream.hung_up:
            return
        if stream.revoked:
            yield REVOKED_EVENT
            return
        latest = cache.held(stream.env)
        if latest is not None and latest.identity != current.identity:
            event = latest.event_after(current.identity) if patches else latest.event
            current = latest
            yield event
        elif stream.heartbeat_due(time.monotonic()):
            yield b": heartbeat stale\n\n" if cache.stale else b": heartbeat\n\n"
        else:
            stream.wake.wait()
            continue
        stream.last_sent = time.monotonic()
