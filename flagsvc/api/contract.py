"""The parts of the API's contract that flask-smorest does not infer from the views: path
parameter patterns, request headers, and errors as ``application/problem+json``."""

from __future__ import annotations

from typing import Any

from apispec import BasePlugin
from marshmallow import fields, validate

from ..envs import ENV_NAME
from ..schemas import FLAG_KEY, INSTANCE_ID

#: Path parameters by name, as every route checks them (422 otherwise).
PATH_PATTERNS = {
    "env": ENV_NAME.pattern,
    "key": FLAG_KEY.pattern,
    "name": FLAG_KEY.pattern,
    "instance": INSTANCE_ID,
}

ETAG = {"type": "string", "pattern": r'^(W/)?"?[0-9]{1,18}"?$'}


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"in": "header", "name": name, "required": False, "description": description, "schema": schema}


IDEMPOTENCY_KEY = _header(
    "Idempotency-Key",
    "A retry with the same key and request replays the first answer (Idempotent-Replayed: true); "
    "the same key with another request is 422. Kept 24 h.",
    {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
)
IF_MATCH = _header(
    "If-Match",
    'The version last read, such as "3": 412 if it moved. "*" matches any.',
    {"anyOf": [ETAG, {"const": "*"}]},
)
IF_NONE_MATCH_ANY = _header("If-None-Match", '"*": create only (412 if the flag exists).', {"const": "*"})
IF_NONE_MATCH_VERSION = _header(
    "If-None-Match", 'The environment version held, such as "3": 304 if it is current.', {"type": "string"}
)
LAST_EVENT_ID = _header(
    "Last-Event-ID", "The version held: no snapshot event on connect if it is current.", {"type": "string"}
)

#: Request headers of each operation beyond Idempotency-Key (every write takes that one).
HEADERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("/api/v1/envs/{env}/flags/{key}", "put"): [IF_MATCH, IF_NONE_MATCH_ANY],
    ("/api/v1/envs/{env}/flags/{key}", "patch"): [IF_MATCH],
    ("/api/v1/envs/{env}/flags/{key}", "delete"): [IF_MATCH],
    ("/api/v1/envs/{env}/flags/{key}/kill", "post"): [IF_MATCH],
    ("/api/v1/envs/{env}/flags/{key}/restore", "post"): [IF_MATCH],
    ("/api/v1/envs/{env}/playbooks/{name}/apply", "post"): [IF_MATCH],
    ("/api/v1/envs/{env}/snapshot", "get"): [IF_NONE_MATCH_VERSION],
    ("/api/v1/envs/{env}/stream", "get"): [LAST_EVENT_ID],
}
WRITES = ("post", "put", "patch", "delete")
#: Writes that take no Idempotency-Key: an SDK instance's heartbeat and goodbye (not audited
#: state changes), and Alertmanager's notifications (a retry is decided again, changing nothing).
NOT_IDEMPOTENT = {
    ("/api/v1/envs/{env}/clients/{instance}", "post"),
    ("/api/v1/envs/{env}/clients/{instance}", "delete"),
    ("/api/v1/envs/{env}/alerts/alertmanager", "post"),
}


class ContractPlugin(BasePlugin):
    """An apispec plugin, run after flask-smorest's: patterns and headers by route, and what a
    schema declares in ``OPENAPI`` (constraints of the whole object, such as minProperties)."""

    def schema_helper(self, name: str, definition: dict[Any, Any], **kwargs: Any) -> dict[Any, Any] | None:
        extra = getattr(kwargs.get("schema"), "OPENAPI", None)
        return dict(extra) if extra else None

    def path_helper(
        self, path: str | None = None, operations: Any = None, parameters: Any = None, **_: Any
    ) -> None:
        for parameter in parameters or []:
            pattern = PATH_PATTERNS.get(parameter.get("name"))
            if parameter.get("in") == "path" and pattern:
                parameter["schema"] = {"type": "string", "pattern": pattern}

    def operation_helper(self, path: str | None = None, operations: Any = None, **_: Any) -> None:
        for method, operation in (operations or {}).items():
            headers = list(HEADERS.get((str(path), method), []))
            if method in WRITES and (path, method) not in NOT_IDEMPOTENT:
                headers.append(IDEMPOTENCY_KEY)
            if headers:
                operation.setdefault("parameters", []).extend(headers)


def dict_constraints(_converter: Any, field: fields.Field, **_: Any) -> dict[str, Any]:
    """A marshmallow ``Dict``'s key pattern and size, which apispec leaves out."""
    if not isinstance(field, fields.Dict):
        return {}
    out: dict[str, Any] = {}
    for validator in getattr(field.key_field, "validators", []):
        if isinstance(validator, validate.Regexp):
            out["propertyNames"] = {"pattern": validator.regex.pattern}
    for validator in field.validators:
        if isinstance(validator, validate.Length):
            if validator.min is not None:
                out["minProperties"] = validator.min
            if validator.max is not None:
                out["maxProperties"] = validator.max
    return out
