"""Reading the audit log: queries and hash-chain verification.

Entries are written only by :mod:`flagsvc.commit`. The Stream is never trimmed by MAXLEN.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis

from .commit import entry_hash, parse_head
from .keys import Namespace

_JSON_FIELDS = ("before", "after")
_INT_FIELDS = ("seq", "env_version")
_BATCH = 500
#: Ids of the walked index that one call of ``audit_intersect.lua`` reads at most (~1 ms of Redis).
_INTERSECT_BUDGET = 2000
_INTERSECT = resources.files(__package__).joinpath("lua/audit_intersect.lua").read_text()
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


#: What every record carries and no reader of a change needs to see.
_BOOKKEEPING = ("version", "created_at", "updated_at", "updated_by", "key", "name")


def change_summary(before: Any, after: Any, *, width: int = 80) -> str:
    """A change as a person reads it: ``enabled: true -> false; default_variant: "normal" ->
    "short"``, ``created`` or ``archived``; each value cut at ``width`` characters."""
    if not isinstance(after, dict):
        return "deleted" if before else ""
    if not isinstance(before, dict):
        return "created"
    if after.get("archived") and not before.get("archived"):
        return "archived"
    names = [n for n in {**before, **after} if n not in _BOOKKEEPING and before.get(n) != after.get(n)]
    return "; ".join(f"{n}: {_shown(before.get(n), width)} -> {_shown(after.get(n), width)}" for n in names)


def _shown(value: Any, width: int) -> str:
    text = "(none)" if value is None else json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= width else text[: width - 1] + "…"


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
            # Stream ids carry the entry's time to the millisecond (see commit.lua), so the id
            # range is the window; this compares the rest. Entry times are fixed-width UTC
            # ISO 8601, so strings compare like the times they hold.
            moment = fields.get("time", "")
            if (self.since and moment < _iso(self.since)) or (self.until and moment > _iso(self.until)):
                return False
        return all(fields.get(name) == value for name, value in self.indexed())

    def indexed(self) -> list[tuple[str, str]]:
        """``(field, value)`` of the filters on indexed fields."""
        return [
            (name, value)
            for name, value in (
                ("incident", self.incident),
                ("flag", self.flag),
                ("actor", self.actor),
                ("action", self.action),
            )
            if value is not None
        ]


@functools.lru_cache(maxsize=64)
def _iso(moment: datetime) -> str:
    """``moment`` written like an audit entry's ``time`` (see ``commit.iso_from_ms``)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _parse_id(stream_id: str) -> tuple[int, int]:
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n)


@dataclass(frozen=True)
class _IdRange:
    """The stream ids a query may return: ``low``..``high``, each bound inclusive or not."""

    low: tuple[int, int] = (0, 0)
    high: tuple[int, int] = (MAX_SEQ, MAX_SEQ)
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def of(cls, criteria: AuditFilter, cursor: str | None, oldest_first: bool) -> _IdRange | None:
        """The range of ``criteria``'s window past ``cursor``; None when it is empty."""
        low, high = cls.low, cls.high
        low_open = high_open = False
        if criteria.since:
            low = (_ms(criteria.since), 0)
        if criteria.until:
            high = (_ms(criteria.until), MAX_SEQ)
        if cursor:
            at = _parse_id(cursor)
            if oldest_first and at >= low:
                low, low_open = at, True
            elif not oldest_first and at <= high:
                high, high_open = at, True
        if low > high or (low == high and (low_open or high_open)):
            return None
        if (low_open and low == (MAX_SEQ, MAX_SEQ)) or (high_open and high == (0, 0)):
            return None
        return cls(low, high, low_open, high_open)

    @property
    def xmin(self) -> str:
        return ("(" if self.low_open else "") + "{}-{}".format(*self.low)

    @property
    def xmax(self) -> str:
        return ("(" if self.high_open else "") + "{}-{}".format(*self.high)


class AuditLog:
    """Queries over one namespace's audit Stream."""

    def __init__(self, client: redis.Redis, ns: Namespace) -> None:
        self._redis = client
        self._ns = ns
        self._intersect = client.register_script(_INTERSECT)

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

        With filters on indexed fields, the smallest of their indexes is walked and, with more
        than one, intersected with the others inside Redis (``audit_intersect.lua``); only the
        entries in all of them are read from the Stream. Otherwise the Stream itself is read
        over the id range of the time window. The first read is ``first_batch`` (a page and
        one), later ones grow to 500.
        """
        ids = _IdRange.of(criteria, cursor, oldest_first)
        if ids is None:
            return
        indexes = [self._ns.audit_index(name, value) for name, value in criteria.indexed()]
        if not indexes:
            yield from self._scan_stream(criteria, ids, oldest_first, first_batch)
            return
        if len(indexes) > 1:
            pipe = self._redis.pipeline(transaction=False)
            for key in indexes:
                pipe.zcard(key)
            sizes = pipe.execute()
            indexes = [key for _, key in sorted(zip(sizes, indexes, strict=True))]
        seqs = self._seq_range(ids)
        if seqs is None:
            return
        yield from self._walk_index(indexes[0], indexes[1:], criteria, seqs, oldest_first, first_batch)

    def _seq_range(self, ids: _IdRange) -> tuple[str, str] | None:
        """The range of chain sequence numbers (the index scores) of the entries in ``ids``, as
        ``ZRANGEBYSCORE`` bounds; None when no entry is in it."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrange(self._ns.audit, min=ids.xmin, max=ids.xmax, count=1)
        pipe.xrevrange(self._ns.audit, max=ids.xmax, min=ids.xmin, count=1)
        first, last = pipe.execute()
        if not first:
            # Nothing live in range; archived entries may still be indexed until the end of a
            # trim, and are skipped when read.
            return None
        low = "-inf" if ids.low == (0, 0) and not ids.low_open else first[0][1]["seq"]
        high = "+inf" if ids.high == (MAX_SEQ, MAX_SEQ) else last[0][1]["seq"]
        return low, high

    def _walk_index(
        self,
        key: str,
        others: list[str],
        criteria: AuditFilter,
        seqs: tuple[str, str],
        oldest_first: bool,
        batch: int,
    ) -> Iterator[tuple[str, dict[str, str]]]:
        low, high = seqs
        while True:
            if others:
                state, last, *ids = self._intersect(
                    keys=[key, *others],
                    args=[low, high, "asc" if oldest_first else "desc", batch, _INTERSECT_BUDGET],
                )
                done = state == "done"
            else:
                scored = (
                    self._redis.zrangebyscore(key, low, high, start=0, num=batch, withscores=True)
                    if oldest_first
                    else self._redis.zrevrangebyscore(key, high, low, start=0, num=batch, withscores=True)
                )
                ids = [stream_id for stream_id, _ in scored]
                last, done = (str(int(scored[-1][1])) if scored else ""), len(scored) < batch
            pipe = self._redis.pipeline(transaction=False)
            for stream_id in ids:
                pipe.xrange(self._ns.audit, min=stream_id, max=stream_id)
            for found in pipe.execute():
                if found and criteria.matches(found[0][1]):  # an archived entry is gone
                    yield found[0]
            if done or not last:
                return
            if oldest_first:
                low = f"({last}"
            else:
                high = f"({last}"
            batch = min(batch * 2, _BATCH)

    def _scan_stream(
        self, criteria: AuditFilter, ids: _IdRange, oldest_first: bool, size: int
    ) -> Iterator[tuple[str, dict[str, str]]]:
        low, high = ids.xmin, ids.xmax
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

    def verify(
        self,
        archives: Iterable[Iterable[tuple[str, dict[str, str]]]] = (),
        *,
        expect_head: tuple[int, str] | None = None,
    ) -> VerifyResult:
        """Walk the chain: each entry's hash, its link to the previous one, the sequence, the head.

        ``archives`` (oldest first) are the entries ``flagsvc audit trim`` moved to files: with
        them the walk starts at the very first entry and crosses each archive boundary; without
        them it starts at the stored anchor of the last trim. ``expect_head`` (``seq, hash``, a
        head copied off the host earlier) must be an entry of the chain: a shorter chain, valid as
        it is, means its tail was lost (a rollback), another hash that it was rewritten."""
        chain = ChainWalk(expect_head)
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
        return self._check_head(chain)

    def _check_head(self, chain: ChainWalk) -> VerifyResult:
        head_seq, head_hash = parse_head(self._redis.get(self._ns.audit_head))
        if (head_seq, head_hash) != (chain.seq, chain.prev_hash):
            return VerifyResult(
                False,
                chain.count,
                chain.last_id,
                f"head is entry {head_seq} but the log ends at entry {chain.seq}: newest edited or removed",
            )
        if chain.expect is not None and chain.expect[0] > chain.seq:
            return VerifyResult(
                False,
                chain.count,
                None,
                f"the log ends at entry {chain.seq}, before the expected head {chain.expect[0]}: "
                "its tail was lost (Redis rolled back)",
            )
        return chain.result(ok=True)


class ChainWalk:
    """The state of a walk along the hash chain."""

    def __init__(self, expect: tuple[int, str] | None = None) -> None:
        """``expect``: an entry (``seq, hash``) the chain must hold."""
        self.expect = expect
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
        elif self.expect is not None and self.expect[0] == expected and self.expect[1] != fields["hash"]:
            self.problem = "not the expected head: the history was rewritten from here (Redis rolled back)"
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
