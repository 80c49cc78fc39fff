"""flagctl playbook and report against a live server: a scripted incident, its Markdown report."""

from __future__ import annotations

import json
import re

import pytest
import requests

from flagsvc_client.flagctl import main

from .helpers import ENV_URL


@pytest.fixture
def ctl(server, tokens, capsys):
    def run(*args: str, role: str = "operator"):
        code = main(["--url", server.url, "--token", tokens[role], *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    return run


@pytest.fixture
def incident(server, auth, ctl):
    """INC-42: a kill, a playbook applied then reverted, a restore; an unrelated change after."""
    admin = auth("admin")
    for key in ("checkout.recs", "exports", "search.v2"):
        requests.put(f"{server.url}{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True},
                     headers=admin, timeout=5)  # fmt: skip
    playbook = {
        "description": "shed load",
        "changes": {"exports": {"enabled": False}, "search.v2": {"enabled": False}},
    }
    requests.put(f"{server.url}{ENV_URL}/playbooks/shed-load", json=playbook, headers=admin, timeout=5)
    ctl("kill", "checkout.recs", "--reason", "recs time out", "--incident", "INC-42")
    ctl("playbook", "apply", "shed-load", "--reason", "db saturated", "--incident", "INC-42")
    ctl("restore", "search.v2", "--reason", "search is fine", "--incident", "INC-42")
    ctl("playbook", "revert", "shed-load", "--reason", "db recovered", "--incident", "INC-42")
    ctl("restore", "checkout.recs", "--reason", "unrelated", "--incident", "INC-43")


def table(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[1:]]


def test_playbook_commands(incident, ctl):
    listed = ctl("playbook", "list", role="reader")
    assert listed.split()[:3] == ["-", "-", "shed-load"], "not applied, no alert applies it"
    preview = ctl("playbook", "apply", "shed-load", "--reason", "r", "--incident", "INC-50", "--dry-run")
    assert preview.startswith("would apply playbook shed-load")
    assert "exports: " in preview and "already as wanted" not in preview
    assert json.loads(ctl("playbook", "show", "shed-load", "--json", role="reader"))["applied"] is None


def test_report_for_a_scripted_incident(incident, ctl):
    report = ctl("report", "--incident", "INC-42", role="reader")
    assert report.startswith("# Incident INC-42: flag changes\n")
    timeline = [row[1:] for row in table(report, "Timeline")]  # all but the time
    assert timeline == [
        ["operator", "flag.kill", "checkout.recs", "on → **off**", "recs time out"],
        ["operator", "playbook.apply", "playbook `shed-load`", "", "db saturated"],
        ["operator", "flag.kill", "exports", "on → **off**", "db saturated"],
        ["operator", "flag.kill", "search.v2", "on → **off**", "db saturated"],
        ["operator", "flag.restore", "search.v2", "**off** → on", "search is fine"],
        ["operator", "playbook.revert", "playbook `shed-load`", "", "db recovered"],
        ["operator", "flag.restore", "exports", "**off** → on", "db recovered"],
    ]
    assert "- `shed-load` **applied**" in report
    assert "left alone (changed since): `search.v2`" in report
    kills = {row[0]: row for row in table(report, "Kills and how long they lasted")}
    assert set(kills) == {"`checkout.recs`", "`exports`", "`search.v2`"}
    assert kills["`checkout.recs`"][3:] == ["—", "—", "restored by a change outside this report"]
    assert kills["`exports`"][4] == "operator" and kills["`exports`"][5].endswith(" s")
    # The report is of INC-42; what is disabled now is the state of the environment today.
    assert "## Still disabled now\n\nNothing: every flag of `production` is enabled." in report


def test_report_shows_hostile_text_as_text(server, auth, make_token, ctl):
    """A reason or token name holding control characters, bidi overrides, pipes, HTML or Markdown
    stays in its table cell on one line and renders as the very text (escaped), nothing else."""
    actor = "eve\u202e|`*"
    hostile = {"Authorization": f"Bearer {make_token('operator', name=actor)}"}
    reason = "ok\x1b[2J\r\nforged | <img src=x onerror=alert(1)> *x* [y](javascript:z) `c` &#x202e; _u_ ~s~"
    for key, why in (("checkout.recs", reason), ("exports", "\u202egnp.exe")):
        requests.put(f"{server.url}{ENV_URL}/flags/{key}", json={"kind": "kill_switch", "enabled": True},
                     headers=auth("admin"), timeout=5)  # fmt: skip
        resp = requests.post(
            f"{server.url}{ENV_URL}/flags/{key}/kill",
            json={"reason": why, "incident": "INC-66"},
            headers=hostile,
            timeout=5,
        )
        assert resp.ok, resp.text

    report = ctl("report", "--incident", "INC-66", role="reader")
    assert all(line.isprintable() for line in report.splitlines()), "no raw control or bidi character"
    shown_actor = r"eve\\u202e\|\`\*"
    timeline = table(report, "Timeline")
    assert [row[1:] for row in timeline] == [
        [
            shown_actor,
            "flag.kill",
            "checkout.recs",
            "on → **off**",
            r"ok\\x1b\[2J\\r\\nforged \| \<img src=x onerror=alert(1)> \*x\* \[y\](javascript:z) \`c\` "
            r"\&#x202e; \_u\_ \~s\~",
        ],
        [shown_actor, "flag.kill", "exports", "on → **off**", r"\\u202egnp.exe"],
    ]
    assert [row[2] for row in table(report, "Kills and how long they lasted")] == [shown_actor] * 2
    disabled = report.split("## Still disabled now\n", 1)[1]
    assert f"- `checkout.recs` (kill_switch), since {timeline[0][0]} by {shown_actor}\n" in disabled
