"""The on-call console at ``/ui/``: server-rendered pages (Jinja2) over the same stores and write
paths as the API, a signed session cookie, CSRF tokens on every form, and a little JavaScript of
our own (live propagation over SSE, countdowns). Nothing is fetched from elsewhere at run time."""

from __future__ import annotations

from flask import Flask, redirect


def init_app(app: Flask) -> None:
    from .views import bp  # the views use the stores, which hold the console's sessions

    app.register_blueprint(bp)
    app.add_url_rule("/", "root", lambda: redirect("/ui/"))
