"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, Response, jsonify

from ..extensions import stores

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process answers."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Redis answers, and it is a master that takes writes: the service can read and write flags."""
    try:
        problem = stores().unready()
    except redis.RedisError as exc:
        log.warning("readiness: Redis unavailable: %s", exc)
        return jsonify(status="unavailable", redis=type(exc).__name__), 503
    rollbacks = stores().history.rollbacks()
    if problem is not None:
        return jsonify(status="unavailable", redis=problem, rollbacks=rollbacks), 503
    if rollbacks:  # ready (it serves the current history), and says what was lost
        return jsonify(status="ready", rollbacks=rollbacks), 200
    return jsonify(status="ready"), 200
