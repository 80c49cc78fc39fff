"""Connections to Redis: one URL for a single server, a Sentinel-managed master or a Cluster.

``FLAGSVC_REDIS_URL`` (and ``--redis-url``) takes

- ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock``;
- ``redis+sentinel://[user:password@]host:port[,host:port...]/MASTER_NAME[?db=N]`` (``rediss+sentinel``
  for TLS to the servers): the master Sentinel names, re-resolved on every failover;
- ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster``): a Redis Cluster.

:class:`Durability` is what a commit does once Redis answered, before the write is acknowledged:
``WAIT`` until a replica has it, and with Sentinel a check that no failover began meanwhile (a
write to a master that is being replaced is lost when it rejoins as a replica).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

log = logging.getLogger(__name__)

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class InvalidRedisUrl(ValueError):
    """The Redis URL cannot be used; the message says why (never the password)."""


@dataclass(frozen=True)
class Target:
    """A parsed Redis URL."""

    kind: str  # "single", "sentinel" or "cluster"
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
            return cls("single", url)
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":") if credentials else ("", "", "")
        nodes = tuple(_node(host) for host in hosts.split(",") if host)
        if not nodes:
            raise InvalidRedisUrl(f"{scheme}:// needs at least one host:port")
        db = parse_qs(parts.query).get("db", ["0"])[0]
        if not db.isascii() or not db.isdigit():
            raise InvalidRedisUrl(f"db={db!r} is not a database number")
        kind = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
        master = parts.path.strip("/")
        if kind == "sentinel" and not master:
            raise InvalidRedisUrl("redis+sentinel:// needs the master's name as its path: .../MASTER_NAME")
        return cls(
            kind,
            url,
            nodes,
            master_name=master if kind == "sentinel" else "",
            db=int(db),
            username=unquote(username) or None,
            password=unquote(password) or None,
            tls=scheme.startswith("rediss"),
        )


def _node(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise InvalidRedisUrl(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def client_options(socket_timeout: float) -> dict[str, Any]:
    """What every connection of the service uses."""
    return {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": 30,
        # One immediate retry covers a pooled connection that died with a Redis restart; more
        # would only delay the 503 an outage must give. Retrying a commit is safe: its audit-head
        # check refuses to apply the same change twice. A timeout is not retried: Redis is hung,
        # and a commit in flight has an unknown outcome that the answer must say.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    }


def connect(
    url: str, *, socket_timeout: float = 5.0, wait_replicas: int | None = None, wait_timeout_ms: int = 1000
) -> Any:
    """A client for ``url`` (see the module docstring), decoding to ``str``, with the
    :class:`Durability` its commits need (``wait_replicas``: ``None`` for automatic)."""
    target = Target.parse(url)
    options = client_options(socket_timeout)
    if target.kind == "single":
        client = redis.Redis.from_url(url, **options)
        _DURABILITY[client] = Durability(client, wait_replicas, timeout_ms=wait_timeout_ms)
        return client
    auth = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        options.pop("retry")  # a cluster client retries per node itself, on redirections too
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            ssl=target.tls,
            **auth,
            **options,
        )
        _DURABILITY[cluster] = ClusterDurability(cluster, wait_replicas, timeout_ms=wait_timeout_ms)
        return cluster
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs={"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout},
        ssl=target.tls,
        **auth,
        **options,
    )
    client = sentinel.master_for(target.master_name, db=target.db)
    _DURABILITY[client] = Durability(
        client, wait_replicas, timeout_ms=wait_timeout_ms, sentinel=sentinel, master_name=target.master_name
    )
    return client


def describe(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


class Unconfirmed(Exception):
    """Redis applied a commit, but it is not known to survive a failover: not acknowledged."""


class Durability:
    """When a commit on ``client`` counts as acknowledged.

    ``WAIT`` for ``replicas`` of them (``None``: 1 when the master has replicas, else 0) for at
    most ``timeout_ms``; and with Sentinel, every reachable sentinel still names the master this
    process writes to, with no failover in progress: a write taken by a master that is being
    replaced is lost when that master rejoins as a replica, so it is not acknowledged.
    """

    def __init__(
        self,
        client: Any,
        replicas: int | None = None,
        *,
        timeout_ms: int = 1000,
        sentinel: Sentinel | None = None,
        master_name: str = "",
    ) -> None:
        self.client = client
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.sentinel = sentinel
        self.master_name = master_name
        self._known_replicas: int | None = None

    @property
    def active(self) -> bool:
        return self.sentinel is not None or self.wanted() > 0

    def for_key(self, key: str) -> Durability:
        """The rules for a commit on ``key`` (one server: these)."""
        return self

    def wanted(self) -> int:
        """How many replicas a commit waits for. A master known to have none is counted again
        first (one ``INFO`` per commit, on such masters only): a replica may have joined since the
        last count, a second ago, and a replica just promoted was counted as having none."""
        if self.replicas is not None:
            return self.replicas
        if not self._known_replicas:
            self._count_replicas()
        return 1 if self._known_replicas else 0

    def confirm(self, acked: int) -> None:
        """Raise :class:`Unconfirmed` unless a commit that ``acked`` replicas has is durable."""
        wanted = self.wanted()
        if acked < wanted:
            raise Unconfirmed(
                f"Redis applied the change but {acked} of the {wanted} replica(s) it waits for confirmed it "
                f"within {self.timeout_ms} ms: a failover could still lose it"
            )
        self._check_sentinels()

    def _check_sentinels(self) -> None:
        if self.sentinel is None:
            return
        pool = self.client.connection_pool
        for server in self.sentinel.sentinels:
            try:
                state = server.sentinel_master(self.master_name)
            except redis.RedisError:
                continue  # an unreachable sentinel has no say
            moving = state.get("is_odown") or "failover_in_progress" in str(state.get("flags", ""))
            if moving or (state.get("ip"), int(state.get("port", 0))) != pool.master_address:
                pool.disconnect()  # the next command asks the sentinels where the master is
                raise Unconfirmed(
                    "a Redis failover is in progress: the change may be lost with the old master"
                )

    # -- the change listener keeps the number of replicas current --------------------------------

    def reset(self) -> None:
        self._known_replicas = None

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        """Nothing: replicas are not announced by commits."""

    def refresh(self) -> None:
        """Follow the master the sentinels name, and count its replicas."""
        if self.sentinel is not None:
            self._follow_master()
        self._count_replicas()

    def _count_replicas(self) -> None:
        self._known_replicas = int(self.client.info("replication").get("connected_slaves", 0))

    def _follow_master(self) -> None:
        """After a failover, connections still open to the old master would keep writing there
        (it answers NOREPLICAS until the sentinels demote it, seconds later): drop them all."""
        pool = self.client.connection_pool
        current = self.sentinel.discover_master(self.master_name) if self.sentinel else None
        if pool.master_address is not None and current != pool.master_address:
            log.warning("Redis master moved from %s to %s: reconnecting", pool.master_address, current)
            pool.get_master_address()  # records the new master, drops idle connections
            pool.disconnect()  # and those in use: a command in flight there fails (outcome unknown)


class ClusterDurability:
    """:class:`Durability` on a Redis Cluster, node by node: a commit runs with its ``WAIT`` on
    its own connection to the master of its environment's slot (the cluster client would send a
    keyless ``WAIT`` to an arbitrary node), and waits for one of that master's replicas when it
    has some (or ``replicas``)."""

    def __init__(self, cluster: RedisCluster, replicas: int | None = None, *, timeout_ms: int = 1000) -> None:
        self.cluster = cluster
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._nodes: dict[str, Durability] = {}

    def for_key(self, key: str) -> Durability:
        """The rules of the master that holds ``key``, on a client of that master alone."""
        node = self.cluster.get_node_from_key(key)
        rules = self._nodes.get(node.name)
        if rules is None:
            client = self.cluster.get_redis_connection(node)
            rules = self._nodes[node.name] = Durability(client, self.replicas, timeout_ms=self.timeout_ms)
        return rules

    def moved(self) -> None:
        """A slot moved: learn the cluster's slots again, and count the replicas again, before
        the next commit."""
        self.cluster.nodes_manager.initialize()
        self.reset()

    # -- the change listener keeps each master's number of replicas current --------------------

    def reset(self) -> None:
        for rules in list(self._nodes.values()):
            rules.reset()

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        """Nothing: replicas are not announced by commits."""

    def refresh(self) -> None:
        """Count each master's replicas. A node that is no longer a master is forgotten (after a
        failover, the old master's count would fail every time, or describe a replica); one that
        cannot be counted now is counted again at its next commit."""
        masters = {node.name for node in self.cluster.get_primaries()}
        for name, rules in list(self._nodes.items()):
            if name not in masters:
                del self._nodes[name]
                continue
            try:
                rules.refresh()
            except redis.RedisError as exc:
                log.warning("Redis Cluster: could not count the replicas of %s (%s)", name, exc)
                rules.reset()


def writable(client: Any) -> str | None:
    """``None`` if ``client`` reaches a master that takes writes now, else why not."""
    if isinstance(client, RedisCluster):
        state = client.cluster_info().get("cluster_state")
        return None if state == "ok" else f"cluster state {state}"
    info = client.info("replication")
    if info.get("role") != "master":
        return f"connected to a {info.get('role')}, not the master"
    good = info.get("min_slaves_good_slaves")  # present only with min-replicas-to-write set
    if good is None:
        return None
    try:
        wanted = int(client.config_get("min-replicas-to-write").get("min-replicas-to-write", 0))
    except redis.ResponseError:  # CONFIG is disabled on some managed services
        return None
    return f"{good} good replicas, min-replicas-to-write is {wanted}" if int(good) < wanted else None


_DURABILITY: weakref.WeakKeyDictionary[Any, Durability | ClusterDurability] = weakref.WeakKeyDictionary()


def durability_of(client: Any) -> Durability | ClusterDurability | None:
    """The durability rules of a client made by :func:`connect` (``None`` for others)."""
    return _DURABILITY.get(client)
