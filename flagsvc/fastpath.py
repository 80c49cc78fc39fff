"""The SDK's two hot requests answered before Flask: snapshot polls and heartbeats.

Every SDK instance in poll mode asks ``GET /api/v1/envs/{env}/snapshot`` every few seconds,
nearly always with the current ``If-None-Match``. The answer is in this worker's snapshot cache,
yet Flask's request and response machinery (routing, hooks, header objects) costs as much again
as all the rest of a poll (``bench/api.py``: 3,937 polls/s through Flask, 7,154 past it on
2 cores). :class:`SnapshotPolls` is a small
WSGI middleware that answers a well-formed, authorized poll itself - same status, headers, body
and metrics as the Flask view - and passes everything else to Flask: a missing or refused token,
an unknown environment, a query string or a body, any other method or path. So every error
still comes from the one place that makes problem+json.

Heartbeats are the other request every instance sends (every 30 s, and after each change): with
a large fleet they outnumber everything else. :class:`Heartbeats` takes a well-formed, authorized
one the same way (the view's schema validates it; the registry gathers it in memory) and passes
everything else to Flask, a refusal by the limits included.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .api.clients import report_headers
from .api.common import accepts_gzip, request_id_for, snapshot_named_by
from .auth import authorize, bearer
from .envs import ENV_NAME
from .logs import log_request
from .metrics import observe_request
from .schemas import FLAG_KEY, INSTANCE_ID, MAX_COUNT, MAX_COUNTS, HeartbeatSchema
from .snapshots import poll_answer
from .tokens import Role, Token

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: The Flask route of the snapshot, as metrics label it.
ROUTE = "/api/v1/envs/<env>/snapshot"
_STATUS_LINES = {200: "200 OK", 304: "304 NOT MODIFIED"}  # as werkzeug writes them
_PATH = re.compile(rf"^/api/v1/envs/({ENV_NAME.pattern.strip('^$')})/snapshot$")
#: The Flask route of a heartbeat, as metrics label it.
HEARTBEAT_ROUTE = "/api/v1/envs/<env>/clients/<instance>"
_HEARTBEAT_PATH = re.compile(
    rf"^/api/v1/envs/({ENV_NAME.pattern.strip('^$')})/clients/({INSTANCE_ID.strip('^$')})$"
)
_HEARTBEAT = HeartbeatSchema()


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
        headers.append(answered(environ, ROUTE, status, started, token, log_requests=self._log_requests))
        return _STATUS_LINES[status], headers, body


class Heartbeats:
    """Take ``POST .../clients/{instance}`` heartbeats; everything else goes to ``app``."""

    def __init__(
        self,
        app: WSGIApp,
        stores: Callable[[], Any],
        config: Mapping[str, Any],
        *,
        log_requests: bool = False,
    ) -> None:
        """``stores`` returns the app's :class:`flagsvc.extensions.Stores`; ``config``, the app's."""
        self.app = app  #: the wrapped app, which answers everything but heartbeats
        self._stores = stores
        self._config = config
        self._log_requests = log_requests

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = self._take(environ)
        if headers is None:
            return self.app(environ, start_response)
        start_response("204 NO CONTENT", headers)
        return [b""]

    def _take(self, environ: dict[str, Any]) -> list[tuple[str, str]] | None:
        """The answer's headers once the heartbeat is taken, or None when Flask must handle it."""
        started = time.perf_counter()
        match = _HEARTBEAT_PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None or environ.get("REQUEST_METHOD") != "POST" or environ.get("QUERY_STRING"):
            return None
        raw = _json_body(environ, int(self._config["MAX_CONTENT_LENGTH"]))
        if raw is None:
            return None
        env, instance = match.groups()
        stores = self._stores()
        try:
            token = authorize(
                stores.tokens, bearer(environ.get("HTTP_AUTHORIZATION")), Role.SDK, env, may_wait=False
            )
            if not stores.envs.exists(env):
                return None
            body = load_heartbeat(json.loads(raw))
            published = stores.snapshots.get(env)
            stores.clients.report(
                env,
                instance,
                body,
                source=environ.get("REMOTE_ADDR") or "",
                token_id=token.id,
                token_name=token.name,
                flags=published.flags,
                known_version=published.version,
            )
        except Exception:  # noqa: BLE001 - a refusal, bad input, Redis trouble...: Flask answers it
            return None
        headers = report_headers(stores.clients.pace(env))
        headers.append(
            answered(environ, HEARTBEAT_ROUTE, 204, started, token, log_requests=self._log_requests)
        )
        return headers


def load_heartbeat(data: Any) -> dict[str, Any]:
    """``HeartbeatSchema().load(data)``, with plain evaluation counts (integers, flag keys) checked
    here by the schema's rules in one pass: field by field, they are most of a heartbeat's cost."""
    counts = data.get("counts") if isinstance(data, dict) else None
    if not isinstance(counts, dict) or not _plain_counts(counts):
        return dict(_HEARTBEAT.load(data))
    body = dict(_HEARTBEAT.load({k: v for k, v in data.items() if k != "counts"}))
    body["counts"] = dict(counts)
    return body


def _plain_counts(counts: dict[Any, Any]) -> bool:
    return len(counts) <= MAX_COUNTS and all(
        type(n) is int and 0 <= n <= MAX_COUNT and FLAG_KEY.fullmatch(flag) for flag, n in counts.items()
    )


def _json_body(environ: dict[str, Any], limit: int) -> bytes | None:
    """A JSON body of at most ``limit`` bytes, read so that Flask can read it again; None if the
    request has another kind of body."""
    mimetype = str(environ.get("CONTENT_TYPE", "")).partition(";")[0].strip().lower()
    length = str(environ.get("CONTENT_LENGTH") or "")
    if mimetype != "application/json" or not length.isdigit() or "HTTP_TRANSFER_ENCODING" in environ:
        return None
    if not 0 < int(length) <= limit:
        return None
    raw: bytes = environ["wsgi.input"].read(int(length))
    environ["wsgi.input"] = io.BytesIO(raw)
    return raw


def answered(
    environ: dict[str, Any], route: str, status: int, started: float, token: Token, *, log_requests: bool
) -> tuple[str, str]:
    """Count (and log) a request answered before Flask as Flask's hooks would; its
    ``X-Request-ID`` header."""
    request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))
    seconds = time.perf_counter() - started
    method = str(environ.get("REQUEST_METHOD"))
    observe_request(route, method, status, seconds)
    if log_requests:
        log_request(
            method,
            environ.get("PATH_INFO", ""),
            status,
            request_id=request_id,
            seconds=seconds,
            actor=token.name,
            remote=environ.get("REMOTE_ADDR"),
        )
    return ("X-Request-ID", request_id)
