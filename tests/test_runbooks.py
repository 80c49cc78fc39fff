"""Every command in the runbooks is a real command of this project, with real options."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from flagsvc.cli import main as flagsvc_main
from flagsvc_client.flagctl import main as flagctl_main

RUNBOOKS = sorted((Path(__file__).parent.parent / "ops/runbooks").glob("*.md"))


def commands(path: Path) -> list[str]:
    """The shell lines of the runbook's ```sh blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
        lines += [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    return lines


def options_of(words: list[str]) -> set[str]:
    return {w.split("=")[0] for w in words if w.startswith("--")}


def flagsvc_help(words: list[str]) -> str:
    path, group = [], flagsvc_main
    for word in words:
        if isinstance(group, click.Group) and word in group.commands:
            path.append(word)
            group = group.commands[word]
        else:
            break
    result = CliRunner().invoke(flagsvc_main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert not isinstance(group, click.Group), f"flagsvc {' '.join(path)} needs a subcommand"
    return result.output


def flagctl_help(words: list[str]) -> str:
    path = [w for w in words[:2] if not w.startswith("-")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        flagctl_main([*path, "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.name)
def test_runbook_commands_exist(runbook, app):
    routes = [re.sub(r"<[^>]+>", "[^/]+", rule.rule) for rule in app.url_map.iter_rules()]
    checked = 0
    for line in commands(runbook):
        words = shlex.split(line.split(" > ")[0])
        if words[0] in ("flagsvc", "flagctl"):
            help_text = flagsvc_help(words[1:]) if words[0] == "flagsvc" else flagctl_help(words[1:])
            missing = {o for o in options_of(words) if o not in help_text}
            assert not missing, f"{runbook.name}: {line!r} uses unknown options {missing}"
            checked += 1
        elif words[0] == "curl":
            url = next(w for w in words if "/" in w and ("$FLAGSVC_URL" in w or "://" in w))
            if url.startswith("$FLAGSVC_URL"):
                path = url.removeprefix("$FLAGSVC_URL")
            else:
                path = "/" + url.split("://", 1)[1].partition("/")[2]
            path = path.split("?")[0]
            assert any(re.fullmatch(r, path) for r in routes), f"{runbook.name}: no route for {path}"
            checked += 1
    assert checked >= 2, f"{runbook.name} shows no command"


def test_there_is_a_runbook_for_each_situation():
    assert {p.stem for p in RUNBOOKS} >= {
        "disable-a-feature",
        "playbooks",
        "outage",
        "rotate-token",
        "review-audit",
        "backup-restore",
    }
