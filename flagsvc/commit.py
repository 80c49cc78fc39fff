"""The one write path: a change, its chained audit entry and its notification, atomically.

Every change of flagsvc state goes through :meth:`Committer.commit`. The caller reads the
state it needs *together with the audit head* (``<seq>:<hash>`` of the newest entry) in one
MULTI/EXEC, computes the change, and commits it with ``commit.lua``, which re-checks the head:
since every change appends an audit entry, an unchanged head proves that nothing in the
namespace changed in between. On a conflict the caller reads again and retries
(:func:`retry_on_conflict`). The SHA-256 chain hash is computed here, in Python, from the
previous head; Redis only checks and stores.

A process dying anywhere leaves either nothing or everything: the Lua script is one atomic
Redis command, written to the append-only file as a whole.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar

import redis

from .errors import WriteContention
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

T = TypeVar("T")


class Conflict(Exception):
    """The audit head moved between read and commit: read again and retry."""


def utcnow_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    """One write in a commit: ``cmd`` in SET/HSET/HDEL/SADD on ``key`` with ``args``."""

    cmd: str
    key: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Idempotency:
    """Remember this commit's result under ``key`` (a Redis key) for ``ttl`` seconds."""

    key: str
    value: str
    ttl: int


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

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._script = client.register_script(_SCRIPT)

    def commit(
        self,
        ns: Namespace,
        head: str | bytes | None,
        *,
        ops: Sequence[Op],
        audit: Mapping[str, str] | Sequence[Mapping[str, str]],
        idempotency: Idempotency | None = None,
        notify: str | None = None,
    ) -> Committed | Replayed:
        """Commit ``ops`` and the audit entry ``audit`` (or several, chained in order) if the
        head is still ``head``.

        Raises :class:`Conflict` if it moved.
        """
        seq, prev_hash = parse_head(head)
        now = utcnow_iso()
        chained: list[dict[str, str]] = []
        for fields in [audit] if isinstance(audit, Mapping) else audit:
            seq += 1
            entry = {name: "" for name in AUDIT_FIELDS}
            entry.update({k: str(v) for k, v in fields.items()})
            entry.update(seq=str(seq), time=now, prev_hash=prev_hash)
            entry["hash"] = prev_hash = entry_hash(entry)
            chained.append(entry)

        keys = [ns.audit, ns.audit_head, idempotency.key if idempotency else ns.audit_head]

        def key_index(key: str) -> int:
            if key not in keys:
                keys.append(key)
            return keys.index(key) + 1

        plan_ops = [[op.cmd, key_index(op.key), *op.args] for op in ops]
        indexes = [
            [key_index(ns.audit_index(name, e[name])) for name in INDEXED_FIELDS if e[name]] for e in chained
        ]
        plan: dict[str, Any] = {
            "expect_head": (head.decode() if isinstance(head, bytes) else head) or "",
            "new_head": f"{seq}:{prev_hash}",
            "ops": plan_ops,
            "entries": [[x for name in AUDIT_FIELDS for x in (name, e[name])] for e in chained],
            "indexes": indexes,
        }
        if idempotency:
            plan["idempotency"] = {"value": idempotency.value, "ttl": idempotency.ttl}
        if notify is not None:
            plan["channel"] = ns.changes_channel
            plan["message"] = notify
        status, value = self._script(keys=keys, args=[json.dumps(plan)])
        status = status.decode() if isinstance(status, bytes) else status
        value = value.decode() if isinstance(value, bytes) else value
        if status == "conflict":
            raise Conflict(value)
        if status == "replay":
            return Replayed(value)
        return Committed(stream_id=value, entries=chained)


def retry_on_conflict(attempt: Callable[[], T], *, deadline_seconds: float = 5.0) -> T:
    """Run ``attempt`` (read, decide, commit) until it does not raise :class:`Conflict`.

    Some writer wins every round, so this ends; the deadline bounds the wait of one request
    under extreme contention (503, nothing written).
    """
    deadline = time.monotonic() + deadline_seconds
    delay = 0.0005
    while True:
        try:
            return attempt()
        except Conflict:
            if time.monotonic() > deadline:
                raise WriteContention("the environment kept changing; nothing was written") from None
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.02)
