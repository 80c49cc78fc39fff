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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from .commit import Op, iso_from_ms
from .errors import AlreadyExists, StoreUnavailable, TokenNotFound
from .keys import SystemKeys, is_system
from .writes import Change, State, WriteContext, Writer, audit_entry

TOKEN_PREFIX = "fsk_"
ALL_ENVS = "*"
_CACHE_MAX = 10_000
#: The most system log entries one refresh follows; beyond, it reads every token again.
_CHANGES_PAGE = 1000


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


def _token_id_of(fields: dict[str, str]) -> str | None:
    """The id of the token a system log entry changed, if it changed one."""
    if not fields.get("action", "").startswith("token."):
        return None
    record = json.loads(fields.get("after") or fields.get("before") or "{}")
    token_id = record.get("id")
    return str(token_id) if token_id else None


def split_token(token: str) -> str | None:
    """The id of a well-formed token, else ``None``."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not sep or len(token_id) != 12 or not secret:
        return None
    return token_id


@dataclass
class _Cached:
    """A token record as this process last read it (``None``: no such token)."""

    record: Token | None
    loaded: float  # time.monotonic()


class TokenStore:
    """Tokens in Redis, with an in-process cache that a background refresh keeps current.

    The SDK's read paths (snapshot, stream, OFREP) authenticate from the cache alone: a hung
    Redis never holds them up. The cache is refreshed every second (:meth:`refresh`, from the
    process's change listener) and a revocation is announced and applied at once
    (:meth:`reload`). Token expiry is judged on Redis' clock, shared by every host.
    """

    def __init__(self, client: redis.Redis, cache_seconds: float = 1.0) -> None:
        self._redis = client
        self._keys = SystemKeys()
        self._writer = Writer(client)
        self._cache_seconds = cache_seconds
        self._cache: dict[str, _Cached] = {}
        self._clock_offset = 0.0  # Redis' clock minus this host's, in seconds
        self._followed: tuple[str, int] | None = None  # system log entry (id, seq) the cache follows
        self._confirmed = float("-inf")  # time.monotonic() of the last refresh: every record current
        self._unreachable = False  # the last Redis read of this store failed

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
        k = self._keys
        ctx = WriteContext(actor=actor, source=source, request_id=request_id)

        def decide(state: State) -> Change[Token]:
            if state.values[0]:
                raise AlreadyExists(f"a token named {name!r} exists")
            expires_at = None
            if expires_in is not None:
                expires_at = iso_from_ms(state.now_ms + int(expires_in.total_seconds() * 1000))
            record = Token(
                id=token_id,
                name=name,
                role=str(role),
                envs=sorted(set(envs)) or [ALL_ENVS],
                created_at=state.now,
                created_by=actor,
                sha256=_digest(secret),
                expires_at=expires_at,
            )
            return Change(
                record,
                ops=[
                    Op("HSET", k.tokens, (token_id, json.dumps(asdict(record)))),
                    Op("HSET", k.token_names, (name, token_id)),
                ],
                audit=[audit_entry(ctx, "token.create", token=name, after=record.public())],
                notify={"type": "token.create", "id": token_id},
            )

        record = self._writer.run(k, lambda pipe: pipe.hexists(k.token_names, name), decide).result
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
        ctx = WriteContext(actor=actor, source=source, request_id=request_id, reason=reason)
        token_id = self._redis.hget(k.token_names, name_or_id) or name_or_id

        def decide(state: State) -> Change[Token]:
            if not state.values[0]:
                raise TokenNotFound(f"no token named or with id {name_or_id!r}")
            before = Token.from_json(state.values[0])
            if before.revoked_at:
                return Change(before)
            after = replace(before, revoked_at=state.now, revoked_by=actor)
            return Change(
                after,
                ops=[Op("HSET", k.tokens, (before.id, json.dumps(asdict(after))))],
                audit=[
                    audit_entry(
                        ctx, "token.revoke", token=before.name, before=before.public(), after=after.public()
                    )
                ],
                notify={"type": "token.revoke", "id": before.id},
            )

        revoked = self._writer.run(k, lambda pipe: pipe.hget(k.tokens, token_id), decide).result
        self._remember(revoked.id, revoked)
        return revoked

    # -- the cache -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Redis' clock, and the tokens changed since the last refresh (the change listener calls
        this every second): a few commands whatever the number of tokens. Every token is read at
        the first refresh, and again when the changes since cannot be followed (a long outage)."""
        try:
            seconds, micros = self._redis.time()
            newest = self._redis.xrevrange(self._keys.audit, count=1)
            if self._followed is None or not self._follow_changes(newest):
                self._read_all(newest)
        except redis.RedisError:
            self._unreachable = True
            raise
        self._unreachable = False
        self._clock_offset = int(seconds) + int(micros) / 1e6 - time.time()
        self._confirmed = time.monotonic()
        self._forget_unknown_ids()

    def _follow_changes(self, newest: Sequence[Any]) -> bool:
        """Re-read the tokens the system log shows changed since the last refresh; False if it
        cannot show them all (more than a page, or entries trimmed)."""
        assert self._followed is not None
        seen_id, seen_seq = self._followed
        if not newest or newest[0][0] == seen_id:
            return bool(newest) or seen_seq == 0
        since = self._redis.xrange(self._keys.audit, min=f"({seen_id}", count=_CHANGES_PAGE + 1)
        if not since or len(since) > _CHANGES_PAGE or int(since[0][1]["seq"]) != seen_seq + 1:
            return False
        changed = {_token_id_of(fields) for _, fields in since} - {None}
        if changed:
            ids = sorted(str(i) for i in changed)
            records = self._redis.hmget(self._keys.tokens, ids)
            now = time.monotonic()
            for token_id, raw in zip(ids, records, strict=True):
                self._cache[token_id] = _Cached(Token.from_json(raw) if raw else None, now)
        self._followed = (since[-1][0], int(since[-1][1]["seq"]))
        return True

    def _read_all(self, newest: Sequence[Any]) -> None:
        """Every token, read after the newest log entry (a change after it is followed next time)."""
        records = self._redis.hgetall(self._keys.tokens)
        now = time.monotonic()
        vanished = {
            tid: _Cached(None, now) for tid, c in self._cache.items() if c.record and tid not in records
        }
        negatives = {tid: c for tid, c in self._cache.items() if c.record is None}
        self._cache = {**negatives, **vanished}  # gone from Redis: no longer valid, not "not yet read"
        self._cache.update({tid: _Cached(Token.from_json(raw), now) for tid, raw in records.items()})
        self._followed = (newest[0][0], int(newest[0][1]["seq"])) if newest else ("0-0", 0)

    def _forget_unknown_ids(self) -> None:
        """Ids that matched no token are looked up again once a second at most, and not kept
        beyond :data:`_CACHE_MAX` (a flood of made-up ids)."""
        now = time.monotonic()
        stale = [
            tid
            for tid, c in self._cache.items()
            if c.record is None and now - c.loaded >= self._cache_seconds
        ]
        for tid in stale:
            del self._cache[tid]

    def reload(self, token_id: str) -> None:
        """Re-read one token now (its change was announced: a revocation, a new token)."""
        self._remember(token_id, self._lookup(token_id))

    def reset(self) -> None:
        """Forget every cached token (the change listener starts in a new process)."""
        self._cache.clear()
        self._followed = None

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        """A token created or revoked anywhere is re-read here at once."""
        if is_system(namespace) and notice.get("type") in ("token.create", "token.revoke"):
            self.reload(str(notice.get("id")))

    def now(self) -> datetime:
        """Redis' time, as measured at the last refresh (expiry is judged on it)."""
        return datetime.fromtimestamp(time.time() + self._clock_offset, UTC)

    def authenticate(self, presented: str, *, may_wait: bool = True) -> Token | None:
        """The active token matching ``presented``, or ``None``. Constant-time comparison.

        With ``may_wait=False`` (the SDK's read paths) a token this process knows is judged from
        the cache whatever its age, never waiting on Redis; an unknown one is looked up unless
        Redis is known to be unreachable (then :class:`~flagsvc.errors.StoreUnavailable`)."""
        token_id = split_token(presented)
        if token_id is None:
            return None
        record = self._cached_or_read(token_id, may_wait)
        if record is None or not hmac.compare_digest(record.sha256, _digest(presented)):
            return None
        return record if record.is_active(self.now()) else None

    def by_id(self, token_id: str) -> Token | None:
        """The active token ``token_id`` (cached as :meth:`authenticate` caches), or ``None``: what
        a console session, which holds the id and not the secret, acts with."""
        record = self._cached_or_read(token_id, may_wait=True)
        return record if record is not None and record.is_active(self.now()) else None

    def still_valid(self, token: Token) -> bool:
        """Whether ``token`` (authenticated earlier) is still active, from the cache alone: an open
        stream's token is checked every second and ends once its token is revoked or expired."""
        cached = self._cache.get(token.id)
        if cached is None:
            return True  # not re-read yet: as valid as when it was authenticated
        record = cached.record
        return record is not None and record.sha256 == token.sha256 and record.is_active(self.now())

    def _cached_or_read(self, token_id: str, may_wait: bool) -> Token | None:
        cached = self._cache.get(token_id)
        current_since = max(cached.loaded, self._confirmed) if cached is not None else 0.0
        fresh = cached is not None and time.monotonic() - current_since <= self._cache_seconds
        if cached is not None and (fresh or not may_wait):
            return cached.record
        if cached is None and not may_wait and self._unreachable:
            raise StoreUnavailable("tokens cannot be checked while Redis is unreachable; retry")
        try:
            record = self._lookup(token_id)
        except redis.RedisError:
            if cached is None:
                raise
            # Redis is down: a token verified before keeps working for the reads that are
            # still served (snapshot, stream); it cannot have been revoked meanwhile.
            return cached.record
        self._remember(token_id, record)
        return record

    def _lookup(self, token_id: str) -> Token | None:
        try:
            raw = self._redis.hget(self._keys.tokens, token_id)
        except redis.RedisError:
            self._unreachable = True
            raise
        self._unreachable = False
        return Token.from_json(raw) if raw else None

    def _remember(self, token_id: str, record: Token | None) -> None:
        if record is None and len(self._cache) >= 2 * _CACHE_MAX:
            return  # a flood of made-up ids: look them up each time rather than grow
        self._cache[token_id] = _Cached(record, time.monotonic())
