"""The flag store: flags of each environment in Redis, every write atomic and audited."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from .commit import Committed, Committer, Idempotency, Op, Replayed, retry_on_conflict, utcnow_iso
from .errors import FlagNotFound, IdempotencyKeyReused, VersionMismatch
from .keys import EnvKeys
from .metrics import FLAG_CHANGES

#: Fields a client defines; everything else on a flag is owned by the server.
DEFINITION_FIELDS = (
    "kind",
    "type",
    "enabled",
    "variants",
    "default_variant",
    "off_variant",
    "rules",
    "salt",
    "description",
    "owner",
    "tags",
)
#: Fields an SDK needs to evaluate a flag: what the snapshot carries.
EVALUATION_FIELDS = (
    "kind",
    "type",
    "enabled",
    "variants",
    "default_variant",
    "off_variant",
    "rules",
    "salt",
    "version",
)
#: Kill switches first, then the other kinds, everywhere flags are listed.
KIND_ORDER = {"kill_switch": 0, "ops": 1, "release": 2, "experiment": 3}

Flag = dict[str, Any]


def sort_flags(flags: list[Flag]) -> list[Flag]:
    return sorted(flags, key=lambda f: (KIND_ORDER.get(f["kind"], 9), f["key"]))


def definition_of(flag: Flag) -> Flag:
    return {k: flag[k] for k in DEFINITION_FIELDS if k in flag}


def new_record(
    key: str, definition: Flag, stored: Flag | None, actor: str, now: str, archived: bool = False
) -> Flag:
    """The stored record of ``definition`` as the next version of ``stored`` (the flag as it is
    in Redis, archived or not, or ``None``)."""
    live = stored if stored and not stored.get("archived") else None
    return {
        "key": key,
        **definition,
        "version": (stored["version"] if stored else 0) + 1,
        "created_at": live["created_at"] if live else now,
        "updated_at": now,
        "updated_by": actor,
        "archived": archived,
    }


def next_version(flag: Flag, change: Flag, actor: str, now: str) -> Flag:
    """``flag`` with ``change`` applied, as its next version. A pending ``revert_at`` no longer
    applies: the scheduled revert will find the flag changed and skip."""
    after = {k: v for k, v in flag.items() if k != "revert_at"}
    after.update(change, version=flag["version"] + 1, updated_at=now, updated_by=actor)
    return after


@dataclass(frozen=True)
class Mutation:
    """What a write does to a flag: ``definition`` is the new one, ``None`` means no change."""

    action: str
    definition: Flag | None
    archived: bool = False


@dataclass(frozen=True)
class WriteContext:
    """Who writes, from where and why: what the audit entry records."""

    actor: str
    source: str = ""
    request_id: str = ""
    reason: str = ""
    incident: str = ""


@dataclass(frozen=True)
class IdempotencyRequest:
    key: str
    fingerprint: str
    ttl: int


@dataclass(frozen=True)
class WriteResult:
    flag: Flag
    changed: bool
    created: bool = False
    replayed: bool = False
    #: The environment version that includes this write (what SDKs must apply); 0 if unknown.
    env_version: int = 0


@dataclass(frozen=True)
class Snapshot:
    env: str
    version: int
    flags: dict[str, Flag]

    def to_dict(self) -> dict[str, Any]:
        return {"env": self.env, "version": self.version, "flags": self.flags}


class FlagStore:
    """Flags of every environment. Reads are plain; writes go through :class:`Committer`."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._committer = Committer(client)

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

    def snapshot(self, env: str) -> Snapshot:
        """The environment's version and the evaluation fields of its live flags, consistently."""
        k = EnvKeys(env)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(k.version)
        pipe.hvals(k.flags)
        version, raw = pipe.execute()
        flags: dict[str, Flag] = {}
        for flag in sort_flags([json.loads(r) for r in raw]):
            if not flag.get("archived"):
                flags[flag["key"]] = {f: flag[f] for f in EVALUATION_FIELDS if f in flag}
        return Snapshot(env, int(version or 0), flags)

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
    ) -> WriteResult:
        """Apply ``mutate`` to the current flag (``None`` if absent or archived) atomically.

        ``revert_in`` makes the change temporary: the flag gets ``revert_at`` and a revert is
        scheduled in the same commit (see :mod:`flagsvc.scheduler`).

        ``if_match`` is the flag version the caller last saw (412 if it moved);
        ``if_none_match_any`` makes the write create-only. With ``idempotency``, a retry of
        the same request replays the first result without a second change.
        """
        k = EnvKeys(env)
        if idempotency:
            prior = self._redis.get(idempotency.key)
            if prior:
                return self._replay(prior, idempotency)

        def attempt() -> WriteResult:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(k.audit_head)
            pipe.get(k.version)
            pipe.hget(k.flags, key)
            head, version, raw = pipe.execute()
            stored = json.loads(raw) if raw else None
            live = stored if stored and not stored.get("archived") else None
            if if_match is not None and (live is None or live["version"] != if_match):
                have = live["version"] if live else "none"
                raise VersionMismatch(f"If-Match wants version {if_match}, the flag is at {have}")
            if if_none_match_any and live is not None:
                raise VersionMismatch(f"If-None-Match: * but flag {key!r} exists")
            mutation = mutate(live)
            if mutation.definition is None or (
                live is not None and not mutation.archived and definition_of(live) == mutation.definition
            ):
                assert live is not None, "a no-op needs an existing flag"
                return self._remember_noop(live, idempotency, int(version or 0))
            now = utcnow_iso()
            flag = new_record(key, mutation.definition, stored, ctx.actor, now, mutation.archived)
            env_version = int(version or 0) + 1
            ops = [
                Op("HSET", k.flags, (key, json.dumps(flag))),
                Op("SET", k.version, (str(env_version),)),
            ]
            if revert_in is not None and live is not None:
                due = datetime.now(UTC) + revert_in
                flag["revert_at"] = due.isoformat(timespec="seconds").replace("+00:00", "Z")
                ops[0] = Op("HSET", k.flags, (key, json.dumps(flag)))
                scheduled = {
                    "id": uuid.uuid4().hex,
                    "kind": "flag",
                    "flag": key,
                    "restore": {"enabled": live["enabled"]},
                    "expect_version": flag["version"],
                    "original": {"action": mutation.action, "actor": ctx.actor, "time": now,
                                 "reason": ctx.reason, "incident": ctx.incident},
                }  # fmt: skip
                ops.append(Op("ZADD", k.reverts, (str(due.timestamp()), json.dumps(scheduled))))
            result = WriteResult(flag, changed=True, created=live is None, env_version=env_version)
            idem = None
            if idempotency:
                idem = Idempotency(idempotency.key, self._idem_value(idempotency, result), idempotency.ttl)
            outcome = self._committer.commit(
                k,
                head,
                ops=ops,
                audit={
                    "actor": ctx.actor,
                    "action": mutation.action,
                    "flag": key,
                    "before": json.dumps(live) if live else "",
                    "after": json.dumps(flag),
                    "reason": ctx.reason,
                    "incident": ctx.incident,
                    "request_id": ctx.request_id,
                    "source": ctx.source,
                    "env_version": str(env_version),
                },
                idempotency=idem,
                notify=json.dumps(
                    {"env": env, "version": env_version, "flag": key, "action": mutation.action}
                ),
            )
            if isinstance(outcome, Replayed):
                assert idempotency is not None
                return self._replay(outcome.value, idempotency)
            assert isinstance(outcome, Committed)
            FLAG_CHANGES.labels(env, mutation.action).inc()
            return result

        return retry_on_conflict(attempt)

    # -- idempotency -------------------------------------------------------------------------

    @staticmethod
    def _idem_value(idempotency: IdempotencyRequest, result: WriteResult) -> str:
        return json.dumps(
            {
                "fingerprint": idempotency.fingerprint,
                "flag": result.flag,
                "changed": result.changed,
                "created": result.created,
                "env_version": result.env_version,
            }
        )

    @staticmethod
    def _replay(stored: str, idempotency: IdempotencyRequest) -> WriteResult:
        record = json.loads(stored)
        if record["fingerprint"] != idempotency.fingerprint:
            raise IdempotencyKeyReused("this Idempotency-Key was used for a different request; use a new key")
        return WriteResult(
            record["flag"],
            record["changed"],
            record["created"],
            replayed=True,
            env_version=record.get("env_version", 0),
        )

    def _remember_noop(
        self, live: Flag, idempotency: IdempotencyRequest | None, env_version: int
    ) -> WriteResult:
        result = WriteResult(live, changed=False, env_version=env_version)
        if idempotency:
            value = self._idem_value(idempotency, result)
            if not self._redis.set(idempotency.key, value, nx=True, ex=idempotency.ttl):
                prior = self._redis.get(idempotency.key)
                if prior:
                    return self._replay(prior, idempotency)
        return result
