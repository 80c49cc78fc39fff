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

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from .api.common import accepts_gzip, request_id_for, snapshot_named_by
from .auth import authorize, bearer
from .envs import ENV_NAME
from .logs import log_request
from .metrics import observe_request
from .snapshots import poll_answer
from .tokens import Role

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: The Flask route of the snapshot, as metrics label it.
ROUTE = "/api/v1/envs/<env>/snapshot"
_STATUS_LINES = {200: "200 OK", 304: "304 NOT MODIFIED"}  # as werkzeug writes them
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
        match = _PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None or environ.get("CONTENT_LENGTH") not in (None, "", "0"):
            return None
        if "HTTP_TRANSFER_ENCODING" in environ:
            return None
        env = match.group(1)
        known = snapshot_named_by(environ.get("HTTP_IF_NONE_MATCH"))
        stores = self._stores()
        try:
            secret = bearer(environ.get("HTTP_AUTHORIZATION"))
            token = authorize(stores.tokens, secret, Role.SDK, env, may_wait=False)
            if not stores.envs.exists(env):
                return None
            gzip = accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING"))
            status, headers, body = poll_answer(stores.snapshots, env, known, accept_gzip=gzip)
        except Exception:  # noqa: BLE001 - a refusal, Redis trouble...: Flask answers and reports it
            return None
        if status == 200:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))
        headers.append(("X-Request-ID", request_id))
        seconds = time.perf_counter() - started
        observe_request(ROUTE, "GET", status, seconds)
        if self._log_requests:
            log_request(
                "GET",
                environ.get("PATH_INFO", ""),
                status,
                request_id=request_id,
                seconds=seconds,
                actor=token.name,
                remote=environ.get("REMOTE_ADDR"),
            )
        return _STATUS_LINES[status], headers, body
