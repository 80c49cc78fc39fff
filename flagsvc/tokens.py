"""API tokens: creation, lookup, revocation. Only the SHA-256 of a secret is stored.

A token reads ``fsk_<id>_<secret>``: the prefix lets secret scanners find leaks, the id finds
the record without touching the secret, and the SHA-256 of the whole token is compared in
constant time. Creation and revocation are audited in the system log.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import redis

from .commit import Committed, Committer, Op, retry_on_conflict, utcnow_iso
from .errors import AlreadyExists, TokenNotFound
from .keys import SystemKeys

TOKEN_PREFIX = "fsk_"
ALL_ENVS = "*"
_CACHE_MAX = 10_000


class Role(enum.IntEnum):
    """Roles, each including the ones before it."""

    SDK = 1
    READER = 2
    OPERATOR = 3
    ADMIN = 4

    @classmethod
    def parse(cls, name: str) -> Role:
        return cls[name.upper()]

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Token:
    """A stored token record (never the secret)."""

    id: str
    name: str
    role: str
    envs: list[str]
    created_at: str
    created_by: str
    sha256: str
    expires_at: str | None = None
    revoked_at: str | None = None
    revoked_by: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def role_level(self) -> Role:
        return Role.parse(self.role)

    def allows_env(self, env: str) -> bool:
        return ALL_ENVS in self.envs or env in self.envs

    def is_active(self, now: datetime | None = None) -> bool:
        if self.revoked_at:
            return False
        if self.expires_at:
            now = now or datetime.now(UTC)
            return now < datetime.fromisoformat(self.expires_at.replace("Z", "+00:00"))
        return True

    def public(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("sha256")
        data.pop("extra")
        data["active"] = self.is_active()
        return data

    @classmethod
    def from_json(cls, raw: str) -> Token:
        return cls(**json.loads(raw))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def split_token(token: str) -> str | None:
    """The id of a well-formed token, else ``None``."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not sep or len(token_id) != 12 or not secret:
        return None
    return token_id


class TokenStore:
    """Tokens in Redis, with a short in-process cache for the request path."""

    def __init__(self, client: redis.Redis, cache_seconds: float = 1.0) -> None:
        self._redis = client
        self._keys = SystemKeys()
        self._committer = Committer(client)
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Token | None]] = {}

    def create(
        self,
        *,
        name: str,
        role: Role,
        envs: list[str],
        expires_in: timedelta | None = None,
        actor: str,
        source: str = "",
        request_id: str = "",
    ) -> tuple[Token, str]:
        """Create a token; returns the record and the secret, which is shown only this once."""
        token_id = secrets.token_hex(6)
        secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        expires_at = None
        if expires_in is not None:
            expires_at = (datetime.now(UTC) + expires_in).isoformat(timespec="seconds").replace("+00:00", "Z")
        record = Token(
            id=token_id,
            name=name,
            role=str(role),
            envs=sorted(set(envs)) or [ALL_ENVS],
            created_at=utcnow_iso(),
            created_by=actor,
            sha256=_digest(secret),
            expires_at=expires_at,
        )
        k = self._keys

        def attempt() -> Committed:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(k.audit_head)
            pipe.hexists(k.token_names, name)
            head, exists = pipe.execute()
            if exists:
                raise AlreadyExists(f"a token named {name!r} exists")
            result = self._committer.commit(
                k,
                head,
                ops=[
                    Op("HSET", k.tokens, (token_id, json.dumps(asdict(record)))),
                    Op("HSET", k.token_names, (name, token_id)),
                ],
                audit={
                    "actor": actor,
                    "action": "token.create",
                    "token": name,
                    "after": json.dumps(record.public()),
                    "source": source,
                    "request_id": request_id,
                },
            )
            assert isinstance(result, Committed)
            return result

        retry_on_conflict(attempt)
        return record, secret

    def list(self) -> list[Token]:
        return sorted(
            (Token.from_json(raw) for raw in self._redis.hvals(self._keys.tokens)),
            key=lambda t: (t.name, t.created_at),
        )

    def count(self) -> int:
        return int(self._redis.hlen(self._keys.tokens))

    def revoke(
        self, name_or_id: str, *, actor: str, reason: str = "", source: str = "", request_id: str = ""
    ) -> Token:
        """Revoke a token by name or id. Idempotent: revoking a revoked token changes nothing."""
        k = self._keys

        def attempt() -> Token:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(k.audit_head)
            pipe.hget(k.token_names, name_or_id)
            pipe.hget(k.tokens, name_or_id)
            head, by_name, by_id = pipe.execute()
            token_id = by_name or (name_or_id if by_id else None)
            raw = self._redis.hget(k.tokens, token_id) if token_id else None
            if not raw:
                raise TokenNotFound(f"no token named or with id {name_or_id!r}")
            before = Token.from_json(raw)
            if before.revoked_at:
                return before
            after = Token(**{**asdict(before), "revoked_at": utcnow_iso(), "revoked_by": actor})
            self._committer.commit(
                k,
                head,
                ops=[Op("HSET", k.tokens, (before.id, json.dumps(asdict(after))))],
                audit={
                    "actor": actor,
                    "action": "token.revoke",
                    "token": before.name,
                    "before": json.dumps(before.public()),
                    "after": json.dumps(after.public()),
                    "reason": reason,
                    "source": source,
                    "request_id": request_id,
                },
                notify=json.dumps({"type": "token.revoke", "id": before.id}),
            )
            return after

        return retry_on_conflict(attempt)

    def preload(self) -> None:
        """Cache every token at once (one command): requests then rarely need Redis to
        authenticate, and a Redis outage finds every token of this process already here."""
        expires = time.monotonic() + self._cache_seconds
        records = {tid: Token.from_json(raw) for tid, raw in self._redis.hgetall(self._keys.tokens).items()}
        if len(records) < _CACHE_MAX:
            self._cache.update({tid: (expires, record) for tid, record in records.items()})

    def forget(self, token_id: str) -> None:
        """Drop a cached token (its revocation was announced)."""
        self._cache.pop(token_id, None)

    def authenticate(self, presented: str) -> Token | None:
        """The active token matching ``presented``, or ``None``. Constant-time comparison."""
        token_id = split_token(presented)
        if token_id is None:
            return None
        now = time.monotonic()
        cached = self._cache.get(token_id)
        if cached and cached[0] > now:
            record = cached[1]
        else:
            try:
                raw = self._redis.hget(self._keys.tokens, token_id)
            except redis.RedisError:
                if cached is None:
                    raise
                # Redis is down: a token verified before keeps working for the reads that are
                # still served (snapshot, stream); it cannot have been revoked meanwhile.
                record = cached[1]
            else:
                record = Token.from_json(raw) if raw else None
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[token_id] = (now + self._cache_seconds, record)
        if record is None or not hmac.compare_digest(record.sha256, _digest(presented)):
            return None
        return record if record.is_active() else None
