"""Flags: list, get, create/replace, patch, archive, kill and restore."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Response, jsonify
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import ValidationError

from ..auth import current_token, require
from ..errors import FlagNotFound, InvalidInput, flatten_validation_messages
from ..extensions import stores
from ..flags import Flag, Mutation, definition_of, switch
from ..schemas import (
    ActionSchema,
    FlagDefinitionSchema,
    FlagListQuerySchema,
    FlagListSchema,
    FlagPreviewSchema,
    FlagSchema,
)
from ..snapshots import etag
from ..tokens import Role
from .common import (
    ENV_VERSION_HEADER,
    check_env,
    check_key,
    idempotency,
    if_match,
    if_none_match_any,
    replay_headers,
    write_context,
)

blp = Blueprint("flags", __name__, url_prefix="/api/v1/envs/<env>/flags", description="Flags")

_FULL = FlagDefinitionSchema()
#: PATCH: any top-level field may be left out; what is given is whole (a rule, a condition).
_PARTIAL = FlagDefinitionSchema(partial=tuple(_FULL.fields))


def _check(env: str, key: str | None = None) -> None:
    check_env(env)
    if key is not None:
        check_key(key)


def _write(
    env: str,
    key: str,
    mutate: Callable[[Flag | None], Mutation],
    body: Any = None,
    *,
    reason: str = "",
    incident: str = "",
    created_status: int = 200,
    **options: Any,
) -> tuple[Flag, int, dict[str, str]]:
    """Write one flag for this request (``If-Match`` and ``Idempotency-Key`` honoured) and answer
    with the flag, its version as ``ETag`` and the environment version that includes it."""
    actor = current_token().name
    done = stores().flags.write(
        env,
        key,
        mutate,
        write_context(actor, reason, incident),
        if_match=if_match(),
        idempotency=idempotency(actor, body),
        **options,
    )
    result = done.result
    if result.changed and not done.replayed:
        stores().snapshots.reload_after_write(env, result.env_version)
    headers = {"ETag": etag(result.flag["version"]), ENV_VERSION_HEADER: str(result.env_version)}
    return result.flag, created_status if result.created else 200, {**headers, **replay_headers(done)}


def _must_exist(env: str, key: str, current: Flag | None) -> Flag:
    if current is None:
        raise FlagNotFound(f"flag {key!r} does not exist in {env!r}")
    return current


@blp.route("")
class Flags(MethodView):
    @require(Role.READER)
    @blp.arguments(FlagListQuerySchema, location="query", unknown="raise")
    @blp.response(200, FlagListSchema)
    def get(self, query: dict[str, Any], env: str) -> dict[str, Any]:
        """List flags, kill switches first."""
        _check(env)
        return {"env": env, "flags": stores().flags.list(env, include_archived=query["include_archived"])}


@blp.route("/<key>")
class FlagResource(MethodView):
    @require(Role.READER)
    @blp.response(200, FlagSchema)
    def get(self, env: str, key: str) -> tuple[Flag, int, dict[str, str]]:
        """One flag, with its version as ``ETag``."""
        _check(env, key)
        flag = stores().flags.get(env, key)
        return flag, 200, {"ETag": etag(flag["version"])}

    @require(Role.ADMIN)
    @blp.arguments(FlagDefinitionSchema)
    @blp.response(200, FlagSchema)
    @blp.alt_response(201, schema=FlagSchema, description="Created")
    def put(self, definition: Flag, env: str, key: str) -> tuple[Flag, int, dict[str, str]]:
        """Create or replace a flag. ``If-Match`` guards a replace, ``If-None-Match: *`` a create."""
        _check(env, key)

        def mutate(current: Flag | None) -> Mutation:
            return Mutation("flag.update" if current else "flag.create", definition)

        return _write(env, key, mutate, definition, created_status=201, if_none_match_any=if_none_match_any())

    @require(Role.ADMIN)
    @blp.arguments(_PARTIAL)
    @blp.response(200, FlagSchema)
    def patch(self, changes: Flag, env: str, key: str) -> tuple[Flag, int, dict[str, str]]:
        """Change some top-level fields of a flag; the result must be a valid flag."""
        _check(env, key)

        def mutate(current: Flag | None) -> Mutation:
            merged = {**definition_of(_must_exist(env, key, current)), **changes}
            try:
                return Mutation("flag.update", _FULL.load(merged))
            except ValidationError as exc:
                errors = flatten_validation_messages(exc.messages)
                for e in errors:
                    e["location"] = "body"
                raise InvalidInput("the flag would be invalid after this change", errors=errors) from None

        return _write(env, key, mutate, changes)

    @require(Role.ADMIN)
    @blp.response(200, FlagSchema)
    def delete(self, env: str, key: str) -> tuple[Flag, int, dict[str, str]]:
        """Archive a flag: gone from the snapshot and the list, kept for the audit."""
        _check(env, key)

        def mutate(current: Flag | None) -> Mutation:
            return Mutation("flag.delete", definition_of(_must_exist(env, key, current)), archived=True)

        return _write(env, key, mutate)


def _preview(env: str, key: str, enabled: bool) -> Response:
    """A dry run of kill or restore: what would change, and who evaluated the flag lately."""
    flag = stores().flags.get(env, key)
    seen = stores().clients.blast_radius(env, [key])[key]
    return jsonify(
        dry_run=True,
        flag=key,
        changed=flag["enabled"] is not enabled,
        before={"enabled": flag["enabled"], "version": flag["version"]},
        after={"enabled": enabled},
        blast_radius=seen,
    )


def _switch(action: str, enabled: bool) -> Callable[..., Any]:
    """A kill or restore view: set ``enabled``, with a reason, idempotent with a key."""

    @require(Role.OPERATOR)
    @blp.arguments(ActionSchema)
    @blp.response(200, FlagSchema)
    @blp.doc(
        responses={
            "200": {
                "description": "The flag, or with dry_run what would change and who evaluated it lately",
                "content": {"application/json": {"schema": {"oneOf": [FlagSchema, FlagPreviewSchema]}}},
            }
        }
    )
    def view(body: dict[str, Any], env: str, key: str) -> tuple[Flag, int, dict[str, str]] | Response:
        _check(env, key)
        if body["dry_run"]:
            return _preview(env, key, enabled)

        mutate = switch(env, key, action, enabled)
        return _write(
            env, key, mutate, body, reason=body["reason"], incident=body["incident"], revert_in=body["for_"]
        )

    return view


kill = _switch("flag.kill", False)
kill.__doc__ = "Kill switch: disable the flag (serve its off variant to everyone). A reason is required."
blp.route("/<key>/kill", methods=["POST"], endpoint="kill")(kill)
restore = _switch("flag.restore", True)
restore.__doc__ = "Re-enable a flag after a kill. A reason is required."
blp.route("/<key>/restore", methods=["POST"], endpoint="restore")(restore)
