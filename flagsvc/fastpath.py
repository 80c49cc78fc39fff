"""SDK snapshot polls answered before Flask: the one hot read, served straight from memory.

Every SDK instance in poll mode asks ``GET /api/v1/envs/{env}/snapshot`` every few seconds,
nearly always with the current ``If-None-Match``. The answer is in this worker's snapshot cache,
yet Flask's request and response machinery (routing, hooks, header objects) costs as much again
as all the rest of a poll (``bench/api.py``: 3,937 polls/s through Flask, 7,154 past it on
2 cores). :class:`SnapshotPolls` is a small
WSGI middleware that answers a well-formed, authorized poll itself - same status, headers, body
and metrics as the Flask view - and passes everything else to Flask: a missing or refused token,
an unknown environment, a query string or a body, any other method or path. So every error
still comes from the one place that makes problem+json.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from .api.common import STALE_HEADER, request_id_for, version_named_by
from .envs import ENV_NAME
from .metrics import LATENCY, POLLS, REQUESTS
from .tokens import Role

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

log = logging.getLogger("flagsvc.requests")

#: The Flask route of the snapshot, as metrics label it.
ROUTE = "/api/v1/envs/<env>/snapshot"
_PATH = re.compile(rf"^/api/v1/envs/({ENV_NAME.pattern.strip('^$')})/snapshot$")


class SnapshotPolls:
    """Answer ``GET .../snapshot`` polls from the snapshot cache; everything else goes to ``app``."""

    def __init__(self, app: WSGIApp, stores: Callable[[], Any], *, log_requests: bool = False) -> None:
        """``stores`` returns the app's :class:`flagsvc.extensions.Stores`."""
        self.app = app  #: the wrapped app, which answers everything but polls
        self._stores = stores
        self._log_requests = log_requests

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        answer = self._answer(environ)
        if answer is None:
            return self.app(environ, start_response)
        status, headers, body = answer
        start_response(status, headers)
        return [body]

    def _answer(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """The poll's answer, or None when Flask must handle the request."""
        started = time.perf_counter()
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("QUERY_STRING"):
            return None
        match = _PATH.match(environ.get("PATH_INFO", ""))
        if match is None or environ.get("CONTENT_LENGTH") not in (None, "", "0"):
            return None
        if "HTTP_TRANSFER_ENCODING" in environ:
            return None
        scheme, _, secret = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None
        env = match.group(1)
        stores = self._stores()
        try:
            token = stores.tokens.authenticate(secret.strip())
            if token is None or token.role_level < Role.SDK or not token.allows_env(env):
                return None
            if not stores.envs.exists(env):
                return None
            cache = stores.snapshots
            published = cache.get(env)
        except Exception:  # noqa: BLE001 - Redis trouble and the like: Flask answers and reports it
            return None
        headers = [("ETag", f'"{published.version}"'), ("Cache-Control", "no-cache")]
        if cache.stale:
            headers.append((STALE_HEADER, "true"))
        if version_named_by(environ.get("HTTP_IF_NONE_MATCH")) == published.version:
            status, body, outcome = "304 NOT MODIFIED", b"", "304"
        else:
            status, body, outcome = "200 OK", published.body, "200"
            headers.append(("Content-Type", "application/json"))
            headers.append(("Content-Length", str(len(body))))
        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))
        headers.append(("X-Request-ID", request_id))
        POLLS.labels(env, outcome).inc()
        elapsed = time.perf_counter() - started
        LATENCY.labels(ROUTE, "GET").observe(elapsed)
        REQUESTS.labels(ROUTE, "GET", outcome).inc()
        if self._log_requests:
            _log_poll(environ, int(outcome), request_id, elapsed, token.name)
        return status, headers, body


def _log_poll(environ: dict[str, Any], status: int, request_id: str, elapsed: float, actor: str) -> None:
    """The request log line, as ``flagsvc.logs`` writes it for the other routes."""
    path = environ.get("PATH_INFO", "")
    log.info(
        "%s %s %s",
        "GET",
        path,
        status,
        extra={
            "request_id": request_id,
            "method": "GET",
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "actor": actor,
            "remote": environ.get("REMOTE_ADDR"),
        },
    )
