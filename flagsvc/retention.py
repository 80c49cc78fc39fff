"""Audit retention: nothing is ever dropped silently. ``flagsvc audit trim`` first archives the
entries older than a cut-off to a file (NDJSON, every field as stored), checks that the file
continues the hash chain, then - in one audited commit - trims them from the Stream and moves the
chain's anchor (``audit:base``) to the last archived entry, so ``flagsvc audit verify`` can walk
the live log alone, or archive files and the live log across the boundary."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis

from .audit import AuditLog, ChainWalk
from .commit import Op
from .keys import EnvKeys
from .writes import Change, WriteContext, Writer, audit_entry

_BATCH = 1000


@dataclass(frozen=True)
class TrimResult:
    archived: int
    through_id: str | None
    archive: Path
    sha256: str


def read_archive(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The entries of an archive file, in order."""
    with path.open() as fh:
        for line in fh:
            record = json.loads(line)
            yield record["id"], record["fields"]


def trim(client: redis.Redis, env: str, before: datetime, archive: Path, *, actor: str) -> TrimResult:
    """Archive the entries of ``env`` older than ``before`` to ``archive`` (a new file), then
    trim them, atomically with their ``audit.trim`` entry. Raises ``FileExistsError`` rather than
    overwrite an archive, ``ValueError`` for a cut-off in the future or a broken chain."""
    if before > datetime.now(UTC):
        raise ValueError("the cut-off is in the future: only past entries can be archived")
    ns = EnvKeys(env)
    log = AuditLog(client, ns)
    cut = f"{int(before.timestamp() * 1000)}-0"
    chain = ChainWalk()
    chain.seq, chain.prev_hash = log.base()
    digest = hashlib.sha256()
    count, last_id = 0, None
    with archive.open("x") as fh:  # never overwrite an archive
        lower = "-"
        while True:
            batch = client.xrange(ns.audit, min=lower, max=f"({cut}", count=_BATCH)
            for stream_id, fields in batch:
                if not chain.step(stream_id, fields):
                    raise ValueError(f"the chain is broken at {stream_id}: {chain.problem}; nothing trimmed")
                line = json.dumps({"id": stream_id, "fields": fields}, sort_keys=True) + "\n"
                fh.write(line)
                digest.update(line.encode())
                count, last_id = count + 1, stream_id
            if len(batch) < _BATCH:
                break
            lower = f"({batch[-1][0]}"
        fh.flush()
        os.fsync(fh.fileno())
    if count == 0:
        archive.unlink()
        return TrimResult(0, None, archive, "")
    summary = {
        "archived": count,
        "through_seq": chain.seq,
        "through_id": last_id,
        "before": before.isoformat(),
        "archive": archive.name,
        "sha256": digest.hexdigest(),
    }
    ctx = WriteContext(
        actor=actor, reason=f"retention: entries before {before.isoformat()} archived to {archive.name}"
    )
    ops = [Op("XTRIM", ns.audit, (cut,)), Op("SET", ns.audit_base, (f"{chain.seq}:{chain.prev_hash}",))]
    Writer(client).run(
        ns,
        lambda pipe: None,
        lambda state: Change(None, ops=ops, audit=[audit_entry(ctx, "audit.trim", after=summary)]),
    )
    _drop_from_indexes(client, ns, chain.seq)
    return TrimResult(count, last_id, archive, digest.hexdigest())


def _drop_from_indexes(client: redis.Redis, ns: EnvKeys, through_seq: int) -> None:
    """Index entries of the trimmed entries, scored by sequence number up to ``through_seq``
    (queries skip them anyway; this keeps the indexes small)."""
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=ns.audit_index("*", "*"), count=1000):
        pipe.zremrangebyscore(key, "-inf", through_seq)
    pipe.execute()
