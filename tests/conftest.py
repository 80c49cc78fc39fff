"""Fixtures: a real Redis server, the app, a live HTTP server, tokens per role."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

from flagsvc import create_app, streaming
from flagsvc.connection import connect
from flagsvc.envs import EnvStore
from flagsvc.tokens import Role, TokenStore

from .helpers import ENV
from .redis_server import RedisServer
from .redis_topology import Cluster


@pytest.fixture(scope="session")
def single_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole run: ``FLAGSVC_TEST_REDIS_URL``, or our own redis-server."""
    external = os.environ.get("FLAGSVC_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-master Redis Cluster for the whole run (started when a test first asks for it)."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster.url
    cluster.stop()


@pytest.fixture
def redis_url(single_redis_url: str) -> str:
    """The Redis of a test; a module may override this fixture to run against a cluster too."""
    return single_redis_url


@pytest.fixture
def r(redis_url: str) -> Iterator[Any]:
    """A client on the test Redis (a cluster client for a cluster), emptied before and after."""
    client = connect(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


#: A write budget no test's seeding reaches.
UNLIMITED_WRITES = {"WRITES_PER_SECOND_PER_TOKEN": 1e6, "WRITE_BURST_PER_TOKEN": 1_000_000}


def start_app(r: Any, redis_url: str, **config: Any) -> Any:
    """The app on ``redis_url`` (and ``config``), with the environment ``ENV`` created."""
    # Tests seed flags faster than any operator writes: test_limits.py tests the write budget.
    app = create_app({"REDIS_URL": redis_url, "TESTING": True, **UNLIMITED_WRITES, **config})
    EnvStore(r).create(ENV, actor="test-setup")
    return app


def create_token(r: Any, role: str, *, name: str | None = None, envs: list[str] | None = None) -> str:
    """A token straight in Redis; returns its secret."""
    store = TokenStore(r)
    _, secret = store.create(
        name=name or f"{role}-{len(store.list())}", role=Role.parse(role), envs=envs or [], actor="test-setup"
    )
    return secret


ROLES = ("sdk", "reader", "operator", "admin")


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def app(request: pytest.FixtureRequest, r: Any, redis_url: str) -> Iterator[Any]:
    """The app; a test marked ``@pytest.mark.app_config(KEY=value, ...)`` gets that configuration."""
    marker = request.node.get_closest_marker("app_config")
    app = start_app(r, redis_url, **(marker.kwargs if marker else {}))
    yield app
    app.extensions["flagsvc"].close()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def make_token(r: Any) -> Callable[..., str]:
    """Create a token straight in Redis: ``make_token("operator", envs=["production"])``."""
    return lambda role, **kwargs: create_token(r, role, **kwargs)


@pytest.fixture
def tokens(make_token: Callable[..., str]) -> dict[str, str]:
    """One token per role, named after the role, on every environment."""
    return {role: make_token(role, name=role) for role in ROLES}


@pytest.fixture
def auth(tokens: dict[str, str]) -> Callable[[str], dict[str, str]]:
    """``auth("admin")`` -> the Authorization header of that role's token."""
    return lambda role: bearer(tokens[role])


class SharedStack:
    """An app on a Redis database of its own, for a module whose tests only read what one
    module-scoped fixture wrote once (an audit history): ``client``, ``auth``, ``make_token``, ``r``
    mean what the function-scoped fixtures of the same names mean."""

    def __init__(self, r: Any, app: Any) -> None:
        self.r, self.app = r, app
        self.client = app.test_client()
        self.tokens = {role: create_token(r, role, name=role) for role in ROLES}

    def auth(self, role: str) -> dict[str, str]:
        return bearer(self.tokens[role])

    def make_token(self, role: str, **kwargs: Any) -> str:
        return create_token(self.r, role, **kwargs)


@pytest.fixture(scope="module")
def shared(single_redis_url: str) -> Iterator[SharedStack]:
    """A :class:`SharedStack` on database 1 of the test Redis, emptied before and after the module."""
    url = urlsplit(single_redis_url)._replace(path="/1").geturl()
    r = connect(url)
    r.flushdb()
    app = start_app(r, url)
    yield SharedStack(r, app)
    app.extensions["flagsvc"].close()
    r.flushdb()
    r.close()


@pytest.fixture
def live_server(app: Any) -> Iterator[str]:
    """The app on a real HTTP server (threaded) on a free loopback port; yields its base URL."""
    srv = RestartableServer(app).start()
    yield srv.url
    srv.stop()


def dataset(client: Any) -> dict[str, Any]:
    """Every key and its content: compare before/after to prove that nothing was written."""
    out: dict[str, Any] = {}
    for key in sorted(client.scan_iter(count=1000)):
        kind = client.type(key)
        if kind == "string":
            out[key] = client.get(key)
        elif kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "set":
            out[key] = sorted(client.smembers(key))
        elif kind == "stream":
            out[key] = client.xrange(key)
        else:
            out[key] = (kind, client.dump(key))
    return out


@pytest.fixture
def snapshot_redis(r: Any) -> Callable[[], dict[str, Any]]:
    return lambda: dataset(r)


class RestartableServer:
    """The app on a real HTTP server (threaded) on a loopback port, which a test can stop and start
    again on the same port (SDK outages)."""

    def __init__(self, app: Any) -> None:
        from .redis_server import free_port

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> RestartableServer:
        streaming.allow_streams()
        self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() waits for the loop to notice
            name="app-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            streaming.end_streams()  # open event streams end like on a gunicorn worker shutdown
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None


@pytest.fixture
def server(app: Any) -> Iterator[RestartableServer]:
    srv = RestartableServer(app).start()
    yield srv
    srv.stop()
