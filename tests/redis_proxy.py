"""A TCP proxy in front of a real Redis that can hold back the replies to one kind of command.

Redis executes the command; only its answer is late. That is the failure a client cannot tell
apart from "not executed": a reply lost to a timeout after the write was applied.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class SlowReplies:
    """Forwards 127.0.0.1:<port> to ``target_port``; replies to ``command`` wait ``delay`` s
    while :attr:`holding` is set."""

    def __init__(self, target_port: int, command: bytes, delay: float) -> None:
        self.target_port = target_port
        self.command = command.upper()
        self.delay = delay
        self.holding = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, name="redis-proxy", daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        """Stop accepting, end every connection, and wait for the threads that served them."""
        self._closed = True
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in [self._listener, *self._sockets]:
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            late = threading.Event()  # the next reply on this connection is to be held
            for args in ((client, server, late, True), (server, client, late, False)):
                self._threads.append(threading.Thread(target=self._pump, args=args, daemon=True))
                self._threads[-1].start()

    def _pump(self, src: socket.socket, dst: socket.socket, late: threading.Event, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream and self.holding.is_set() and self.command in data.upper():
                    late.set()
                elif not upstream and late.is_set():
                    late.clear()
                    time.sleep(self.delay)
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
