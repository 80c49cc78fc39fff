"""Per-process cache of each environment's snapshot, pre-serialized, kept current in the background.

The request path reads only memory: a poll answered ``304`` or ``200`` costs no Redis round trip
(:func:`poll_answer`). The per-worker change listener (:mod:`flagsvc.changes`) keeps the cache
current: it hands over the change notice of every commit, and every second asks it to compare the
stored environment versions with the cached ones. When Redis is unreachable the last snapshot
keeps serving and :attr:`SnapshotCache.stale` says so.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

import redis

from flagsvc_client.engine import CompiledFlag, compile_flag

from .flags import FlagStore, history_of, serialize_snapshot
from .keys import EnvKeys, is_system
from .metrics import ENV_VERSION, POLLS

#: Set on answers served from memory that Redis could not confirm recently.
STALE_HEADER = "X-Flagsvc-Stale"


def etag(identity: str | int) -> str:
    return f'"{identity}"'


#: The start of every serialized snapshot: its version and history (see :func:`serialize_snapshot`).
_IDENTITY = re.compile(rb'\{"env":"[^"]*","version":(\d+),"history":"([0-9a-f]*)"')


class Published:
    """One environment version, serialized once (by the commit that made it) for every client."""

    def __init__(self, env: str, body: bytes) -> None:
        match = _IDENTITY.match(body)
        if match is None:
            raise ValueError(f"the stored snapshot of {env!r} does not start as a snapshot does")
        self.env, self.body = env, body
        self.version, self.history = int(match[1]), match[2].decode()
        self.identity = f"{self.version}-{self.history}"  #: see :class:`flagsvc.flags.Snapshot`
        #: The version this one replaced in this process, while this one is current: what a
        #: ``patch`` event starts from (cleared when this one is replaced: no chain of versions).
        self.base: Published | None = None

    def __repr__(self) -> str:
        return f"Published({self.env!r}, {self.identity!r})"

    @cached_property
    def flags(self) -> dict[str, Any]:
        """Every live flag's evaluation fields, parsed once per version and process."""
        flags: dict[str, Any] = json.loads(self.body)["flags"]
        return flags

    @cached_property
    def event(self) -> bytes:
        """The Server-Sent Event that delivers this version, built once for every stream."""
        return b"id: %s\nevent: snapshot\ndata: %s\n\n" % (self.identity.encode(), self.body)

    def event_after(self, held: str | None) -> bytes:
        """The event that brings a client holding the snapshot named ``held`` (an identity) to
        this version: a ``patch`` of the flags that changed when ``held`` is the version this one
        replaced and the patch is the smaller, else the whole ``snapshot``."""
        if self.base is not None and self.base.identity == held:
            patch = self._patch_event
            if patch is not None:
                return patch
        return self.event

    @cached_property
    def _patch_event(self) -> bytes | None:
        """The ``patch`` event from ``base`` (built once per version), ``None`` if not smaller
        than the snapshot event: the snapshot's identity, the ``base`` identity it applies to, the
        flags added or changed (whole) and the keys of those removed."""
        base = self.base
        if base is None:
            return None
        patch = {
            "env": self.env,
            "version": self.version,
            "history": self.history,
            "base": base.identity,
            "flags": {key: flag for key, flag in self.flags.items() if base.flags.get(key) != flag},
            "removed": sorted(base.flags.keys() - self.flags.keys()),
        }
        data = json.dumps(patch, separators=(",", ":")).encode()
        event = b"id: %s\nevent: patch\ndata: %s\n\n" % (self.identity.encode(), data)
        return event if len(event) < len(self.event) else None

    def gzipped(self) -> bytes:
        """``body`` gzip-compressed, once per version and process (for ``Accept-Encoding: gzip``)."""
        return self._gzipped

    @cached_property
    def _gzipped(self) -> bytes:
        return gzip.compress(self.body, compresslevel=6, mtime=0)

    def compiled(self) -> dict[str, CompiledFlag]:
        """The flags compiled for server-side evaluation (OFREP), once per version and process."""
        return self._compiled

    @cached_property
    def _compiled(self) -> dict[str, CompiledFlag]:
        return {key: compile_flag(key, raw) for key, raw in self.flags.items()}


class SnapshotCache:
    """Snapshots of the environments this process serves; see the module docstring."""

    def __init__(
        self,
        client: redis.Redis,
        flags: FlagStore,
        *,
        stale_after: float = 3.0,
        list_envs: Callable[[], list[str]] | None = None,
        observe: Callable[[str, int, str, str | None], None] | None = None,
        on_publish: Callable[[str], None] | None = None,
    ) -> None:
        """``observe(env, version, history, audit_head)`` sees what every load and refresh read;
        ``on_publish(env)`` runs once this process holds a new version of ``env``."""
        self._redis = client
        self._flags = flags
        self._stale_after = stale_after
        self._list_envs = list_envs
        self._observe = observe
        self._on_publish = on_publish
        self._entries: dict[str, Published] = {}
        self._written: dict[str, int] = {}  # env -> newest version this process committed
        self._last_ok = time.monotonic()
        # One read of Redis, with what it observes and publishes, at a time. The change listener's
        # loads and a request's (after a write of this process) interleave at their round trips
        # under gevent: a read from before a commit published after a newer one took the process
        # back a version, and the history guard took that for Redis losing acknowledged changes.
        self._reading = threading.RLock()

    # -- the request path ------------------------------------------------------------------------

    def get(self, env: str) -> Published:
        """The current snapshot of ``env`` (loads it from Redis the first time, and after a write
        of this process that it does not hold yet)."""
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

    def held(self, env: str) -> Published | None:
        """The snapshot of ``env`` this process holds, from memory only (``None``: not loaded)."""
        return self._entries.get(env)

    def reload_after_write(self, env: str, version: int) -> None:
        """Read-your-writes in this process: ``env`` is at ``version`` or later now. The next
        :meth:`get` here reloads it if the change listener has not yet (it does on the write's
        notice, after the write's response is on its way: the reload is not on the write's path)."""
        if version > self._written.get(env, 0):
            self._written[env] = version

    # -- loading ---------------------------------------------------------------------------------

    def _load(self, env: str, identity: str | None = None) -> Published:
        """The snapshot the last commit stored (one GET); rebuilt from the flags when there is none,
        or when it is not the ``identity`` Redis' version says (flags written by other means)."""
        with self._reading:
            return self._read_and_publish(env, identity)

    def _read_and_publish(self, env: str, identity: str | None) -> Published:
        body = self._flags.serialized_snapshot(env)
        entry = Published(env, body) if body is not None else None
        if entry is None or (identity is not None and entry.identity != identity):
            entry = Published(env, serialize_snapshot(self._flags.rebuild_snapshot(env)))
        if self._observe is not None:
            self._observe(env, entry.version, entry.history, None)
        current = self._entries.get(env)
        if current is None or current.identity != entry.identity:
            if current is not None:
                entry.base, current.base = current, None
            self._entries[env] = entry
            if self._on_publish is not None:
                self._on_publish(env)
        ENV_VERSION.labels(env).set(entry.version)
        return entry

    # -- driven by the change listener -----------------------------------------------------------

    def reset(self) -> None:
        self._entries.clear()
        self._written.clear()

    def refresh(self) -> None:
        """Load every environment not held yet (an outage soon after start still finds them here),
        and reload those whose stored version moved."""
        for env in self._list_envs() if self._list_envs is not None else []:
            if env not in self._entries:
                self._load(env)
        with self._reading:
            self._reload_moved()
        self._last_ok = time.monotonic()

    def _reload_moved(self) -> None:
        envs = list(self._entries)
        if not envs:
            self._redis.ping()
            return
        pipe = self._redis.pipeline(transaction=False)
        for env in envs:  # not MGET: a cluster's pipelines refuse it
            k = EnvKeys(env)
            pipe.get(k.version)
            pipe.get(k.version_mark)
            pipe.get(k.audit_head)
        stored = pipe.execute()
        for i, env in enumerate(envs):
            version, mark, head = int(stored[3 * i] or 0), stored[3 * i + 1] or "", stored[3 * i + 2]
            if self._observe is not None:
                self._observe(env, version, history_of(mark), head)
            identity = f"{version}-{history_of(mark)}"
            if identity != self._entries[env].identity:
                self._load(env, identity)

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        cached = self._entries.get(namespace)
        if is_system(namespace) or cached is None:
            return
        try:
            announced = int(notice.get("version", 0))
        except (ValueError, TypeError):
            announced = 0
        if announced and announced <= cached.version:
            return  # this process has it already (a read after its own write loaded it)
        self._load(namespace)


def holds(published: Published, known: str | None) -> bool:
    """Whether a client that names ``known`` (an identity, or a bare version from an SDK older
    than identities) holds ``published``."""
    return known is not None and known in (published.identity, str(published.version))


#: On every snapshot answer, 200 and 304 (docs/read-tier.md). A shared cache may keep it 1 s and
#: serve it 1 s more while it revalidates in the background - s-maxage is what lets a shared
#: cache store an answer to a request with ``Authorization`` at all (RFC 9111, 3.5) - and only to
#: requests with the same token and encoding (``SNAPSHOT_VARY``). A private cache, or an SDK
#: asking directly, revalidates every poll (``max-age=0``).
SNAPSHOT_CACHE_CONTROL = "max-age=0, s-maxage=1, stale-while-revalidate=1"
SNAPSHOT_VARY = "Authorization, Accept-Encoding"


def poll_answer(
    cache: SnapshotCache, env: str, known: str | None, *, accept_gzip: bool = False
) -> tuple[int, list[tuple[str, str]], bytes]:
    """A snapshot poll's status, headers and body (``304`` when the client ``holds`` the current
    snapshot; gzip-compressed if ``accept_gzip``), counted in the poll metrics; shared by the
    snapshot view and :mod:`flagsvc.fastpath`. The ``ETag`` names the snapshot in either encoding."""
    published = cache.get(env)
    headers = [
        ("ETag", etag(published.identity)),
        ("Cache-Control", SNAPSHOT_CACHE_CONTROL),
        ("Vary", SNAPSHOT_VARY),
    ]
    if cache.stale:
        headers.append((STALE_HEADER, "true"))
    if holds(published, known):
        status, body = 304, b""
    elif accept_gzip:
        status, body = 200, published.gzipped()
        headers.append(("Content-Encoding", "gzip"))
    else:
        status, body = 200, published.body
    POLLS.labels(env, str(status)).inc()
    return status, headers, body
