"""Webhooks: every change of an environment, told to the incident channel, signed.

A subscription (``WebhookStore``) names a URL, the audit actions it wants and a format: Standard
Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``, signed with the
``standardwebhooks`` package) or a Slack incoming-webhook message. Its signing secret is made by
the service, shown once, and rotatable; the previous secret keeps signing for a grace period.

Delivery reads the audit stream itself, through one Redis consumer group per subscription (no
second copy of the truth). The :class:`Deliverer` runs in ``flagsvc worker`` and in every
gunicorn worker; for each subscription one of them holds a lease and delivers its entries one at
a time, in order, at least once (the ``webhook-id`` is the audit entry's id, the same on every
attempt). A failed attempt is retried with exponential backoff and jitter for up to a day, then
the entry is marked failed and the next one goes. A crashed deliverer's lease expires and another
takes over its pending entries. Each subscription has its own thread: a slow or dead receiver
delays no other subscription, and no write ever waits for a delivery.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import ipaddress
import json
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis
import requests
from standardwebhooks.webhooks import Webhook

from .audit import change_summary, decode_entry
from .commit import Op
from .envs import EnvStore
from .errors import InvalidInput, ProblemError
from .keys import EnvKeys
from .writes import Change, Done, IdempotencyRequest, State, WriteContext, Writer, audit_entry, next_record

log = logging.getLogger(__name__)

FORMATS = ("standard", "slack")
#: The previous secret keeps signing (next to the new one) this long after a rotation.
ROTATION_GRACE_SECONDS = 24 * 3600
#: A delivery is retried for this long, then marked failed.
RETRY_FOR_SECONDS = 24 * 3600
#: The first retry waits about this long; each next one twice as long (with jitter), at most an hour.
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 3600.0
#: How long a deliverer holds a subscription without renewing it.
LEASE_SECONDS = 10.0
#: A receiver's connect and read timeouts.
TIMEOUT = (2.0, 5.0)
#: A deliverer in a gunicorn worker shares it with requests: it lets the write that made a new
#: entry answer first (under gevent the deliveries would otherwise run before that answer).
YIELD_SECONDS = 0.02
#: Delivery log entries kept per subscription.
LOG_ENTRIES = 1000


class WebhookNotFound(ProblemError):
    status, slug, title = 404, "webhook-not-found", "Webhook subscription not found"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def group_of(name: str) -> str:
    """The consumer group of subscription ``name`` on the audit stream."""
    return f"webhook:{name}"


# -- where a webhook may go (SSRF) ------------------------------------------------------------------


def url_problem(url: str, allowed_hosts: tuple[str, ...] = ()) -> str | None:
    """Why ``url`` may not receive webhooks, or ``None``: ``https`` to a public address, or a
    loopback or explicitly allowed host (``http`` too); never an internal address otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http(s) URL with a host"
    if parts.username or parts.password:
        return "no credentials in the URL"
    host = parts.hostname
    if host in allowed_hosts:
        return None
    try:
        addresses = {
            info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        }
    except (OSError, UnicodeError):
        return f"host {host!r} does not resolve"
    ips = [ipaddress.ip_address(str(a).split("%")[0]) for a in addresses]
    if all(ip.is_loopback for ip in ips):
        return None
    if any(not ip.is_global for ip in ips):
        return f"host {host!r} is an internal address: add it to FLAGSVC_WEBHOOK_ALLOWED_HOSTS to allow it"
    if parts.scheme != "https":
        return "https is required (plain http only to loopback or allowed hosts)"
    return None


# -- subscriptions ---------------------------------------------------------------------------------


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A subscription as the API shows it: never its secrets."""
    return {k: v for k, v in record.items() if k != "secrets"}


class WebhookStore:
    """Subscriptions of each environment, written like everything else: atomic and audited."""

    def __init__(self, client: redis.Redis, allowed_hosts: tuple[str, ...] = ()) -> None:
        self._redis = client
        self._writer = Writer(client)
        self.allowed_hosts = allowed_hosts

    def list(self, env: str) -> list[dict[str, Any]]:
        raw = self._redis.hgetall(EnvKeys(env).webhooks)
        return [public(json.loads(v)) for _, v in sorted(raw.items())]

    def get(self, env: str, name: str) -> dict[str, Any]:
        raw = self._redis.hget(EnvKeys(env).webhooks, name)
        if raw is None:
            raise WebhookNotFound(f"no webhook {name!r} in {env!r}")
        record: dict[str, Any] = json.loads(raw)
        return record

    def put(
        self,
        env: str,
        name: str,
        definition: dict[str, Any],
        ctx: WriteContext,
        *,
        idempotency: IdempotencyRequest | None = None,
    ) -> Done[tuple[dict[str, Any], str | None]]:
        """Create or replace a subscription; ``(record, secret)``, the secret only on creation."""
        problem = url_problem(definition["url"], self.allowed_hosts)
        if problem:
            raise InvalidInput(
                f"url: {problem}", errors=[{"field": "url", "location": "body", "message": problem}]
            )
        k = EnvKeys(env)
        self._ensure_group(k, name)  # before the commit: the create's own entry is the first event
        secret = new_secret()

        def decide(state: State) -> Change[tuple[dict[str, Any], str | None]]:
            before = json.loads(state.values[0]) if state.values[0] else None
            secrets_ = before["secrets"] if before else [{"secret": secret, "since": state.now}]
            fields = {"name": name, **definition, "secrets": secrets_}
            record = next_record(fields, ctx.actor, state.now, version_of=before, created_of=before)
            action = "webhook.update" if before else "webhook.create"
            entry = audit_entry(
                ctx, action, before=public(before) if before else None, after=public(record), operation=name
            )
            op = Op("HSET", k.webhooks, (name, json.dumps(record)))
            return Change((public(record), None if before else secret), ops=[op], audit=[entry])

        return self._writer.run(k, lambda pipe: pipe.hget(k.webhooks, name), decide, idempotency=idempotency)

    def rotate_secret(self, env: str, name: str, ctx: WriteContext) -> tuple[dict[str, Any], str]:
        """A new secret (returned, shown once); the previous one keeps signing for the grace period."""
        k = EnvKeys(env)
        secret = new_secret()

        def decide(state: State) -> Change[tuple[dict[str, Any], str]]:
            if not state.values[0]:
                raise WebhookNotFound(f"no webhook {name!r} in {env!r}")
            record = json.loads(state.values[0])
            grace_until = state.now_ms / 1000 + ROTATION_GRACE_SECONDS
            kept = [{**record["secrets"][0], "until": grace_until}]
            record = {**record, "secrets": [{"secret": secret, "since": state.now}, *kept],
                      "updated_at": state.now, "updated_by": ctx.actor}  # fmt: skip
            entry = audit_entry(ctx, "webhook.rotate-secret", after=public(record), operation=name)
            op = Op("HSET", k.webhooks, (name, json.dumps(record)))
            return Change((public(record), secret), ops=[op], audit=[entry])

        return self._writer.run(k, lambda pipe: pipe.hget(k.webhooks, name), decide).result

    def delete(self, env: str, name: str, ctx: WriteContext) -> None:
        k = EnvKeys(env)

        def decide(state: State) -> Change[None]:
            if not state.values[0]:
                raise WebhookNotFound(f"no webhook {name!r} in {env!r}")
            entry = audit_entry(
                ctx, "webhook.delete", before=public(json.loads(state.values[0])), operation=name
            )
            return Change(None, ops=[Op("HDEL", k.webhooks, (name,))], audit=[entry])

        self._writer.run(k, lambda pipe: pipe.hget(k.webhooks, name), decide)
        for key in (k.webhook_state(name), k.webhook_log(name), k.webhook_redeliver(name)):
            self._redis.delete(key)
        with contextlib.suppress(redis.ResponseError):
            self._redis.xgroup_destroy(k.audit, group_of(name))

    def deliveries(self, env: str, name: str, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The newest deliveries of ``name``: event, status, attempts, last error, latency."""
        self.get(env, name)
        rows = self._redis.xrevrange(EnvKeys(env).webhook_log(name), count=limit)
        return [{"id": i, **_typed(fields)} for i, fields in rows]

    def redeliver(self, env: str, name: str, event_id: str) -> None:
        """Send the audit entry ``event_id`` to ``name`` again (it keeps its ``webhook-id``)."""
        k = EnvKeys(env)
        self.get(env, name)
        if not self._redis.xrange(k.audit, event_id, event_id):
            raise WebhookNotFound(f"no audit entry {event_id!r} in {env!r}")
        self._redis.rpush(k.webhook_redeliver(name), event_id)

    def _ensure_group(self, k: EnvKeys, name: str) -> None:
        try:
            self._redis.xgroup_create(k.audit, group_of(name), id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def _typed(fields: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(fields)
    for name in ("attempts", "http_status"):
        if out.get(name):
            out[name] = int(out[name])
    if out.get("latency_ms"):
        out["latency_ms"] = float(out["latency_ms"])
    return out


# -- what is sent ----------------------------------------------------------------------------------


def payload(env: str, stream_id: str, entry: dict[str, Any], fmt: str, public_url: str = "") -> str:
    """The body sent for audit entry ``entry``: Standard Webhooks JSON, or a Slack message."""
    summary = change_summary(entry.get("before"), entry.get("after"))
    target = entry.get("flag") or entry.get("playbook") or ""
    link = (
        f"{public_url.rstrip('/')}/ui/envs/{env}/audit?{'flag=' + target if entry.get('flag') else ''}"
        if public_url
        else None
    )
    data = {
        "env": env,
        "id": stream_id,
        "action": entry["action"],
        "flag": entry.get("flag"),
        "playbook": entry.get("playbook"),
        "summary": summary,
        "before": entry.get("before"),
        "after": entry.get("after"),
        "reason": entry.get("reason"),
        "incident": entry.get("incident"),
        "actor": entry["actor"],
        "time": entry["time"],
        "env_version": entry.get("env_version"),
        "link": link,
    }
    if fmt == "slack":
        return json.dumps({"text": _slack_text(data)})
    return json.dumps({"type": entry["action"], "timestamp": entry["time"], "data": data})


def _slack_text(data: dict[str, Any]) -> str:
    what = f"`{data['flag'] or data['playbook']}`" if (data["flag"] or data["playbook"]) else ""
    incident = f" [{data['incident']}]" if data.get("incident") else ""
    lines = [f"*{data['action']}* {what} in *{data['env']}* by {data['actor']}{incident}"]
    if data["summary"]:
        lines.append(data["summary"])
    if data.get("reason"):
        lines.append(f"> {data['reason']}")
    if data.get("link"):
        lines.append(f"<{data['link']}|audit log>")
    return "\n".join(lines)


def signed_headers(record: dict[str, Any], msg_id: str, body: str, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers, signed with every secret still valid (the newest first)."""
    valid = [s["secret"] for s in record["secrets"] if s.get("until", float("inf")) > now.timestamp()]
    signatures = " ".join(Webhook(secret).sign(msg_id, now, body) for secret in valid)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
    }


# -- delivery --------------------------------------------------------------------------------------


@dataclass
class Attempt:
    ok: bool
    status: int | None
    error: str
    latency_ms: float


def backoff(attempts: int, first: float = FIRST_RETRY_SECONDS) -> float:
    """Seconds before retry number ``attempts`` (1, 2...): doubling from ``first``, with jitter,
    capped at :data:`MAX_RETRY_SECONDS`."""
    base = min(first * 2 ** (attempts - 1), MAX_RETRY_SECONDS)
    return base * random.uniform(0.5, 1.5)


class Deliverer:
    """Delivers every subscription of every environment; see the module docstring."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        allowed_hosts: tuple[str, ...] = (),
        public_url: str = "",
        interval: float = 1.0,
        first_retry: float = FIRST_RETRY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._envs = EnvStore(client)
        self._allowed = allowed_hosts
        self._public_url = public_url
        self._interval = interval
        self._first_retry = first_retry
        self._clock = clock
        self._stop = threading.Event()
        self._owner = secrets.token_hex(8)
        self._running: dict[tuple[str, str], threading.Thread] = {}
        self._http = requests.Session()
        self._renew_lease = client.register_script(_RENEW)
        self._release_lease = client.register_script(_RELEASE)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="flagsvc-webhooks", daemon=True)
        thread.start()
        return thread

    def stop(self, wait: float = 3.0) -> None:
        """Stop delivering; wait up to ``wait`` seconds for the delivery threads to let go."""
        self._stop.set()
        deadline = time.monotonic() + wait
        for thread in list(self._running.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.claim_subscriptions()
            except redis.RedisError as exc:
                log.warning("webhooks: Redis unavailable (%s); deliveries wait", exc)
            self._stop.wait(self._interval)

    def claim_subscriptions(self) -> None:
        """Start a delivery thread for each subscription whose lease this deliverer takes."""
        for env in self._envs.list():
            for name in self._redis.hkeys(EnvKeys(env).webhooks):
                thread = self._running.get((env, name))
                if thread is not None and thread.is_alive():
                    continue
                if self._redis.set(
                    EnvKeys(env).webhook_lease(name), self._owner, nx=True, px=int(LEASE_SECONDS * 1000)
                ):
                    worker = threading.Thread(
                        target=self._deliver_subscription,
                        args=(env, name),
                        name=f"flagsvc-webhook-{name}",
                        daemon=True,
                    )
                    self._running[(env, name)] = worker
                    worker.start()

    def _renew(self, k: EnvKeys, name: str) -> bool:
        """Keep the lease; ``False`` if it was lost (another deliverer took over)."""
        return bool(
            self._renew_lease(keys=[k.webhook_lease(name)], args=[self._owner, int(LEASE_SECONDS * 1000)])
        )

    def _deliver_subscription(self, env: str, name: str) -> None:
        k = EnvKeys(env)
        try:
            while not self._stop.is_set() and self._renew(k, name):
                raw = self._redis.hget(k.webhooks, name)
                if raw is None:
                    return  # deleted
                record = json.loads(raw)
                if not record.get("enabled", True):
                    self._stop.wait(1.0)
                    continue
                self._redeliveries(k, env, record)
                self._next_entry(k, env, record)
        except redis.RedisError as exc:
            log.warning(
                "webhook %s in %s: Redis unavailable (%s); the lease lapses, deliveries wait", name, env, exc
            )
        except Exception:
            log.exception("webhook %s in %s: unexpected error; the lease lapses", name, env)
        finally:
            with contextlib.suppress(redis.RedisError):  # let the next deliverer start at once
                self._release_lease(keys=[k.webhook_lease(name)], args=[self._owner])

    def _next_entry(self, k: EnvKeys, env: str, record: dict[str, Any]) -> None:
        """Deliver the oldest pending entry (one this group already read), else wait for a new one."""
        group = group_of(record["name"])
        try:
            pending = self._redis.xreadgroup(group, "deliverer", {k.audit: "0"}, count=1)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("webhook %s in %s: its consumer group was gone; new events only", record["name"], env)
            self._redis.xgroup_create(k.audit, group, id="$", mkstream=True)
            return
        entries = pending[0][1] if pending else []
        if not entries:
            fresh = self._redis.xreadgroup(group, "deliverer", {k.audit: ">"}, count=1, block=500)
            if not fresh:
                return
            entries = fresh[0][1]
            time.sleep(YIELD_SECONDS)  # the write that made this entry answers its client first
        stream_id, fields = entries[0]
        if fields:  # an entry trimmed by retention since it was read has no fields
            entry = decode_entry(stream_id, fields)
            if _wanted(record, entry["action"]) and not self._deliver_with_retries(
                k, env, record, stream_id, entry
            ):
                return  # the lease was lost while retrying: the next holder delivers it
        self._redis.xack(k.audit, group, stream_id)

    def _redeliveries(self, k: EnvKeys, env: str, record: dict[str, Any]) -> None:
        while (event_id := self._redis.lpop(k.webhook_redeliver(record["name"]))) is not None:
            rows = self._redis.xrange(k.audit, event_id, event_id)
            if rows:
                self._deliver_with_retries(k, env, record, event_id, decode_entry(event_id, rows[0][1]))

    def _deliver_with_retries(
        self, k: EnvKeys, env: str, record: dict[str, Any], stream_id: str, entry: dict[str, Any]
    ) -> bool:
        """Deliver until it succeeds or a day has passed (then log it failed); ``False`` if the
        lease was lost meanwhile."""
        state_key = k.webhook_state(record["name"])
        state = self._redis.hgetall(state_key)
        if state.get("id") != stream_id:
            state = {"id": stream_id, "attempts": "0", "first": str(self._clock())}
        attempts, first = int(state["attempts"]), float(state["first"])
        body = payload(env, stream_id, entry, record.get("format", "standard"), self._public_url)
        while not self._stop.is_set():
            attempts += 1
            result = self._send(record, stream_id, body)
            self._redis.hset(state_key, mapping={"id": stream_id, "attempts": attempts, "first": first})
            if result.ok or self._clock() - first > RETRY_FOR_SECONDS:
                status = "delivered" if result.ok else "failed"
                self._log(k, record["name"], stream_id, entry["action"], status, attempts, result)
                self._redis.delete(state_key)
                return True
            self._log(k, record["name"], stream_id, entry["action"], "retrying", attempts, result)
            if not self._sleep_holding(k, record["name"], backoff(attempts, self._first_retry)):
                return False
        return False

    def _sleep_holding(self, k: EnvKeys, name: str, seconds: float) -> bool:
        """Wait ``seconds``, renewing the lease; ``False`` if it was lost or we are stopping."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._stop.wait(min(1.0, max(0.0, end - time.monotonic()))) or not self._renew(k, name):
                return False
        return True

    def _send(self, record: dict[str, Any], msg_id: str, body: str) -> Attempt:
        problem = url_problem(record["url"], self._allowed)  # again: the name may resolve elsewhere now
        if problem:
            return Attempt(False, None, f"refused: {problem}", 0.0)
        headers = signed_headers(record, msg_id, body, datetime.now(UTC))
        start = time.monotonic()
        try:
            resp = self._http.post(
                record["url"], data=body.encode(), headers=headers, timeout=TIMEOUT, allow_redirects=False
            )
        except requests.RequestException as exc:
            return Attempt(False, None, type(exc).__name__, (time.monotonic() - start) * 1000)
        latency = (time.monotonic() - start) * 1000
        ok = 200 <= resp.status_code < 300
        return Attempt(ok, resp.status_code, "" if ok else f"HTTP {resp.status_code}", latency)

    def _log(
        self, k: EnvKeys, name: str, event_id: str, action: str, status: str, attempts: int, result: Attempt
    ) -> None:
        fields = {
            "event_id": event_id,
            "action": action,
            "status": status,
            "attempts": attempts,
            "http_status": result.status or "",
            "last_error": result.error,
            "latency_ms": round(result.latency_ms, 1),
            "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        self._redis.xadd(k.webhook_log(name), fields, maxlen=LOG_ENTRIES, approximate=True)


#: Renew a lease only if this deliverer still holds it; release it likewise.
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _wanted(record: dict[str, Any], action: str) -> bool:
    events = record.get("events") or ["*"]
    return "*" in events or action in events
