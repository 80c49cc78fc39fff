"""The gunicorn worker of flagsvc: gunicorn's gevent worker, made to stop promptly.

gunicorn's own gevent worker lets two things hold a stopping worker until the arbiter kills it
(SIGKILL) at the graceful timeout, 10 s later:

- a kept-alive connection waiting for its client's next request (every SDK poller holds one, and
  so does nginx in front) is waited on until the keep-alive timeout, as long as the graceful one;
- a SIGTERM that reaches a worker between its fork and the moment it installs its own signal
  handlers goes to the handler it inherited from the arbiter, which queues it on the arbiter's
  queue (this process's copy of it) and nothing else: the worker never hears it.

This worker ends a kept-alive connection when it stops, as long as nothing of a next request has
arrived: the greenlet serving it waits for the first byte of the next request apart from reading
it, and a stop ends that wait (not a read: no byte of the client's is ever dropped). A request
already buffered or arriving is served, and the connection closed after it. The worker also
reads a stop the inherited handler queued. A stop then takes about a second (the worker's loop
checks once a second), and the arbiter no longer kills workers that are still serving.
"""

from __future__ import annotations

import array
import fcntl
import signal
import socket
import termios
from dataclasses import dataclass
from queue import Empty
from types import TracebackType
from typing import Any

import gevent
from gevent.socket import wait_read
from gunicorn.workers.ggevent import GeventWorker  # type: ignore[import-untyped]

#: The signals after which a worker must stop (gracefully for SIGTERM, at once for the others).
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


class _Stopping(Exception):
    """Thrown into a greenlet waiting for a next request: the worker stops."""


@dataclass
class _Connection:
    sock: socket.socket
    #: gunicorn's reader of the connection, with what it read ahead of the request it parsed last
    #: (``None``: no request served on this connection yet).
    reader: Any = None


class Worker(GeventWorker):
    """gunicorn's gevent worker, which also ends its idle kept-alive connections on a stop and
    does not lose a stop sent while it boots (``worker_class`` in ``flagsvc/gunicorn_conf.py``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: dict[Any, _Connection] = {}  # serving greenlet -> its connection
        self._waiting: set[Any] = set()  # greenlets waiting for the first byte of a next request

    def init_signals(self) -> None:
        inherited = signal.getsignal(signal.SIGTERM)
        super().init_signals()
        if stop_queued_by(inherited):
            self.alive = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Out of the signal handler, as gunicorn does for its own blocking work.
        gevent.spawn(self._end_waits)

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        serving = gevent.getcurrent()
        self._connections[serving] = _Connection(client)
        try:
            super().handle(listener, client, addr)
        finally:
            del self._connections[serving]

    def handle_request(self, listener_name: Any, req: Any, sock: socket.socket, addr: Any) -> None:
        super().handle_request(listener_name, req, sock, addr)
        connection = self._connections.get(gevent.getcurrent())
        if connection is not None:
            connection.reader = req.unreader

    def timeout_ctx(self) -> _NextRequest:
        """What gunicorn's keep-alive loop reads each request under (gevent's worker: a timeout of
        ``keepalive`` seconds)."""
        return _NextRequest(self, self._connections.get(gevent.getcurrent()))

    def wait_for_first_byte(self, sock: socket.socket) -> None:
        """Return once a byte of the next request on ``sock`` has arrived. ``StopIteration``
        (gunicorn's "close this connection") if the keep-alive timeout passes, or the worker
        stops, first."""
        if not self.alive:
            raise StopIteration
        serving = gevent.getcurrent()
        self._waiting.add(serving)
        try:
            wait_read(sock.fileno(), timeout=self.cfg.keepalive, timeout_exc=_Stopping)
        except _Stopping:
            raise StopIteration from None
        finally:
            self._waiting.discard(serving)

    def _end_waits(self) -> None:
        for waiting in list(self._waiting):
            connection = self._connections.get(waiting)
            if connection is not None and _bytes_waiting(connection.sock) == 0:
                waiting.kill(_Stopping, block=False)


class _NextRequest:
    """Reading a request on a kept-alive connection: first wait for its first byte, unless the
    worker stops first (the connection then ends, with nothing of the client's read); then read it
    within the keep-alive timeout, as gunicorn's gevent worker does."""

    def __init__(self, worker: Worker, connection: _Connection | None) -> None:
        self._worker = worker
        self._connection = connection
        self._timeout = gevent.Timeout(worker.cfg.keepalive, False)

    def __enter__(self) -> None:
        connection = self._connection
        if connection is not None and connection.reader is not None and not _holds_bytes(connection):
            self._worker.wait_for_first_byte(connection.sock)
        self._timeout.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool | None:
        return self._timeout.__exit__(kind, error, trace)


def _holds_bytes(connection: _Connection) -> bool:
    """Does the connection hold bytes of a next request: read ahead by gunicorn, or in the kernel?
    (A reader unlike gunicorn's counts as holding some: the request is then read as gunicorn does.)"""
    read_ahead = getattr(connection.reader, "buf", None)
    if read_ahead is None:
        return True
    with read_ahead.getbuffer() as view:
        if view.nbytes:
            return True
    return _bytes_waiting(connection.sock) > 0


def stop_queued_by(handler: Any) -> bool:
    """Did ``handler``, the SIGTERM handler a worker inherited from gunicorn's arbiter, queue a
    stop signal before the worker installed its own? Takes the signals off that queue (the
    process's own copy of the arbiter's: the arbiter never reads it)."""
    signals = getattr(getattr(handler, "__self__", None), "SIG_QUEUE", None)
    if signals is None:
        return False
    received = set()
    while True:
        try:
            received.add(signals.get_nowait())
        except Empty:
            return bool(received & _STOP_SIGNALS)


def _bytes_waiting(sock: socket.socket) -> int:
    """Bytes received on ``sock`` and not read yet (0 once it is closed)."""
    waiting = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting)
    except OSError:
        return 0
    return waiting[0]
