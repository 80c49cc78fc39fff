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
from datetime import timedelta
from typing import Any, Protocol

import redis

from .commit import Conflict, Op
from .errors import InvalidInput, ProblemError, VersionMismatch
from .flags import (
    Flag,
    bump_version,
    definition_of,
    flag_change,
    live_flag,
    next_version,
    parse_flag,
    switch_action,
)
from .keys import EnvKeys
from .reverts import revert_at, schedule
from .schemas import PLAYBOOK_ALERT_FIELDS
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

CHANGEABLE = ("enabled", "default_variant")
#: The fields of a playbook that its author defines (the alert fields: flagsvc.alerts).
DEFINITION_FIELDS = ("description", "changes", *PLAYBOOK_ALERT_FIELDS)


class PlaybookNotFound(ProblemError):
    status, slug, title = 404, "playbook-not-found", "Playbook not found"


class PlaybookConflict(ProblemError):
    status, slug, title = 409, "playbook-conflict", "The playbook cannot be applied as it stands"


class PlaybookNotApplied(ProblemError):
    status, slug, title = 409, "playbook-not-applied", "The playbook is not applied"


def _state(flag: Flag) -> dict[str, Any]:
    return {k: flag[k] for k in CHANGEABLE}


def playbook_record(
    name: str, definition: dict[str, Any], before: dict[str, Any] | None, actor: str, now: str
) -> dict[str, Any]:
    """The stored record of ``definition`` as the next version of ``before`` (or the first)."""
    return next_record({"name": name, **definition}, actor, now, version_of=before, created_of=before)


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(**data)


OUTCOME = Codec(encode=Outcome.to_dict, decode=Outcome.from_dict)
SAVED = Codec(
    encode=lambda r: {"record": r[0], "created": r[1]}, decode=lambda d: (d["record"], d["created"])
)


class ApplyGuard(Protocol):
    """What an automatic apply adds to the apply's own attempt (the alert receiver's cooldown and
    daily cap): reads, then writes and audit entries committed with the apply, or a refusal."""

    def read(self, pipe: Any) -> None:
        """Queue the reads, after the playbook's."""

    def decide(
        self, state: State, values: list[Any], playbook: dict[str, Any], outcome: Outcome
    ) -> Change[None]:
        """Raise to refuse (nothing written); else the ops and audit entries to commit with the
        apply's ``outcome`` (not on a dry run). ``values``: what :meth:`read` queued."""


@dataclass
class _Plan:
    """The flag writes of an apply or revert, as they are decided one flag at a time."""

    keys: EnvKeys
    ctx: WriteContext
    operation: str
    playbook: str
    state: State
    env_version: int
    outcome: Outcome
    ops: list[Op] = field(default_factory=list)
    entries: list[dict[str, str]] = field(default_factory=list)

    def write(self, flag: Flag, change: dict[str, Any]) -> Flag:
        """Give ``flag`` the ``change``, audited as part of this operation."""
        after = next_version(flag, change, self.ctx.actor, self.state.now)
        self.outcome.changed.append({"flag": flag["key"], "before": _state(flag), "after": _state(after)})
        op, entry = flag_change(
            self.keys, flag, after, self.ctx, switch_action(flag, after), self.env_version,
            operation=self.operation, playbook=self.playbook,
        )  # fmt: skip
        self.ops.append(op)
        self.entries.append(entry)
        return after

    def finish(self, summary: dict[str, str], *tail: Op) -> Change[Outcome]:
        """The commit: the flag writes, the new environment version if any, ``tail`` ops, and the
        ``summary`` entry before the flags' entries."""
        self.outcome.env_version = self.env_version if self.ops else self.env_version - 1
        summary["env_version"] = str(self.outcome.env_version)
        version = bump_version(self.keys, self.env_version) if self.ops else []
        return Change(
            self.outcome,
            ops=[*self.ops, *version, *tail],
            audit=[summary, *self.entries],
            notify={"env": self.keys.name, "version": self.outcome.env_version, "playbook": self.playbook},
        )


class PlaybookStore:
    """Playbooks of every environment, and their application state."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._writer = Writer(client)

    # -- definitions -----------------------------------------------------------------------------

    def list(self, env: str) -> list[dict[str, Any]]:
        k = EnvKeys(env)
        raw = self._redis.hgetall(k.playbooks)
        applied = {n for n in raw if self._redis.exists(k.playbook_applied(n))}
        return [{**json.loads(v), "applied": n in applied} for n, v in sorted(raw.items())]

    def get(self, env: str, name: str) -> dict[str, Any]:
        k = EnvKeys(env)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(k.playbooks, name)
        pipe.get(k.playbook_applied(name))
        raw, applied = pipe.execute()
        if raw is None:
            raise PlaybookNotFound(f"playbook {name!r} does not exist in {env!r}")
        return {**json.loads(raw), "applied": json.loads(applied) if applied else None}

    def put(
        self,
        env: str,
        name: str,
        definition: dict[str, Any],
        ctx: WriteContext,
        *,
        idempotency: IdempotencyRequest | None = None,
    ) -> Done[tuple[dict[str, Any], bool]]:
        """Create or replace a playbook definition (audited); ``(record, created)``, the record
        with its current application, if any. Every flag it names must exist, with every variant
        it names (422 naming the change at fault): found now, not when applied in an incident."""
        k = EnvKeys(env)
        flag_keys = sorted(definition["changes"])

        def read(pipe: Any) -> None:
            pipe.hget(k.playbooks, name)
            pipe.get(k.playbook_applied(name))
            pipe.hmget(k.flags, flag_keys)

        def decide(state: State) -> Change[tuple[dict[str, Any], bool]]:
            raw, applied, raw_flags = state.values
            _check_changes(definition["changes"], dict(zip(flag_keys, raw_flags, strict=True)))
            before = json.loads(raw) if raw else None
            record = playbook_record(name, definition, before, ctx.actor, state.now)
            action = "playbook.update" if before else "playbook.create"
            shown = {**record, "applied": json.loads(applied) if applied else None}
            return Change(
                (shown, before is None),
                ops=[Op("HSET", k.playbooks, (name, json.dumps(record)))],
                audit=[audit_entry(ctx, action, playbook=name, before=before, after=record)],
            )

        return self._writer.run(k, read, decide, idempotency=idempotency, codec=SAVED)

    def delete(
        self, env: str, name: str, ctx: WriteContext, *, idempotency: IdempotencyRequest | None = None
    ) -> Done[None]:
        """Delete a playbook that is not applied (audited)."""
        k = EnvKeys(env)

        def read(pipe: Any) -> None:
            pipe.hget(k.playbooks, name)
            pipe.exists(k.playbook_applied(name))

        def decide(state: State) -> Change[None]:
            raw, applied = state.values
            if raw is None:
                raise PlaybookNotFound(f"playbook {name!r} does not exist in {env!r}")
            if applied:
                raise PlaybookConflict(f"playbook {name!r} is applied: revert it before deleting it")
            entry = audit_entry(ctx, "playbook.delete", playbook=name, before=json.loads(raw))
            return Change(None, ops=[Op("HDEL", k.playbooks, (name,))], audit=[entry])

        return self._writer.run(k, read, decide, idempotency=idempotency)

    # -- apply and revert ------------------------------------------------------------------------

    def apply(
        self,
        env: str,
        name: str,
        ctx: WriteContext,
        *,
        dry_run: bool = False,
        if_match: int | None = None,
        revert_in: timedelta | None = None,
        idempotency: IdempotencyRequest | None = None,
        guard: ApplyGuard | None = None,
    ) -> Done[Outcome]:
        """Apply every change of ``name`` atomically, or nothing (409 naming what is in the way);
        ``guard`` may refuse it, and commits its writes with it."""
        k = EnvKeys(env)
        operation = uuid.uuid4().hex
        seen: dict[str, Any] = {}

        def read(pipe: Any) -> None:
            seen["playbook"] = playbook = self.get(env, name)  # which flags to read
            _read_playbook(pipe, k, name, sorted(playbook["changes"]))
            if guard is not None:
                guard.read(pipe)

        def decide(state: State) -> Change[Outcome]:
            playbook = seen["playbook"]
            version, raw, applied, flags = _unpack(state)
            if raw is None or json.loads(raw)["version"] != playbook["version"]:
                raise Conflict("the playbook changed while it was read")
            _check_applicable(name, playbook, applied, if_match)
            plan = _Plan(
                k, ctx, operation, name, state, version + 1, Outcome(operation, name, dry_run, version)
            )
            prior = _plan_apply(plan, playbook["changes"], flags)
            extra = None
            if guard is not None:  # its values follow _read_playbook's (flags: if any change)
                extra = guard.decide(
                    state, state.values[3 + bool(playbook["changes"]) :], playbook, plan.outcome
                )
            if dry_run:
                return Change(plan.outcome)
            change = _finish_apply(plan, prior, revert_in)
            if extra is None:
                return change
            ops, audit = [*change.ops, *extra.ops], [*change.audit, *extra.audit]
            return Change(change.result, ops=ops, audit=audit, notify=change.notify)

        return self._writer.run(k, read, decide, idempotency=idempotency, codec=OUTCOME)

    def revert(
        self,
        env: str,
        name: str,
        ctx: WriteContext,
        *,
        dry_run: bool = False,
        only_operation: str | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> Done[Outcome]:
        """Restore the prior state of every flag the apply changed and nobody changed since.

        ``only_operation``: revert only that application (a scheduled revert must not undo a
        later, manual re-application)."""
        k = EnvKeys(env)
        operation = uuid.uuid4().hex
        seen: dict[str, Any] = {}

        def read(pipe: Any) -> None:
            seen["applied"] = applied = self.get(env, name)["applied"]  # 404 for an unknown playbook
            _read_playbook(pipe, k, name, sorted(applied["flags"]) if applied else [])

        def decide(state: State) -> Change[Outcome]:
            version, _, raw_applied, flags = _unpack(state)
            applied = seen["applied"]
            if applied is None:
                raise PlaybookNotApplied(f"playbook {name!r} is not applied: there is nothing to revert")
            if raw_applied is None or json.loads(raw_applied) != applied:
                raise Conflict("the playbook's application changed while it was read")
            if only_operation is not None and applied["operation"] != only_operation:
                raise PlaybookNotApplied(
                    f"playbook {name!r} was re-applied since (operation {applied['operation']})"
                )
            plan = _Plan(
                k, ctx, operation, name, state, version + 1, Outcome(operation, name, dry_run, version)
            )
            _plan_revert(plan, applied["flags"], flags)
            if dry_run:
                return Change(plan.outcome)
            return _finish_revert(plan, applied)

        return self._writer.run(k, read, decide, idempotency=idempotency, codec=OUTCOME)


def _read_playbook(pipe: Any, k: EnvKeys, name: str, flag_keys: list[str]) -> None:
    pipe.get(k.version)
    pipe.hget(k.playbooks, name)
    pipe.get(k.playbook_applied(name))
    if flag_keys:
        pipe.hmget(k.flags, flag_keys)


def _unpack(state: State) -> tuple[int, str | None, str | None, list[str | None]]:
    """The environment version, the playbook, its application and the flags of ``_read_playbook``."""
    version, raw, applied, *rest = state.values
    return int(version or 0), raw, applied, rest[0] if rest else []


def change_problem(key: str, change: dict[str, Any], flag: Flag | None) -> tuple[str, str] | None:
    """``(field, message)`` if ``change`` cannot apply to ``flag`` (missing, archived, or without
    the variant named), else ``None``."""
    if flag is None:
        return f"changes.{key}", f"flag {key!r} does not exist"
    if "default_variant" in change and change["default_variant"] not in flag["variants"]:
        variants = ", ".join(sorted(flag["variants"]))
        return (
            f"changes.{key}.default_variant",
            f"flag {key!r} has no variant {change['default_variant']!r} (it has {variants})",
        )
    return None


def _check_changes(changes: dict[str, Any], raw_flags: dict[str, str | None]) -> None:
    """422 unless each changed flag exists (not archived) and has the default variant named."""
    errors = []
    for key, change in sorted(changes.items()):
        problem = change_problem(key, change, live_flag(parse_flag(raw_flags[key])))
        if problem is not None:
            field, message = problem
            errors.append({"field": field, "location": "body", "message": message})
    if errors:
        raise InvalidInput("; ".join(e["message"] for e in errors), errors=errors)


def _check_applicable(name: str, playbook: dict[str, Any], applied: str | None, if_match: int | None) -> None:
    if if_match is not None and playbook["version"] != if_match:
        raise VersionMismatch(f"If-Match wants playbook version {if_match}, it is at {playbook['version']}")
    if applied:
        info = json.loads(applied)
        raise PlaybookConflict(
            f"playbook {name!r} is already applied (operation {info['operation']}, "
            f"{info['applied_at']} by {info['applied_by']}); revert it first"
        )


def _plan_apply(plan: _Plan, changes: dict[str, Any], raw_flags: list[str | None]) -> dict[str, Any]:
    """Decide each flag's change; the prior state of each changed flag (what a revert restores).
    Raises 409, nothing applied, if any flag is missing or lacks a variant."""
    problems, prior = [], {}
    for key, raw in zip(sorted(changes), raw_flags, strict=True):
        flag, change = live_flag(parse_flag(raw)), changes[key]
        problem = change_problem(key, change, flag)
        if problem is not None:
            problems.append(problem[1])
            continue
        assert flag is not None  # a missing flag is a problem
        if {**definition_of(flag), **change} == definition_of(flag):
            plan.outcome.unchanged.append(key)
        else:
            after = plan.write(flag, change)
            prior[key] = {"before": _state(flag), "version_after": after["version"]}
    if problems:
        raise PlaybookConflict("; ".join(problems) + ": nothing was applied")
    return prior


def _finish_apply(plan: _Plan, prior: dict[str, Any], revert_in: timedelta | None) -> Change[Outcome]:
    """The commit of an apply: its flag writes, its application record, its scheduled revert."""
    ctx, outcome = plan.ctx, plan.outcome
    record: dict[str, Any] = {
        "operation": plan.operation,
        "applied_at": plan.state.now,
        "applied_by": ctx.actor,
        "reason": ctx.reason,
        "incident": ctx.incident,
        "flags": prior,
    }
    tail = []
    if revert_in is not None:
        due, record["revert_at"] = revert_at(plan.state, revert_in)
        op, record["scheduled"] = schedule(
            plan.keys, due, ctx, "playbook.apply", plan.state,
            kind="playbook", playbook=plan.playbook, operation=plan.operation,
        )  # fmt: skip
        tail.append(op)
    summary = audit_entry(
        ctx, "playbook.apply", playbook=plan.playbook, operation=plan.operation,
        after={"changed": outcome.changed, "unchanged": outcome.unchanged},
    )  # fmt: skip
    change = plan.finish(summary, *tail)
    record["env_version"] = outcome.env_version
    applied = Op("SET", plan.keys.playbook_applied(plan.playbook), (json.dumps(record),))
    return Change(change.result, ops=[*change.ops, applied], audit=change.audit, notify=change.notify)


def _plan_revert(plan: _Plan, prior: dict[str, Any], raw_flags: list[str | None]) -> None:
    """Restore each flag nobody changed since the apply; skip the others, saying why."""
    for key, raw in zip(sorted(prior), raw_flags, strict=True):
        flag = live_flag(parse_flag(raw))
        expected = prior[key]["version_after"]
        if flag is None or flag["version"] != expected:
            have = "deleted" if flag is None else f"at version {flag['version']}"
            plan.outcome.skipped.append(
                {"flag": key, "reason": f"changed since the apply (expected version {expected}, {have})"}
            )
        else:
            plan.write(flag, prior[key]["before"])


def _finish_revert(plan: _Plan, applied: dict[str, Any]) -> Change[Outcome]:
    """The commit of a revert: its flag writes, the end of the application, its revert unscheduled."""
    outcome, k = plan.outcome, plan.keys
    summary = audit_entry(
        plan.ctx, "playbook.revert", playbook=plan.playbook, operation=plan.operation,
        before={"applied_operation": applied["operation"]},
        after={"reverted": outcome.changed, "skipped": outcome.skipped},
        incident=plan.ctx.incident or applied.get("incident", ""),
    )  # fmt: skip
    tail = [Op("DEL", k.playbook_applied(plan.playbook), ())]
    if applied.get("scheduled"):
        tail.append(Op("ZREM", k.reverts, (applied["scheduled"],)))
    return plan.finish(summary, *tail)
