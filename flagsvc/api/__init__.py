"""The REST API (``/api/v1``): flask-smorest blueprints, request hooks, OpenAPI document."""

from __future__ import annotations

import threading
from typing import Any

from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import resolve_schema_cls
from flask import Flask
from flask_smorest import Api

from ..errors import PROBLEM_JSON
from ..schemas import ParsedString, ProblemSchema
from . import alerts, audit, clients, definitions, envs, flags, health, ofrep, playbooks, snapshot, webhooks
from .common import init_request_hooks
from .contract import ContractPlugin, dict_constraints

SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "fsk_<id>_<secret>"}}


def schema_name(schema: Any) -> str:
    """OpenAPI component name: the class name without ``Schema``; ``...Patch`` when partial."""
    cls = resolve_schema_cls(schema)
    name = (cls[0] if isinstance(cls, list) else cls).__name__.removesuffix("Schema")
    return f"{name}Patch" if getattr(schema, "partial", False) else name


class FlagsvcApi(Api):
    """flask-smorest's Api, documenting errors as ``application/problem+json``, as they are sent.

    A blueprint's views are documented when the OpenAPI document is first read, not when the
    blueprint is registered: building the document is most of the cost of creating an app, and
    most processes (every gunicorn worker, every test) never serve it.
    """

    ERROR_SCHEMA = ProblemSchema
    DEFAULT_RESPONSE_CONTENT_TYPE: str = "application/json"

    def __init__(self, app: Flask, **kwargs: Any) -> None:
        self._undocumented: list[tuple[Any, str]] = []
        self._documenting = threading.RLock()
        self._completing = False
        self._complete = False
        self._responses_documented = False
        self._assembled = False  # the app is still being built
        super().__init__(app, **kwargs)

    def assembled(self) -> None:
        """The app is built: the next read of :attr:`spec` completes the document."""
        self._assembled = True

    @property
    def spec(self) -> Any:
        """The OpenAPI document, with every registered blueprint's views in it."""
        if self._assembled and not self._complete:
            with self._documenting:  # other readers wait here until the document is whole
                if not self._complete and not self._completing:  # documenting reads self.spec
                    self._completing = True
                    try:
                        self._complete_document()
                        self._complete = True
                    finally:
                        self._completing = False
        return self._spec

    @spec.setter
    def spec(self, value: Any) -> None:
        self._spec = value

    def _complete_document(self) -> None:
        if not self._responses_documented:
            self._document_responses()
            self._responses_documented = True
        while self._undocumented:
            blp, name = self._undocumented.pop(0)
            blp.register_views_in_doc(self, self._app, self._spec, name=name, parameters=None)
            self._spec.tag({"name": name, "description": blp.description})

    def register_blueprint(self, blp: Any, *, parameters: Any = None, **options: Any) -> None:
        """Register ``blp`` with the app now; document its views when the document is read."""
        if parameters is not None:
            raise ValueError("url_prefix parameters are not used by flagsvc")
        name = options.get("name", blp.name)
        self._app.extensions["flask-smorest"]["blp_name_to_api"][name] = self
        self._app.register_blueprint(blp, **options)
        self._undocumented.append((blp, name))

    def _register_responses(self) -> None:
        """Nothing yet: :meth:`_document_responses` runs when the document is first read."""

    def _document_responses(self) -> None:
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
    blueprints = (envs.blp, flags.blp, playbooks.blp, definitions.blp, snapshot.blp, clients.blp, audit.blp)
    for blp in (*blueprints, alerts.blp, webhooks.blp, definitions.schemas_blp):
        api.register_blueprint(blp)
    app.register_blueprint(health.bp)
    app.register_blueprint(ofrep.bp)
    app.extensions["flagsvc-api"] = api
    init_request_hooks(app)
    api.assembled()
    return api
