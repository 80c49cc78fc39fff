"""Configuration defaults; ``create_app`` overlays ``FLAGSVC_*`` environment variables."""

from __future__ import annotations

DEFAULTS: dict[str, object] = {
    # Redis: a redis:// rediss:// or unix:// URL. ``flagsvc serve`` sets it to the embedded
    # server when none is given.
    "REDIS_URL": None,
    "REDIS_SOCKET_TIMEOUT": 5.0,
    # Request bodies larger than this are refused with 413 before they are parsed.
    "MAX_CONTENT_LENGTH": 64 * 1024,
    # How long a verified token is cached in a worker; revocation takes effect within it.
    "TOKEN_CACHE_SECONDS": 1.0,
    # How long an Idempotency-Key is remembered.
    "IDEMPOTENCY_TTL_SECONDS": 24 * 3600,
    # Request logs: "" (none beyond gunicorn's), "text" or "json" (one JSON object per line).
    "LOG_FORMAT": "",
    "LOG_LEVEL": "INFO",
    # Number of proxies in front of the service whose X-Forwarded-For is trusted.
    "TRUSTED_PROXIES": 0,
    # flask-smorest / OpenAPI
    "API_TITLE": "flagsvc",
    "API_VERSION": "v1",
    "OPENAPI_VERSION": "3.1.0",
    "OPENAPI_URL_PREFIX": "/api/v1",
    "OPENAPI_JSON_PATH": "openapi.json",
}
