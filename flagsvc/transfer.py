"""Export and import of an environment's definitions (flags and playbooks): backups, and config
kept in git. Import validates everything first, then applies every difference in one audited
commit; importing the same file again changes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis
from marshmallow import ValidationError

from .commit import Op
from .envs import EnvStore
from .flags import (
    DEFINITION_FIELDS,
    Flag,
    bump_version,
    definition_of,
    flag_change,
    live_flag,
    new_record,
    parse_flag,
    sort_flags,
)
from .keys import EnvKeys
from .playbooks import DEFINITION_FIELDS as PLAYBOOK_FIELDS
from .playbooks import playbook_record
from .schemas import FLAG_KEY, FlagDefinitionSchema, PlaybookDefinitionSchema
from .writes import Change, State, WriteContext, Writer, audit_entry

FORMAT = "flagsvc-export/1"


class ImportRefused(Exception):
    """The file is not an export, or some definition in it is invalid; nothing was written."""


def export_env(client: redis.Redis, env: str) -> dict[str, Any]:
    """The live flags and the playbooks of ``env``, definitions only (no versions or times)."""
    k = EnvKeys(env)
    pipe = client.pipeline(transaction=True)
    pipe.get(k.version)
    pipe.hvals(k.flags)
    pipe.hvals(k.playbooks)
    version, raw_flags, raw_playbooks = pipe.execute()
    flags = sort_flags([json.loads(r) for r in raw_flags])
    return {
        "format": FORMAT,
        "env": env,
        "env_version": int(version or 0),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "flags": {f["key"]: definition_of(f) for f in flags if not f.get("archived")},
        "playbooks": {
            p["name"]: {k2: p[k2] for k2 in PLAYBOOK_FIELDS}
            for p in sorted((json.loads(r) for r in raw_playbooks), key=lambda p: p["name"])
        },
    }


def _validated(document: Any) -> tuple[dict[str, Flag], dict[str, dict[str, Any]]]:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ImportRefused(f"not a flagsvc export (format {FORMAT!r} expected)")
    flags, playbooks, problems = {}, {}, []
    for key, definition in (document.get("flags") or {}).items():
        if not FLAG_KEY.fullmatch(str(key)):
            problems.append(f"flag {key!r}: not a valid key")
            continue
        try:
            flags[key] = FlagDefinitionSchema().load(definition)
        except ValidationError as exc:
            problems.append(f"flag {key!r}: {exc.messages}")
    for name, definition in (document.get("playbooks") or {}).items():
        try:
            playbooks[name] = PlaybookDefinitionSchema().load(definition)
        except ValidationError as exc:
            problems.append(f"playbook {name!r}: {exc.messages}")
    if problems:
        raise ImportRefused("; ".join(problems) + "; nothing was imported")
    return flags, playbooks


def import_env(client: redis.Redis, env: str, document: Any, *, actor: str, source: str) -> dict[str, int]:
    """Make ``env`` hold the document's flags and playbooks (others are left alone)."""
    flags, playbooks = _validated(document)
    EnvStore(client).create(env, actor=actor)
    k = EnvKeys(env)
    ctx = WriteContext(actor=actor, reason=f"import from {source}")

    def read(pipe: Any) -> None:
        pipe.get(k.version)
        pipe.hgetall(k.flags)
        pipe.hgetall(k.playbooks)

    def decide(state: State) -> Change[dict[str, int]]:
        version, stored_flags, stored_playbooks = state.values
        counts = {"flags_created": 0, "flags_updated": 0, "playbooks_written": 0, "unchanged": 0}
        env_version = int(version or 0) + 1
        ops, entries = _import_flags(k, ctx, state, flags, stored_flags, env_version, counts)
        if ops:
            ops += bump_version(k, env_version)
        more_ops, more_entries = _import_playbooks(k, ctx, state, playbooks, stored_playbooks, counts)
        notify = {"env": env, "version": env_version, "action": "import"} if entries else None
        return Change(counts, ops=[*ops, *more_ops], audit=[*entries, *more_entries], notify=notify)

    return Writer(client).run(k, read, decide, deadline_seconds=30).result


def _import_flags(
    k: EnvKeys,
    ctx: WriteContext,
    state: State,
    flags: dict[str, Flag],
    stored: dict[str, str],
    env_version: int,
    counts: dict[str, int],
) -> tuple[list[Op], list[dict[str, str]]]:
    """The writes and audit entries that give each flag of the file its definition."""
    ops, entries = [], []
    for key, definition in flags.items():
        before = parse_flag(stored.get(key))
        live = live_flag(before)
        if live is not None and definition_of(live) == {f: definition.get(f) for f in DEFINITION_FIELDS}:
            counts["unchanged"] += 1
            continue
        after = new_record(key, definition, before, ctx.actor, state.now)
        op, entry = flag_change(k, live, after, ctx, "flag.update" if live else "flag.create", env_version)
        ops.append(op)
        entries.append(entry)
        counts["flags_updated" if live else "flags_created"] += 1
    return ops, entries


def _import_playbooks(
    k: EnvKeys,
    ctx: WriteContext,
    state: State,
    playbooks: dict[str, dict[str, Any]],
    stored: dict[str, str],
    counts: dict[str, int],
) -> tuple[list[Op], list[dict[str, str]]]:
    """The writes and audit entries that give each playbook of the file its definition."""
    ops, entries = [], []
    for name, definition in playbooks.items():
        before = json.loads(stored[name]) if name in stored else None
        if before and {f: before.get(f) for f in PLAYBOOK_FIELDS} == definition:
            counts["unchanged"] += 1
            continue
        record = playbook_record(name, definition, before, ctx.actor, state.now)
        ops.append(Op("HSET", k.playbooks, (name, json.dumps(record))))
        action = "playbook.update" if before else "playbook.create"
        entries.append(audit_entry(ctx, action, playbook=name, before=before, after=record))
        counts["playbooks_written"] += 1
    return ops, entries
