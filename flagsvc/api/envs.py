"""Environments: list (reader), create (admin)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from ..auth import current_token, require
from ..extensions import stores
from ..schemas import EnvCreateSchema, EnvListSchema, EnvSchema
from ..tokens import Role
from .common import check_env, idempotency, replay_headers, write_context

blp = Blueprint("envs", __name__, url_prefix="/api/v1/envs", description="Environments")


@blp.route("")
class Envs(MethodView):
    @require(Role.READER)
    @blp.response(200, EnvListSchema)
    def get(self) -> dict[str, Any]:
        """List the environments this token may use."""
        token = current_token()
        return {"envs": [e for e in stores().envs.list() if token.allows_env(e)]}


@blp.route("/<env>")
class Env(MethodView):
    @require(Role.ADMIN)
    @blp.arguments(EnvCreateSchema, required=False)
    @blp.response(200, EnvSchema)
    @blp.alt_response(201, schema=EnvSchema, description="Created")
    def put(self, body: dict[str, Any], env: str) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Create an environment (idempotent: 200 if it exists, 201 if created)."""
        check_env(env, must_exist=False)
        ctx = write_context(current_token().name)
        done = stores().envs.create(
            env,
            actor=ctx.actor,
            source=ctx.source,
            request_id=ctx.request_id,
            idempotency=idempotency(ctx.actor, body),
        )
        answer = {"env": env, "version": stores().flags.version(env), "created": done.result}
        return answer, 201 if done.result else 200, replay_headers(done)
