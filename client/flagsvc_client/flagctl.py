"""``flagctl``: the operator's command line over the flagsvc REST API.

Configuration: ``--url``/``FLAGSVC_URL``, ``--token``/``FLAGSVC_TOKEN``, ``--env``/``FLAGSVC_ENV``.
Exit codes: 0 done, 1 unexpected error, 2 usage, 3 not authorized (401/403), 4 not found,
5 conflict (the flag changed: 409/412), 6 service unreachable or failing (5xx), 7 refused input,
8 ``--wait`` timed out before every live SDK instance applied the change, 9 ``diff --exit-code``
found changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import requests

from ._ctlapi import (
    EXIT_NOT_CONFIRMED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Api,
    CommandError,
)
from ._definitions import cmd_apply, cmd_create, cmd_delete, cmd_diff, cmd_edit, cmd_export, cmd_set
from ._escaping import printable
from ._incident import build_report
from ._version import __version__


def _flag_state(flag: dict[str, Any]) -> str:
    """What the flag serves when no rule matches: ``on``/``KILLED`` for a kill switch, else the
    default variant, or ``OFF:<off variant>`` when disabled."""
    if flag.get("kind") == "kill_switch":
        return "on" if flag.get("enabled") else "KILLED"
    return str(flag["default_variant"]) if flag.get("enabled") else f"OFF:{flag['off_variant']}"


def _targeting(flag: dict[str, Any]) -> str:
    """Rules at a glance: ``-``, ``rules:2``, ``rules:2,rollout``."""
    rules = flag.get("rules") or []
    if not rules:
        return "-"
    return f"rules:{len(rules)}" + (",rollout" if any(r.get("rollout") for r in rules) else "")


def _holders(api: Api) -> dict[str, str]:
    """Flag key -> ``playbook:<name>`` for each flag an applied playbook changed."""
    return {
        key: f"playbook:{name}"
        for name, application in _applied_playbooks(api).items()
        for key in (application or {}).get("flags", {})
    }


def _held_by(flag: dict[str, Any], holders: dict[str, str]) -> str:
    parts = [holders[flag["key"]]] if flag["key"] in holders else []
    if flag.get("revert_at"):
        parts.append(f"until:{flag['revert_at']}")
    return ",".join(parts) or "-"


def cmd_list(api: Api, args: argparse.Namespace) -> Any:
    flags = api.call("GET", api.env_path("flags")).json()["flags"]
    if args.json:
        return flags
    holders = _holders(api)
    rows = [("STATE", "KEY", "KIND", "TYPE", "RULES", "HELD", "VER", "UPDATED", "BY")]
    for f in flags:
        rows.append(
            (
                _flag_state(f),
                f["key"],
                f["kind"],
                f["type"],
                _targeting(f),
                _held_by(f, holders),
                str(f["version"]),
                f["updated_at"],
                f["updated_by"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_show(api: Api, args: argparse.Namespace) -> Any:
    flag = api.call("GET", api.env_path("flags", args.key)).json()
    if args.json:
        return flag
    lines = [
        f"{flag['key']}  [{_flag_state(flag)}]  {flag['kind']}, {flag['type']}, version {flag['version']}",
        f"  updated {flag['updated_at']} by {flag['updated_by']}",
        f"  variants: {json.dumps(flag['variants'])}",
        f"  default: {flag['default_variant']}   off (when killed): {flag['off_variant']}",
    ]
    holder = _holders(api).get(flag["key"])
    if holder:
        lines.append(f"  held by {holder.replace(':', ' ', 1)} (a revert of it restores this flag)")
    if flag.get("revert_at"):
        lines.append(f"  temporary: reverts at {flag['revert_at']}")
    for i, rule in enumerate(flag["rules"]):
        conds = (
            " and ".join(f"{c['attribute']} {c['operator']} {c['values']}" for c in rule["conditions"])
            or "always"
        )
        serve = rule.get("variant") or ", ".join(f"{p['variant']}:{p['weight']}" for p in rule["rollout"])
        lines.append(f"  rule {i}: if {conds} -> {serve}")
    if flag.get("description"):
        lines.append(f"  {flag['description']}")
    if flag.get("owner"):
        lines.append(f"  owner: {flag['owner']}")
    return "\n".join(lines)


def _switch(api: Api, args: argparse.Namespace, action: str) -> Any:
    body = {"reason": args.reason}
    if args.incident:
        body["incident"] = args.incident
    if args.for_:
        body["for"] = args.for_
    if args.dry_run:
        return _switch_preview(api, args, action, body)
    before = api.call("GET", api.env_path("flags", args.key)).json()
    # One idempotency key per invocation: the automatic retry cannot kill twice.
    headers = {"Idempotency-Key": f"flagctl-{uuid.uuid4()}"}
    resp = api.call("POST", api.env_path("flags", args.key, action), json=body, headers=headers, retry=True)
    flag = resp.json()
    changed = flag["version"] != before["version"]
    verb = "killed" if action == "kill" else "restored"
    if not changed:
        state = "disabled" if action == "kill" else "enabled"
        message = f"{args.key} was already {state} in {api.env} (version {flag['version']})"
    else:
        message = f"{verb} {args.key} in {api.env}: now {_flag_state(flag)} (version {flag['version']})"
        if flag.get("revert_at"):
            message += f"; reverts at {flag['revert_at']}"
    if not args.wait:
        return flag if args.json else message
    target = int(resp.headers.get("X-Flagsvc-Env-Version", "0"))
    return _confirm(api, args, target, {"flag": flag}, message)


def cmd_kill(api: Api, args: argparse.Namespace) -> Any:
    return _switch(api, args, "kill")


def cmd_restore(api: Api, args: argparse.Namespace) -> Any:
    return _switch(api, args, "restore")


def _confirm(api: Api, args: argparse.Namespace, target: int, result: dict[str, Any], message: str) -> Any:
    """``--wait``: print ``message``, then wait until every live SDK instance runs ``target``;
    exit 8 naming the laggards when ``--timeout-wait`` is up."""
    if not args.json:
        print(message, flush=True)
    confirmed, view = _wait_for_version(api, target, args.timeout_wait)
    if args.json:
        answer = {**result, "env_version": target, "confirmed": confirmed, "clients": view}
        if not confirmed:
            print(json.dumps(answer, indent=2))
            raise CommandError("not every live SDK instance applied the change in time", EXIT_NOT_CONFIRMED)
        return answer
    summary = _propagation_line(view, target)
    if not confirmed:
        lagging = [i for i in view["instances"] if i["live"] and i["applied_version"] < target]
        for inst in lagging:
            print(f"  lagging: {_instance_line(inst)}")
        raise CommandError(f"timed out: {summary}", EXIT_NOT_CONFIRMED)
    return f"confirmed: {summary}"


def _switch_preview(api: Api, args: argparse.Namespace, action: str, body: dict[str, Any]) -> Any:
    """``--dry-run``: what the kill or restore would change and who evaluated the flag lately."""
    preview = api.call("POST", api.env_path("flags", args.key, action), json={**body, "dry_run": True}).json()
    if args.json:
        return preview
    radius = preview.get("blast_radius") or {}
    apps = ", ".join(f"{app} ({n} instances)" for app, n in sorted((radius.get("apps") or {}).items()))
    change = "would change nothing" if not preview["changed"] else f"would {action} {args.key}"
    return (
        f"dry run, nothing changed: {change} in {api.env}\n"
        f"  evaluated in the last 15 minutes: {radius.get('evaluations', 0)} times"
        + (f", by {apps}" if apps else ", by no SDK instance")
    )


#: How long ``--wait`` waits at least; longer when the service tells SDKs to spread the report of
#: a change over more (a large fleet).
WAIT_SECONDS = 30.0


def _wait_for_version(api: Api, target: int, timeout: float | None) -> tuple[bool, dict[str, Any]]:
    """Poll the propagation view until every live instance applied ``target``, for ``timeout``
    seconds (None: 30 s, or the spread the SDKs are told plus 10 s if that is longer)."""
    started, deadline = time.monotonic(), None if timeout is None else time.monotonic() + timeout
    while True:
        view = api.call("GET", api.env_path("clients")).json()
        if deadline is None:
            spread = float((view.get("pace") or {}).get("jitter_seconds") or 0)
            deadline = started + max(WAIT_SECONDS, spread + 10)
        live = [i for i in view["instances"] if i["live"]]
        if all(i["applied_version"] >= target for i in live):
            return True, view
        if time.monotonic() >= deadline:
            return False, view
        time.sleep(0.25)


def _propagation_line(view: dict[str, Any], target: int) -> str:
    """How many live instances run ``target``: fleet-wide counts when the view is at ``target``
    (it lists at most a few hundred instances), else the instances it lists."""
    summary = view.get("summary") or {}
    if view.get("version") == target and "live" in summary:
        done, live = int(summary["applied_current"]), int(summary["live"])
    else:
        listed = [i for i in view["instances"] if i["live"]]
        done, live = sum(1 for i in listed if i["applied_version"] >= target), len(listed)
    if not live:
        return f"version {target}; no live SDK instance reports to this environment"
    return f"{done}/{live} live SDK instances run version {target} or later"


def _instance_line(inst: dict[str, Any]) -> str:
    error = f", error: {inst['last_error']}" if inst.get("last_error") else ""
    return (
        f"{inst.get('app', '?')} {inst.get('host', '?')}:{inst.get('pid', '?')} "
        f"version {inst.get('applied_version')} ({inst.get('mode', '?')}, "
        f"seen {inst.get('age_seconds')} s ago{error})"
    )


def cmd_clients(api: Api, args: argparse.Namespace) -> Any:
    view = api.call("GET", api.env_path("clients")).json()
    if args.json:
        return view
    s = view["summary"]
    lines = [
        f"{api.env} version {view['version']}: {s['applied_current']}/{s['live']} live instances current, "
        f"{s['lagging']} lagging, {s['silent']} silent"
    ]
    for inst in view["instances"]:
        state = "silent" if not inst["live"] else ("LAGGING" if inst["lag"] else "current")
        lines.append(f"  {state:<8} {_instance_line(inst)}")
    lines += [f"  {'ofrep' if c['live'] else 'silent':<8} {_consumer_line(c)}" for c in view.get("ofrep", [])]
    return "\n".join(lines)


def _consumer_line(consumer: dict[str, Any]) -> str:
    """An OFREP consumer: it evaluates on the service, so it is always on the current version."""
    return (
        f"{printable(consumer['app'])} over OFREP (token {printable(consumer['token'])}, "
        f"{consumer.get('address') or '?'}, seen {consumer['age_seconds']} s ago; evaluates on the service)"
    )


AUDIT_FILTERS = ("flag", "actor", "action", "incident", "since", "until")
AUDIT_FORMATS = {"csv": "text/csv", "ndjson": "application/x-ndjson"}


def cmd_audit(api: Api, args: argparse.Namespace) -> Any:
    params: dict[str, Any] = {name: getattr(args, name) for name in AUDIT_FILTERS if getattr(args, name)}
    if args.format in AUDIT_FORMATS:  # the whole matching log, as the service exports it
        resp = api.call(
            "GET", api.env_path("audit"), params=params, headers={"Accept": AUDIT_FORMATS[args.format]}
        )
        return resp.text.rstrip("\n")
    params["limit"] = args.limit
    entries = api.call("GET", api.env_path("audit"), params=params).json()["entries"]
    if args.json:
        return entries
    lines = []
    for e in entries:
        # Reasons, incidents and token names are anyone's text: shown escaped, one entry a line.
        shown = {name: printable(str(value)) for name, value in e.items() if value is not None}
        incident = f"[{shown['incident']}]" if shown.get("incident") else ""
        extra = " ".join(x for x in (incident, shown.get("reason", "")) if x)
        target = shown.get("flag") or shown.get("playbook") or shown.get("token") or "-"
        lines.append(f"{shown['time']}  {shown['actor']:<16} {shown['action']:<14} {target:<28} {extra}")
    return "\n".join(lines) or "(no entries)"


def _alerts_line(book: dict[str, Any]) -> str:
    """What an Alertmanager alert does with ``book``: the alerts that trigger it, whether they
    apply it, and the guards on it (an on-call must know before an alert fires)."""
    triggers = book.get("triggers") or []
    if not triggers:
        return "  alerts: no trigger (applied by hand only)"
    matches = (", ".join(f"{k}={printable(str(v))}" for k, v in sorted(t["match"].items())) for t in triggers)
    which = " or ".join(f"{{{match}}}" for match in matches)
    if not book.get("auto"):
        does = "recorded, NOT applied (auto is off)"
    elif book.get("mode") == "dry_run":
        does = "recorded as would_apply, NOT applied (mode dry_run)"
    else:
        does = "APPLIED BY THE ALERT"
    guards = [f"cooldown {book['cooldown']}"] if book.get("cooldown") else []
    if book.get("max_auto_applies_per_day"):
        guards.append(f"at most {book['max_auto_applies_per_day']} a day")
    if book.get("revert_on_resolve"):
        guards.append("reverted when the alert resolves")
    return f"  alerts: {which}: {does}" + (f" ({', '.join(guards)})" if guards else "")


def cmd_playbook(api: Api, args: argparse.Namespace) -> Any:
    if args.playbook_command == "list":
        books = api.call("GET", api.env_path("playbooks")).json()["playbooks"]
        if args.json:
            return books
        lines = []
        for b in books:
            state = "APPLIED" if b["applied"] else "-"
            auto = "AUTO" if b.get("auto") and b.get("triggers") else "-"
            about = printable(b["description"])
            lines.append(f"{state:<8} {auto:<5} {b['name']:<32} {len(b['changes'])} flags  {about}")
        return "\n".join(lines) or "(no playbooks)"
    if args.playbook_command == "show":
        book = api.call("GET", api.env_path("playbooks", args.name)).json()
        if args.json:
            return book
        lines = [f"{book['name']} (version {book['version']}): {printable(book['description'])}"]
        lines += [f"  {flag}: {json.dumps(change)}" for flag, change in sorted(book["changes"].items())]
        lines.append(_alerts_line(book))
        applied = book.get("applied")
        if applied:
            incident = f" ({printable(str(applied['incident']))})" if applied.get("incident") else ""
            lines.append(
                f"  APPLIED {applied['applied_at']} by {printable(applied['applied_by'])}{incident}"
                + (f", reverts by itself at {applied['revert_at']}" if applied.get("revert_at") else "")
            )
        return "\n".join(lines)
    body: dict[str, Any] = {"reason": args.reason, "dry_run": args.dry_run}
    if args.incident:
        body["incident"] = args.incident
    if getattr(args, "for_", None):
        body["for"] = args.for_
    outcome = api.call(
        "POST", api.env_path("playbooks", args.name, args.playbook_command), json=body, retry=False
    ).json()
    if args.json and not args.wait:
        return outcome
    verb = args.playbook_command
    done = {"apply": "applied", "revert": "reverted"}[verb]
    head = f"would {verb}" if outcome["dry_run"] else done
    lines = [f"{head} playbook {args.name} in {api.env} (operation {outcome['operation']}):"]
    for change in outcome["changed"]:
        radius = (outcome.get("blast_radius") or {}).get(change["flag"])
        seen = ""
        if radius is not None:
            apps = ", ".join(f"{app} x{n}" for app, n in radius["apps"].items()) or "no SDK instance"
            seen = f"   [last 15 min: {radius['evaluations']} evaluations; {apps}]"
        lines.append(
            f"  {change['flag']}: {json.dumps(change['before'])} -> {json.dumps(change['after'])}{seen}"
        )
    lines += [f"  {flag}: already as wanted" for flag in outcome["unchanged"]]
    lines += [f"  {s['flag']}: LEFT ALONE, {s['reason']}" for s in outcome["skipped"]]
    if args.wait and not outcome["dry_run"] and outcome["changed"]:
        return _confirm(api, args, outcome["env_version"], {"outcome": outcome}, "\n".join(lines))
    return outcome if args.json else "\n".join(lines)


def cmd_status(api: Api, args: argparse.Namespace) -> Any:
    """One screen for the incident: health, what is off and why, what reverts when, applied
    playbooks, and the fleet on the current version."""
    health = _health(api)
    flags = api.call("GET", api.env_path("flags")).json()["flags"]
    applied = _applied_playbooks(api)
    view = api.call("GET", api.env_path("clients")).json()
    off = [f for f in flags if not f["enabled"]]
    if args.json:
        return {"health": health, "off": off, "playbooks": applied, "clients": view["summary"]}
    lines = [f"{api.env}: service {health.get('status', '?')}" + _rollbacks(health)]
    lines += _off_lines(api, off)
    lines += [
        f"  temporary: {f['key']} ({_flag_state(f)}) reverts at {f['revert_at']}"
        for f in flags
        if f.get("revert_at") and f["enabled"]
    ]
    lines.append(f"playbooks applied ({len(applied)}):" if applied else "playbooks applied: none")
    for name, record in sorted(applied.items()):
        until = f", reverts at {record['revert_at']}" if record.get("revert_at") else ""
        incident = f" ({printable(str(record['incident']))})" if record.get("incident") else ""
        by = printable(record["applied_by"])
        lines.append(f"  {name}: {record['applied_at']} by {by}{incident}{until}")
    silent = view["summary"]["silent"]
    ofrep = sum(1 for c in view.get("ofrep", []) if c["live"])
    lines.append(f"SDK: {_propagation_line(view, view['version'])}; {silent} silent; {ofrep} OFREP consumers")
    lines += [f"  LAGGING {_instance_line(i)}" for i in view["instances"] if i["live"] and i["lag"]][:10]
    return "\n".join(lines)


def _applied_playbooks(api: Api) -> dict[str, dict[str, Any]]:
    """Playbook name -> its current application, for the applied ones."""
    listed = api.call("GET", api.env_path("playbooks")).json()["playbooks"]
    return {
        p["name"]: api.call("GET", api.env_path("playbooks", p["name"])).json()["applied"]
        for p in listed
        if p["applied"]
    }


def _off_lines(api: Api, off: list[dict[str, Any]]) -> list[str]:
    """The flags that are off: since when, by whom, why (their newest audit entry)."""
    lines = [f"off ({len(off)}):" if off else "off: none"]
    why = _latest_reasons(api, [f["key"] for f in off])
    for f in off:
        until = f", reverts at {f['revert_at']}" if f.get("revert_at") else ""
        by = printable(f["updated_by"])
        line = f"  {_flag_state(f):<8} {f['key']}  since {f['updated_at']} by {by}{until}"
        lines.append(line + (f"  {why[f['key']]}" if f["key"] in why else ""))
    return lines


def _health(api: Api) -> dict[str, Any]:
    """``/readyz``, whatever its status code (a 503 is the answer, not an error)."""
    try:
        resp = api.session.get(f"{api.base}/readyz", timeout=api.timeout)
        body: dict[str, Any] = resp.json()
        return body
    except (requests.RequestException, ValueError) as exc:
        raise CommandError(
            f"cannot reach flagsvc at {api.base}: {type(exc).__name__}", EXIT_UNAVAILABLE
        ) from None


def _rollbacks(health: dict[str, Any]) -> str:
    rolled = health.get("rollbacks") or {}
    problem = f" (Redis: {health['redis']})" if health.get("redis") else ""
    return problem + "".join(f"; ROLLBACK DETECTED in {env}: {what}" for env, what in rolled.items())


def _latest_reasons(api: Api, keys: list[str]) -> dict[str, str]:
    """Flag key -> the reason of its newest change (why it is off), for ``keys``."""
    reasons: dict[str, str] = {}
    for key in keys:
        entries = api.call("GET", api.env_path("audit"), params={"flag": key, "limit": 1}).json()["entries"]
        if entries:
            e = entries[0]
            incident = f"[{printable(e['incident'])}] " if e.get("incident") else ""
            reasons[key] = f'{incident}"{printable(e.get("reason") or "")}"'
    return reasons


def cmd_report(api: Api, args: argparse.Namespace) -> Any:
    params: dict[str, Any] = {"order": "oldest"}
    for name in ("incident", "since", "until"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    if len(params) == 1:
        raise CommandError("give --incident, or --since (and --until)", EXIT_USAGE)
    resp = api.call("GET", api.env_path("audit"), params=params, headers={"Accept": "application/x-ndjson"})
    entries = [json.loads(line) for line in resp.text.splitlines() if line]
    flags = api.call("GET", api.env_path("flags")).json()["flags"]
    if args.json:
        return {"entries": entries, "flags": flags}
    title = f"Incident {args.incident}: flag changes" if args.incident else "Flag changes"
    return build_report(entries, flags, env=api.env, title=title)


def _seconds(text: str) -> float:
    """``30``, ``30s``, ``2m`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30s or 2m") from None


EXIT_CODES = (
    "exit codes: 0 ok, 1 error, 2 usage, 3 not authorized, 4 not found, 5 conflict, "
    "6 service unreachable, 7 refused input, 8 --wait timed out, 9 diff --exit-code found changes"
)


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="flagctl",
        description="Operate flagsvc: contain an incident (status, kill, restore, playbook), look "
        "(list, show, clients, audit, report), and keep flags as code (create, set, edit, delete, "
        "export, diff, apply). Without a command: status.",
        epilog=f"{EXIT_CODES}\n\n"
        + _examples("flagctl", "flagctl kill checkout.recs --reason 'p95 9s' --wait"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"flagctl {__version__}")
    parser.set_defaults(func=cmd_status)  # flagctl alone: the incident screen
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = _command_maker(sub, common)
    command("status", cmd_status, "the incident screen (also: flagctl alone)", "flagctl status --env staging")
    command("list", cmd_list, "flags, kill switches first: state, rules, what holds them", "flagctl list")
    command("show", cmd_show, "one flag", "flagctl show payments.timeout-ms").add_argument(
        "key", help="the flag's key"
    )
    _add_switch_commands(command)
    command("clients", cmd_clients, "SDK instances and the version they run", "flagctl clients --json")
    _add_playbook_commands(command, common)
    _add_review_commands(command)
    _add_flag_commands(command)
    _add_file_commands(command)
    completion = command(
        "completion", cmd_completion, "print a shell completion script (bash or zsh)",
        "source <(flagctl completion bash)", "flagctl completion zsh > ~/.zfunc/_flagctl",
    )  # fmt: skip
    completion.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    return parser


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _command_maker(sub: _Subcommands, common: argparse.ArgumentParser) -> _Command:
    """A maker of subcommands: name, function, help, then example command lines."""

    def command(
        name: str, func: Callable[..., Any], help_text: str, *examples: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=_examples(*examples) if examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    return command


def _add_review_commands(command: _Command) -> None:
    """``report`` and ``audit``."""
    report = command(
        "report", cmd_report, "post-incident report (Markdown)",
        "flagctl report --incident INC-42 > INC-42.md", "flagctl report --since 6h",
    )  # fmt: skip
    report.add_argument("--incident", help="the incident id given with the changes")
    report.add_argument("--since", help="ISO 8601 time or a duration ago (2h)")
    report.add_argument("--until", help="ISO 8601 time or a duration ago")
    audit = command(
        "audit", cmd_audit, "recent changes, newest first",
        "flagctl audit --flag checkout.recs", "flagctl audit --incident INC-42 --format csv > INC-42.csv",
    )  # fmt: skip
    audit.add_argument("--flag", help="only this flag")
    audit.add_argument("--actor", help="only changes by this token name")
    audit.add_argument("--action", help="only this action, e.g. flag.kill, playbook.apply")
    audit.add_argument("--incident", help="only changes made for this incident id")
    audit.add_argument("--since", help="ISO 8601 time or a duration ago (2h)")
    audit.add_argument("--until", help="ISO 8601 time or a duration ago")
    audit.add_argument("--limit", type=int, default=20, help="entries shown (text and --json; 20)")
    audit.add_argument(
        "--format", choices=["text", "csv", "ndjson"], default="text",
        help="csv or ndjson: every matching entry, as the service exports them",
    )  # fmt: skip


def _add_flag_commands(command: _Command) -> None:
    """One flag at a time: ``create``, ``set``, ``edit``, ``delete``."""
    create = command(
        "create", cmd_create, "create a flag (admin)",
        "flagctl create checkout.recs --kind kill_switch --owner checkout",
        "flagctl create payments.timeout-ms --kind ops --type number "
        "--variant normal=3000 --variant short=800 --default normal --off short",
    )  # fmt: skip
    create.add_argument("key", help="the new flag's key: lower-case [a-z0-9] then [a-z0-9._-]")
    create.add_argument("--kind", required=True, choices=["kill_switch", "release", "ops", "experiment"])
    create.add_argument("--type", default="boolean", choices=["boolean", "string", "number", "json"])
    create.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
    create.add_argument("--default", metavar="NAME", help="the variant served when no rule matches")
    create.add_argument("--off", metavar="NAME", help="the variant served when the flag is off (killed)")
    create.add_argument("--disabled", action="store_true", help="create it off")
    create.add_argument("--description", help="what the flag is for")
    create.add_argument("--owner", help="the team that owns it")
    create.add_argument("--tag", action="append", default=[], help="repeatable")
    set_ = command(
        "set", cmd_set, "serve another default variant, or give it a new value (admin)",
        "flagctl set payments.timeout-ms short", "flagctl set payments.timeout-ms normal=2500",
    )  # fmt: skip
    set_.add_argument("key", help="the flag's key")
    set_.add_argument("target", help="a variant's name, a variant's value, or NAME=VALUE")
    edit = command(
        "edit", cmd_edit, "edit a flag's definition in $EDITOR, saved with If-Match (admin)",
        "EDITOR=nano flagctl edit search.v2",
    )  # fmt: skip
    edit.add_argument("key", help="the flag's key")
    edit.add_argument(
        "--format", choices=["yaml", "json"], help="of the file edited (YAML if PyYAML is there)"
    )
    delete = command(
        "delete",
        cmd_delete,
        "archive a flag (admin; kept in the audit log)",
        "flagctl delete old.banner --yes",
    )
    delete.add_argument("key", help="the flag's key")
    delete.add_argument("--yes", action="store_true", help="do not ask")


def _add_file_commands(command: _Command) -> None:
    """Flags as code: ``export``, ``diff``, ``apply`` of a definitions file."""
    export = command(
        "export", cmd_export, "write the environment's flags and playbooks as a definitions file",
        "flagctl export -o flags/production.yaml", "flagctl export --env staging --format json",
    )  # fmt: skip
    export.add_argument("-o", "--output", metavar="FILE", help="the file to write (default: print)")
    export.add_argument("--format", choices=["yaml", "json"], help="default: by the file's suffix, else YAML")
    diff = command(
        "diff", cmd_diff, "what applying a file (or another environment) would change",
        "flagctl diff -f flags/production.yaml", "flagctl diff --from staging --env production",
    )  # fmt: skip
    apply = command(
        "apply", cmd_apply, "make the environment hold a definitions file, in one audited commit (admin)",
        "flagctl apply -f flags/production.yaml --dry-run",
        "flagctl apply -f flags/production.yaml --reason 'PR #123' --yes",
        "flagctl apply --from staging --env production --reason 'promote search.v2'",
    )  # fmt: skip
    for p in (diff, apply):
        p.add_argument("-f", "--file", metavar="FILE", help="YAML or JSON definitions file ('-': stdin)")
        p.add_argument("--from", dest="from_env", metavar="ENV", help="compare with this environment instead")
        p.add_argument(
            "--prune", action="store_true", help="archive the flags (delete the playbooks) not in it"
        )
    diff.add_argument("--exit-code", action="store_true", help="exit 9 when there are changes")
    apply.add_argument("--reason", help="why (recorded with every change; required unless --dry-run)")
    apply.add_argument("--incident", help="incident id, e.g. INC-42")
    apply.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    apply.add_argument("--yes", action="store_true", help="apply without asking (required off a terminal)")


def cmd_completion(api: Api | None, args: argparse.Namespace) -> Any:
    try:
        import shtab
    except ImportError:
        raise CommandError("completion needs shtab: pip install 'flagsvc-client[cli]'", EXIT_USAGE) from None
    script: str = shtab.complete(build_parser(), shell=args.shell)
    return script.rstrip("\n")


def _common_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help="flagsvc base URL (FLAGSVC_CONTROL_URL, else FLAGSVC_URL)"
    )
    common.add_argument("--token", default=argparse.SUPPRESS, help="API token (FLAGSVC_TOKEN)")
    common.add_argument(
        "--env", default=argparse.SUPPRESS, help="environment (FLAGSVC_ENV, default production)"
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per request (10)")
    return common


# argparse names the type of add_subparsers() only privately.
_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Makes a subcommand: its name, function, help, then example command lines.
_Command: TypeAlias = Callable[..., argparse.ArgumentParser]


def _add_switch_commands(command: _Command) -> None:
    """``kill`` and ``restore``."""
    for action, func, help_text, example in (
        ("kill", cmd_kill, "disable a flag (serve its off variant)",
         "flagctl kill checkout.recs --reason 'p95 9s' --incident INC-42 --for 30m --wait"),
        ("restore", cmd_restore, "re-enable a flag", "flagctl restore checkout.recs --reason 'fixed' --wait"),
    ):  # fmt: skip
        p = command(
            action, func, help_text, f"flagctl {action} checkout.recs --reason 'why' --dry-run", example
        )
        p.add_argument("key", help="the flag's key")
        p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
        p.add_argument("--incident", help="incident id, e.g. INC-42")
        p.add_argument(
            "--for", dest="for_", metavar="DURATION", help="temporary: revert by itself after 30m, 2h..."
        )
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="show what would change and who evaluates the flag; change nothing",
        )
        _add_wait_arguments(p)


def _add_wait_arguments(p: argparse.ArgumentParser) -> None:
    """``--wait`` and ``--timeout-wait`` of the commands that change what SDKs serve."""
    p.add_argument("--wait", action="store_true", help="wait until every live SDK instance applied it")
    p.add_argument(
        "--timeout-wait",
        type=_seconds,
        default=None,
        metavar="DURATION",
        help="for --wait (30s, or longer if the service has SDKs spread their reports over more)",
    )


def _add_playbook_commands(command: _Command, common: argparse.ArgumentParser) -> None:
    """``playbook list|show|apply|revert``."""
    playbook = command(
        "playbook", cmd_playbook, "containment playbooks: list, show, apply, revert",
        "flagctl playbook list",
        "flagctl playbook apply checkout-degraded --reason 'p95 9s' --incident INC-42 --dry-run",
    )  # fmt: skip
    pb = playbook.add_subparsers(dest="playbook_command", required=True, metavar="ACTION")
    pb.add_parser("list", parents=[common], help="playbooks and whether applied")
    pb.add_parser("show", parents=[common], help="one playbook").add_argument("name", help="the playbook")
    for action, help_text in (("apply", "apply every change at once"), ("revert", "put the flags back")):
        p = pb.add_parser(action, parents=[common], help=help_text, description=help_text)
        p.add_argument("name", help="the playbook")
        p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
        p.add_argument("--incident", required=action == "apply", help="incident id (required to apply)")
        p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
        _add_wait_arguments(p)
        if action == "apply":
            p.add_argument("--for", dest="for_", metavar="DURATION", help="revert by itself after 30m, 2h...")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    api = None if args.func is cmd_completion else _connect(parser, args)
    try:
        result = args.func(api, args)
    except CommandError as exc:
        print(f"flagctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result, indent=2) if args.json else result)
    return EXIT_OK


def _connect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Api:
    """The service of the options or the environment (exits with usage help if there is none)."""
    # The control listener, when there is one, answers operators first (SDK polls never queue there).
    url = getattr(args, "url", None) or os.environ.get("FLAGSVC_CONTROL_URL") or os.environ.get("FLAGSVC_URL")
    token = getattr(args, "token", None) or os.environ.get("FLAGSVC_TOKEN")
    env = getattr(args, "env", None) or os.environ.get("FLAGSVC_ENV") or "production"
    if not url or not token:
        parser.error("set --url and --token (or FLAGSVC_CONTROL_URL or FLAGSVC_URL, and FLAGSVC_TOKEN)")
    return Api(url, token, env, getattr(args, "timeout", 10.0))


if __name__ == "__main__":
    sys.exit(main())
