"""Export then import into an empty Redis reproduces the environment; import is idempotent."""

from __future__ import annotations

import json

import redis
from click.testing import CliRunner

from flagsvc.audit import AuditLog
from flagsvc.cli import main
from flagsvc.keys import EnvKeys

from .helpers import ENV_URL, TIMEOUT_FLAG
from .redis_server import RedisServer


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def test_export_import_round_trip_into_an_empty_redis(client, auth, redis_url, tmp_path):
    admin = auth("admin")
    client.put(
        f"{ENV_URL}/flags/recs",
        json={"kind": "kill_switch", "enabled": True, "owner": "checkout"},
        headers=admin,
    )
    client.put(
        f"{ENV_URL}/flags/timeout",
        json={
            **TIMEOUT_FLAG,
            "rules": [
                {
                    "conditions": [{"attribute": "region", "operator": "in", "values": ["eu"]}],
                    "variant": "short",
                }
            ],
        },
        headers=admin,
    )
    client.put(f"{ENV_URL}/flags/gone", json={"kind": "release", "enabled": True}, headers=admin)
    client.delete(f"{ENV_URL}/flags/gone", headers=admin)
    client.post(f"{ENV_URL}/flags/recs/kill", json={"reason": "INC-1"}, headers=auth("operator"))
    client.put(f"{ENV_URL}/playbooks/shed", json={"changes": {"recs": {"enabled": False}}}, headers=admin)

    exported = cli("export", "--env", "production", "--redis-url", redis_url)
    assert exported.exit_code == 0, exported.output
    document = json.loads(exported.output)
    assert set(document["flags"]) == {"recs", "timeout"}, "archived flags are not exported"
    assert document["flags"]["recs"]["enabled"] is False

    empty = RedisServer(tmp_path / "empty").start()
    try:
        path = tmp_path / "production.json"
        path.write_text(exported.output)
        imported = cli("import", "--env", "production", str(path), "--redis-url", empty.url)
        assert imported.exit_code == 0, imported.output
        assert "2 flags created, 1 playbook created" in imported.output
        again = json.loads(cli("export", "--env", "production", "--redis-url", empty.url).output)
        for doc in (document, again):
            doc.pop("exported_at"), doc.pop("env_version")
        assert again == document
        repeat = cli("import", "--env", "production", str(path), "--redis-url", empty.url)
        assert "nothing to change" in repeat.output
        other = redis.Redis.from_url(empty.url, decode_responses=True)
        log = AuditLog(other, EnvKeys("production"))
        assert log.verify().ok
        actions = [f["action"] for _, f in other.xrange(EnvKeys("production").audit)]
        assert sorted(actions) == ["flag.create", "flag.create", "playbook.create"]
        other.close()
    finally:
        empty.stop()


def test_an_invalid_file_imports_nothing(redis_url, snapshot_redis, tmp_path):
    before = snapshot_redis()
    bad = {
        "format": "flagsvc-export/1",
        "flags": {"ok": {"kind": "kill_switch", "enabled": True}, "bad": {"kind": "nope", "enabled": True}},
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = cli("import", "--env", "production", str(path), "--redis-url", redis_url)
    assert (
        result.exit_code != 0 and "flags.bad.kind" in result.output and "nothing was changed" in result.output
    )
    foreign = cli("import", "--env", "production", "-", "--redis-url", redis_url, input='{"flag": {}}')
    assert foreign.exit_code != 0 and "flag: unknown field" in foreign.output
    alien = cli("import", "--env", "production", "-", "--redis-url", redis_url, input='{"format": "x/2"}')
    assert alien.exit_code != 0 and "format: must be 'flagsvc/1'" in alien.output
    assert snapshot_redis() == before
