"""What SDKs read: the snapshot (``ETag`` = environment version, ``If-None-Match`` -> 304) and
the Server-Sent Events stream of it."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from flask.views import MethodView
from flask_smorest import Blueprint

from ..auth import current_token, require
from ..errors import TooManyRequests
from ..extensions import stores
from ..schemas import SnapshotSchema, StreamQuerySchema
from ..snapshots import poll_answer
from ..streaming import EventStream, events
from ..tokens import Role
from .common import accepts_gzip, check_env, if_none_match_snapshot

#: One Server-Sent Event of the stream, as the OpenAPI document describes each.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["snapshot", "patch", "shutdown", "revoked"]},
        "data": {
            "type": "string",
            "description": "snapshot: the snapshot's JSON; patch: {env, version, history, base (the "
            "identity it applies to), flags (added or changed, whole), removed (keys)}; revoked: {detail}",
        },
        "id": {"type": "string", "description": "the snapshot's identity (its ETag): <version>-<history>"},
        "retry": {"type": "integer"},
    },
}

blp = Blueprint("snapshot", __name__, url_prefix="/api/v1/envs/<env>", description="Snapshot for SDKs")


@blp.route("/snapshot")
class SnapshotResource(MethodView):
    @require(Role.SDK, cached=True)
    @blp.doc(responses={"304": {"description": "Not modified: the version in If-None-Match is current"}})
    @blp.response(200, SnapshotSchema)
    def get(self, env: str) -> Response:
        """Every live flag's evaluation fields, with the environment version.

        Served from this worker's memory (no Redis round trip); ``X-Flagsvc-Stale: true`` when
        Redis could not confirm it recently (the last known snapshot keeps serving). gzip when
        ``Accept-Encoding`` takes it; a shared cache may keep the answer 1 s per token and
        encoding (``Cache-Control``, ``Vary``: docs/read-tier.md).
        """
        check_env(env)
        gzip = accepts_gzip(request.headers.get("Accept-Encoding"))
        status, headers, body = poll_answer(
            stores().snapshots, env, if_none_match_snapshot(), accept_gzip=gzip
        )
        if status == 304:
            return Response(status=304, headers=headers)
        return Response(body, mimetype="application/json", headers=headers)


@blp.route("/stream")
class StreamResource(MethodView):
    @require(Role.SDK, cached=True)
    @blp.doc(
        responses={
            "200": {
                "description": "text/event-stream: `snapshot` events (id = the snapshot's identity, "
                "data = the snapshot) or, with `patches=true`, `patch` events of the flags that changed, "
                "`: heartbeat` comments every 15 s, a `shutdown` event before the server closes it",
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
            }
        }
    )
    @blp.arguments(StreamQuerySchema, location="query", as_kwargs=True)
    def get(self, env: str, patches: bool) -> Response:
        """Server-Sent Events: the snapshot now (unless ``Last-Event-ID`` is current) and on every change.

        With ``patches=true``, a change to the version the client holds comes as a ``patch`` event
        (the flags that changed): a kill is a few hundred bytes whatever the number of flags. A
        ``revoked`` event ends the stream once the token is revoked or expires. 429 when the
        token already holds as many streams as a worker allows (``MAX_STREAMS_PER_TOKEN``)."""
        check_env(env)
        cache, token, streams, tokens = stores().snapshots, current_token(), stores().streams, stores().tokens
        first = cache.get(env)
        stream = streams.open(env, token.id, _client_socket(), lambda: tokens.still_valid(token))
        if stream is None:
            raise TooManyRequests(
                f"token {token.name!r} already holds {streams.per_token} event streams on this worker; "
                "poll the snapshot instead",
                retry_after=30,
            )
        body = EventStream(
            events(cache, stream, first, request.headers.get("Last-Event-ID"), patches=patches),
            on_close=lambda: streams.close(stream),
        )
        response = Response(
            body,
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.direct_passthrough = True
        return response


def _client_socket() -> Any:
    """The connection's socket, where the server exposes it (gunicorn, werkzeug)."""
    return request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
