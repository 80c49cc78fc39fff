"""The post-incident report: a Markdown timeline built from audit entries and the current flags."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

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


def _state(flag: Mapping[str, Any] | None) -> str:
    if not flag:
        return "—"
    if flag.get("archived"):
        return "archived"
    enabled = "on" if flag.get("enabled") else "**off**"
    if flag.get("type", "boolean") != "boolean":
        return f"{enabled}, serves `{flag.get('default_variant')}`"
    return enabled


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


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
    current = {f["key"]: f for f in flags}
    lines = [f"# {title}", ""]
    if not entries:
        return "\n".join([*lines, f"No change in `{env}` matches.", ""])
    lines += [
        f"Environment `{env}`: {len(entries)} audited changes from {_hm(entries[0]['time'])} to "
        f"{_hm(entries[-1]['time'])} UTC. Generated {now.strftime('%Y-%m-%d %H:%M')} UTC from the audit log.",
        "",
        "## Timeline",
        "",
        "| time (UTC) | actor | action | flag | change | reason |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        target = e.get("flag") or (
            f"playbook `{e['playbook']}`" if e.get("playbook") else e.get("token") or ""
        )
        change = ""
        if e.get("flag"):
            change = f"{_state(e.get('before'))} → {_state(e.get('after'))}"
        lines.append(
            f"| {_hm(e['time'])} | {_cell(e['actor'])} | {e['action']} | {_cell(target)} | {change} | "
            f"{_cell(e.get('reason'))} |"
        )

    playbook_lines = []
    for e in entries:
        if e["action"] == "playbook.apply":
            changed = ", ".join(f"`{c['flag']}`" for c in (e.get("after") or {}).get("changed", []))
            playbook_lines.append(
                f"- `{e['playbook']}` **applied** {_hm(e['time'])} by {e['actor']} "
                f"(operation `{e.get('operation')}`): {changed or 'nothing to change'}"
            )
        elif e["action"] == "playbook.revert":
            after = e.get("after") or {}
            reverted = ", ".join(f"`{c['flag']}`" for c in after.get("reverted", []))
            skipped = ", ".join(f"`{c['flag']}`" for c in after.get("skipped", []))
            playbook_lines.append(
                f"- `{e['playbook']}` **reverted** {_hm(e['time'])} by {e['actor']}: {reverted or 'nothing'}"
                + (f"; left alone (changed since): {skipped}" if skipped else "")
            )
    if playbook_lines:
        lines += ["", "## Playbooks", "", *playbook_lines]

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
    kills += open_kills.values()
    if kills:
        lines += [
            "",
            "## Kills and how long they lasted",
            "",
            "| flag | killed | by | restored | by | lasted |",
            "|---|---|---|---|---|---|",
        ]
        for k in sorted(kills, key=lambda k: k["killed"]):
            start = f"| `{k['flag']}` | {_hm(k['killed'])} | {k['by']}"
            if k["end"]:
                lasted = _duration((_time(k["end"]) - _time(k["killed"])).total_seconds())
                lines.append(f"{start} | {_hm(k['end'])} | {k['end_by']} | {lasted} |")
            elif current.get(k["flag"], {}).get("enabled"):
                lines.append(f"{start} | — | — | restored by a change outside this report |")
            else:
                lasted = _duration((now - _time(k["killed"])).total_seconds())
                lines.append(f"{start} | — | — | still off ({lasted} so far) |")

    disabled = [f for f in flags if not f.get("enabled") and not f.get("archived")]
    lines += ["", "## Still disabled now", ""]
    if disabled:
        for f in disabled:
            revert = f" — reverts by itself at {_hm(f['revert_at'])}" if f.get("revert_at") else ""
            lines.append(
                f"- `{f['key']}` ({f['kind']}), since {_hm(f['updated_at'])} by {f['updated_by']}{revert}"
            )
    else:
        lines.append(f"Nothing: every flag of `{env}` is enabled.")
    return "\n".join([*lines, ""])
