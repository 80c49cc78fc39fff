"""gunicorn settings for flagsvc; ``flagsvc serve`` runs with them, ``ops/gunicorn.conf.py`` reuses them.

Worker model: ``gevent``. SDKs hold Server-Sent Events streams open for hours; a greenlet per
connection lets one worker hold thousands of them at a few KiB each, while REST calls (short: a
Redis round trip or two, or none for a snapshot poll) interleave on the same event loop.
redis-py and the change listener's background thread run as greenlets under gevent's monkey
patching. It is applied here, first, when gunicorn loads this file by its path (``flagsvc serve``
does): before anything imports ssl, sockets or threads, so the workers do not warn that they
patch too late. The app is imported by each worker after its fork (``preload_app`` is off).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import multiprocessing  # noqa: E402 - after the monkey patching
import os  # noqa: E402
from typing import Any  # noqa: E402

bind = os.environ.get("FLAGSVC_BIND", "127.0.0.1:8000")
# One gevent worker per core: a worker already multiplexes its connections, more workers only
# add processes competing for the cores (and one more snapshot reload per change). Measured on
# 2 cores: 2 workers serve more polls, and flips wait less, than 4 (bench/api.py --workers 2,4).
workers = int(os.environ.get("FLAGSVC_WORKERS", 0)) or max(2, multiprocessing.cpu_count())
worker_class = "gevent"
# Concurrent connections per worker (streams included).
worker_connections = int(os.environ.get("FLAGSVC_WORKER_CONNECTIONS", 4000))
# Keep-alive for pollers (SDKs poll every 5 s by default). An idle keep-alive connection holds a
# stopping worker until it closes, so this also bounds how long a graceful stop can take.
keepalive = 10
# A worker silent this long is killed and replaced; on SIGTERM, streams end within ~1 s (they
# send a `shutdown` event) and requests in flight get graceful_timeout to finish.
timeout = 30
graceful_timeout = 10
# Workers build their own app after fork: no Redis connection or thread crosses a fork.
preload_app = False
accesslog = os.environ.get("FLAGSVC_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("FLAGSVC_LOG_LEVEL", "info")
proc_name = "flagsvc"
control_socket_disable = True  # no shared $HOME/.gunicorn/gunicorn.ctl between instances


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

            Scheduler(stores.redis).start()
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
    if worker_class == "gevent":
        import gevent

        gevent.sleep(0)
