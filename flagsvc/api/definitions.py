"""Flags as code: an environment's definitions as one document, planned and applied at once, and
the JSON Schema of that document for editors."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint

from ..auth import current_token, require
from ..definitions import FORMAT, METADATA_FIELDS, apply_definitions, export_env, parse_document
from ..errors import Forbidden
from ..extensions import stores
from ..schemas import FLAG_KEY, DefinitionsApplySchema, DefinitionsPlanSchema
from ..tokens import Role
from .common import check_env, idempotency, replay_headers, write_context

blp = Blueprint(
    "definitions",
    __name__,
    url_prefix="/api/v1/envs/<env>/definitions",
    description="Flags as code: the environment's flags and playbooks as one document",
)
#: Public, like the OpenAPI document: what editors fetch to validate a definitions file.
schemas_blp = Blueprint(
    "schemas", __name__, url_prefix="/api/v1/schemas", description="JSON Schemas of flagsvc's files"
)


def _json(document: Any, status: int = 200, **headers: str) -> Response:
    """``document`` with its keys in the order they were built (the canonical order)."""
    return Response(json.dumps(document, indent=2) + "\n", status, headers, mimetype="application/json")


@blp.route("")
class Definitions(MethodView):
    @require(Role.READER)
    @blp.response(200, description="The flags and playbooks of the environment, canonical form")
    def get(self, env: str) -> Response:
        """The environment as a definitions document (``flagctl export``): defaults left out, so
        that a document applied to an empty environment exports back exactly."""
        check_env(env)
        return _json(export_env(stores().redis, env))


@blp.route("/apply", methods=["POST"])
@require(Role.READER)  # a dry run is a read (a diff in a pull request); an apply needs admin
@blp.arguments(DefinitionsApplySchema)
@blp.response(200, DefinitionsPlanSchema)
def apply(body: dict[str, Any], env: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Make the environment hold a document (created if missing), in one audited commit, or with
    ``dry_run`` answer the plan: creates, updates field by field, archives (``prune``), and what
    is left alone because containment holds it. ``base_version`` refuses (409) a plan made
    before another change."""
    check_env(env, must_exist=False)  # an apply creates it; a dry run plans against nothing
    if not body["dry_run"] and current_token().role_level < Role.ADMIN:
        raise Forbidden(
            f"applying needs the admin role; token {current_token().name!r} is {current_token().role}"
        )
    declared = parse_document(body["definitions"], prefix="definitions.")
    actor = current_token().name
    done = apply_definitions(
        stores().redis,
        env,
        declared,
        write_context(actor, body["reason"], body["incident"]),
        prune=body["prune"],
        dry_run=body["dry_run"],
        base_version=body["base_version"],
        idempotency=idempotency(actor, body),
    )
    plan = done.result
    if plan.env_version > plan.base_version and not done.replayed:
        stores().snapshots.reload_after_write(env, plan.env_version)
    return plan.to_dict(), 200, replay_headers(done)


@schemas_blp.route("/definitions.json")
@schemas_blp.doc(security=[])
@schemas_blp.response(200, description="A JSON Schema (2020-12); no token needed")
def definitions_schema() -> Response:
    """The JSON Schema of a definitions file (``flagctl apply -f``), from the same schemas the API
    validates with: point an editor at it."""
    return _json(file_schema(current_app.extensions["flagsvc-api"].spec.to_dict(), request.url))


def file_schema(openapi: dict[str, Any], schema_id: str) -> dict[str, Any]:
    """A JSON Schema (2020-12) of a definitions document, built from the OpenAPI components."""
    components = openapi["components"]["schemas"]
    needed = _referenced(components, ["FlagDefinition", "PlaybookDefinition"])
    defs = json.loads(
        json.dumps({name: components[name] for name in needed}).replace("#/components/schemas/", "#/$defs/")
    )
    by_name = {"type": "string", "pattern": FLAG_KEY.pattern}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": schema_id,
        "title": "flagsvc definitions file (flagctl apply -f, flagctl export)",
        "type": "object",
        "properties": {
            "format": {"const": FORMAT},
            "flags": {
                "type": "object",
                "propertyNames": by_name,
                "additionalProperties": {"$ref": "#/$defs/FlagDefinition"},
            },
            "playbooks": {
                "type": "object",
                "propertyNames": by_name,
                "additionalProperties": {"$ref": "#/$defs/PlaybookDefinition"},
            },
            **{name: {"description": "written by flagsvc export; ignored"} for name in METADATA_FIELDS},
        },
        "additionalProperties": False,
        "$defs": defs,
    }


def _referenced(components: dict[str, Any], roots: list[str]) -> list[str]:
    """``roots`` and every component they refer to, transitively."""
    found: list[str] = []
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.append(name)
        text = json.dumps(components[name])
        pending += [part.split('"')[0] for part in text.split("#/components/schemas/")[1:]]
    return sorted(found)
