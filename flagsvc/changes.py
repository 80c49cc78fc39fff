"""The per-worker change listener: one background thread that keeps this process's caches current.

Every commit publishes a notice on its namespace's channel (``flagsvc:{<ns>}:changes``). The
listener subscribes to all of them and hands each notice to the subscribers, then, at least every
``interval`` seconds and after every (re)subscription, asks each to :meth:`Subscriber.refresh`
itself from Redis: pub/sub drops messages across reconnects, the periodic refresh is what
guarantees convergence. Its two subscribers are the snapshot cache and the token cache. A Redis
failure is logged and retried with backoff; the caches keep serving what they hold.

The thread starts on first use in each process (a forked gunicorn worker never inherits a
running thread), or at once with :meth:`ChangeListener.start` (gunicorn's ``post_worker_init``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import redis

from .keys import ALL_CHANGES, listener_wakeup

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What the listener drives."""

    def reset(self) -> None:
        """Forget what an earlier process held (called when the listener starts in a process)."""

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        """A commit in ``namespace`` announced ``notice``."""

    def refresh(self) -> None:
        """Re-read what may have changed unannounced; raise ``redis.RedisError`` if Redis fails."""


def namespace_of(channel: str) -> str | None:
    """``flagsvc:{production}:changes`` -> ``production``."""
    start, end = channel.find("{"), channel.find("}")
    return channel[start + 1 : end] if 0 <= start < end else None


class ChangeListener:
    """Feeds change notices and periodic refreshes to its subscribers; see the module docstring."""

    def __init__(
        self, client: redis.Redis, subscribers: Sequence[Subscriber], *, interval: float = 1.0
    ) -> None:
        self._redis = client
        self._subscribers = list(subscribers)
        self._interval = interval
        self._started_pid: int | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._wakeup = listener_wakeup(uuid.uuid4().hex)

    def ensure_started(self) -> None:
        """Start the thread if it does not run in this process yet."""
        if self._started_pid == os.getpid():
            return
        with self._start_lock:
            if self._started_pid == os.getpid():
                return
            for subscriber in self._subscribers:
                subscriber.reset()
            self._stop.clear()
            self._started_pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="flagsvc-change-listener", daemon=True)
            self._thread.start()

    start = ensure_started

    def stop(self) -> None:
        """Stop the thread, and wait (a few seconds at most) until it no longer reads or writes."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            with contextlib.suppress(redis.RedisError):
                self._redis.publish(self._wakeup, "stop")  # rather than wait out its read timeout
            thread.join(timeout=2 * self._interval + 5)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(ALL_CHANGES)
                pubsub.subscribe(self._wakeup)
                self._refresh()  # whatever changed while not subscribed
                backoff = 0.1
                self._listen(pubsub)
            except redis.RedisError as exc:
                log.warning("change listener: Redis unavailable (%s); serving cached data", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._interval)
            except Exception:
                log.exception("change listener: unexpected error")
                self._stop.wait(self._interval)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _listen(self, pubsub: Any) -> None:
        next_refresh = time.monotonic() + self._interval
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=max(0.0, next_refresh - time.monotonic()))
            if message is not None:
                self._dispatch(message)
            if time.monotonic() >= next_refresh:
                self._refresh()
                next_refresh = time.monotonic() + self._interval

    def _refresh(self) -> None:
        """Refresh every subscriber, even after one failed; then raise the first failure."""
        failures: list[redis.RedisError] = []
        for subscriber in self._subscribers:
            try:
                subscriber.refresh()
            except redis.RedisError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def _dispatch(self, message: dict[str, Any]) -> None:
        namespace = namespace_of(str(message.get("channel", "")))
        if namespace is None:
            return
        try:
            notice = json.loads(str(message.get("data", "{}")))
        except ValueError:
            notice = {}
        if not isinstance(notice, dict):
            notice = {}
        for subscriber in self._subscribers:
            subscriber.on_change(namespace, notice)
