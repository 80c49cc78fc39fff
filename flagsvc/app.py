"""The Flask app factory: ``create_app`` (``flagsvc:create_app()`` for gunicorn, ``wsgi.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import api, console, errors, extensions, logs, metrics
from .config import DEFAULTS
from .fastpath import Heartbeats, SnapshotPolls


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then ``FLAGSVC_*`` environment variables, then ``config``."""
    app = Flask("flagsvc")  # the package's name: its root path, and the logger ``flagsvc``
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("FLAGSVC")
    if config:
        app.config.from_mapping(config)
    extensions.init_app(app)
    metrics.init_app(app)
    logs.init_app(app)
    api.init_app(app)
    console.init_app(app)
    errors.init_app(app)
    stores, log_requests = (lambda: extensions.stores_of(app)), bool(app.config.get("LOG_FORMAT"))
    heartbeats = Heartbeats(app.wsgi_app, stores, app.config, log_requests=log_requests)
    app.wsgi_app = SnapshotPolls(heartbeats, stores, log_requests=log_requests)  # type: ignore[method-assign]
    proxies = int(app.config["TRUSTED_PROXIES"])
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # type: ignore[method-assign]
    return app
