"""The OpenFeature Remote Evaluation Protocol (OFREP) for stacks without a flagsvc SDK.

``POST /ofrep/v1/evaluate/flags/{key}``, ``POST /ofrep/v1/evaluate/flags`` (bulk, with
``ETag``/``If-None-Match``) and ``GET /ofrep/v1/configuration``. Evaluation runs the SDK's engine
on this worker's in-memory snapshot, so answers equal what the Python SDK computes. Auth:
``Authorization: Bearer`` or ``X-API-Key`` with a token (``sdk`` role or above) scoped to exactly
one environment - the one evaluated. Errors use the protocol's body: ``{key, errorCode,
errorDetails}``. Evaluations are counted per token and app (``X-Flagsvc-App``, optional) into the
usage that dry runs show, and the consumer is listed in ``/clients`` (:class:`OfrepUsage`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import Blueprint, Response, request

from ..auth import authorize, bearer
from ..errors import Forbidden, Unauthorized
from ..extensions import stores
from ..snapshots import STALE_HEADER
from ..tokens import ALL_ENVS, Role, Token

bp = Blueprint("ofrep", __name__, url_prefix="/ofrep/v1")

#: Evaluation errors of the engine and the HTTP status OFREP gives them.
_ERROR_STATUS = {
    "FLAG_NOT_FOUND": 404,
    "PARSE_ERROR": 400,
    "TARGETING_KEY_MISSING": 400,
    "INVALID_CONTEXT": 400,
}
MIN_POLLING_INTERVAL_MS = 1000
#: Names the application in the usage view (else the token's name).
APP_HEADER = "X-Flagsvc-App"
_APP_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class OfrepError(Exception):
    def __init__(self, status: int, code: str, details: str, key: str | None = None) -> None:
        super().__init__(details)
        self.status, self.code, self.details, self.key = status, code, details, key


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


@bp.errorhandler(OfrepError)
def _error(exc: OfrepError) -> Response:
    body = {"errorCode": exc.code, "errorDetails": exc.details}
    if exc.key is not None:
        body = {"key": exc.key, **body}
    return _json(body, exc.status)


def _token(key: str | None = None) -> Token:
    secret = (
        bearer(request.headers.get("Authorization")) or request.headers.get("X-API-Key", "").strip() or None
    )
    try:
        token = authorize(stores().tokens, secret, Role.SDK, None, may_wait=False)
    except Unauthorized:
        raise OfrepError(
            401, "GENERAL", "send Authorization: Bearer <token> or X-API-Key with a valid token", key
        ) from None
    except Forbidden as exc:
        raise OfrepError(403, "GENERAL", exc.detail, key) from None
    if len(token.envs) != 1 or token.envs[0] == ALL_ENVS:
        detail = f"token {token.name!r} must be scoped to exactly one environment"
        raise OfrepError(403, "GENERAL", detail, key)
    return token


def _context(key: str | None = None) -> dict[str, Any]:
    """The evaluation context of the body (``targetingKey`` becomes ``targeting_key``); errors
    name the flag ``key`` evaluated, if one."""
    raw = request.get_data(cache=True)
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise OfrepError(400, "PARSE_ERROR", "the body is not valid JSON", key) from None
    context = body.get("context", {}) if isinstance(body, dict) else None
    if not isinstance(context, dict):
        raise OfrepError(400, "INVALID_CONTEXT", "context must be a JSON object", key)
    context = dict(context)
    if "targetingKey" in context:
        context["targeting_key"] = context.pop("targetingKey")
    return context


def _evaluate(key: str, flags: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    flag = flags.get(key)
    if flag is None:
        return {"key": key, "errorCode": "FLAG_NOT_FOUND", "errorDetails": f"no flag {key!r}"}
    details = flag.evaluate(context, None)
    if details.error_code:
        return {"key": key, "errorCode": details.error_code, "errorDetails": details.error_message or ""}
    metadata = {"version": details.flag_version} if details.flag_version is not None else {}
    return {
        "key": key,
        "value": details.value,
        "reason": details.reason,
        "variant": details.variant,
        "metadata": metadata,
    }


def _published(key: str | None = None) -> tuple[Any, Token]:
    """The snapshot of the token's environment, and the token."""
    token = _token(key)
    env = token.envs[0]
    if not stores().envs.exists(env):
        raise OfrepError(403, "GENERAL", f"environment {env!r} is not available to this token", key)
    return stores().snapshots.get(env), token


def _count(token: Token, results: list[dict[str, Any]], key: str | None = None) -> None:
    """Count the flags evaluated (not those missing) for the token and the app it names."""
    app = request.headers.get(APP_HEADER, "")
    if app and not _APP_NAME.fullmatch(app):
        raise OfrepError(400, "GENERAL", f"{APP_HEADER}: 1-64 characters of [A-Za-z0-9._:-]", key)
    evaluated = [r["key"] for r in results if r.get("errorCode") != "FLAG_NOT_FOUND"]
    stores().ofrep_usage.count(token.envs[0], token.name, app, evaluated, request.remote_addr or "")


@bp.post("/evaluate/flags/<key>")
def evaluate_flag(key: str) -> Response:
    """One flag: ``{key, value, reason, variant, metadata}`` or ``{key, errorCode, errorDetails}``."""
    published, token = _published(key)
    result = _evaluate(key, published.compiled(), _context(key))
    _count(token, [result], key)
    if "errorCode" in result:
        raise OfrepError(
            _ERROR_STATUS.get(result["errorCode"], 400), result["errorCode"], result["errorDetails"], key
        )
    return _json(result)


@bp.post("/evaluate/flags")
def evaluate_flags() -> Response:
    """Every flag for one context; ``ETag`` covers the version and the context (``304``)."""
    published, token = _published()
    context = _context()
    digest = hashlib.sha256(json.dumps(context, sort_keys=True, default=str).encode()).hexdigest()[:16]
    etag = f'"{published.identity}-{digest}"'
    headers = {"ETag": etag}
    if stores().snapshots.stale:
        headers[STALE_HEADER] = "true"
    if request.headers.get("If-None-Match") == etag:
        return Response(status=304, headers=headers)
    compiled = published.compiled()
    results = [_evaluate(key, compiled, context) for key in compiled]
    _count(token, results)
    return _json({"flags": results}, headers=headers)


@bp.get("/configuration")
def configuration() -> Response:
    """What this OFREP server supports."""
    _token()
    return _json(
        {
            "name": "flagsvc",
            "capabilities": {
                "cacheInvalidation": {
                    "polling": {"enabled": True, "minPollingIntervalMs": MIN_POLLING_INTERVAL_MS}
                },
                "flagEvaluation": {"supportedTypes": ["boolean", "string", "integer", "float", "object"]},
            },
        }
    )
