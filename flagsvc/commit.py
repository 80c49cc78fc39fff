"""The commit: a change, its chained audit entries and its notification, atomically.

Every change of flagsvc state is committed by :meth:`Committer.commit`, called by the write
skeleton (:mod:`flagsvc.writes`). The caller reads the state it needs *together with the audit
head* (``<seq>:<hash>`` of the newest entry) in one MULTI/EXEC, computes the change, and commits
it with ``commit.lua``, which re-checks the head: since every change appends an audit entry, an
unchanged head proves that nothing in the namespace changed in between; on a :class:`Conflict`
the caller reads again. The SHA-256 chain hash is computed here, in Python, from the previous
head; Redis only checks and stores.

A process dying anywhere leaves either nothing or everything: the Lua script is one atomic
Redis command, written to the append-only file as a whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis

from .connection import ClusterDurability, Durability, durability_of
from .keys import Namespace

#: Audit fields, in the order they are written to the stream.
AUDIT_FIELDS = (
    "seq",
    "time",
    "actor",
    "action",
    "flag",
    "token",
    "before",
    "after",
    "reason",
    "incident",
    "request_id",
    "source",
    "env_version",
    "operation",
    "playbook",
    "prev_hash",
    "hash",
)

#: Audit fields with an index (a sorted set of entry ids per value) for fast filtered queries.
INDEXED_FIELDS = ("flag", "actor", "action", "incident")

_SCRIPT = resources.files(__package__).joinpath("lua/commit.lua").read_text()

log = logging.getLogger(__name__)


class Conflict(Exception):
    """The audit head moved between read and commit: read again and retry."""


def iso_from_ms(ms: int) -> str:
    """Milliseconds since the epoch written like an audit entry's ``time``."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entry_hash(fields: Mapping[str, str]) -> str:
    """SHA-256 over the canonical JSON of every field but ``hash`` (``prev_hash`` included)."""
    payload = {k: v for k, v in fields.items() if k != "hash"}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_head(head: str | bytes | None) -> tuple[int, str]:
    """``"<seq>:<hash>"`` -> ``(seq, hash)``; ``(0, "")`` for an empty log."""
    if not head:
        return 0, ""
    text = head.decode() if isinstance(head, bytes) else head
    seq, _, digest = text.partition(":")
    return int(seq), digest


@dataclass(frozen=True)
class Op:
    """One write in a commit: ``cmd`` (see ``commit.lua``) on ``key`` with ``args``; ``also``: the
    other keys it touches (FLAG, SNAPSHOT), passed to the script before ``args``."""

    cmd: str
    key: str
    args: tuple[str, ...]
    also: tuple[str, ...] = ()


@dataclass(frozen=True)
class Idempotency:
    """Remember this commit's result under ``key`` (a Redis key) for ``ttl`` seconds, listed in the
    sorted set ``index`` that keeps a token's newest ``cap`` records (older ones are dropped)."""

    key: str
    value: str
    ttl: int
    index: str
    cap: int


@dataclass(frozen=True)
class Committed:
    stream_id: str  # of the last entry
    entries: list[dict[str, str]]


@dataclass(frozen=True)
class Replayed:
    """The idempotency key was already used; ``value`` is what the first commit stored."""

    value: str


class Committer:
    """Commits audited changes to one Redis connection."""

    def __init__(self, client: redis.Redis, *, clock_ms: Callable[[], int] | None = None) -> None:
        """Entry times come from Redis' clock (``TIME``), the one clock every host of the service
        shares; ``clock_ms`` (milliseconds since the epoch) replaces it in tests."""
        self._redis = client
        self._script = client.register_script(_SCRIPT)
        self._clock_ms = clock_ms or self._redis_ms

    def _redis_ms(self) -> int:
        seconds, micros = self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def commit(
        self,
        ns: Namespace,
        head: str | bytes | None,
        *,
        ops: Sequence[Op],
        audit: Mapping[str, str] | Sequence[Mapping[str, str]],
        idempotency: Idempotency | None = None,
        notify: str | None = None,
        time_ms: int | None = None,
    ) -> Committed | Replayed:
        """Commit ``ops`` and the audit entry ``audit`` (or several, chained in order) if the
        head is still ``head``; with no entries, only the idempotency record (a decision that
        changes nothing). ``time_ms`` is the entries' time (default: this committer's clock).

        Every entry of one commit gets the same ``time``, never earlier than the newest entry's
        (should the clock go back, after a Redis failover say, the commit takes that time and
        logs a warning), and a stream id from that time: ids and times agree, so a time window is
        an id range. Raises :class:`Conflict` if the head moved.
        """
        keys = _Keys(ns.audit, ns.audit_head, idempotency.key if idempotency else ns.audit_head)
        entries = [audit] if isinstance(audit, Mapping) else audit
        time_ms = self._clock_ms() if time_ms is None else time_ms
        expect_head = _text(head) or ""
        plan = _plan(ns, keys, expect_head, ops, idempotency, notify, time_ms)
        for _ in range(2):  # with the head unchanged, the newest id is too: the second try fits
            chained = _chain(head, entries, time_ms)
            _add_entries(plan, ns, keys, chained, time_ms, expect_head)
            status, value = self._call(keys.names, plan)
            if status != "clock":
                break
            log.warning(
                "the clock is %d ms behind the newest audit entry of %s; committing at that entry's time",
                int(value) - time_ms,
                ns.base,
            )
            time_ms = int(value)
        if status in ("conflict", "clock"):
            raise Conflict(value)
        if status == "replay":
            return Replayed(value)
        return Committed(stream_id=value, entries=chained)

    def replay(self, key: str, ttl: int) -> str | None:
        """The idempotency record at ``key``, renewed for ``ttl`` seconds and, with durability rules,
        confirmed on the replicas like a commit; ``None`` if there is none."""
        durability = self._durability(key)
        pipe = (durability.client if durability is not None else self._redis).pipeline(transaction=False)
        pipe.get(key)
        pipe.expire(key, ttl)
        if durability is not None:
            pipe.execute_command("WAIT", durability.wanted(), durability.timeout_ms)
        record, _, *acked = self._execute(pipe)
        if record is not None and durability is not None:
            durability.confirm(int(acked[0]))
        return _text(record) or None

    def _call(self, keys: list[str], plan: dict[str, Any]) -> tuple[str, str]:
        """Run ``commit.lua``; with :class:`~flagsvc.connection.Durability` rules, ``WAIT`` on the
        same connection in the same round trip (on a cluster, a connection to the master of the
        commit's slot), and :class:`~flagsvc.connection.Unconfirmed` if an applied (or replayed)
        commit is not known to survive a failover."""
        durability = self._durability(keys[0])
        if durability is None:
            status, value = self._script(keys=keys, args=[json.dumps(plan)])
            return _text(status), _text(value)
        pipe = durability.client.pipeline(transaction=False)
        self._script(keys=keys, args=[json.dumps(plan)], client=pipe)
        pipe.execute_command("WAIT", durability.wanted(), durability.timeout_ms)
        (status, value), acked = self._execute(pipe)
        if _text(status) in ("ok", "replay"):
            durability.confirm(int(acked))
        return _text(status), _text(value)

    def _durability(self, key: str) -> Durability | None:
        """The rules a commit on ``key`` waits by (on a cluster: those of the master of its
        slot); ``None`` when it waits for nothing."""
        rules = durability_of(self._redis)
        node = rules.for_key(key) if rules is not None else None
        return node if node is not None and node.active else None

    def _execute(self, pipe: Any) -> list[Any]:
        """``pipe.execute()``; a slot that moved (the commands ran nowhere) makes a cluster
        client learn its slots again, and the write answers 503 to be retried."""
        try:
            result: list[Any] = pipe.execute()
        except redis.exceptions.MovedError:
            rules = durability_of(self._redis)
            if isinstance(rules, ClusterDurability):
                rules.moved()
            raise
        return result


class _Keys:
    """The KEYS of one script call; the plan names each by its (1-based, as in Lua) index."""

    def __init__(self, *first: str) -> None:
        self.names = list(first)

    def index(self, key: str) -> int:
        if key not in self.names:
            self.names.append(key)
        return self.names.index(key) + 1


def _text(value: str | bytes | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _plan(
    ns: Namespace,
    keys: _Keys,
    expect_head: str,
    ops: Sequence[Op],
    idempotency: Idempotency | None,
    notify: str | None,
    time_ms: int,
) -> dict[str, Any]:
    """The commit's plan for ``commit.lua`` but its entries (see :func:`_add_entries`)."""
    plan: dict[str, Any] = {
        "expect_head": expect_head,
        "ops": [[op.cmd, keys.index(op.key), *map(keys.index, op.also), *op.args] for op in ops],
    }
    if idempotency:
        plan["idempotency"] = {
            "value": idempotency.value,
            "ttl": idempotency.ttl,
            "index": keys.index(idempotency.index),
            "cap": idempotency.cap,
            "now": time_ms // 1000,
        }
    if notify is not None:
        plan["channel"] = ns.changes_channel
        plan["message"] = notify
    return plan


def _add_entries(
    plan: dict[str, Any],
    ns: Namespace,
    keys: _Keys,
    chained: list[dict[str, str]],
    time_ms: int,
    expect_head: str,
) -> None:
    """The chained audit entries, their time, their index keys and the head after them."""
    plan["time_ms"] = str(time_ms)
    plan["new_head"] = f"{chained[-1]['seq']}:{chained[-1]['hash']}" if chained else expect_head
    plan["entries"] = [[x for name in AUDIT_FIELDS for x in (name, e[name])] for e in chained]
    plan["indexes"] = [
        [keys.index(ns.audit_index(name, e[name])) for name in INDEXED_FIELDS if e[name]] for e in chained
    ]


def _chain(
    head: str | bytes | None, entries: Sequence[Mapping[str, str]], time_ms: int
) -> list[dict[str, str]]:
    """The audit entries, numbered and hash-chained after ``head``, all at ``time_ms``."""
    seq, prev_hash = parse_head(head)
    now = iso_from_ms(time_ms)
    chained: list[dict[str, str]] = []
    for fields in entries:
        seq += 1
        entry = {name: "" for name in AUDIT_FIELDS}
        entry.update({k: str(v) for k, v in fields.items()})
        entry.update(seq=str(seq), time=now, prev_hash=prev_hash)
        entry["hash"] = prev_hash = entry_hash(entry)
        chained.append(entry)
    return chained
