"""The snapshot SDKs poll: ``ETag`` is the environment version, ``If-None-Match`` gets 304."""

from __future__ import annotations

from flask import Response, json
from flask.views import MethodView
from flask_smorest import Blueprint

from ..auth import require
from ..extensions import stores
from ..schemas import SnapshotSchema
from ..tokens import Role
from .common import check_env, etag, if_none_match_version

blp = Blueprint("snapshot", __name__, url_prefix="/api/v1/envs/<env>", description="Snapshot for SDKs")


@blp.route("/snapshot")
class SnapshotResource(MethodView):
    @require(Role.SDK)
    @blp.doc(responses={"304": {"description": "Not modified: the version in If-None-Match is current"}})
    @blp.response(200, SnapshotSchema)
    def get(self, env: str) -> Response:
        """Every live flag's evaluation fields, with the environment version."""
        check_env(env)
        flags = stores().flags
        known = if_none_match_version()
        if known is not None and known == flags.version(env):
            return Response(status=304, headers={"ETag": etag(known)})
        snap = flags.snapshot(env)
        response = Response(json.dumps(snap.to_dict()), mimetype="application/json")
        response.headers["ETag"] = etag(snap.version)
        response.headers["Cache-Control"] = "no-cache"
        return response
