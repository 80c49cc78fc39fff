"""Per-process cache of each environment's snapshot, pre-serialized, kept current in the background.

The request path reads only memory: a poll answered ``304`` or ``200`` costs no Redis round trip.
A background thread (a greenlet under gevent) keeps the cache current: it listens to the change
notifications every commit publishes, and at least every ``check_interval`` seconds compares the
stored environment versions with the cached ones (pub/sub drops messages across reconnects, so
the periodic check is what guarantees convergence). When Redis is unreachable the last snapshot
keeps serving and :attr:`SnapshotCache.stale` says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from flagsvc_client.engine import CompiledFlag, compile_flag

from .flags import FlagStore
from .keys import PREFIX, EnvKeys
from .metrics import ENV_VERSION

log = logging.getLogger(__name__)

CHANGES_PATTERN = f"{PREFIX}:{{*}}:changes"


@dataclass(frozen=True)
class Published:
    """One environment version, serialized once for every client that asks."""

    env: str
    version: int
    body: bytes
    flags: dict[str, Any] = field(default_factory=dict, repr=False)
    _compiled: dict[str, CompiledFlag] = field(default_factory=dict, repr=False, compare=False)

    def compiled(self) -> dict[str, CompiledFlag]:
        """The flags compiled for server-side evaluation (OFREP), once per version and process."""
        if not self._compiled and self.flags:
            self._compiled.update({key: compile_flag(key, raw) for key, raw in self.flags.items()})
        return self._compiled


def _env_of_channel(channel: str) -> str | None:
    start, end = channel.find("{"), channel.find("}")
    return channel[start + 1 : end] if 0 <= start < end else None


class SnapshotCache:
    """Snapshots of the environments this process serves; see the module docstring."""

    def __init__(
        self,
        client: redis.Redis,
        flags: FlagStore,
        *,
        check_interval: float = 1.0,
        stale_after: float = 3.0,
        on_system_change: Callable[[dict[str, object]], None] | None = None,
        list_envs: Callable[[], list[str]] | None = None,
        also_refresh: Callable[[], None] | None = None,
    ) -> None:
        self._redis = client
        self._flags = flags
        self._check_interval = check_interval
        self._stale_after = stale_after
        self._on_system_change = on_system_change
        self._list_envs = list_envs
        self._also_refresh = also_refresh
        self._entries: dict[str, Published] = {}
        self._written: dict[str, int] = {}  # env -> newest version this process committed
        self._changed = threading.Condition()
        self._last_ok = time.monotonic()
        self._started_pid: int | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()

    # -- the request path ------------------------------------------------------------------------

    def get(self, env: str) -> Published:
        """The current snapshot of ``env`` (loads it from Redis the first time, and after a write
        of this process that it does not hold yet)."""
        self._ensure_started()
        entry = self._entries.get(env)
        if entry is None or entry.version < self._written.get(env, 0):
            try:
                entry = self._load(env)
            except redis.RedisError:
                if entry is None:
                    raise
                self._written.pop(env, None)  # not on every poll of an outage; refresh() heals
        return entry

    @property
    def stale(self) -> bool:
        """True when Redis has not confirmed the cached versions recently."""
        return time.monotonic() - self._last_ok > self._stale_after

    def wait_for_change(self, env: str, version: int, timeout: float) -> Published | None:
        """Block (a greenlet under gevent) until ``env`` moves past ``version``, at most ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                entry = self._entries.get(env)
                if entry is not None and entry.version != version:
                    return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def reload_after_write(self, env: str, version: int) -> None:
        """Read-your-writes in this process: ``env`` is at ``version`` or later now. The next
        :meth:`get` here reloads it if the background thread has not yet (it does on the write's
        notification, after the write's response is on its way: the reload is not on the
        write's path)."""
        if version > self._written.get(env, 0):
            self._written[env] = version

    # -- loading ---------------------------------------------------------------------------------

    def _load(self, env: str) -> Published:
        snap = self._flags.snapshot(env)
        entry = Published(
            env, snap.version, json.dumps(snap.to_dict(), separators=(",", ":")).encode(), snap.flags
        )
        with self._changed:
            current = self._entries.get(env)
            if current is None or current.version != entry.version:
                self._entries[env] = entry
                self._changed.notify_all()
        ENV_VERSION.labels(env).set(entry.version)
        return entry

    def preload(self) -> None:
        """Load every environment, so that a Redis outage soon after start still finds them here."""
        if self._list_envs is not None:
            for env in self._list_envs():
                if env not in self._entries:
                    self._load(env)

    def refresh(self) -> None:
        """Compare every cached version with Redis and reload the ones that moved."""
        if self._also_refresh is not None:
            self._also_refresh()
        envs = list(self._entries)
        if envs:
            pipe = self._redis.pipeline(transaction=False)
            for env in envs:
                pipe.get(EnvKeys(env).version)
            for env, stored in zip(envs, pipe.execute(), strict=True):
                if int(stored or 0) != self._entries[env].version:
                    self._load(env)
        else:
            self._redis.ping()
        self._last_ok = time.monotonic()

    # -- the background thread -------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread now (gunicorn's ``post_worker_init``): every environment
        and token is in memory before the first request, and stays there through an outage."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._started_pid == os.getpid():
            return
        with self._start_lock:
            if self._started_pid == os.getpid():
                return
            # First use in this process (a forked worker never inherits a running thread).
            self._entries.clear()
            self._written.clear()
            self._changed = threading.Condition()
            self._started_pid = os.getpid()
            thread = threading.Thread(target=self._run, name="flagsvc-snapshot-cache", daemon=True)
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(CHANGES_PATTERN)
                self.preload()
                self.refresh()  # whatever changed while not subscribed
                backoff = 0.1
                next_check = time.monotonic() + self._check_interval
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=max(0.0, next_check - time.monotonic()))
                    if message is not None:
                        self._handle(message)
                    if time.monotonic() >= next_check:
                        self.refresh()
                        next_check = time.monotonic() + self._check_interval
            except redis.RedisError as exc:
                log.warning("snapshot cache: Redis unavailable (%s); serving cached snapshots", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._check_interval)
            except Exception:
                log.exception("snapshot cache: unexpected error")
                self._stop.wait(self._check_interval)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _handle(self, message: dict[str, object]) -> None:
        channel = str(message.get("channel", ""))
        env = _env_of_channel(channel)
        if env is None:
            return
        if env.startswith("_"):
            if self._on_system_change is not None:
                with contextlib.suppress(ValueError):
                    self._on_system_change(json.loads(str(message.get("data", "{}"))))
            return
        cached = self._entries.get(env)
        if cached is None:
            return
        try:
            announced = int(json.loads(str(message.get("data", "{}"))).get("version", 0))
        except (ValueError, TypeError, AttributeError):
            announced = 0
        if announced and announced <= cached.version:
            return  # this process has it already (a read after its own write loaded it)
        self._load(env)
