"""gunicorn settings for flagsvc; ``flagsvc serve`` runs with them, ``ops/gunicorn.conf.py`` reuses them.

Worker model: ``gthread``. Each worker runs a thread pool, keeps HTTP connections alive (SDKs
poll over keep-alive), and shares one Redis connection pool among its threads. Requests are
short (a Redis round trip or two), so a few threads per worker cover the I/O waits.
"""

from __future__ import annotations

import multiprocessing
import os

bind = os.environ.get("FLAGSVC_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("FLAGSVC_WORKERS", 0)) or min(2 * multiprocessing.cpu_count(), 8)
worker_class = "gthread"
threads = int(os.environ.get("FLAGSVC_THREADS", 4))
# Keep-alive for pollers; above a typical proxy's idle timeout is not needed on loopback.
keepalive = 30
# A worker silent this long is killed and replaced; graceful shutdown lets requests finish.
timeout = 30
graceful_timeout = 10
# Workers build their own app after fork: no Redis connection crosses a fork.
preload_app = False
accesslog = os.environ.get("FLAGSVC_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("FLAGSVC_LOG_LEVEL", "info")
proc_name = "flagsvc"
control_socket_disable = True  # no shared $HOME/.gunicorn/gunicorn.ctl between instances
