"""Configuration defaults; ``create_app`` overlays ``FLAGSVC_*`` environment variables."""

from __future__ import annotations

from flask import Config

DEFAULTS: dict[str, object] = {
    # Redis: redis://, rediss://, unix://, redis+sentinel://.../MASTER or redis+cluster://
    # (flagsvc/connection.py). ``flagsvc serve`` sets it to the embedded server when none is given.
    "REDIS_URL": None,
    "REDIS_SOCKET_TIMEOUT": 5.0,
    # A commit is acknowledged once this many replicas confirm it (WAIT): "auto" waits for one
    # when the master has replicas; 0 never waits. Beyond the timeout the answer is 503
    # outcome-unknown (the change is on the master, not yet known to survive a failover).
    "REDIS_WAIT_REPLICAS": "auto",
    "REDIS_WAIT_TIMEOUT_MS": 1000,
    # Request bodies larger than this are refused with 413 before they are parsed.
    "MAX_CONTENT_LENGTH": 64 * 1024,
    # How long a verified token is cached in a worker; revocation takes effect within it.
    "TOKEN_CACHE_SECONDS": 1.0,
    # How long an Idempotency-Key is remembered (a token keeps its newest 1,000 per environment).
    "IDEMPOTENCY_TTL_SECONDS": 24 * 3600,
    # Limits per token, so that one leaked or buggy SDK token cannot flood Redis or the workers:
    # SDK instances it may report per environment (a new one replaces the longest silent one),
    # heartbeats per instance per minute, and open event streams per worker process.
    "MAX_INSTANCES_PER_TOKEN": 10_000,
    "HEARTBEATS_PER_MINUTE": 30,
    "MAX_STREAMS_PER_TOKEN": 2_000,
    # Told to SDKs with every heartbeat's answer, so that a large fleet can be slowed without a
    # release: seconds between heartbeats, and the spread of the reports after a change.
    "HEARTBEAT_INTERVAL_SECONDS": 30,
    "HEARTBEAT_JITTER_SECONDS": 1.0,
    # ... both stretched for a fleet whose reports would exceed this many heartbeats a second
    # per environment (0: never): 100,000 instances report every 100 s, and within 100 s of a change.
    "FLEET_HEARTBEATS_PER_SECOND": 1_000,
    # Writes (POST, PUT, PATCH, DELETE) per operator or admin token, per worker process: a
    # sustained rate and a burst; beyond, 429 after a pause of up to a second.
    "WRITES_PER_SECOND_PER_TOKEN": 20.0,
    "WRITE_BURST_PER_TOKEN": 60,
    # Webhooks: hosts that may receive them over plain http or at an internal address (comma
    # separated; loopback always may), and the console's public URL for links in the payloads.
    "WEBHOOK_ALLOWED_HOSTS": "",
    "PUBLIC_URL": "",
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


def service_config() -> Config:
    """The configuration a process outside the web app (``flagsvc worker``) runs with: the
    defaults, then ``FLAGSVC_*`` environment variables, as ``create_app`` reads them."""
    config = Config(".")
    config.from_mapping(DEFAULTS)
    config.from_prefixed_env("FLAGSVC")
    return config
