"""Schemathesis hooks for the contract test (loaded through ``SCHEMATHESIS_HOOKS``).

One more check than schemathesis's own: a request the API refuses (4xx or 5xx) stored nothing.
Before each call the whole Redis dataset is read (``FLAGSVC_CONTRACT_REDIS_URL``); after a
refusal it must be the same, but for keys with a time to live that expired meanwhile. An accepted
heartbeat is written by the server within a second, in the background: the next call waits for
that write before it reads the dataset. And a
unique ``Idempotency-Key`` per generated request, so that one example does not replay another.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any

import redis
import schemathesis

_redis = redis.Redis.from_url(os.environ["FLAGSVC_CONTRACT_REDIS_URL"])
_before: dict[int, dict[bytes, tuple[bytes | None, bool]]] = {}
_HEARTBEAT = re.compile(r"/api/v1/envs/[^/]+/clients/[^/]+$")
#: Until when an accepted heartbeat may still be written (the server writes them once a second).
_heartbeats_written_by = 0.0


def dataset() -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key: its serialized value, and whether it expires."""
    keys = list(_redis.scan_iter(count=1000))
    pipe = _redis.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
        pipe.pttl(key)
    values = pipe.execute()
    return {key: (values[2 * i], values[2 * i + 1] > 0) for i, key in enumerate(keys)}


@schemathesis.hook
def map_headers(context: Any, headers: dict[str, Any] | None) -> dict[str, Any] | None:
    if headers and "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = f"{headers['Idempotency-Key']}"[:200] + uuid.uuid4().hex[:16]
    return headers


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    time.sleep(max(0.0, _heartbeats_written_by - time.monotonic()))
    _before[id(case)] = dataset()


@schemathesis.check
def nothing_stored_by_a_refused_request(ctx: Any, response: Any, case: Any) -> bool | None:
    global _heartbeats_written_by
    before = _before.pop(id(case), None)
    if (
        case.method.upper() == "POST"
        and _HEARTBEAT.search(case.formatted_path)
        and response.status_code < 300
    ):
        _heartbeats_written_by = time.monotonic() + 1.5
    if before is None or response.status_code < 400:
        return None
    after = dataset()
    changed = sorted(k.decode() for k, v in after.items() if before.get(k) != v)
    vanished = sorted(k.decode() for k, (_, expires) in before.items() if k not in after and not expires)
    if changed or vanished:
        raise AssertionError(
            f"a {response.status_code} answer stored something: changed {changed}, removed {vanished}"
        )
    return None
