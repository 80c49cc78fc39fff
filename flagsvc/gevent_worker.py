"""The gunicorn worker of flagsvc: gunicorn's gevent worker, made to stop promptly.

gunicorn's own gevent worker lets two things hold a stopping worker until the arbiter kills it
(SIGKILL) at the graceful timeout, 10 s later:

- a kept-alive connection waiting for its client's next request (every SDK poller holds one, and
  so does nginx in front) is waited on until the keep-alive timeout, as long as the graceful one;
- a SIGTERM that reaches a worker between its fork and the moment it installs its own signal
  handlers goes to the handler it inherited from the arbiter, which queues it on the arbiter's
  queue (this process's copy of it) and nothing else: the worker never hears it.

This worker closes its kept-alive connections that wait for a next request when it is told to
stop, and any that finishes a request afterwards (as nginx does on a graceful stop); a connection
whose next request has begun to arrive is served first. It also reads a stop the inherited
handler queued. A stop then takes about a second (the worker's loop checks once a second), and
the arbiter no longer kills workers that are still serving.
"""

from __future__ import annotations

import array
import fcntl
import queue
import signal
import socket
import termios
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker  # type: ignore[import-untyped]

#: The signals after which a worker must stop (gracefully for SIGTERM, at once for the others).
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


class Worker(GeventWorker):
    """gunicorn's gevent worker, which also closes its idle kept-alive connections on a stop and
    does not lose a stop sent while it boots (``worker_class`` in ``flagsvc/gunicorn_conf.py``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Connections that served a request and wait for the next one.
        self._kept_alive: set[socket.socket] = set()

    def init_signals(self) -> None:
        inherited = signal.getsignal(signal.SIGTERM)
        super().init_signals()
        if stop_queued_by(inherited):
            self.alive = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Out of the signal handler, as gunicorn does for its own blocking work.
        gevent.spawn(self._close_kept_alive)

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        try:
            super().handle(listener, client, addr)
        finally:
            self._kept_alive.discard(client)

    def handle_request(self, listener_name: Any, req: Any, sock: socket.socket, addr: Any) -> None:
        self._kept_alive.discard(sock)
        super().handle_request(listener_name, req, sock, addr)
        # Reached when the connection stays open for another request.
        if self.alive:
            self._kept_alive.add(sock)
        else:
            close_if_quiet(sock)

    def _close_kept_alive(self) -> None:
        for sock in list(self._kept_alive):
            close_if_quiet(sock)


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
        except queue.Empty:
            return bool(received & _STOP_SIGNALS)


def close_if_quiet(sock: socket.socket) -> None:
    """Shut down a kept-alive connection unless its next request has begun to arrive (that one is
    served, and the connection closed after it): the greenlet reading it sees the end of the
    stream and ends. A request whose first bytes are still on the way is the race every server
    has with a keep-alive connection it closes (as at its keep-alive timeout); checking for
    waiting bytes narrows it to the moment they cross."""
    try:
        if _bytes_waiting(sock) == 0:
            # Through a duplicate of its descriptor: gevent's shutdown of the socket itself would
            # interrupt the greenlet reading it with an error, which gunicorn logs as one.
            with socket.fromfd(sock.fileno(), sock.family, sock.type) as twin:
                twin.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by its client or by the worker
        pass


def _bytes_waiting(sock: socket.socket) -> int:
    waiting = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting)
    return waiting[0]
