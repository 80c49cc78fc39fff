"""flagctl's flags as code: definitions files (YAML or JSON), plans, and editing one flag.

A definitions file holds an environment's flags and playbooks (``flagctl export`` writes one);
``flagctl diff`` and ``apply --dry-run`` print the service's plan for it, ``apply`` commits that
plan in one audited write. YAML needs PyYAML (``pip install 'flagsvc-client[cli]'``); JSON
needs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ._ctlapi import EXIT_CONFLICT, EXIT_DIFFERENT, EXIT_ERROR, EXIT_USAGE, Api, CommandError
from ._escaping import printable

#: Where the service publishes the JSON Schema of a definitions file.
SCHEMA_PATH = "/api/v1/schemas/definitions.json"
_YAML_SUFFIXES = (".yaml", ".yml")


class FileError(Exception):
    """A definitions file that cannot be read or written."""


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise FileError(
            "YAML needs PyYAML: pip install 'flagsvc-client[cli]' (or use a .json file)"
        ) from None
    return yaml


def parse_text(text: str, name: str) -> Any:
    """The document in ``text``: JSON, else YAML (JSON is YAML too)."""
    try:
        return json.loads(text)
    except ValueError as json_error:
        if name.endswith(".json"):
            raise FileError(f"{name}: not JSON: {json_error}") from None
    yaml = _yaml()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FileError(f"{name}: not YAML: {exc}") from None


def read_file(path: str) -> Any:
    """The document in ``path`` (``-``: standard input)."""
    if path == "-":
        return parse_text(sys.stdin.read(), "<stdin>")
    try:
        return parse_text(Path(path).read_text(encoding="utf-8"), path)
    except OSError as exc:
        raise FileError(f"cannot read {path}: {exc.strerror}") from None


def render(document: Any, fmt: str) -> str:
    """``document`` as ``yaml`` or ``json`` text, keys in the order given (the canonical order)."""
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    text: str = _yaml().safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return text


def format_of(path: str | None, explicit: str | None) -> str:
    """``yaml`` or ``json``: as asked, else by the file's suffix, else YAML when PyYAML is there."""
    if explicit:
        return explicit
    if path and path != "-":
        return "yaml" if path.endswith(_YAML_SUFFIXES) else "json"
    try:
        _yaml()
    except FileError:
        return "json"
    return "yaml"


# -- plans -----------------------------------------------------------------------------------------

_SIGNS = {"create": "+", "update": "~", "archive": "-", "delete": "-"}


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The plan, one change per block, field by field; what is left alone and why."""
    lines = []
    for change in plan["changes"]:
        what = f"{change['type']} {change['name']}"
        lines.append(f"{_SIGNS[change['op']]} {what} ({change['op']})")
        for name, values in change["fields"].items():
            if change["op"] == "create":
                lines.append(f"    {name}: {_shown(values['after'])}")
            else:
                lines.append(f"    {name}: {_shown(values['before'])} -> {_shown(values['after'])}")
    for kept in plan["kept"]:
        lines.append(
            f"! {kept['type']} {kept['name']}: LEFT ALONE ({kept['field']}): {printable(kept['reason'])}"
        )
    unmanaged = [f"{u['type']} {u['name']}" for u in plan["unmanaged"]]
    if unmanaged:
        lines.append(f"  not in the file, kept (--prune archives them): {', '.join(unmanaged)}")
    return lines


def _shown(value: Any) -> str:
    return printable(json.dumps(value, ensure_ascii=False))


def plan_summary(plan: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for change in plan["changes"]:
        counts[change["op"]] = counts.get(change["op"], 0) + 1
    done = ", ".join(f"{n} to {op}" for op, n in sorted(counts.items())) or "no changes"
    return f"{plan['env']} at version {plan['base_version']}: {done}"


# -- editing one flag --------------------------------------------------------------------------------

#: The fields of a flag its author edits (the rest is the server's).
EDITABLE = (
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


def edit_in_editor(definition: dict[str, Any], fmt: str, header: str) -> tuple[Any, Path]:
    """Open ``definition`` in ``$VISUAL``/``$EDITOR`` (vi); the edited document and its file,
    which is kept so that an edit the service refuses is not lost."""
    suffix = ".yaml" if fmt == "yaml" else ".json"
    handle, name = tempfile.mkstemp(prefix="flagctl-edit-", suffix=suffix)
    path = Path(name)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        if fmt == "yaml":
            out.write("".join(f"# {line}\n" for line in header.splitlines()))
        out.write(render(definition, fmt))
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    status = subprocess.call([*shlex.split(editor), str(path)])
    if status != 0:
        raise FileError(f"the editor exited with status {status}; nothing was changed (edit kept in {path})")
    return parse_text(path.read_text(encoding="utf-8"), str(path)), path


def coerce(text: str, flag_type: str) -> Any:
    """A variant value typed on the command line, as the flag's ``flag_type`` wants it."""
    if flag_type == "string":
        return text
    try:
        value = json.loads(text)
    except ValueError:
        raise FileError(f"{text!r} is not a {flag_type} value") from None
    valid = {
        "boolean": isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "json": True,
    }
    if not valid.get(flag_type, False):
        raise FileError(f"{text!r} is not a {flag_type} value")
    return value


# -- the commands ------------------------------------------------------------------------------------


def _definitions(api: Api, env: str) -> dict[str, Any]:
    document: dict[str, Any] = api.call("GET", f"/api/v1/envs/{quote(env, safe='')}/definitions").json()
    return document


def _plan(api: Api, document: Any, *, prune: bool, dry_run: bool = True, **more: Any) -> dict[str, Any]:
    body = {"definitions": document, "prune": prune, "dry_run": dry_run, **more}
    plan: dict[str, Any] = api.call("POST", api.env_path("definitions", "apply"), json=body).json()
    return plan


def _document_of(args: argparse.Namespace, api: Api) -> Any:
    """The document a diff or apply compares with: ``-f FILE``, or ``--from ENV``'s definitions."""
    if getattr(args, "from_env", None):
        return _definitions(api, args.from_env)
    if not args.file:
        raise CommandError("give -f FILE (or --from ENV)", EXIT_USAGE)
    try:
        return read_file(args.file)
    except FileError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def cmd_export(api: Api, args: argparse.Namespace) -> Any:
    document = _definitions(api, api.env)
    if args.json:
        return document
    try:
        text = render(document, format_of(args.output, args.format))
    except FileError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if not args.output or args.output == "-":
        return text.rstrip("\n")
    Path(args.output).write_text(text, encoding="utf-8")
    counts = f"{len(document['flags'])} flags and {len(document['playbooks'])} playbooks"
    return f"wrote the {counts} of {api.env} to {args.output}"


def cmd_diff(api: Api, args: argparse.Namespace) -> Any:
    plan = _plan(api, _document_of(args, api), prune=args.prune)
    if args.json:
        return plan
    lines = plan_lines(plan)
    if args.exit_code and plan["changes"]:
        print("\n".join(lines))
        raise CommandError(plan_summary(plan), EXIT_DIFFERENT)
    return "\n".join(lines) if lines else f"{api.env} already holds what the file defines"


def cmd_apply(api: Api, args: argparse.Namespace) -> Any:
    document = _document_of(args, api)
    plan = _plan(api, document, prune=args.prune)
    if args.dry_run or not plan["changes"]:
        if args.json:
            return plan
        head = "dry run, nothing changed: " if args.dry_run else ""
        return "\n".join([*plan_lines(plan), head + plan_summary(plan)])
    if not args.reason:
        raise CommandError("give --reason: it is recorded with every change of the apply", EXIT_USAGE)
    if not args.json:
        print("\n".join([*plan_lines(plan), plan_summary(plan)]), flush=True)
    _confirm_or_stop(args, f"apply these changes to {api.env}?")
    done = _plan(
        api,
        document,
        prune=args.prune,
        dry_run=False,
        reason=args.reason,
        incident=args.incident or "",
        base_version=plan["base_version"],  # refused if anything changed since the plan shown
    )
    if args.json:
        return done
    return f"applied to {api.env}: now at version {done['env_version']} (operation {done['operation']})"


def _confirm_or_stop(args: argparse.Namespace, question: str) -> None:
    """Go on with ``--yes``; else ask on a terminal; refuse when no one can answer."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError("not a terminal: give --yes to go on without a prompt", EXIT_USAGE)
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise CommandError("stopped, nothing changed", EXIT_ERROR)


def cmd_create(api: Api, args: argparse.Namespace) -> Any:
    flag_type = args.type
    definition: dict[str, Any] = {"kind": args.kind, "type": flag_type, "enabled": not args.disabled}
    try:
        variants = {name: coerce(value, flag_type) for name, value in (_pair(v) for v in args.variant)}
    except FileError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if variants:
        definition["variants"] = variants
    for option, name in (("default", "default_variant"), ("off", "off_variant")):
        if getattr(args, option):
            definition[name] = getattr(args, option)
    for name in ("description", "owner"):
        if getattr(args, name):
            definition[name] = getattr(args, name)
    if args.tag:
        definition["tags"] = args.tag
    resp = api.call("PUT", api.env_path("flags", args.key), json=definition, headers={"If-None-Match": "*"})
    flag = resp.json()
    return flag if args.json else f"created {args.key} in {api.env} (version {flag['version']})"


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CommandError(f"{text!r}: give a variant as NAME=VALUE", EXIT_USAGE)
    return name, value


def cmd_set(api: Api, args: argparse.Namespace) -> Any:
    """Serve another default variant (``set KEY short``, or the variant holding a value), or
    give a variant a new value and serve it (``set KEY normal=1500``)."""
    resp = api.call("GET", api.env_path("flags", args.key))
    flag, version = resp.json(), resp.headers.get("ETag", "")
    change = _default_change(flag, args.target)
    resp = api.call("PATCH", api.env_path("flags", args.key), json=change, headers={"If-Match": version})
    after = resp.json()
    if args.json:
        return after
    default = after["default_variant"]
    value = json.dumps(after["variants"][default])
    return f"{args.key} in {api.env}: serves {default} = {value} (version {after['version']})"


def _default_change(flag: dict[str, Any], target: str) -> dict[str, Any]:
    variants = flag["variants"]
    if target in variants:
        return {"default_variant": target}
    name, sep, raw = target.partition("=")
    try:
        if sep:
            return {"variants": {**variants, name: coerce(raw, flag["type"])}, "default_variant": name}
        value = coerce(target, flag["type"])
    except FileError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    holding = [n for n, v in variants.items() if v == value and type(v) is type(value)]
    if len(holding) != 1:
        listed = ", ".join(f"{n}={json.dumps(v)}" for n, v in variants.items())
        raise CommandError(
            f"{target!r} is not one variant of {flag['key']} ({listed}); give NAME=VALUE to set one",
            EXIT_USAGE,
        )
    return {"default_variant": holding[0]}


def cmd_edit(api: Api, args: argparse.Namespace) -> Any:
    resp = api.call("GET", api.env_path("flags", args.key))
    flag, version = resp.json(), resp.headers.get("ETag", "")
    definition = {name: flag[name] for name in EDITABLE if name in flag}
    header = (
        f"{args.key} in {api.env}, version {flag['version']}; saved with If-Match: a change made meanwhile\n"
        f"is refused, not overwritten. Schema: {api.base}{SCHEMA_PATH}"
    )
    try:
        edited, path = edit_in_editor(definition, format_of(None, args.format), header)
    except FileError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if edited == definition:
        path.unlink()
        return f"no change to {args.key}"
    try:
        after = api.call(
            "PUT", api.env_path("flags", args.key), json=edited, headers={"If-Match": version}
        ).json()
    except CommandError as exc:
        raise CommandError(_refused_edit(api, args.key, exc, path), exc.code) from None
    path.unlink()
    return after if args.json else f"saved {args.key} in {api.env} (version {after['version']})"


def _refused_edit(api: Api, key: str, error: CommandError, path: Path) -> str:
    """Why an edit was not saved, and where it is."""
    kept = f"your edit is kept in {path} (run flagctl edit again and redo it)"
    if error.code != EXIT_CONFLICT:
        return f"{error}; {kept}"
    now = api.call("GET", api.env_path("flags", key)).json()
    return (
        f"{key} changed meanwhile (version {now['version']}, by {printable(now['updated_by'])} at "
        f"{now['updated_at']}): nothing was overwritten; {kept}"
    )


def cmd_delete(api: Api, args: argparse.Namespace) -> Any:
    flag = api.call("GET", api.env_path("flags", args.key)).json()
    _confirm_or_stop(args, f"archive {args.key} in {api.env} (SDKs then serve their code default)?")
    after = api.call(
        "DELETE", api.env_path("flags", args.key), headers={"If-Match": f'"{flag["version"]}"'}
    ).json()
    return after if args.json else f"archived {args.key} in {api.env} (kept in the audit log)"
