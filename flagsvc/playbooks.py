"""Containment playbooks: named sets of flag changes, applied in one atomic step, reverted exactly.

A playbook is ``{description, changes: {flag: {enabled?, default_variant?}}}``. Applying it
writes every change, one environment version, a ``playbook.apply`` audit entry and one entry per
flag (all sharing an operation id), and records each flag's prior state - all in one commit, so
either all of it happens or none. Reverting restores the prior state of each flag that nobody
changed since, skips (and audits) the others.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from .commit import Committed, Committer, Conflict, Op, retry_on_conflict, utcnow_iso
from .errors import ProblemError, VersionMismatch
from .flags import Flag, WriteContext, definition_of, next_version
from .keys import EnvKeys
from .metrics import FLAG_CHANGES

CHANGEABLE = ("enabled", "default_variant")


class PlaybookNotFound(ProblemError):
    status, slug, title = 404, "playbook-not-found", "Playbook not found"


class PlaybookConflict(ProblemError):
    status, slug, title = 409, "playbook-conflict", "The playbook cannot be applied as it stands"


def playbooks_key(env: str) -> str:
    return f"{EnvKeys(env).base}:playbooks"


def applied_key(env: str, name: str) -> str:
    return f"{EnvKeys(env).base}:playbook-applied:{name}"


def _state(flag: Flag) -> dict[str, Any]:
    return {k: flag[k] for k in CHANGEABLE}


def _count(env: str, entries: list[dict[str, str]]) -> None:
    for entry in entries:
        FLAG_CHANGES.labels(env, entry["action"]).inc()


def _flag_action(before: Flag, after: Flag) -> str:
    if before["enabled"] and not after["enabled"]:
        return "flag.kill"
    if not before["enabled"] and after["enabled"]:
        return "flag.restore"
    return "flag.update"


@dataclass
class Outcome:
    """What an apply or revert did (or, with ``dry_run``, would do)."""

    operation: str
    playbook: str
    dry_run: bool
    env_version: int
    changed: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "playbook": self.playbook,
            "dry_run": self.dry_run,
            "env_version": self.env_version,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
        }


class PlaybookStore:
    """Playbooks of every environment, and their application state."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._committer = Committer(client)

    # -- definitions -----------------------------------------------------------------------------

    def list(self, env: str) -> list[dict[str, Any]]:
        raw = self._redis.hgetall(playbooks_key(env))
        applied = {n for n in raw if self._redis.exists(applied_key(env, n))}
        return [{**json.loads(v), "applied": n in applied} for n, v in sorted(raw.items())]

    def get(self, env: str, name: str) -> dict[str, Any]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(playbooks_key(env), name)
        pipe.get(applied_key(env, name))
        raw, applied = pipe.execute()
        if raw is None:
            raise PlaybookNotFound(f"playbook {name!r} does not exist in {env!r}")
        return {**json.loads(raw), "applied": json.loads(applied) if applied else None}

    def put(
        self, env: str, name: str, definition: dict[str, Any], ctx: WriteContext
    ) -> tuple[dict[str, Any], bool]:
        """Create or replace a playbook definition (audited); ``(record, created)``."""
        k = EnvKeys(env)

        def attempt() -> tuple[dict[str, Any], bool]:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(k.audit_head)
            pipe.hget(playbooks_key(env), name)
            head, raw = pipe.execute()
            before = json.loads(raw) if raw else None
            now = utcnow_iso()
            record = {
                "name": name,
                **definition,
                "version": (before["version"] if before else 0) + 1,
                "created_at": before["created_at"] if before else now,
                "updated_at": now,
                "updated_by": ctx.actor,
            }
            self._committer.commit(
                k,
                head,
                ops=[Op("HSET", playbooks_key(env), (name, json.dumps(record)))],
                audit={
                    "actor": ctx.actor,
                    "action": "playbook.update" if before else "playbook.create",
                    "playbook": name,
                    "before": json.dumps(before) if before else "",
                    "after": json.dumps(record),
                    "request_id": ctx.request_id,
                    "source": ctx.source,
                },
            )
            return record, before is None

        return retry_on_conflict(attempt)

    def delete(self, env: str, name: str, ctx: WriteContext) -> None:
        k = EnvKeys(env)

        def attempt() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(k.audit_head)
            pipe.hget(playbooks_key(env), name)
            pipe.exists(applied_key(env, name))
            head, raw, applied = pipe.execute()
            if raw is None:
                raise PlaybookNotFound(f"playbook {name!r} does not exist in {env!r}")
            if applied:
                raise PlaybookConflict(f"playbook {name!r} is applied: revert it before deleting it")
            self._committer.commit(
                k,
                head,
                ops=[Op("HDEL", playbooks_key(env), (name,))],
                audit={
                    "actor": ctx.actor,
                    "action": "playbook.delete",
                    "playbook": name,
                    "before": raw,
                    "request_id": ctx.request_id,
                    "source": ctx.source,
                },
            )

        retry_on_conflict(attempt)

    # -- apply and revert ------------------------------------------------------------------------

    def _read(
        self, env: str, name: str, flag_keys: list[str]
    ) -> tuple[Any, int, str | None, str | None, list]:
        k = EnvKeys(env)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(k.audit_head)
        pipe.get(k.version)
        pipe.hget(playbooks_key(env), name)
        pipe.get(applied_key(env, name))
        if flag_keys:
            pipe.hmget(k.flags, flag_keys)
        results = pipe.execute()
        head, version, raw, applied = results[:4]
        flags = results[4] if flag_keys else []
        return head, int(version or 0), raw, applied, flags

    def apply(
        self,
        env: str,
        name: str,
        ctx: WriteContext,
        *,
        dry_run: bool = False,
        if_match: int | None = None,
        revert_in: timedelta | None = None,
    ) -> Outcome:
        """Apply every change of ``name`` atomically, or nothing (409 naming what is in the way)."""
        k = EnvKeys(env)
        operation = uuid.uuid4().hex

        def attempt() -> Outcome:
            playbook = self.get(env, name)
            keys = sorted(playbook["changes"])
            head, version, raw, applied, raw_flags = self._read(env, name, keys)
            if raw is None or json.loads(raw)["version"] != playbook["version"]:
                raise Conflict("the playbook changed while it was read")
            if if_match is not None and playbook["version"] != if_match:
                raise VersionMismatch(
                    f"If-Match wants playbook version {if_match}, it is at {playbook['version']}"
                )
            if applied:
                info = json.loads(applied)
                raise PlaybookConflict(
                    f"playbook {name!r} is already applied (operation {info['operation']}, "
                    f"{info['applied_at']} by {info['applied_by']}); revert it first"
                )
            outcome = Outcome(operation, name, dry_run, version)
            problems, ops, entries, prior = [], [], [], {}
            now = utcnow_iso()
            for key, raw_flag in zip(keys, raw_flags, strict=True):
                flag = json.loads(raw_flag) if raw_flag else None
                if flag is None or flag.get("archived"):
                    problems.append(f"flag {key!r} does not exist")
                    continue
                change = playbook["changes"][key]
                if "default_variant" in change and change["default_variant"] not in flag["variants"]:
                    problems.append(f"flag {key!r} has no variant {change['default_variant']!r}")
                    continue
                definition = {**definition_of(flag), **change}
                if definition == definition_of(flag):
                    outcome.unchanged.append(key)
                    continue
                after = next_version(flag, change, ctx.actor, now)
                outcome.changed.append({"flag": key, "before": _state(flag), "after": _state(after)})
                prior[key] = {"before": _state(flag), "version_after": after["version"]}
                ops.append(Op("HSET", k.flags, (key, json.dumps(after))))
                entries.append(self._flag_entry(ctx, operation, name, flag, after, version + 1))
            if problems:
                raise PlaybookConflict("; ".join(problems) + ": nothing was applied")
            if dry_run:
                return outcome
            outcome.env_version = version + 1 if ops else version
            record = {
                "operation": operation,
                "applied_at": now,
                "applied_by": ctx.actor,
                "reason": ctx.reason,
                "incident": ctx.incident,
                "env_version": outcome.env_version,
                "flags": prior,
            }
            summary = {
                "actor": ctx.actor,
                "action": "playbook.apply",
                "playbook": name,
                "operation": operation,
                "after": json.dumps({"changed": outcome.changed, "unchanged": outcome.unchanged}),
                "reason": ctx.reason,
                "incident": ctx.incident,
                "request_id": ctx.request_id,
                "source": ctx.source,
                "env_version": str(outcome.env_version),
            }
            if revert_in is not None:
                due = datetime.now(UTC) + revert_in
                record["revert_at"] = due.isoformat(timespec="seconds").replace("+00:00", "Z")
                record["scheduled"] = json.dumps(
                    {
                        "id": uuid.uuid4().hex,
                        "kind": "playbook",
                        "playbook": name,
                        "operation": operation,
                        "original": {
                            "action": "playbook.apply",
                            "actor": ctx.actor,
                            "time": now,
                            "reason": ctx.reason,
                            "incident": ctx.incident,
                        },
                    }
                )
                ops.append(Op("ZADD", k.reverts, (str(due.timestamp()), record["scheduled"])))
            if ops:
                ops.append(Op("SET", k.version, (str(version + 1),)))
            ops.append(Op("SET", applied_key(env, name), (json.dumps(record),)))
            result = self._committer.commit(
                k,
                head,
                ops=ops,
                audit=[summary, *entries],
                notify=json.dumps({"env": env, "version": outcome.env_version, "playbook": name}),
            )
            assert isinstance(result, Committed)
            _count(env, entries)
            return outcome

        return retry_on_conflict(attempt)

    def revert(
        self,
        env: str,
        name: str,
        ctx: WriteContext,
        *,
        dry_run: bool = False,
        only_operation: str | None = None,
    ) -> Outcome:
        """Restore the prior state of every flag the apply changed and nobody changed since.

        ``only_operation``: revert only that application (a scheduled revert must not undo a
        later, manual re-application)."""
        k = EnvKeys(env)
        operation = uuid.uuid4().hex

        def attempt() -> Outcome:
            self.get(env, name)  # 404 for an unknown playbook
            head, version, _, applied, _ = self._read(env, name, [])
            if not applied:
                raise PlaybookConflict(f"playbook {name!r} is not applied")
            record = json.loads(applied)
            if only_operation is not None and record["operation"] != only_operation:
                raise PlaybookConflict(
                    f"playbook {name!r} was re-applied since (operation {record['operation']})"
                )
            keys = sorted(record["flags"])
            head, version, _, applied_again, raw_flags = self._read(env, name, keys)
            if applied_again != applied:
                raise Conflict("the playbook changed while it was read")
            outcome = Outcome(operation, name, dry_run, version)
            ops, entries, now = [], [], utcnow_iso()
            for key, raw_flag in zip(keys, raw_flags, strict=True):
                prior = record["flags"][key]
                flag = json.loads(raw_flag) if raw_flag else None
                if flag is None or flag.get("archived") or flag["version"] != prior["version_after"]:
                    have = (
                        "deleted" if flag is None or flag.get("archived") else f"at version {flag['version']}"
                    )
                    outcome.skipped.append(
                        {
                            "flag": key,
                            "reason": f"changed since the apply (expected version "
                            f"{prior['version_after']}, {have})",
                        }
                    )
                    continue
                after = next_version(flag, prior["before"], ctx.actor, now)
                outcome.changed.append({"flag": key, "before": _state(flag), "after": _state(after)})
                ops.append(Op("HSET", k.flags, (key, json.dumps(after))))
                entries.append(self._flag_entry(ctx, operation, name, flag, after, version + 1))
            if dry_run:
                return outcome
            outcome.env_version = version + 1 if ops else version
            summary = {
                "actor": ctx.actor,
                "action": "playbook.revert",
                "playbook": name,
                "operation": operation,
                "before": json.dumps({"applied_operation": record["operation"]}),
                "after": json.dumps({"reverted": outcome.changed, "skipped": outcome.skipped}),
                "reason": ctx.reason,
                "incident": ctx.incident or record.get("incident", ""),
                "request_id": ctx.request_id,
                "source": ctx.source,
                "env_version": str(outcome.env_version),
            }
            if ops:
                ops.append(Op("SET", k.version, (str(version + 1),)))
            ops.append(Op("DEL", applied_key(env, name), ()))
            if record.get("scheduled"):
                ops.append(Op("ZREM", k.reverts, (record["scheduled"],)))
            self._committer.commit(
                k,
                head,
                ops=ops,
                audit=[summary, *entries],
                notify=json.dumps({"env": env, "version": outcome.env_version, "playbook": name}),
            )
            _count(env, entries)
            return outcome

        return retry_on_conflict(attempt)

    @staticmethod
    def _flag_entry(
        ctx: WriteContext, operation: str, playbook: str, before: Flag, after: Flag, env_version: int
    ) -> dict[str, str]:
        return {
            "actor": ctx.actor,
            "action": _flag_action(before, after),
            "flag": before["key"],
            "before": json.dumps(before),
            "after": json.dumps(after),
            "reason": ctx.reason,
            "incident": ctx.incident,
            "request_id": ctx.request_id,
            "source": ctx.source,
            "env_version": str(env_version),
            "operation": operation,
            "playbook": playbook,
        }
