"""The flag store: flags of each environment in Redis, every write atomic and audited."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from .commit import Conflict, Op
from .errors import FlagNotFound, VersionMismatch
from .keys import EnvKeys
from .reverts import revert_at, schedule
from .writes import (
    Change,
    Codec,
    Done,
    IdempotencyRequest,
    State,
    WriteContext,
    Writer,
    audit_entry,
    next_record,
)

#: What an SDK needs to evaluate a flag (with its version): what the snapshot carries.
RULE_FIELDS = ("kind", "type", "enabled", "variants", "default_variant", "off_variant", "rules", "salt")
#: Fields a client defines; everything else on a flag is owned by the server.
DEFINITION_FIELDS = (*RULE_FIELDS, "description", "owner", "tags")
#: Fields of the snapshot.
EVALUATION_FIELDS = (*RULE_FIELDS, "version")
#: Kill switches first, then the other kinds, everywhere flags are listed.
KIND_ORDER = {"kill_switch": 0, "ops": 1, "release": 2, "experiment": 3}

Flag = dict[str, Any]


NO_HISTORY = "0" * 12


def history_of(mark: str | None) -> str:
    """The history part of a snapshot's identity, from a version mark ``<seq>:<hash>``."""
    return mark.partition(":")[2][:12] if mark else NO_HISTORY


def sort_flags(flags: list[Flag]) -> list[Flag]:
    return sorted(flags, key=lambda f: (KIND_ORDER.get(f["kind"], 9), f["key"]))


def definition_of(flag: Flag) -> Flag:
    return {k: flag[k] for k in DEFINITION_FIELDS if k in flag}


def new_record(
    key: str, definition: Flag, stored: Flag | None, actor: str, now: str, archived: bool = False
) -> Flag:
    """The stored record of ``definition`` as the next version of ``stored`` (the flag as it is
    in Redis, archived or not, or ``None``); a flag re-created after its archive starts anew."""
    record = next_record(
        {"key": key, **definition}, actor, now, version_of=stored, created_of=live_flag(stored)
    )
    return {**record, "archived": archived}


def next_version(flag: Flag, change: Flag, actor: str, now: str) -> Flag:
    """``flag`` with ``change`` applied, as its next version. A pending ``revert_at`` no longer
    applies: the scheduled revert will find the flag changed and skip."""
    after = {k: v for k, v in flag.items() if k != "revert_at"}
    after.update(change, version=flag["version"] + 1, updated_at=now, updated_by=actor)
    return after


def live_flag(stored: Flag | None) -> Flag | None:
    """``stored`` unless it is absent or archived."""
    return stored if stored and not stored.get("archived") else None


def parse_flag(raw: str | None) -> Flag | None:
    return json.loads(raw) if raw else None


def switch_action(before: Flag | None, after: Flag) -> str:
    """The audit action of a change from ``before`` to ``after`` that is not a create or delete."""
    if before is not None and before["enabled"] and not after["enabled"]:
        return "flag.kill"
    if before is not None and not before["enabled"] and after["enabled"]:
        return "flag.restore"
    return "flag.update"


def flag_change(
    keys: EnvKeys,
    before: Flag | None,
    after: Flag,
    ctx: WriteContext,
    action: str,
    env_version: int,
    **extra: str,
) -> tuple[Op, dict[str, str]]:
    """The one way a flag changes: the write of its next record ``after`` and the audit entry of
    the change from ``before`` (the live flag, or ``None``). ``extra``: operation, playbook, reason."""
    op = Op(
        "FLAG",
        keys.flags,
        (after["key"], json.dumps(after), snapshot_member(after)),
        also=(keys.snapshot_flags,),
    )
    entry = audit_entry(
        ctx, action, flag=after["key"], before=before, after=after, env_version=env_version, **extra
    )
    return op, entry


def bump_version(keys: EnvKeys, env_version: int) -> list[Op]:
    """The environment's new version, set in the commit of its flag changes, its mark, and its
    serialized snapshot (built by the commit from every flag's :func:`snapshot_member`)."""
    return [
        Op("SET", keys.version, (str(env_version),)),
        Op("SETHEAD", keys.version_mark, ()),
        Op(
            "SNAPSHOT",
            keys.snapshot,
            (snapshot_prefix(keys.name, env_version),),
            also=(keys.snapshot_flags, keys.flags),
        ),
    ]


def evaluation_fields(flag: Flag) -> Flag:
    """What the snapshot carries of a flag."""
    return {f: flag[f] for f in EVALUATION_FIELDS if f in flag}


def snapshot_member(flag: Flag) -> str:
    """The flag's member of the serialized snapshot, after its kind's rank (the order of members):
    ``<rank>|"<key>":{...}``; ``""`` for an archived flag, which the snapshot leaves out."""
    if flag.get("archived"):
        return ""
    member = json.dumps({flag["key"]: evaluation_fields(flag)}, separators=(",", ":"))[1:-1]
    return f"{KIND_ORDER.get(flag['kind'], 9)}|{member}"


def snapshot_prefix(env: str, version: int) -> str:
    """The serialized snapshot up to its history (the commit appends the history and the flags)."""
    return json.dumps({"env": env, "version": version}, separators=(",", ":"))[:-1] + ',"history":"'


def serialize_snapshot(snap: Snapshot) -> bytes:
    """The bytes SDKs read, as the commit builds them (``commit.lua``; flags of one kind may come
    in another order there: Redis compares keys in its own locale)."""
    return json.dumps(snap.to_dict(), separators=(",", ":")).encode()


@dataclass(frozen=True)
class Mutation:
    """What a write does to a flag: ``definition`` is the new one, ``None`` means no change."""

    action: str
    definition: Flag | None
    archived: bool = False


def switch(env: str, key: str, action: str, enabled: bool) -> Callable[[Flag | None], Mutation]:
    """The mutation of a kill (``enabled=False``) or a restore: no change if already so; 404 if
    the flag does not exist. The API and the console both switch flags with it."""

    def mutate(current: Flag | None) -> Mutation:
        if current is None:
            raise FlagNotFound(f"flag {key!r} does not exist in {env!r}")
        definition = definition_of(current)
        if definition["enabled"] is enabled:
            return Mutation(action, None)
        return Mutation(action, {**definition, "enabled": enabled})

    return mutate


@dataclass(frozen=True)
class WriteResult:
    flag: Flag
    changed: bool
    created: bool = False
    #: The environment version that includes this write (what SDKs must apply); 0 if unknown.
    env_version: int = 0


#: How a write's result is kept in its idempotency record.
WRITE_RESULT = Codec(
    encode=lambda r: {
        "flag": r.flag,
        "changed": r.changed,
        "created": r.created,
        "env_version": r.env_version,
    },
    decode=lambda d: WriteResult(d["flag"], d["changed"], d["created"], env_version=d.get("env_version", 0)),
)


@dataclass(frozen=True)
class Snapshot:
    env: str
    version: int
    flags: dict[str, Flag]
    #: The first 12 hex digits of the audit hash where the version last moved: a version number
    #: reused after a rollback of Redis comes with another history.
    history: str = NO_HISTORY
    #: The audit head (``<seq>:<hash>``) read with it.
    head: str = ""

    @property
    def identity(self) -> str:
        """``<version>-<history>``: the snapshot's ETag and event id."""
        return f"{self.version}-{self.history}"

    def to_dict(self) -> dict[str, Any]:
        return {"env": self.env, "version": self.version, "history": self.history, "flags": self.flags}


class FlagStore:
    """Flags of every environment. Reads are plain; writes go through :class:`~flagsvc.writes.Writer`."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._writer = Writer(client)

    # -- reads -------------------------------------------------------------------------------

    def list(self, env: str, *, include_archived: bool = False) -> list[Flag]:
        raw = self._redis.hvals(EnvKeys(env).flags)
        flags = [json.loads(r) for r in raw]
        return sort_flags([f for f in flags if include_archived or not f.get("archived")])

    def get(self, env: str, key: str, *, include_archived: bool = False) -> Flag:
        raw = self._redis.hget(EnvKeys(env).flags, key)
        flag = json.loads(raw) if raw else None
        if flag is None or (flag.get("archived") and not include_archived):
            raise FlagNotFound(f"flag {key!r} does not exist in {env!r}")
        return flag

    def version(self, env: str) -> int:
        return int(self._redis.get(EnvKeys(env).version) or 0)

    def serialized_snapshot(self, env: str) -> bytes | None:
        """The snapshot as the last commit stored it, in one GET; ``None``: :meth:`rebuild_snapshot`."""
        raw = self._redis.get(EnvKeys(env).snapshot)
        return raw.encode() if isinstance(raw, str) else raw

    def rebuild_snapshot(self, env: str) -> Snapshot:
        """The environment's version and the evaluation fields of its live flags, consistently, read
        from the flags; also stored (with every flag's member) for the next reads and commits,
        unless something changed meanwhile. Needed once, for flags older than stored snapshots."""
        k = EnvKeys(env)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(k.version)
        pipe.get(k.version_mark)
        pipe.get(k.audit_head)
        pipe.hvals(k.flags)
        version, mark, head, raw = pipe.execute()
        stored = [json.loads(r) for r in raw]
        live = {f["key"]: evaluation_fields(f) for f in sort_flags(stored) if not f.get("archived")}
        snap = Snapshot(env, int(version or 0), live, history_of(mark), head or "")
        ops = [
            Op("DEL", k.snapshot_flags, ()),
            *(Op("HSET", k.snapshot_flags, (f["key"], snapshot_member(f))) for f in stored),
            Op("SET", k.snapshot, (serialize_snapshot(snap).decode(),)),
        ]
        if stored:  # an empty environment's first commit stores its snapshot
            with contextlib.suppress(Conflict):  # a commit came in between: it stored its own
                self._writer.committer.commit(k, head, ops=ops, audit=[])
        return snap

    # -- writes ------------------------------------------------------------------------------

    def write(
        self,
        env: str,
        key: str,
        mutate: Callable[[Flag | None], Mutation],
        ctx: WriteContext,
        *,
        if_match: int | None = None,
        if_none_match_any: bool = False,
        idempotency: IdempotencyRequest | None = None,
        revert_in: timedelta | None = None,
    ) -> Done[WriteResult]:
        """Apply ``mutate`` to the current flag (``None`` if absent or archived) atomically.

        ``revert_in`` makes the change temporary: the flag gets ``revert_at`` and a revert is
        scheduled in the same commit (see :mod:`flagsvc.scheduler`).

        ``if_match`` is the flag version the caller last saw (412 if it moved);
        ``if_none_match_any`` makes the write create-only. With ``idempotency``, a retry of
        the same request replays the first result without a second change.
        """
        k = EnvKeys(env)

        def read(pipe: Any) -> None:
            pipe.get(k.version)
            pipe.hget(k.flags, key)

        def decide(state: State) -> Change[WriteResult]:
            version, raw = int(state.values[0] or 0), state.values[1]
            stored = parse_flag(raw)
            live = live_flag(stored)
            _check_preconditions(key, live, if_match, if_none_match_any)
            mutation = mutate(live)
            if _is_noop(live, mutation):
                assert live is not None, "a no-op needs an existing flag"
                return Change(WriteResult(live, changed=False, env_version=version))
            return _flag_write(k, key, stored, mutation, ctx, state, version + 1, revert_in)

        return self._writer.run(k, read, decide, idempotency=idempotency, codec=WRITE_RESULT)


def _check_preconditions(key: str, live: Flag | None, if_match: int | None, if_none_match_any: bool) -> None:
    if if_match is not None and (live is None or live["version"] != if_match):
        have = live["version"] if live else "none"
        raise VersionMismatch(f"If-Match wants version {if_match}, the flag is at {have}")
    if if_none_match_any and live is not None:
        raise VersionMismatch(f"If-None-Match: * but flag {key!r} exists")


def _is_noop(live: Flag | None, mutation: Mutation) -> bool:
    if mutation.definition is None:
        return True
    return live is not None and not mutation.archived and definition_of(live) == mutation.definition


def _flag_write(
    k: EnvKeys,
    key: str,
    stored: Flag | None,
    mutation: Mutation,
    ctx: WriteContext,
    state: State,
    env_version: int,
    revert_in: timedelta | None,
) -> Change[WriteResult]:
    """The commit of one flag's next record; temporary (``revert_in``) when it has a live flag."""
    assert mutation.definition is not None
    live = live_flag(stored)
    flag = new_record(key, mutation.definition, stored, ctx.actor, state.now, mutation.archived)
    ops = []
    if revert_in is not None and live is not None:
        due, flag["revert_at"] = revert_at(state, revert_in)
        op, _ = schedule(
            k, due, ctx, mutation.action, state,
            kind="flag", flag=key, restore={"enabled": live["enabled"]}, expect_version=flag["version"],
        )  # fmt: skip
        ops.append(op)
    write, entry = flag_change(k, live, flag, ctx, mutation.action, env_version)
    return Change(
        WriteResult(flag, changed=True, created=live is None, env_version=env_version),
        ops=[write, *bump_version(k, env_version), *ops],
        audit=[entry],
        notify={"env": k.name, "version": env_version, "flag": key, "action": mutation.action},
    )
