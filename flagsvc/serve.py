"""``flagsvc serve``: the embedded (or given) Redis, first-start bootstrap, then gunicorn."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import FrameType

import click
import redis

from . import embedded
from .connection import connect
from .envs import EnvStore
from .tokens import Role, TokenStore

DEFAULT_ENV = "production"
ADMIN_TOKEN_FILE = "admin-token"
BOOTSTRAP_ACTOR = "flagsvc-bootstrap"
#: With a control listener, the main gunicorn runs at this niceness (the control one at 0).
SDK_NICENESS = 5


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


def run(
    host: str,
    port: int,
    data_dir: Path,
    workers: int | None,
    redis_url: str | None,
    control_port: int | None = None,
) -> int:
    """Start Redis if needed, bootstrap, run gunicorn in the foreground; its exit code.

    With no ``redis_url``, the embedded Redis of ``data_dir`` runs as a child of this process,
    which restarts it should it die, and shuts it down (append-only file flushed) after gunicorn.

    With ``control_port``, a second gunicorn with one worker serves the same API there: the
    control listener for operators (``flagctl``, the nginx routes for writes). SDK polls and
    streams keep the main workers busy; a kill sent to the control listener is answered by a
    process that is otherwise idle, so it does not queue behind them (bench/propagation.py).
    """
    server = None
    if not redis_url:
        try:
            server = embedded.launch(data_dir)
        except embedded.EmbeddedError as exc:
            raise click.ClickException(str(exc)) from None
        redis_url = server.url
        click.echo(f"flagsvc: embedded Redis (append-only, fsync always) in {data_dir.resolve()}")
    try:
        return _serve(host, port, data_dir, workers, redis_url, control_port, server)
    finally:
        if server is not None:
            server.stop()


def _serve(
    host: str,
    port: int,
    data_dir: Path,
    workers: int | None,
    redis_url: str,
    control_port: int | None,
    server: embedded.EmbeddedRedis | None,
) -> int:
    """Bootstrap, then the gunicorn listeners until the first one exits (its exit code)."""
    client = connect(redis_url)
    secret = bootstrap(client, data_dir)
    client.close()
    if secret:
        click.echo(f"flagsvc: first start: admin token (shown once, also in {data_dir / ADMIN_TOKEN_FILE}):")
        click.echo(f"    {secret}")
    click.echo(f"flagsvc: listening on http://{host}:{port}")
    if control_port:
        click.echo(f"flagsvc: control listener (operators, one worker) on http://{host}:{control_port}")
    metrics_dir = data_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # samples of a previous run's workers
    metrics_dir.mkdir(parents=True)
    env = dict(os.environ, FLAGSVC_REDIS_URL=redis_url, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    main = _gunicorn_command(f"{host}:{port}", workers)
    if control_port:
        # SDK traffic yields the CPU to operators when both want it: the SDKs evaluate locally
        # and barely notice a slower poll; a kill must get through.
        main = ["nice", "-n", str(SDK_NICENESS), *main]
    procs = [subprocess.Popen(main, env=env)]
    if control_port:
        procs.append(subprocess.Popen(_gunicorn_command(f"{host}:{control_port}", 1), env=env))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    supervisor = embedded.Supervisor(server, log=_log) if server is not None else None
    return _wait_first(procs, supervisor.check if supervisor else None)


def _log(line: str) -> None:
    click.echo(f"flagsvc: {line}", err=True)


def _gunicorn_command(bind: str, workers: int | None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",  # by path: the file patches for gevent before anything else is imported
        str(resources.files(__package__).joinpath("gunicorn_conf.py")),
        "--bind",
        bind,
        *(["--workers", str(workers)] if workers else []),
        "flagsvc:create_app()",
    ]


def _wait_first(procs: list[subprocess.Popen[bytes]], tick: Callable[[], None] | None = None) -> int:
    """Wait until one gunicorn exits, stop the others, and return the first exit code: a
    listener that is gone takes the service down with it, for the supervisor to restart.
    ``tick`` runs every 0.2 s meanwhile (the embedded Redis' supervision)."""
    while True:
        for proc in procs:
            code = proc.poll()
            if code is not None:
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
                for other in procs:
                    other.wait()
                return code
        if tick is not None:
            tick()
        time.sleep(0.2)
