"""Export and import of an environment's definitions (flags and playbooks): backups, and config
kept in git. Import validates everything first, then applies every difference in one audited
commit; importing the same file again changes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis
from marshmallow import ValidationError

from .commit import Committer, Op, retry_on_conflict, utcnow_iso
from .envs import EnvStore
from .flags import DEFINITION_FIELDS, Flag, definition_of, new_record, sort_flags
from .keys import EnvKeys
from .playbooks import playbooks_key
from .schemas import FLAG_KEY, FlagDefinitionSchema, PlaybookDefinitionSchema

FORMAT = "flagsvc-export/1"
PLAYBOOK_FIELDS = ("description", "changes")


class ImportRefused(Exception):
    """The file is not an export, or some definition in it is invalid; nothing was written."""


def export_env(client: redis.Redis, env: str) -> dict[str, Any]:
    """The live flags and the playbooks of ``env``, definitions only (no versions or times)."""
    k = EnvKeys(env)
    pipe = client.pipeline(transaction=True)
    pipe.get(k.version)
    pipe.hvals(k.flags)
    pipe.hvals(playbooks_key(env))
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
        if not FLAG_KEY.match(str(key)):
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
    committer = Committer(client)

    def attempt() -> dict[str, int]:
        pipe = client.pipeline(transaction=True)
        pipe.get(k.audit_head)
        pipe.get(k.version)
        pipe.hgetall(k.flags)
        pipe.hgetall(playbooks_key(env))
        head, version, stored_flags, stored_playbooks = pipe.execute()
        now, ops, entries = utcnow_iso(), [], []
        counts = {"flags_created": 0, "flags_updated": 0, "playbooks_written": 0, "unchanged": 0}
        env_version = int(version or 0) + 1
        for key, definition in flags.items():
            before = json.loads(stored_flags[key]) if key in stored_flags else None
            live = before if before and not before.get("archived") else None
            if live is not None and definition_of(live) == {f: definition.get(f) for f in DEFINITION_FIELDS}:
                counts["unchanged"] += 1
                continue
            after = new_record(key, definition, before, actor, now)
            ops.append(Op("HSET", k.flags, (key, json.dumps(after))))
            action = "flag.update" if live else "flag.create"
            counts["flags_updated" if live else "flags_created"] += 1
            entries.append(
                {
                    "actor": actor,
                    "action": action,
                    "flag": key,
                    "before": json.dumps(live) if live else "",
                    "after": json.dumps(after),
                    "reason": f"import from {source}",
                    "env_version": str(env_version),
                }
            )
        for name, definition in playbooks.items():
            before = json.loads(stored_playbooks[name]) if name in stored_playbooks else None
            if before and {f: before.get(f) for f in PLAYBOOK_FIELDS} == definition:
                counts["unchanged"] += 1
                continue
            record = {
                "name": name,
                **definition,
                "version": (before["version"] if before else 0) + 1,
                "created_at": before["created_at"] if before else now,
                "updated_at": now,
                "updated_by": actor,
            }
            ops.append(Op("HSET", playbooks_key(env), (name, json.dumps(record))))
            counts["playbooks_written"] += 1
            entries.append(
                {
                    "actor": actor,
                    "action": "playbook.update" if before else "playbook.create",
                    "playbook": name,
                    "before": json.dumps(before) if before else "",
                    "after": json.dumps(record),
                    "reason": f"import from {source}",
                }
            )
        if not entries:
            return counts
        if any(op.key == k.flags for op in ops):
            ops.append(Op("SET", k.version, (str(env_version),)))
        committer.commit(
            k,
            head,
            ops=ops,
            audit=entries,
            notify=json.dumps({"env": env, "version": env_version, "action": "import"}),
        )
        return counts

    return retry_on_conflict(attempt, deadline_seconds=30)
