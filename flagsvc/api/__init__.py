"""The REST API (``/api/v1``): flask-smorest blueprints, request hooks, OpenAPI document."""

from __future__ import annotations

from typing import Any

from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import resolve_schema_cls
from flask import Flask
from flask_smorest import Api

from ..errors import PROBLEM_JSON
from ..schemas import ParsedString, ProblemSchema
from . import audit, clients, envs, flags, health, ofrep, playbooks, snapshot
from .common import init_request_hooks
from .contract import ContractPlugin, dict_constraints

SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "fsk_<id>_<secret>"}}


def schema_name(schema: Any) -> str:
    """OpenAPI component name: the class name without ``Schema``; ``...Patch`` when partial."""
    cls = resolve_schema_cls(schema)
    name = (cls[0] if isinstance(cls, list) else cls).__name__.removesuffix("Schema")
    return f"{name}Patch" if getattr(schema, "partial", False) else name


class FlagsvcApi(Api):
    """flask-smorest's Api, documenting errors as ``application/problem+json``, as they are sent."""

    ERROR_SCHEMA = ProblemSchema
    DEFAULT_RESPONSE_CONTENT_TYPE: str = "application/json"

    def _register_responses(self) -> None:
        default = self.DEFAULT_RESPONSE_CONTENT_TYPE
        self.DEFAULT_RESPONSE_CONTENT_TYPE = PROBLEM_JSON
        try:
            super()._register_responses()
        finally:
            self.DEFAULT_RESPONSE_CONTENT_TYPE = default


def init_app(app: Flask) -> Api:
    api = FlagsvcApi(
        app,
        spec_kwargs={
            "marshmallow_plugin": MarshmallowPlugin(schema_name_resolver=schema_name),
            "extra_plugins": [ContractPlugin()],
            "security": [{"bearer": []}],
            "components": {"securitySchemes": SECURITY_SCHEMES},
        },
    )
    api.ma_plugin.converter.add_attribute_function(dict_constraints)
    api.register_field(ParsedString, "string", None)
    for blp in (envs.blp, flags.blp, playbooks.blp, snapshot.blp, clients.blp, audit.blp):
        api.register_blueprint(blp)
    app.register_blueprint(health.bp)
    app.register_blueprint(ofrep.bp)
    init_request_hooks(app)
    return api
