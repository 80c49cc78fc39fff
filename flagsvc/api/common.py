"""What every API view shares: request ids, body checks, path checks, ETags, audit context."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

from flask import Flask, Response, current_app, request

from ..envs import ENV_NAME
from ..errors import InvalidInput
from ..extensions import stores
from ..schemas import FLAG_KEY
from ..writes import Done, IdempotencyRequest, WriteContext

#: On write answers: the environment version that includes the write (``flagctl --wait``).
ENV_VERSION_HEADER = "X-Flagsvc-Env-Version"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_SNAPSHOT_ETAG = re.compile(r'^(?:W/)?"?([0-9]{1,18}(?:-[0-9a-f]{12})?)"?$')
_ETAG = re.compile(r'^(?:W/)?"?([0-9]{1,18})"?$')


def init_request_hooks(app: Flask) -> None:
    @app.before_request
    def _assign_request_id() -> None:
        request.request_id = request_id_for(request.headers.get("X-Request-ID", ""))  # type: ignore[attr-defined]

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        request_id = getattr(request, "request_id", None)
        if request_id:
            response.headers["X-Request-ID"] = request_id
        return response


def request_id_for(incoming: str) -> str:
    """The client's ``X-Request-ID`` if it is a sane one, else a new id."""
    return incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


def path_error(field: str, message: str) -> InvalidInput:
    return InvalidInput(
        f"invalid {field} in the URL: {message}",
        errors=[{"field": field, "location": "path", "message": message}],
    )


def check_env(env: str, *, must_exist: bool = True) -> None:
    if not ENV_NAME.fullmatch(env):
        raise path_error("env", "lower-case letters, digits, '-' and '_', at most 63, starting alphanumeric")
    if must_exist:
        stores().envs.require(env)


def check_key(key: str) -> None:
    if not FLAG_KEY.fullmatch(key):
        raise path_error("key", "lower-case [a-z0-9] then [a-z0-9._-], at most 128 characters")


def _parse_etag_header(name: str) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    match = _ETAG.fullmatch(raw.split(",")[0].strip())
    if not match:
        raise InvalidInput(
            f'{name} must be a flag version ETag such as "3"',
            errors=[{"field": name, "location": "header", "message": "not a version ETag"}],
        )
    return int(match.group(1))


def if_match() -> int | None:
    """The flag version the client expects (``If-Match``), or ``None``."""
    if request.headers.get("If-Match", "").strip() == "*":
        return None
    return _parse_etag_header("If-Match")


def if_none_match_any() -> bool:
    return request.headers.get("If-None-Match", "").strip() == "*"


def if_none_match_snapshot() -> str | None:
    """The snapshot named by ``If-None-Match`` (polling), ``None`` if absent or unparsable."""
    return snapshot_named_by(request.headers.get("If-None-Match"))


def snapshot_named_by(raw: str | None) -> str | None:
    """The snapshot identity (``<version>-<history>``, or a bare version from an older SDK) in an
    ``If-None-Match`` value (its first ETag), ``None`` if absent or unparsable."""
    if not raw:
        return None
    match = _SNAPSHOT_ETAG.fullmatch(raw.split(",")[0].strip())
    return match.group(1) if match else None


def accepts_gzip(raw: str | None) -> bool:
    """Whether an ``Accept-Encoding`` value takes gzip: ``gzip`` (or ``x-gzip``), else ``*``, with
    a weight above 0 (``gzip;q=0`` refuses it)."""
    weights: dict[str, float] = {}
    for item in (raw or "").split(","):
        coding, *params = item.split(";")
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                weight = _qvalue(value)
        weights.setdefault(coding.strip().lower(), weight)
    for coding in ("gzip", "x-gzip", "*"):
        if coding in weights:
            return weights[coding] > 0
    return False


def _qvalue(raw: str) -> float:
    try:
        return min(max(float(raw.strip()), 0.0), 1.0)
    except ValueError:
        return 0.0


def write_context(actor: str, reason: str = "", incident: str = "") -> WriteContext:
    return WriteContext(
        actor=actor,
        source=request.remote_addr or "",
        request_id=getattr(request, "request_id", ""),
        reason=reason,
        incident=incident,
    )


def idempotency(actor: str, body: Any = None) -> IdempotencyRequest | None:
    """The request's ``Idempotency-Key``, scoped to the token's name (and the namespace written);
    the record remembers method, path and ``body`` so that the key cannot be reused for another."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            "Idempotency-Key must be 1-255 visible ASCII characters",
            errors=[{"field": "Idempotency-Key", "location": "header", "message": "invalid"}],
        )
    canonical = json.dumps([request.method, request.path, body], sort_keys=True, default=str)
    fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
    digest = hashlib.sha256(key.encode()).hexdigest()
    ttl = int(current_app.config["IDEMPOTENCY_TTL_SECONDS"])
    return IdempotencyRequest(actor, digest, fingerprint, ttl)


def replay_headers(done: Done[Any]) -> dict[str, str]:
    """``Idempotent-Replayed: true`` on the answer of a replayed request."""
    return {"Idempotent-Replayed": "true"} if done.replayed else {}
