"""Audit retention: trimming archives first, is audited, and the chain verifies across the cut."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from click.testing import CliRunner

from flagsvc.cli import main
from flagsvc.keys import EnvKeys

from .helpers import ENV_URL


def flip(client, auth, n: int) -> None:
    for i in range(n):
        action = "kill" if i % 2 == 0 else "restore"
        body = {"reason": f"step {i}", "incident": "INC-1"}
        assert (
            client.post(f"{ENV_URL}/flags/a/{action}", json=body, headers=auth("operator")).status_code == 200
        )


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_trim_archives_then_trims_and_verify_crosses_the_boundary(client, auth, r, redis_url, tmp_path):
    client.put(f"{ENV_URL}/flags/a", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    flip(client, auth, 10)
    time.sleep(0.05)
    cutoff = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    flip(client, auth, 5)
    stream = EnvKeys("production").audit
    old = [sid for sid, f in r.xrange(stream) if f["time"] < cutoff.replace("+00:00", "Z")]
    assert len(old) == 11

    archive = tmp_path / "audit-2026.ndjson"
    result = cli(
        "audit",
        "trim",
        "--env",
        "production",
        "--before",
        cutoff,
        "--archive",
        str(archive),
        "--redis-url",
        redis_url,
    )
    assert result.exit_code == 0, result.output
    assert "archived 11 entries" in result.output
    assert [json.loads(line)["id"] for line in archive.read_text().splitlines()] == old
    remaining = r.xrange(stream)
    assert [f["seq"] for _, f in remaining] == [str(s) for s in range(12, 18)]
    trim_entry = remaining[-1][1]
    assert trim_entry["action"] == "audit.trim" and json.loads(trim_entry["after"])["archived"] == 11

    live_only = cli("audit", "verify", "--env", "production", "--redis-url", redis_url)
    assert live_only.exit_code == 0 and "6 entries" in live_only.output
    full = cli("audit", "verify", "--env", "production", "--archive", str(archive), "--redis-url", redis_url)
    assert full.exit_code == 0 and "17 entries" in full.output, full.output

    # Queries no longer see the archived entries; the index skips them.
    assert len(client.get(f"{ENV_URL}/audit?flag=a&limit=100", headers=auth("reader")).json["entries"]) == 5

    # An edited archive is caught, and an archive is never overwritten.
    lines = archive.read_text().splitlines()
    record = json.loads(lines[3])
    record["fields"]["reason"] = "edited"
    lines[3] = json.dumps(record)
    archive.write_text("\n".join(lines) + "\n")
    edited = cli(
        "audit", "verify", "--env", "production", "--archive", str(archive), "--redis-url", redis_url
    )
    assert edited.exit_code == 1 and "archive" in edited.output
    again = cli(
        "audit",
        "trim",
        "--env",
        "production",
        "--before",
        cutoff,
        "--archive",
        str(archive),
        "--redis-url",
        redis_url,
    )
    assert again.exit_code != 0 and "never overwritten" in again.output


def test_nothing_to_trim_and_future_cutoffs(client, auth, redis_url, tmp_path, snapshot_redis):
    before = snapshot_redis()
    none = cli(
        "audit",
        "trim",
        "--env",
        "production",
        "--before",
        "2000-01-01T00:00:00Z",
        "--archive",
        str(tmp_path / "x.ndjson"),
        "--redis-url",
        redis_url,
    )
    assert none.exit_code == 0 and "nothing older" in none.output and not (tmp_path / "x.ndjson").exists()
    future = cli(
        "audit",
        "trim",
        "--env",
        "production",
        "--before",
        "2999-01-01T00:00:00Z",
        "--archive",
        str(tmp_path / "y.ndjson"),
        "--redis-url",
        redis_url,
    )
    assert future.exit_code != 0 and "future" in future.output
    assert snapshot_redis() == before
