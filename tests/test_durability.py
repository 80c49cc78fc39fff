"""An acknowledged change survives Redis being killed: AOF with appendfsync always."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import redis

from flagsvc import create_app
from flagsvc.audit import AuditLog
from flagsvc.envs import EnvStore
from flagsvc.keys import EnvKeys
from flagsvc.tokens import Role, TokenStore

from .helpers import FLAGS_URL
from .redis_server import RedisServer

pytestmark = pytest.mark.slow  # kills and restarts a redis-server


def test_acknowledged_changes_survive_sigkill(tmp_path):
    server = RedisServer(tmp_path / "redis", durable=True).start()
    apps: list[Any] = []
    try:
        direct = redis.Redis.from_url(server.url, decode_responses=True)
        EnvStore(direct).create("production", actor="test")
        _, secret = TokenStore(direct).create(name="oncall", role=Role.ADMIN, envs=[], actor="test")
        apps.append(create_app({"REDIS_URL": server.url}))
        client = apps[-1].test_client()
        headers = {"Authorization": f"Bearer {secret}"}
        acknowledged: dict[str, bool] = {}
        for i in range(20):
            key = f"feature-{i}"
            assert (
                client.put(
                    f"{FLAGS_URL}/{key}", json={"kind": "kill_switch", "enabled": True}, headers=headers
                ).status_code
                == 201
            )
            if i % 2 == 0:
                resp = client.post(f"{FLAGS_URL}/{key}/kill", json={"reason": f"INC {i}"}, headers=headers)
                assert resp.status_code == 200
            acknowledged[key] = i % 2 != 0
        expected_entries = direct.xlen(EnvKeys("production").audit)
        server.kill(signal.SIGKILL)  # right after the last acknowledgement: no shutdown, no save

        server.start()
        after = redis.Redis.from_url(server.url, decode_responses=True)
        apps.append(create_app({"REDIS_URL": server.url}))
        client = apps[-1].test_client()
        flags = {f["key"]: f["enabled"] for f in client.get(FLAGS_URL, headers=headers).json["flags"]}
        assert flags == acknowledged
        assert after.xlen(EnvKeys("production").audit) == expected_entries == 30
        assert int(after.get(EnvKeys("production").version)) == 30
        result = AuditLog(after, EnvKeys("production")).verify()
        assert result.ok and result.entries == 30
    finally:
        for app in apps:  # their change listeners stop with the test, not at the interpreter's exit
            app.extensions["flagsvc"].close()
        server.kill()
