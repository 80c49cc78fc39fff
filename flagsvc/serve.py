"""``flagsvc serve``: the embedded (or given) Redis, first-start bootstrap, then gunicorn.

This process supervises and serves nothing: it imports neither Flask nor redis-py, and runs the
first-start bootstrap, which needs the stores, as a short-lived process of its own
(:mod:`flagsvc.bootstrap`). It stays a small part of the service's memory (bench/memory.py).
"""

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

from . import embedded


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

    With ``control_port``, gunicorn also listens there, with one more worker that alone serves
    that port: the control listener for operators (``flagctl``, the nginx routes for writes). SDK
    polls and streams keep the main workers busy; a kill sent to the control listener is answered
    by a process that is otherwise idle, so it does not queue behind them (bench/propagation.py).
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
    """Bootstrap, then gunicorn until it exits (its exit code)."""
    _bootstrap(redis_url, data_dir)
    click.echo(f"flagsvc: listening on http://{host}:{port}")
    if control_port:
        click.echo(f"flagsvc: control listener (operators, one worker) on http://{host}:{control_port}")
    metrics_dir = data_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # samples of a previous run's workers
    metrics_dir.mkdir(parents=True)
    control_bind = f"{host}:{control_port}" if control_port else None
    binds = [f"{host}:{port}", *filter(None, [control_bind])]
    env = _gunicorn_env(redis_url, metrics_dir, workers, control_bind)
    gunicorn = subprocess.Popen(_gunicorn_command(binds), env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if gunicorn.poll() is None:
            gunicorn.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    supervisor = embedded.Supervisor(server, log=_log) if server is not None else None
    return _wait(gunicorn, supervisor.check if supervisor else None)


def _bootstrap(redis_url: str, data_dir: Path) -> None:
    """The first start's environment and admin token (printed once), in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "flagsvc.bootstrap", str(data_dir)],
        env=dict(os.environ, FLAGSVC_REDIS_URL=redis_url),
        check=False,
    )
    if done.returncode != 0:
        how = embedded.describe_exit(done.returncode)
        raise click.ClickException(f"the first-start bootstrap on Redis failed ({how}): see above")


def _gunicorn_env(
    redis_url: str, metrics_dir: Path, workers: int | None, control_bind: str | None
) -> dict[str, str]:
    """gunicorn's environment: the Redis, the metrics folder, the workers of the main listener, the
    control listener's address, and the arbiter's import of the app's modules before it forks."""
    env = dict(os.environ, FLAGSVC_REDIS_URL=redis_url, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    env.setdefault("FLAGSVC_PRELOAD", "1")
    env.pop("FLAGSVC_WORKERS", None)
    if workers:
        env["FLAGSVC_WORKERS"] = str(workers)
    env.pop("FLAGSVC_CONTROL_BIND", None)
    if control_bind:
        env["FLAGSVC_CONTROL_BIND"] = control_bind
    return env


def _log(line: str) -> None:
    click.echo(f"flagsvc: {line}", err=True)


def _gunicorn_command(binds: list[str]) -> list[str]:
    """One gunicorn for every listener (``flagsvc/gunicorn_conf.py`` gives each its workers)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",  # by path: the file patches for gevent before anything else is imported
        str(resources.files(__package__).joinpath("gunicorn_conf.py")),
        *(arg for bind in binds for arg in ("--bind", bind)),
        "flagsvc:create_app()",
    ]


def _wait(proc: subprocess.Popen[bytes], tick: Callable[[], None] | None = None) -> int:
    """Wait until gunicorn exits and return its exit code: the service goes down with it, for
    the supervisor to restart. ``tick`` runs every 0.2 s meanwhile (the embedded Redis' supervision)."""
    while (code := proc.poll()) is None:
        if tick is not None:
            tick()
        time.sleep(0.2)
    return code
