"""Domain errors and their rendering as RFC 9457 ``application/problem+json``.

Every error the API returns goes through :func:`problem_response`: validation errors name the
fields at fault, domain errors carry their own status, and a Redis failure surfaces as 503
(Redis is the source of truth: the server never pretends a write succeeded).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from .metrics import REDIS_ERRORS

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:flagsvc:problem:"


class ProblemError(Exception):
    """An error that maps to one problem+json response."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.errors = errors
        self.headers = dict(headers or {})
        self.extra = extra


class InvalidInput(ProblemError):
    status, slug, title = 422, "invalid-input", "Invalid input"


class Unauthorized(ProblemError):
    status, slug, title = 401, "unauthorized", "Missing or invalid token"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="flagsvc"'})


class Forbidden(ProblemError):
    status, slug, title = 403, "forbidden", "Token not allowed here"


class TooManyRequests(ProblemError):
    status, slug, title = 429, "too-many-requests", "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


class EnvNotFound(ProblemError):
    status, slug, title = 404, "env-not-found", "Environment not found"


class FlagNotFound(ProblemError):
    status, slug, title = 404, "flag-not-found", "Flag not found"


class TokenNotFound(ProblemError):
    status, slug, title = 404, "token-not-found", "Token not found"


class AlreadyExists(ProblemError):
    status, slug, title = 409, "already-exists", "Already exists"


class VersionMismatch(ProblemError):
    status, slug, title = 412, "version-mismatch", "The flag changed since you read it"


class IdempotencyKeyReused(ProblemError):
    status, slug, title = 422, "idempotency-key-reused", "Idempotency-Key reused with another request"


class WriteContention(ProblemError):
    status, slug, title = 503, "write-contention", "Too many concurrent writes, retry"


class OutcomeUnknown(ProblemError):
    """Redis failed while a commit was in flight: it may or may not have been applied."""

    status, slug, title = 503, "outcome-unknown", "The change may or may not have been applied"


class StoreUnavailable(ProblemError):
    status, slug, title = 503, "store-unavailable", "Flag store (Redis) unavailable"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str | None = None,
    errors: Iterable[Mapping[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    """Build a problem+json response, which no cache may store."""
    body: dict[str, Any] = {
        "type": f"{TYPE_BASE}{slug}" if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = list(errors)
    body.update(extra)
    request_id = getattr(request, "request_id", None) if request else None
    if request_id:
        body["request_id"] = request_id
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    response.headers["Cache-Control"] = "no-store"  # no cache keeps a refusal (docs/read-tier.md)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def flatten_validation_messages(messages: Any, prefix: str = "") -> list[dict[str, str]]:
    """Turn marshmallow's nested ``{field: [msg]}`` into ``[{field: "a.b.0", message}]``."""
    out: list[dict[str, str]] = []
    if isinstance(messages, Mapping):
        for name, sub in messages.items():
            path = f"{prefix}.{name}" if prefix and name != "_schema" else (prefix or str(name))
            if name == "_schema" and not prefix:
                path = "(body)"
            out.extend(flatten_validation_messages(sub, path))
    elif isinstance(messages, list | tuple) and all(isinstance(m, str) for m in messages):
        out.extend({"field": prefix or "(body)", "message": m} for m in messages)
    elif isinstance(messages, list | tuple):
        for item in messages:
            out.extend(flatten_validation_messages(item, prefix))
    else:
        out.append({"field": prefix or "(body)", "message": str(messages)})
    return out


def _webargs_errors(messages: Mapping[str, Any]) -> list[dict[str, str]]:
    """webargs nests messages under their location (``json``, ``query``...)."""
    out: list[dict[str, str]] = []
    for location, fields in messages.items():
        for item in flatten_validation_messages(fields):
            item["location"] = "body" if location == "json" else str(location)
            out.append(item)
    return out


def handle_problem(error: ProblemError) -> Response:
    return problem_response(
        error.status,
        error.title,
        error.detail,
        slug=error.slug,
        errors=error.errors,
        headers=error.headers,
        **error.extra,
    )


def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    messages = data.get("messages")
    if messages:
        errors = _webargs_errors(messages)
        fields = ", ".join(sorted({e["field"] for e in errors}))
        return problem_response(
            status,
            "Invalid input",
            f"Invalid fields: {fields}",
            slug="invalid-input",
            errors=errors,
            headers=data.get("headers"),
        )
    detail = data.get("message") or error.description or error.name
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return problem_response(status, error.name, str(detail), headers=headers)


#: Redis failures that mean "not available right now" (down, hung, loading, a replica, a
#: failover or a cluster reshard in progress), as opposed to a bug in a command.
REDIS_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.ReadOnlyError,
    redis.exceptions.ClusterError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
)
#: Error replies of the same kind that redis-py raises as a plain ``ResponseError``.
UNAVAILABLE_REPLIES = ("NOREPLICAS", "MASTERDOWN", "LOADING", "READONLY", "CLUSTERDOWN", "TRYAGAIN")


#: Such a reply at the start of a ``ResponseError``, after the prefix redis-py gives an error of
#: a pipeline ("Command # 1 (…) of pipeline caused error: "), or inside the error of a script
#: whose write Redis refused ("Error running script (…): @user_script:134: -NOREPLICAS …").
_UNAVAILABLE_REPLY = re.compile(rf"(?:^|of pipeline caused error: |: -)(?:{'|'.join(UNAVAILABLE_REPLIES)})\b")


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means Redis cannot take the request now, rather than a bug."""
    if isinstance(error, REDIS_UNAVAILABLE):
        return True
    return isinstance(error, redis.ResponseError) and _UNAVAILABLE_REPLY.search(str(error)) is not None


def handle_redis_error(error: Exception) -> Response:
    """503. The client learns the kind of failure, never its text (addresses, socket paths):
    that goes to the log."""
    log.error("redis unavailable: %s", error)
    REDIS_ERRORS.inc()
    return handle_problem(StoreUnavailable(f"Redis is unavailable ({type(error).__name__}); retry later"))


def handle_unexpected(error: Exception) -> Response:
    if is_unavailable(error):
        return handle_redis_error(error)
    log.exception("unhandled error")
    return problem_response(500, "Internal Server Error", "Unexpected error; see the server log.")


def init_app(app: Flask) -> None:
    """Register the handlers. Called after flask-smorest so that ours win."""
    app.register_error_handler(ProblemError, handle_problem)
    app.register_error_handler(HTTPException, handle_http_exception)
    for exc in REDIS_UNAVAILABLE:
        app.register_error_handler(exc, handle_redis_error)
    app.register_error_handler(Exception, handle_unexpected)
