"""Reading the audit log: queries and hash-chain verification.

Entries are written only by :mod:`flagsvc.commit`. The Stream is never trimmed by MAXLEN.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from .commit import entry_hash, parse_head
from .keys import Namespace

_JSON_FIELDS = ("before", "after")
_INT_FIELDS = ("seq", "env_version")
_BATCH = 500
MAX_SEQ = 2**64 - 1


def decode_entry(stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """Stream fields -> API shape: JSON fields parsed, numbers as numbers, ``""`` as ``None``."""
    out: dict[str, Any] = {"id": stream_id}
    for name, value in fields.items():
        if name in _JSON_FIELDS:
            out[name] = json.loads(value) if value else None
        elif name in _INT_FIELDS:
            out[name] = int(value) if value else None
        else:
            out[name] = value if value != "" else None
    return out


@dataclass(frozen=True)
class AuditPage:
    entries: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True)
class AuditFilter:
    """Exact matches on indexed fields, and an inclusive time window."""

    flag: str | None = None
    actor: str | None = None
    action: str | None = None
    incident: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, fields: dict[str, str]) -> bool:
        if self.since or self.until:
            # The window applies to the entry's own time, which precedes its stream id by the
            # commit's duration (ids only narrow the read, with WINDOW_SLACK_MS). Entry times are
            # fixed-width UTC ISO 8601, so strings compare like the times they hold.
            moment = fields.get("time", "")
            if (self.since and moment < _iso(self.since)) or (self.until and moment > _iso(self.until)):
                return False
        return all(
            value is None or fields.get(name) == value
            for name, value in (
                ("flag", self.flag),
                ("actor", self.actor),
                ("action", self.action),
                ("incident", self.incident),
            )
        )


#: An entry's time is taken just before its commit (each retry takes a new one), its stream id
#: by Redis during it: the id is later by one commit round trip. Generous for a slow Redis.
WINDOW_SLACK_MS = 1000


@functools.lru_cache(maxsize=64)
def _iso(moment: datetime) -> str:
    """``moment`` written like an audit entry's ``time`` (see ``commit.utcnow_iso``)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _score(stream_id: str) -> int:
    """The index score of a stream id: ``ms * 1000 + sequence`` (see commit.lua)."""
    ms, _, n = stream_id.partition("-")
    return int(ms) * 1000 + int(n)


class AuditLog:
    """Queries over one namespace's audit Stream."""

    def __init__(self, client: redis.Redis, ns: Namespace) -> None:
        self._redis = client
        self._ns = ns

    def query(
        self,
        criteria: AuditFilter | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
        oldest_first: bool = False,
    ) -> AuditPage:
        """One page of matching entries, newest first unless ``oldest_first``; pass
        ``next_cursor`` back as ``cursor`` for the next page."""
        if criteria is None:
            criteria = AuditFilter()
        entries: list[dict[str, Any]] = []
        rows = self.iter_matching(criteria, cursor=cursor, oldest_first=oldest_first, first_batch=limit + 1)
        for stream_id, fields in rows:
            if len(entries) == limit:
                return AuditPage(entries, entries[-1]["id"])
            entries.append(decode_entry(stream_id, fields))
        return AuditPage(entries, None)

    def iter_matching(
        self,
        criteria: AuditFilter,
        *,
        cursor: str | None = None,
        oldest_first: bool = False,
        first_batch: int = _BATCH,
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """Matching entries in order, read in batches (an export never holds the whole log).

        With filters on indexed fields, the smallest of their indexes is walked and the entries
        fetched by id; otherwise the Stream itself is read within the time window. The first
        batch is ``first_batch`` (a page and one), later ones grow to 500.
        """
        candidates = [
            self._ns.audit_index(name, value)
            for name, value in (
                ("incident", criteria.incident),
                ("flag", criteria.flag),
                ("actor", criteria.actor),
                ("action", criteria.action),
            )
            if value is not None
        ]
        if not candidates:
            yield from self._scan_stream(criteria, cursor, oldest_first, first_batch)
            return
        if len(candidates) > 1:
            pipe = self._redis.pipeline(transaction=False)
            for key in candidates:
                pipe.zcard(key)
            sizes = pipe.execute()
            candidates = [key for _, key in sorted(zip(sizes, candidates, strict=True))]
        yield from self._walk_index(candidates[0], criteria, cursor, oldest_first, first_batch)

    def _walk_index(
        self, key: str, criteria: AuditFilter, cursor: str | None, oldest_first: bool, batch: int
    ) -> Iterator[tuple[str, dict[str, str]]]:
        low: str = str(_ms(criteria.since) * 1000) if criteria.since else "-inf"
        high: str = str((_ms(criteria.until) + WINDOW_SLACK_MS) * 1000 + 999) if criteria.until else "+inf"
        if cursor == "0-0" and not oldest_first:
            return
        if cursor:
            if oldest_first:
                low = f"({_score(cursor)}"
            else:
                high = f"({_score(cursor)}"
        while True:
            if oldest_first:
                ids = self._redis.zrangebyscore(key, low, high, start=0, num=batch, withscores=True)
            else:
                ids = self._redis.zrevrangebyscore(key, high, low, start=0, num=batch, withscores=True)
            if not ids:
                return
            pipe = self._redis.pipeline(transaction=False)
            for stream_id, _ in ids:
                pipe.xrange(self._ns.audit, min=stream_id, max=stream_id)
            for found in pipe.execute():
                if found and criteria.matches(found[0][1]):  # an archived entry is gone
                    yield found[0]
            last_score = int(ids[-1][1])
            if oldest_first:
                low = f"({last_score}"
            else:
                high = f"({last_score}"
            if len(ids) < batch:
                return
            batch = min(batch * 2, _BATCH)

    def _scan_stream(
        self, criteria: AuditFilter, cursor: str | None, oldest_first: bool, size: int
    ) -> Iterator[tuple[str, dict[str, str]]]:
        low = f"{_ms(criteria.since)}-0" if criteria.since else "-"
        high = f"{_ms(criteria.until) + WINDOW_SLACK_MS}-{MAX_SEQ}" if criteria.until else "+"
        if cursor == "0-0" and not oldest_first:
            return
        if cursor:
            if oldest_first:
                low = f"({cursor}"
            else:
                high = f"({cursor}"
        while True:
            if oldest_first:
                batch = self._redis.xrange(self._ns.audit, min=low, max=high, count=size)
            else:
                batch = self._redis.xrevrange(self._ns.audit, max=high, min=low, count=size)
            for stream_id, fields in batch:
                if criteria.matches(fields):
                    yield stream_id, fields
            if len(batch) < size:
                return
            size = min(size * 2, _BATCH)
            if oldest_first:
                low = f"({batch[-1][0]}"
            else:
                high = f"({batch[-1][0]}"

    def iter_all(self) -> Iterator[tuple[str, dict[str, str]]]:
        """Every entry, oldest first, read in batches."""
        lower = "-"
        while True:
            batch = self._redis.xrange(self._ns.audit, min=lower, max="+", count=_BATCH)
            yield from batch
            if len(batch) < _BATCH:
                return
            lower = f"({batch[-1][0]}"

    def base(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest entry trimmed away (``(0, "")`` if none): the anchor the
        live log's chain continues from."""
        return parse_head(self._redis.get(self._ns.audit_base))

    def verify(self, archives: Iterable[Iterable[tuple[str, dict[str, str]]]] = ()) -> VerifyResult:
        """Walk the chain: each entry's hash, its link to the previous one, the sequence, the head.

        ``archives`` (oldest first) are the entries ``flagsvc audit trim`` moved to files: with
        them the walk starts at the very first entry and crosses each archive boundary; without
        them it starts at the stored anchor of the last trim."""
        chain = ChainWalk()
        archives = list(archives)
        if not archives:
            chain.seq, chain.prev_hash = self.base()
        for archive in archives:
            for stream_id, fields in archive:
                if not chain.step(stream_id, fields):
                    return chain.result(ok=False, where="archive")
        if archives and (chain.seq, chain.prev_hash) != self.base():
            return VerifyResult(
                False, chain.count, chain.last_id, "the archives do not end where the live log begins"
            )
        for stream_id, fields in self.iter_all():
            if not chain.step(stream_id, fields):
                return chain.result(ok=False)
        head_seq, head_hash = parse_head(self._redis.get(self._ns.audit_head))
        if (head_seq, head_hash) != (chain.seq, chain.prev_hash):
            return VerifyResult(
                False,
                chain.count,
                chain.last_id,
                f"head is entry {head_seq} but the log ends at entry {chain.seq}: newest edited or removed",
            )
        return chain.result(ok=True)


class ChainWalk:
    """The state of a walk along the hash chain."""

    def __init__(self) -> None:
        self.seq, self.prev_hash, self.count = 0, "", 0
        self.last_id: str | None = None
        self.bad_id: str | None = None
        self.problem: str | None = None

    def step(self, stream_id: str, fields: dict[str, str]) -> bool:
        expected = self.seq + 1
        if fields.get("seq") != str(expected):
            self.problem = f"sequence {fields.get('seq')!r}, expected {expected}: entry removed or inserted"
        elif fields.get("prev_hash") != self.prev_hash:
            self.problem = (
                "prev_hash does not match the previous entry: an entry before it was removed or edited"
            )
        elif entry_hash(fields) != fields.get("hash"):
            self.problem = "hash does not match the entry's content: the entry was edited"
        if self.problem:
            self.bad_id = stream_id
            return False
        self.seq, self.prev_hash, self.count, self.last_id = (
            expected,
            fields["hash"],
            self.count + 1,
            stream_id,
        )
        return True

    def result(self, *, ok: bool, where: str = "") -> VerifyResult:
        problem = f"{where}: {self.problem}" if where and self.problem else self.problem
        return VerifyResult(ok, self.count, self.bad_id, problem)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    bad_entry: str | None
    problem: str | None
