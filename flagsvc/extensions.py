"""The stores bound to an app: created once in the factory, reached through ``stores()``.

One Redis connection pool per process. ``flagsvc serve`` forks gunicorn workers *before*
they create the app (no preload), so no pool crosses a fork.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Flask, current_app
from redis.backoff import NoBackoff
from redis.retry import Retry

from .audit import AuditLog
from .changes import ChangeListener
from .clients import ClientRegistry, Limits
from .envs import EnvStore
from .flags import FlagStore
from .keys import EnvKeys
from .playbooks import PlaybookStore
from .snapshots import SnapshotCache
from .streaming import StreamLimiter
from .tokens import TokenStore


@dataclass
class Stores:
    """Everything the requests of one app reach Redis through."""

    redis: redis.Redis
    envs: EnvStore
    flags: FlagStore
    tokens: TokenStore
    snapshots: SnapshotCache
    clients: ClientRegistry
    playbooks: PlaybookStore
    streams: StreamLimiter
    listener: ChangeListener

    def audit(self, env: str) -> AuditLog:
        """The audit log of ``env``."""
        return AuditLog(self.redis, EnvKeys(env))

    def ping(self) -> None:
        """Raise ``redis.RedisError`` unless Redis answers."""
        self.redis.ping()

    def started(self) -> Stores:
        """These stores, with this process's change listener running."""
        self.listener.ensure_started()
        return self

    def close(self) -> None:
        """Stop the change listener (an app embedded in tests, say)."""
        self.listener.stop()


def connect(url: str, *, socket_timeout: float = 5.0) -> redis.Redis:
    """A Redis client for ``url`` (redis://, rediss:// or unix://), decoding to ``str``."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        # One immediate retry covers a pooled connection that died with a Redis restart; more
        # would only delay the 503 an outage must give. Retrying a commit is safe: its audit-head
        # check refuses to apply the same change twice. A timeout is not retried: Redis is hung,
        # and a commit in flight has an unknown outcome that the answer must say.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )


def make_stores(
    client: redis.Redis,
    *,
    token_cache_seconds: float = 1.0,
    limits: Limits | None = None,
    streams_per_token: int = 2_000,
) -> Stores:
    flags = FlagStore(client)
    tokens = TokenStore(client, cache_seconds=token_cache_seconds)
    envs = EnvStore(client)
    snapshots = SnapshotCache(client, flags, list_envs=envs.list)
    return Stores(
        redis=client,
        envs=envs,
        flags=flags,
        tokens=tokens,
        snapshots=snapshots,
        clients=ClientRegistry(client, limits),
        playbooks=PlaybookStore(client),
        streams=StreamLimiter(streams_per_token),
        listener=ChangeListener(client, [snapshots, tokens]),
    )


def init_app(app: Flask) -> None:
    url = app.config.get("REDIS_URL")
    if not url:
        raise RuntimeError(
            "FLAGSVC_REDIS_URL is not set: use `flagsvc serve` for the embedded Redis, "
            "or point FLAGSVC_REDIS_URL at a Redis server"
        )
    client = connect(str(url), socket_timeout=float(app.config["REDIS_SOCKET_TIMEOUT"]))
    app.extensions["flagsvc"] = make_stores(
        client,
        token_cache_seconds=float(app.config["TOKEN_CACHE_SECONDS"]),
        limits=Limits(int(app.config["MAX_INSTANCES_PER_TOKEN"]), int(app.config["HEARTBEATS_PER_MINUTE"])),
        streams_per_token=int(app.config["MAX_STREAMS_PER_TOKEN"]),
    )


def stores() -> Stores:
    """The current app's stores, with this process's change listener running."""
    return stores_of(current_app)


def stores_of(app: Flask) -> Stores:
    """``app``'s stores, with this process's change listener running."""
    s: Stores = app.extensions["flagsvc"]
    return s.started()
