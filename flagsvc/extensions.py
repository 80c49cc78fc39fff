"""The stores bound to an app: created once in the factory, reached through ``stores()``.

One Redis connection pool per process. ``flagsvc serve`` forks gunicorn workers *before*
they create the app (no preload), so no pool crosses a fork.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, current_app

from .audit import AuditLog
from .changes import ChangeListener, Subscriber
from .clients import ClientRegistry, Limits, OfrepUsage
from .connection import connect, durability_of, writable
from .console.sessions import ConsoleSessions
from .envs import EnvStore
from .flags import FlagStore
from .history import HistoryGuard
from .keys import EnvKeys
from .playbooks import PlaybookStore
from .ratelimit import WriteBudget
from .snapshots import SnapshotCache
from .streaming import OpenStreams
from .tokens import TokenStore
from .webhooks import WebhookStore

log = logging.getLogger(__name__)


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
    streams: OpenStreams
    writes: WriteBudget
    history: HistoryGuard
    ofrep_usage: OfrepUsage
    console: ConsoleSessions
    webhooks: WebhookStore
    listener: ChangeListener

    def audit(self, env: str) -> AuditLog:
        """The audit log of ``env``."""
        return AuditLog(self.redis, EnvKeys(env))

    def unready(self) -> str | None:
        """Why the service cannot take writes now (``None``: it can). Raises ``redis.RedisError``
        when Redis does not answer."""
        return writable(self.redis)

    def started(self) -> Stores:
        """These stores, with this process's change listener running."""
        self.listener.ensure_started()
        return self

    def close(self) -> None:
        """Stop the change listener (a stopping worker, an app embedded in tests), then write what
        the process gathered since the listener's last second: heartbeats and OFREP counts. An
        instance that has just reported the version it applied is otherwise shown behind until
        its next report, 30 s or more later."""
        self.listener.stop()
        for gathered in (self.clients, self.ofrep_usage):
            try:
                gathered.refresh()
            except redis.RedisError as exc:
                log.warning("stopping: could not write the heartbeats and counts gathered (%s)", exc)


def make_stores(
    client: redis.Redis,
    *,
    token_cache_seconds: float = 1.0,
    limits: Limits | None = None,
    streams_per_token: int = 2_000,
    writes: WriteBudget | None = None,
    webhook_hosts: tuple[str, ...] = (),
) -> Stores:
    flags = FlagStore(client)
    tokens = TokenStore(client, cache_seconds=token_cache_seconds)
    envs = EnvStore(client)
    history = HistoryGuard(client)
    streams = OpenStreams(streams_per_token)
    snapshots = SnapshotCache(
        client, flags, list_envs=envs.list, observe=history.observe, on_publish=streams.publish
    )
    ofrep_usage = OfrepUsage(client)
    clients = ClientRegistry(client, limits, on_claim=history.sdk_applied)
    return Stores(
        redis=client,
        envs=envs,
        flags=flags,
        tokens=tokens,
        snapshots=snapshots,
        clients=clients,
        playbooks=PlaybookStore(client),
        streams=streams,
        writes=writes or WriteBudget(20.0, 60),
        history=history,
        ofrep_usage=ofrep_usage,
        console=ConsoleSessions(client, tokens),
        webhooks=WebhookStore(client, webhook_hosts),
        listener=ChangeListener(
            client, [snapshots, tokens, clients, ofrep_usage, *_durability_subscribers(client)]
        ),
    )


def _durability_subscribers(client: Any) -> list[Subscriber]:
    """The client's durability rules, which the listener keeps current, if it has some."""
    rules = durability_of(client)
    return [rules] if rules is not None else []


def init_app(app: Flask) -> None:
    url = app.config.get("REDIS_URL")
    if not url:
        raise RuntimeError(
            "FLAGSVC_REDIS_URL is not set: use `flagsvc serve` for the embedded Redis, "
            "or point FLAGSVC_REDIS_URL at a Redis server"
        )
    wait = str(app.config["REDIS_WAIT_REPLICAS"])
    client = connect(
        str(url),
        socket_timeout=float(app.config["REDIS_SOCKET_TIMEOUT"]),
        wait_replicas=None if wait == "auto" else int(wait),
        wait_timeout_ms=int(app.config["REDIS_WAIT_TIMEOUT_MS"]),
    )
    app.extensions["flagsvc"] = make_stores(
        client,
        token_cache_seconds=float(app.config["TOKEN_CACHE_SECONDS"]),
        limits=limits_from(app.config),
        streams_per_token=int(app.config["MAX_STREAMS_PER_TOKEN"]),
        webhook_hosts=allowed_hosts(app.config),
        writes=WriteBudget(
            float(app.config["WRITES_PER_SECOND_PER_TOKEN"]), int(app.config["WRITE_BURST_PER_TOKEN"])
        ),
    )


def limits_from(config: Mapping[str, Any]) -> Limits:
    """The SDK limits and pace the configuration sets (see :class:`flagsvc.clients.Limits`)."""
    return Limits(
        per_token=int(config["MAX_INSTANCES_PER_TOKEN"]),
        per_minute=int(config["HEARTBEATS_PER_MINUTE"]),
        interval=float(config["HEARTBEAT_INTERVAL_SECONDS"]),
        jitter=float(config["HEARTBEAT_JITTER_SECONDS"]),
        fleet_rate=float(config["FLEET_HEARTBEATS_PER_SECOND"]),
    )


def allowed_hosts(config: Any) -> tuple[str, ...]:
    """``WEBHOOK_ALLOWED_HOSTS`` as a tuple of host names."""
    return tuple(h.strip() for h in str(config.get("WEBHOOK_ALLOWED_HOSTS") or "").split(",") if h.strip())


def stores() -> Stores:
    """The current app's stores, with this process's change listener running."""
    return stores_of(current_app)


def stores_of(app: Flask) -> Stores:
    """``app``'s stores, with this process's change listener running."""
    s: Stores = app.extensions["flagsvc"]
    return s.started()
