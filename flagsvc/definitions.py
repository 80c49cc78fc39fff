"""Flags as code: an environment's flags and playbooks as one declarative document.

``export_env`` writes the document in its canonical form (defaults left out, fields in schema
order), so that a file applied to an empty environment exports back byte for byte.
``apply_definitions`` makes an environment hold a document: it plans every difference, field by
field, and commits the plan in one audited write, or (``dry_run``) only answers it. Applying a
file never undoes containment: a flag's on/off state, a flag an applied playbook holds, a pending
temporary change and an applied playbook are left alone, and the plan says so.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from marshmallow import ValidationError

from .commit import Conflict, Op
from .envs import EnvStore
from .errors import InvalidInput, ProblemError, flatten_validation_messages
from .flags import (
    DEFINITION_FIELDS,
    Flag,
    bump_version,
    definition_of,
    flag_change,
    live_flag,
    new_record,
)
from .keys import EnvKeys
from .playbooks import DEFINITION_FIELDS as PLAYBOOK_FIELDS
from .playbooks import change_problem, playbook_record
from .schemas import (
    BOOLEAN_VARIANTS,
    FLAG_KEY,
    PLAYBOOK_ALERT_DEFAULTS,
    FlagDefinitionSchema,
    PlaybookDefinitionSchema,
)
from .writes import Change, Codec, Done, IdempotencyRequest, State, WriteContext, Writer, audit_entry

FORMAT = "flagsvc/1"
#: Also read: what ``flagsvc export`` wrote before flags as code.
_OLD_FORMATS = ("flagsvc-export/1",)
#: Fields a backup (``flagsvc export``) adds, ignored when a document is applied.
METADATA_FIELDS = ("env", "env_version", "exported_at")
_DOCUMENT_FIELDS = ("format", "flags", "playbooks", *METADATA_FIELDS)
#: A flag field left out of the canonical form when it has this value.
_FLAG_DEFAULTS: dict[str, Any] = {
    "type": "boolean",
    "rules": [],
    "salt": None,
    "description": "",
    "owner": "",
    "tags": [],
}
_BOOLEAN_DEFAULTS = {"variants": dict(BOOLEAN_VARIANTS), "default_variant": "on", "off_variant": "off"}


class EnvChanged(ProblemError):
    status, slug, title = 409, "env-changed", "The environment changed since the plan"


# -- the canonical document ----------------------------------------------------------------------


def canonical_flag(definition: Flag) -> Flag:
    """``definition`` without the fields that hold their default, in schema order."""
    out = {}
    for name in DEFINITION_FIELDS:
        if name not in definition:
            continue
        value = definition[name]
        if name in _FLAG_DEFAULTS and value == _FLAG_DEFAULTS[name]:
            continue
        if definition.get("type", "boolean") == "boolean" and _BOOLEAN_DEFAULTS.get(name, ...) == value:
            continue
        out[name] = value
    return out


def canonical_playbook(definition: dict[str, Any]) -> dict[str, Any]:
    """``definition`` without empty fields and alert fields at their default, in schema order."""
    return {
        name: definition[name]
        for name in PLAYBOOK_FIELDS
        if definition.get(name) not in (None, "")
        and PLAYBOOK_ALERT_DEFAULTS.get(name, ...) != definition[name]
    }


def export_env(client: redis.Redis, env: str, *, metadata: bool = False) -> dict[str, Any]:
    """The live flags and the playbooks of ``env`` as a document (flags and playbooks by name);
    ``metadata`` adds the environment, its version and the time (a backup)."""
    k = EnvKeys(env)
    pipe = client.pipeline(transaction=True)
    pipe.get(k.version)
    pipe.hvals(k.flags)
    pipe.hvals(k.playbooks)
    version, raw_flags, raw_playbooks = pipe.execute()
    flags = [f for f in (json.loads(r) for r in raw_flags) if not f.get("archived")]
    playbooks = [json.loads(r) for r in raw_playbooks]
    document: dict[str, Any] = {"format": FORMAT}
    if metadata:
        exported_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        document.update(env=env, env_version=int(version or 0), exported_at=exported_at)
    document["flags"] = {f["key"]: canonical_flag(f) for f in sorted(flags, key=lambda f: f["key"])}
    document["playbooks"] = {
        p["name"]: canonical_playbook(p) for p in sorted(playbooks, key=lambda p: p["name"])
    }
    return document


# -- reading a document ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """A validated document: flag definitions and playbook definitions, by key and name."""

    flags: dict[str, Flag]
    playbooks: dict[str, dict[str, Any]]
    where: str = ""  #: the document's place in a request body, prefixed to the fields at fault


def parse_document(document: Any, prefix: str = "") -> Declared:
    """The definitions of ``document``, or 422 naming every field at fault (under ``prefix``)."""
    if not isinstance(document, dict):
        raise _invalid([(prefix or "(body)", "a document is an object with flags and playbooks")])
    errors: list[tuple[str, str]] = []
    fmt = document.get("format", FORMAT)
    if fmt != FORMAT and fmt not in _OLD_FORMATS:
        errors.append((f"{prefix}format", f"must be {FORMAT!r}"))
    errors += [(f"{prefix}{name}", "unknown field") for name in document if name not in _DOCUMENT_FIELDS]
    flags = _load_each(document.get("flags"), FlagDefinitionSchema(), f"{prefix}flags", errors)
    playbooks = _load_each(
        document.get("playbooks"), PlaybookDefinitionSchema(), f"{prefix}playbooks", errors
    )
    if errors:
        raise _invalid(errors)
    return Declared(flags, playbooks, prefix)


def _load_each(
    section: Any, schema: Any, where: str, errors: list[tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        errors.append((where, "an object of definitions by name"))
        return {}
    loaded = {}
    for name, definition in section.items():
        if not FLAG_KEY.fullmatch(str(name)):
            errors.append((f"{where}.{name}", "not a valid name: lower-case [a-z0-9] then [a-z0-9._-]"))
            continue
        try:
            loaded[name] = schema.load(definition)
        except ValidationError as exc:
            errors += [
                (e["field"], e["message"])
                for e in flatten_validation_messages(exc.messages, f"{where}.{name}")
            ]
    return loaded


def _invalid(errors: list[tuple[str, str]]) -> InvalidInput:
    listed = [{"field": f, "location": "body", "message": m} for f, m in errors]
    detail = "; ".join(f"{f}: {m}" for f, m in errors[:5]) + ("; ..." if len(errors) > 5 else "")
    return InvalidInput(f"the document is not valid, nothing was changed: {detail}", errors=listed)


# -- the plan --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What applying a document changes (or, with ``dry_run``, would change)."""

    env: str
    dry_run: bool
    prune: bool
    base_version: int  #: the environment version the plan was made from
    env_version: int = 0  #: the version that includes the changes (``base_version`` if none)
    operation: str = ""
    #: ``{"op": create|update|archive|delete, "type": flag|playbook, "name", "fields"}``,
    #: ``fields``: ``{field: {"before", "after"}}``.
    changes: list[dict[str, Any]] = field(default_factory=list)
    #: What the document would change but applying leaves alone, and why.
    kept: list[dict[str, Any]] = field(default_factory=list)
    #: Flags and playbooks of the environment the document does not name (``prune`` removes them).
    unmanaged: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "dry_run": self.dry_run,
            "prune": self.prune,
            "operation": self.operation,
            "base_version": self.base_version,
            "env_version": self.env_version,
            "changes": self.changes,
            "kept": self.kept,
            "unmanaged": self.unmanaged,
        }


@dataclass(frozen=True)
class _Stored:
    """What one attempt read of the environment."""

    version: int
    flags: dict[str, Flag]  #: live flags
    archived: dict[str, Flag]
    playbooks: dict[str, dict[str, Any]]
    applied: dict[str, dict[str, Any]]  #: playbook name -> its current application

    def holder(self, key: str) -> str | None:
        """The applied playbook that changed flag ``key``, if any."""
        return next((name for name, a in sorted(self.applied.items()) if key in a.get("flags", {})), None)


def _field_changes(before: dict[str, Any], after: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {
        n: {"before": before.get(n), "after": after.get(n)} for n in names if before.get(n) != after.get(n)
    }


def _plan_flags(plan: Plan, stored: _Stored, declared: Declared) -> dict[str, Flag]:
    """Plan every flag of the document; the definitions to write, by key."""
    written = {}
    for key, definition in declared.flags.items():
        wanted = _plan_flag(plan, stored, key, definition)
        if wanted is not None:
            written[key] = wanted
    return written


def _plan_flag(plan: Plan, stored: _Stored, key: str, definition: Flag) -> Flag | None:
    """Plan the flag ``key`` of the document; the definition to write, if any."""
    live = stored.flags.get(key)
    if live is None:
        plan.changes.append(
            {
                "op": "create",
                "type": "flag",
                "name": key,
                "fields": _field_changes({}, canonical_flag(definition), DEFINITION_FIELDS),
            }
        )
        return definition
    if live["enabled"] != definition["enabled"]:
        state = "on" if live["enabled"] else "off"
        reason = (
            f"the flag is {state} (last changed {live['updated_at']} by {live['updated_by']}): "
            "apply never switches a flag; use flagctl kill or restore"
        )
        plan.kept.append({"type": "flag", "name": key, "field": "enabled", "reason": reason})
    wanted = {**definition, "enabled": live["enabled"]}
    fields = _field_changes(definition_of(live), wanted, DEFINITION_FIELDS)
    if not fields:
        return None
    blocked = _why_held(stored, key, live)
    if blocked:
        plan.kept.append({"type": "flag", "name": key, "field": ",".join(fields), "reason": blocked})
        return None
    plan.changes.append({"op": "update", "type": "flag", "name": key, "fields": fields})
    return wanted


def _why_held(stored: _Stored, key: str, live: Flag) -> str | None:
    """Why containment holds flag ``key`` (it must not change under it), or ``None``."""
    holder = stored.holder(key)
    if holder:
        return f"playbook {holder!r} is applied and holds this flag: revert it first"
    if live.get("revert_at"):
        return f"a temporary change reverts at {live['revert_at']}: change it after that"
    return None


def _plan_prune(plan: Plan, stored: _Stored, declared: Declared) -> list[str]:
    """Note (and with ``prune`` plan the archive of) each live flag the document leaves out."""
    archive = []
    for key, live in sorted(stored.flags.items()):
        if key in declared.flags:
            continue
        if not plan.prune:
            plan.unmanaged.append({"type": "flag", "name": key})
            continue
        blocked = _why_held(stored, key, live) or (
            None if live["enabled"] else "the flag is off: restore it or archive it with flagctl delete"
        )
        if blocked:
            plan.kept.append({"type": "flag", "name": key, "field": "archived", "reason": blocked})
            continue
        plan.changes.append({"op": "archive", "type": "flag", "name": key, "fields": {}})
        archive.append(key)
    return archive


def _plan_playbooks(plan: Plan, stored: _Stored, declared: Declared) -> tuple[list[str], list[str]]:
    """Plan the playbooks: which to write and (``prune``) which to delete."""
    write, delete = [], []
    for name, definition in declared.playbooks.items():
        before = stored.playbooks.get(name)
        fields = _field_changes(before or {}, definition, PLAYBOOK_FIELDS)
        if before is not None and not fields:
            continue
        if name in stored.applied:
            plan.kept.append(
                {
                    "type": "playbook",
                    "name": name,
                    "field": ",".join(fields),
                    "reason": "the playbook is applied: revert it first",
                }
            )
            continue
        plan.changes.append(
            {"op": "update" if before else "create", "type": "playbook", "name": name, "fields": fields}
        )
        write.append(name)
    for name in sorted(set(stored.playbooks) - set(declared.playbooks)):
        if not plan.prune:
            plan.unmanaged.append({"type": "playbook", "name": name})
        elif name in stored.applied:
            plan.kept.append(
                {
                    "type": "playbook",
                    "name": name,
                    "field": "deleted",
                    "reason": "the playbook is applied: revert it first",
                }
            )
        else:
            plan.changes.append({"op": "delete", "type": "playbook", "name": name, "fields": {}})
            delete.append(name)
    return write, delete


def _check_playbooks(stored: _Stored, declared: Declared, archived: list[str]) -> None:
    """422 unless every playbook of the document changes flags that exist once it is applied."""
    resulting = {**{k: f for k, f in stored.flags.items() if k not in archived}, **declared.flags}
    errors = []
    for name, definition in declared.playbooks.items():
        for key, change in sorted(definition["changes"].items()):
            problem = change_problem(key, change, resulting.get(key))
            if problem is not None:
                errors.append((f"{declared.where}playbooks.{name}.{problem[0]}", problem[1]))
    if errors:
        raise _invalid(errors)


_DONE = {"create": "created", "update": "updated", "archive": "archived", "delete": "deleted"}


def summary(plan: Plan) -> str:
    """``2 flags created, 1 playbook updated``, or ``nothing to change``."""
    counts = Counter((change["type"], change["op"]) for change in plan.changes)
    parts = [f"{n} {kind}{'s' if n > 1 else ''} {_DONE[op]}" for (kind, op), n in sorted(counts.items())]
    return ", ".join(parts) or "nothing to change"


# -- applying --------------------------------------------------------------------------------------


def apply_definitions(
    client: redis.Redis,
    env: str,
    declared: Declared,
    ctx: WriteContext,
    *,
    prune: bool = False,
    dry_run: bool = False,
    base_version: int | None = None,
    idempotency: IdempotencyRequest | None = None,
) -> Done[Plan]:
    """Make ``env`` hold ``declared`` in one audited commit (created if missing), or with
    ``dry_run`` only plan it. ``base_version``: refuse (409) if the environment moved past the
    version a reviewed plan was made from."""
    if not dry_run:
        EnvStore(client).create(env, actor=ctx.actor, source=ctx.source, request_id=ctx.request_id)
    k = EnvKeys(env)
    operation = uuid.uuid4().hex
    seen: dict[str, list[str]] = {}

    def read(pipe: Any) -> None:
        seen["playbooks"] = names = sorted(client.hkeys(k.playbooks))  # which applications to read
        pipe.get(k.version)
        pipe.hgetall(k.flags)
        pipe.hgetall(k.playbooks)
        for name in names:
            pipe.get(k.playbook_applied(name))

    def decide(state: State) -> Change[Plan]:
        stored = _stored(state, seen["playbooks"])
        if base_version is not None and stored.version != base_version:
            raise EnvChanged(
                f"{env!r} is at version {stored.version}, the plan was made at {base_version}: plan again"
            )
        plan = Plan(env, dry_run, prune, stored.version, stored.version, operation)
        flags = _plan_flags(plan, stored, declared)
        archive = _plan_prune(plan, stored, declared)
        write, delete = _plan_playbooks(plan, stored, declared)
        _check_playbooks(stored, declared, archive)
        if dry_run or not plan.changes:
            return Change(plan)
        return _commit_plan(k, ctx, state, stored, plan, flags, archive, (write, delete), declared)

    return Writer(client).run(k, read, decide, idempotency=idempotency, codec=PLAN, deadline_seconds=30)


def _stored(state: State, playbook_names: list[str]) -> _Stored:
    version, raw_flags, raw_playbooks, *applied = state.values
    if sorted(raw_playbooks) != playbook_names:
        raise Conflict("the playbooks changed while they were read")
    every = {key: json.loads(raw) for key, raw in raw_flags.items()}
    return _Stored(
        version=int(version or 0),
        flags={key: f for key, f in every.items() if live_flag(f)},
        archived={key: f for key, f in every.items() if not live_flag(f)},
        playbooks={name: json.loads(raw) for name, raw in raw_playbooks.items()},
        applied={name: json.loads(raw) for name, raw in zip(playbook_names, applied, strict=True) if raw},
    )


def _commit_plan(
    k: EnvKeys,
    ctx: WriteContext,
    state: State,
    stored: _Stored,
    plan: Plan,
    flags: dict[str, Flag],
    archive: list[str],
    playbooks: tuple[list[str], list[str]],
    declared: Declared,
) -> Change[Plan]:
    """The writes and audit entries of ``plan``: flags and the environment version, then playbooks."""
    ops: list[Op] = []
    entries: list[dict[str, str]] = []
    plan.env_version = env_version = stored.version + 1
    for key, definition in flags.items():
        before = stored.flags.get(key) or stored.archived.get(key)
        live = stored.flags.get(key)
        after = new_record(key, definition, before, ctx.actor, state.now)
        action = "flag.update" if live else "flag.create"
        op, entry = flag_change(k, live, after, ctx, action, env_version, operation=plan.operation)
        ops.append(op)
        entries.append(entry)
    for key in archive:
        live = stored.flags[key]
        after = new_record(key, definition_of(live), live, ctx.actor, state.now, archived=True)
        op, entry = flag_change(k, live, after, ctx, "flag.delete", env_version, operation=plan.operation)
        ops.append(op)
        entries.append(entry)
    if ops:
        ops += bump_version(k, env_version)
    else:
        plan.env_version = stored.version
    write, delete = playbooks
    for name in write:
        before = stored.playbooks.get(name)
        record = playbook_record(name, declared.playbooks[name], before, ctx.actor, state.now)
        ops.append(Op("HSET", k.playbooks, (name, json.dumps(record))))
        action = "playbook.update" if before else "playbook.create"
        entries.append(
            audit_entry(ctx, action, playbook=name, before=before, after=record, operation=plan.operation)
        )
    for name in delete:
        ops.append(Op("HDEL", k.playbooks, (name,)))
        entries.append(
            audit_entry(
                ctx, "playbook.delete", playbook=name, before=stored.playbooks[name], operation=plan.operation
            )
        )
    notify = (
        {"env": k.name, "version": plan.env_version, "action": "apply"}
        if plan.env_version > stored.version
        else None
    )
    return Change(plan, ops=ops, audit=entries, notify=notify)


#: How a plan is kept in an idempotency record.
PLAN = Codec(encode=Plan.to_dict, decode=lambda data: Plan(**data))
