"""The post-incident report: a Markdown timeline built from audit entries and the current flags.

Every text from the server (reasons, token names, flag keys...) goes through :func:`_md` or
:func:`_code`: it stays on its line and in its table cell, and renders as that very text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ._escaping import printable

FLAG_ACTIONS = ("flag.kill", "flag.restore", "flag.update", "flag.auto_revert", "flag.create", "flag.delete")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _hm(text: str) -> str:
    return _time(text).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{int(seconds)} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


# What Markdown (GFM) could read as markup inside a line: escapes, code, emphasis, links, HTML,
# entities, table pipes, strikethrough, math; and ``_`` unless it sits between two alphanumerics.
_MARKUP = re.compile(r"[\\`*\[\]<|&~$]|(?<![^\W_])_|_(?![^\W_])")
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def _md(text: Any) -> str:
    """``text`` as Markdown that shows exactly that text, escaped by :func:`printable`, on one line."""
    return _MARKUP.sub(lambda m: "\\" + m.group(), printable(str(text or "")))


def _code(text: Any) -> str:
    """An identifier as inline code; any other text as :func:`_md` (a code span cannot escape)."""
    text = str(text or "")
    return f"`{text}`" if _IDENTIFIER.fullmatch(text) else _md(text)


def _state(flag: Mapping[str, Any] | None) -> str:
    if not flag:
        return "—"
    if flag.get("archived"):
        return "archived"
    enabled = "on" if flag.get("enabled") else "**off**"
    if flag.get("type", "boolean") != "boolean":
        return f"{enabled}, serves {_code(flag.get('default_variant'))}"
    return enabled


def build_report(
    entries: Iterable[Mapping[str, Any]],
    flags: Iterable[Mapping[str, Any]],
    *,
    env: str,
    title: str,
    now: datetime | None = None,
) -> str:
    """Markdown: the timeline, playbooks applied and reverted, how long each kill lasted, and
    what is still disabled now. ``entries`` oldest first, as the audit API returns them."""
    now = now or datetime.now(UTC)
    entries = list(entries)
    flags = list(flags)
    lines = [f"# {_md(title)}", ""]
    if not entries:
        return "\n".join([*lines, f"No change in {_code(env)} matches.", ""])
    lines += _timeline(entries, env, now)
    lines += _section("Playbooks", _playbook_lines(entries))
    current = {f["key"]: f for f in flags}
    lines += _section("Kills and how long they lasted", _kill_table(_kills(entries), current, now))
    lines += ["", "## Still disabled now", "", *_still_disabled(flags, env)]
    return "\n".join([*lines, ""])


def _section(heading: str, body: list[str]) -> list[str]:
    """A section, or nothing when there is nothing to say."""
    return ["", f"## {heading}", "", *body] if body else []


def _timeline(entries: list[Mapping[str, Any]], env: str, now: datetime) -> list[str]:
    lines = [
        f"Environment {_code(env)}: {len(entries)} audited changes from {_hm(entries[0]['time'])} to "
        f"{_hm(entries[-1]['time'])} UTC. Generated {now.strftime('%Y-%m-%d %H:%M')} UTC from the audit log.",
        "",
        "## Timeline",
        "",
        "| time (UTC) | actor | action | flag | change | reason |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        target = _md(e.get("flag")) or (
            f"playbook {_code(e['playbook'])}" if e.get("playbook") else _md(e.get("token"))
        )
        change = ""
        if e.get("flag"):
            change = f"{_state(e.get('before'))} → {_state(e.get('after'))}"
        lines.append(
            f"| {_hm(e['time'])} | {_md(e['actor'])} | {_md(e['action'])} | {target} | {change} | "
            f"{_md(e.get('reason'))} |"
        )
    return lines


def _playbook_lines(entries: list[Mapping[str, Any]]) -> list[str]:
    """One line per playbook applied or reverted."""
    lines = []
    for e in entries:
        if e["action"] == "playbook.apply":
            changed = ", ".join(_code(c["flag"]) for c in (e.get("after") or {}).get("changed", []))
            lines.append(
                f"- {_code(e['playbook'])} **applied** {_hm(e['time'])} by {_md(e['actor'])} "
                f"(operation {_code(e.get('operation'))}): {changed or 'nothing to change'}"
            )
        elif e["action"] == "playbook.revert":
            after = e.get("after") or {}
            reverted = ", ".join(_code(c["flag"]) for c in after.get("reverted", []))
            skipped = ", ".join(_code(c["flag"]) for c in after.get("skipped", []))
            lines.append(
                f"- {_code(e['playbook'])} **reverted** {_hm(e['time'])} by {_md(e['actor'])}: "
                f"{reverted or 'nothing'}" + (f"; left alone (changed since): {skipped}" if skipped else "")
            )
    return lines


def _kills(entries: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each change that turned a flag off, with the one that turned it on again (``end``) if any."""
    kills: list[dict[str, Any]] = []
    open_kills: dict[str, dict[str, Any]] = {}
    for e in entries:
        before, after = e.get("before") or {}, e.get("after") or {}
        if not e.get("flag") or not before or not after:
            continue
        if before.get("enabled") and not after.get("enabled"):
            open_kills[e["flag"]] = {"flag": e["flag"], "killed": e["time"], "by": e["actor"], "end": None}
        elif not before.get("enabled") and after.get("enabled") and e["flag"] in open_kills:
            kill = open_kills.pop(e["flag"])
            kill.update(end=e["time"], end_by=e["actor"])
            kills.append(kill)
    return kills + list(open_kills.values())


def _kill_table(
    kills: list[dict[str, Any]], current: Mapping[str, Mapping[str, Any]], now: datetime
) -> list[str]:
    if not kills:
        return []
    lines = ["| flag | killed | by | restored | by | lasted |", "|---|---|---|---|---|---|"]
    for k in sorted(kills, key=lambda k: k["killed"]):
        start = f"| {_code(k['flag'])} | {_hm(k['killed'])} | {_md(k['by'])}"
        if k["end"]:
            lasted = _duration((_time(k["end"]) - _time(k["killed"])).total_seconds())
            lines.append(f"{start} | {_hm(k['end'])} | {_md(k['end_by'])} | {lasted} |")
        elif current.get(k["flag"], {}).get("enabled"):
            lines.append(f"{start} | — | — | restored by a change outside this report |")
        else:
            lasted = _duration((now - _time(k["killed"])).total_seconds())
            lines.append(f"{start} | — | — | still off ({lasted} so far) |")
    return lines


def _still_disabled(flags: list[Mapping[str, Any]], env: str) -> list[str]:
    disabled = [f for f in flags if not f.get("enabled") and not f.get("archived")]
    if not disabled:
        return [f"Nothing: every flag of {_code(env)} is enabled."]
    lines = []
    for f in disabled:
        revert = f" — reverts by itself at {_hm(f['revert_at'])}" if f.get("revert_at") else ""
        lines.append(
            f"- {_code(f['key'])} ({_md(f['kind'])}), since {_hm(f['updated_at'])} by "
            f"{_md(f['updated_by'])}{revert}"
        )
    return lines
