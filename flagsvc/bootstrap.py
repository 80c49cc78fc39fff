"""First start of ``flagsvc serve``: the ``production`` environment and an admin token.

``flagsvc serve`` runs this module as a short-lived process of its own
(``python -m flagsvc.bootstrap DATA_DIR``, the Redis URL in ``FLAGSVC_REDIS_URL``), so that the
supervising process that stays for the life of the service never imports the stores, nor Flask.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import redis

from .connection import connect
from .envs import EnvStore
from .tokens import Role, TokenStore

DEFAULT_ENV = "production"
ADMIN_TOKEN_FILE = "admin-token"
BOOTSTRAP_ACTOR = "flagsvc-bootstrap"


def bootstrap(client: redis.Redis, data_dir: Path) -> str | None:
    """On a first start: the ``production`` environment and an admin token.

    The token's secret is written to ``<data-dir>/admin-token`` (mode 0600) and returned, so it
    is shown once; on later starts nothing is created and ``None`` is returned.
    """
    envs = EnvStore(client)
    if not envs.list():
        envs.create(DEFAULT_ENV, actor=BOOTSTRAP_ACTOR)
    tokens = TokenStore(client)
    if tokens.count():
        return None
    _, secret = tokens.create(name="admin", role=Role.ADMIN, envs=[], actor=BOOTSTRAP_ACTOR)
    path = data_dir / ADMIN_TOKEN_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)
    return secret


def main(argv: list[str]) -> int:
    """Bootstrap the Redis of ``FLAGSVC_REDIS_URL``; print the admin token of a first start."""
    if len(argv) != 1 or not os.environ.get("FLAGSVC_REDIS_URL"):
        print("usage: FLAGSVC_REDIS_URL=... python -m flagsvc.bootstrap DATA_DIR", file=sys.stderr)
        return 2
    data_dir = Path(argv[0])
    client = connect(os.environ["FLAGSVC_REDIS_URL"])
    try:
        secret = bootstrap(client, data_dir)
    finally:
        client.close()
    if secret:
        click.echo(f"flagsvc: first start: admin token (shown once, also in {data_dir / ADMIN_TOKEN_FILE}):")
        click.echo(f"    {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
