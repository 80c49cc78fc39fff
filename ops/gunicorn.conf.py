"""gunicorn config for production: ``gunicorn -c ops/gunicorn.conf.py wsgi:app``.

The settings are flagsvc's own (``flagsvc/gunicorn_conf.py``, the ones ``flagsvc serve`` uses);
override any of them below or with ``FLAGSVC_BIND``, ``FLAGSVC_WORKERS``,
``FLAGSVC_WORKER_CONNECTIONS``. ``FLAGSVC_PRELOAD=1`` (off here, on under ``flagsvc serve``) has
the arbiter import the app's modules before it forks: the workers share them, but a HUP then
restarts them on the code imported at start.
"""

from gevent import monkey

monkey.patch_all()  # first: before flagsvc (and ssl, sockets, threads) is imported

from flagsvc.gunicorn_conf import *  # noqa: E402, F403
