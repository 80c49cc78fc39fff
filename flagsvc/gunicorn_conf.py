"""gunicorn settings for flagsvc; ``flagsvc serve`` runs with them, ``ops/gunicorn.conf.py`` reuses them.

Worker model: ``gevent``. SDKs hold Server-Sent Events streams open for hours; a greenlet per
connection lets one worker hold thousands of them at a few KiB each, while REST calls (short: a
Redis round trip or two, or none for a snapshot poll) interleave on the same event loop.
redis-py and the change listener's background thread run as greenlets under gevent's monkey
patching. It is applied here, first, when gunicorn loads this file by its path (``flagsvc serve``
does): before anything imports ssl, sockets or threads, so the workers do not warn that they
patch too late.

Each worker creates its app after its fork (``preload_app`` is off): no Redis connection or
thread crosses a fork. With ``FLAGSVC_PRELOAD=1`` (``flagsvc serve`` sets it) the arbiter imports
the app's *modules* beforehand, after the patching, and freezes them out of the garbage
collector's reach (``gc.freeze``): the workers then share those pages instead of each holding a
copy. Importing creates no app, no Redis client, no thread. The cost: a HUP restarts the workers
on the code the arbiter imported at its start (restart the service after an upgrade).

With ``FLAGSVC_CONTROL_BIND`` (``flagsvc serve --control-port`` sets it) gunicorn binds that
address too and runs one more worker, the control worker: it alone accepts on that address and
it accepts nothing else, while the other workers serve the main address only, at nice 5. A kill
sent there is answered by an otherwise idle process: it does not queue behind SDK traffic.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402 - after the monkey patching
import importlib  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

from flagsvc.control_worker import control_wanted, main_workers, own_listeners  # noqa: E402

#: Modules the workers use, imported by the arbiter with ``FLAGSVC_PRELOAD=1``: the app's, and
#: those the hooks below and the first requests would import.
_PRELOAD = (
    "flagsvc.app",
    "flagsvc.console.views",
    "flagsvc.scheduler",
    "flagsvc.streaming",
    "flagsvc.webhooks",
    "prometheus_client.multiprocess",
)
#: Niceness of the main workers when a control worker runs beside them (the control one stays at
#: 0): SDK traffic yields the CPU to operators when both want it. The SDKs evaluate locally and
#: barely notice a slower poll; a kill must get through.
SDK_NICENESS = 5


def _preload() -> None:
    """Import the workers' modules here, in the arbiter, and keep the garbage collector off them:
    a collection in a worker would otherwise write to every page that holds them."""
    for name in _PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


if os.environ.get("FLAGSVC_PRELOAD", "0") == "1":
    _preload()

_control_bind = os.environ.get("FLAGSVC_CONTROL_BIND") or None
bind = [os.environ.get("FLAGSVC_BIND", "127.0.0.1:8000"), *([_control_bind] if _control_bind else [])]
# One gevent worker per core, at least 2; a control listener adds a worker of its own.
workers = main_workers(os.environ.get("FLAGSVC_WORKERS")) + (1 if _control_bind else 0)
# gunicorn's gevent worker, which also closes idle kept-alive connections when told to stop and
# does not miss a stop sent while it boots (flagsvc/gevent_worker.py): a stop takes ~1 s.
worker_class = "flagsvc.gevent_worker.Worker"
# Concurrent connections per worker (streams included).
worker_connections = int(os.environ.get("FLAGSVC_WORKER_CONNECTIONS", 4000))
# Keep-alive for pollers (SDKs poll every 5 s by default); a stopping worker closes the idle ones.
keepalive = 10
# A worker silent this long is killed and replaced; on SIGTERM, streams end within ~1 s (they
# send a `shutdown` event) and requests in flight get graceful_timeout to finish.
timeout = 30
graceful_timeout = 10
# Workers build their own app after fork (the arbiter imports at most its modules, _preload): no
# Redis connection or thread crosses a fork.
preload_app = False
accesslog = os.environ.get("FLAGSVC_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("FLAGSVC_LOG_LEVEL", "info")
proc_name = "flagsvc"
control_socket_disable = True  # no shared $HOME/.gunicorn/gunicorn.ctl between instances


def pre_fork(server: Any, worker: Any) -> None:
    """In the arbiter, before a worker is forked: with a control listener, is it the control worker?"""
    if _control_bind:
        worker.flagsvc_control = control_wanted(server.WORKERS.values(), server.num_workers)


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    """In the arbiter, when an operator changes the number of workers (TTIN, TTOU): with a control
    listener, a drop stops a main worker and leaves at least one. gunicorn stops its oldest
    workers, and the control one is usually the oldest: it is made the youngest first."""
    if not _control_bind or old_value is None or new_value >= old_value:
        return
    if new_value < 2:
        server.log.warning("flagsvc: the control and main listeners need a worker each; kept %s", old_value)
        server.num_workers = old_value
        return
    for worker in server.WORKERS.values():
        if getattr(worker, "flagsvc_control", False):
            server.worker_age += 1
            worker.age = server.worker_age


def post_fork(server: Any, worker: Any) -> None:
    """In a new worker: with a control listener, keep the listener of its role and close the
    other; the main workers yield the CPU to the control one."""
    if not _control_bind:
        return
    from gunicorn.util import parse_address  # type: ignore[import-untyped]

    control = bool(getattr(worker, "flagsvc_control", False))
    mine = own_listeners(server.LISTENERS, parse_address(_control_bind), control)
    if not mine:
        raise RuntimeError(f"FLAGSVC_CONTROL_BIND {_control_bind} is not among gunicorn's bound addresses")
    for other in server.LISTENERS:
        if other not in mine:
            other.close()
    worker.sockets = mine
    if not control:
        os.nice(SDK_NICENESS)


def post_worker_init(worker: Any) -> None:
    """Let open event streams see the worker stopping (``worker.alive``) and end cleanly, fill
    this worker's snapshot and token caches before it serves anything, and start its scheduler
    of automatic reverts (``FLAGSVC_SCHEDULER=0`` turns it off, e.g. to run ``flagsvc worker``)."""
    from flagsvc.streaming import set_worker

    set_worker(worker)
    stores = getattr(worker.wsgi, "extensions", {}).get("flagsvc")
    if stores is not None:
        stores.listener.start()
        if os.environ.get("FLAGSVC_SCHEDULER", "1") != "0":
            # Automatic reverts: safe to run in every worker, each revert happens once.
            from flagsvc.scheduler import Scheduler

            Scheduler(stores.redis, clients=stores.clients).start()
        if os.environ.get("FLAGSVC_WEBHOOKS", "1") != "0":
            # Webhook deliveries: in every worker too; a lease gives each subscription to one.
            from flagsvc.extensions import allowed_hosts
            from flagsvc.webhooks import Deliverer

            config = worker.wsgi.config
            Deliverer(
                stores.redis, allowed_hosts=allowed_hosts(config), public_url=config["PUBLIC_URL"]
            ).start()


def pre_request(worker: Any, req: Any) -> None:
    """An event stream's connection is never reused: gunicorn drops a ``Connection: close`` the
    app sets, so mark it here. Otherwise a stream ended by a shutdown would stay open as an idle
    keep-alive and hold the stopping worker until the graceful timeout."""
    if req.path.endswith("/stream"):
        req.must_close = True


def worker_exit(server: Any, worker: Any) -> None:
    """In a worker that stops: stop its change listener and write the heartbeats and counts it
    gathered since its last second (``Stores.close``)."""
    stores = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("flagsvc")
    if stores is not None:
        stores.close()


def child_exit(server: Any, worker: Any) -> None:
    """A worker's metrics samples stop counting once it is gone (prometheus multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Yield to the other greenlets after every request. A busy keep-alive client (a poller that
    sends its next request as soon as it has an answer) finds its next request already buffered,
    and gevent reads it without switching: one connection could otherwise hold the worker for a
    long time while a kill waits behind it."""
    import gevent

    gevent.sleep(0)
