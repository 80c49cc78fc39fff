"""Reading the audit log: queries and hash-chain verification.

Entries are written only by :mod:`flagsvc.commit`. The Stream is never trimmed by MAXLEN.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .commit import entry_hash, parse_head
from .keys import Namespace

_JSON_FIELDS = ("before", "after")
_INT_FIELDS = ("seq", "env_version")
_BATCH = 500


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


class AuditLog:
    """Queries over one namespace's audit Stream."""

    def __init__(self, client: redis.Redis, ns: Namespace) -> None:
        self._redis = client
        self._ns = ns

    def query(self, *, flag: str | None = None, limit: int = 50, cursor: str | None = None) -> AuditPage:
        """Newest first, optionally only the entries of ``flag``; ``cursor`` continues a page."""
        entries: list[dict[str, Any]] = []
        if cursor == "0-0":
            return AuditPage(entries, None)  # nothing is older than the first possible id
        upper = f"({cursor}" if cursor else "+"
        while len(entries) < limit:
            batch = self._redis.xrevrange(self._ns.audit, max=upper, min="-", count=_BATCH)
            if not batch:
                return AuditPage(entries, None)
            for stream_id, fields in batch:
                if flag is None or fields.get("flag") == flag:
                    entries.append(decode_entry(stream_id, fields))
                    if len(entries) == limit:
                        return AuditPage(entries, stream_id)
            upper = f"({batch[-1][0]}"
            if len(batch) < _BATCH:
                return AuditPage(entries, None)
        return AuditPage(entries, None)

    def iter_all(self) -> Iterator[tuple[str, dict[str, str]]]:
        """Every entry, oldest first, read in batches."""
        lower = "-"
        while True:
            batch = self._redis.xrange(self._ns.audit, min=lower, max="+", count=_BATCH)
            yield from batch
            if len(batch) < _BATCH:
                return
            lower = f"({batch[-1][0]}"

    def verify(self) -> VerifyResult:
        """Walk the chain: each entry's hash, its link to the previous one, the sequence, the head."""
        prev_hash, expected_seq, count, last_id = "", 1, 0, None
        for stream_id, fields in self.iter_all():
            problem = None
            if fields.get("seq") != str(expected_seq):
                problem = (
                    f"sequence {fields.get('seq')!r}, expected {expected_seq}: entry removed or inserted"
                )
            elif fields.get("prev_hash") != prev_hash:
                problem = (
                    "prev_hash does not match the previous entry: an entry before it was removed or edited"
                )
            elif entry_hash(fields) != fields.get("hash"):
                problem = "hash does not match the entry's content: the entry was edited"
            if problem:
                return VerifyResult(False, count, stream_id, problem)
            prev_hash, expected_seq, count, last_id = fields["hash"], expected_seq + 1, count + 1, stream_id
        head_seq, head_hash = parse_head(self._redis.get(self._ns.audit_head))
        if (head_seq, head_hash) != (count, prev_hash):
            return VerifyResult(
                False,
                count,
                last_id,
                f"head is entry {head_seq} but the log ends at entry {count}: newest edited or removed",
            )
        return VerifyResult(True, count, None, None)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    bad_entry: str | None
    problem: str | None
