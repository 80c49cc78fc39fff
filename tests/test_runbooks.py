"""Every command in the runbooks and in docs/ is a real command of this project, with real options,
and every API path they show is a route."""

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

ROOT = Path(__file__).parent.parent
RUNBOOKS = sorted((ROOT / "ops/runbooks").glob("*.md"))
DOCS = sorted((ROOT / "docs").glob("*.md"))


def commands(path: Path) -> list[str]:
    """The shell lines of the page's ```sh blocks, continuation lines joined."""
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


def routes_of(app) -> list[str]:
    return [re.sub(r"<[^>]+>", "[^/]+", rule.rule) for rule in app.url_map.iter_rules()]


def check_commands(path: Path, routes: list[str]) -> int:
    """Check every flagsvc, flagctl and curl line of ``path``'s sh blocks; how many were checked."""
    checked = 0
    for line in commands(path):
        words = shlex.split(line.split(" > ")[0])
        if words[0] in ("flagsvc", "flagctl"):
            help_text = flagsvc_help(words[1:]) if words[0] == "flagsvc" else flagctl_help(words[1:])
            missing = {o for o in options_of(words) if o not in help_text}
            assert not missing, f"{path.name}: {line!r} uses unknown options {missing}"
            checked += 1
        elif words[0] == "curl":
            url = next((w for w in words if "/" in w and ("$FLAGSVC_URL" in w or "://" in w)), None)
            assert url, f"{path.name}: {line!r}: write the URL as $FLAGSVC_URL/... or in full"
            if url.startswith("$FLAGSVC_URL"):
                route = url.removeprefix("$FLAGSVC_URL")
            else:
                route = "/" + url.split("://", 1)[1].partition("/")[2]
            route = route.split("?")[0]
            assert any(re.fullmatch(r, route) for r in routes), f"{path.name}: no route for {route}"
            checked += 1
    return checked


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.name)
def test_runbook_commands_exist(runbook, app):
    assert check_commands(runbook, routes_of(app)) >= 2, f"{runbook.name} shows no command"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_commands_exist(page, app):
    check_commands(page, routes_of(app))


def test_docs_show_commands(app):
    """The pages about operating the service show their commands in sh blocks, so they are checked."""
    routes = routes_of(app)
    for name in ("operations.md", "audit.md", "sdk.md"):
        assert check_commands(ROOT / "docs" / name, routes) >= 2, f"docs/{name} shows no command"


def test_there_is_a_runbook_for_each_situation():
    assert {p.stem for p in RUNBOOKS} >= {
        "disable-a-feature",
        "playbooks",
        "outage",
        "rotate-token",
        "review-audit",
        "backup-restore",
    }
