"""Admin commands work on the service's real data or refuse: they never create a data folder or
start a Redis of their own (a token created there would get 401 from the real service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flagsvc.cli import main

EXPORT = {"format": "flagsvc-export/1", "flags": {"recs": {"kind": "kill_switch", "enabled": True}}}

ADMIN_COMMANDS = [
    ["token", "create", "--name", "ci", "--role", "reader"],
    ["token", "list"],
    ["token", "revoke", "ci"],
    ["audit", "verify", "--env", "production"],
    ["audit", "trim", "--env", "production", "--before", "180d", "--archive", "old.ndjson"],
    ["export", "--env", "production"],
    ["import", "--env", "production", "production.json"],
    ["worker", "--once"],
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An operator's shell in a folder with an export file and no `FLAGSVC_*` variable."""
    for name in [n for n in os.environ if n.startswith("FLAGSVC_")]:
        monkeypatch.delenv(name)
    folder = tmp_path / "ops"
    folder.mkdir()
    (folder / "production.json").write_text(json.dumps(EXPORT))
    monkeypatch.chdir(folder)
    return folder


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def assert_refused_with_advice(output: str) -> None:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    for advice in ("flagsvc serve", "--data-dir", "--redis-url"):
        assert advice in lines[0], output


@pytest.mark.parametrize("args", ADMIN_COMMANDS, ids=lambda a: " ".join(w for w in a[:2] if w[0] != "-"))
def test_without_a_running_service_admin_commands_refuse_and_create_nothing(workdir, args):
    before = tree(workdir)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert_refused_with_advice(result.output)
    assert not (workdir / "flagsvc-data").exists()
    assert tree(workdir) == before


def test_on_the_data_dir_of_a_stopped_service_admin_commands_refuse_and_touch_nothing(workdir):
    data_dir = workdir / "flagsvc-data"
    data_dir.mkdir()
    (data_dir / "admin-token").write_text("fsk_x\n")
    (data_dir / "flagsvc.aof").write_bytes(b"")
    before = tree(workdir)
    result = CliRunner().invoke(main, ["token", "create", "--name", "ci", "--role", "reader"])
    assert result.exit_code == 1, result.output
    assert_refused_with_advice(result.output)
    assert str(data_dir.resolve()) in result.output
    assert tree(workdir) == before


def test_audit_verify_of_an_unknown_environment_is_an_error(app, redis_url, tmp_path):
    textfile = tmp_path / "chain.prom"
    args = ["audit", "verify", "--env", "prodution", "--redis-url", redis_url, "--textfile", str(textfile)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "'prodution' does not exist" in result.output and "intact" not in result.output
    assert "production" in result.output, "the existing environments are named"
    assert not textfile.exists(), "no 'chain ok' sample for an environment that is not there"


@pytest.mark.slow  # a python subprocess
def test_python_m_flagsvc_cli_runs_audit_trim(app, redis_url, tmp_path):
    archive = tmp_path / "old.ndjson"
    command = [sys.executable, "-m", "flagsvc.cli", "audit", "trim", "--env", "production"]
    command += ["--before", "180d", "--archive", str(archive), "--redis-url", redis_url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nothing older than" in result.stdout
