"""Console sessions: signing in with an API token, a signed cookie, CSRF tokens.

Signing in checks an API token (reader and above) once; the session then holds the token's id,
never its secret. The cookie carries a random session id signed with the console's key (kept in
Redis, shared by every worker); the session record lives in Redis with the same expiry, so that
signing out, or revoking the token, ends the session at once on every worker. Each session has
its own CSRF token, which every state-changing form sends back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime

import redis
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ..keys import SystemKeys
from ..tokens import Token, TokenStore

COOKIE = "flagsvc_console"
#: A session ends this long after sign-in (or when its token expires, if sooner).
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True)
class Session:
    """A signed-in console user: the token it acts with, and the session's CSRF token."""

    id: str
    token: Token
    csrf: str

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.csrf)


class ConsoleSessions:
    """Sessions in Redis; cookies signed with a key that every worker shares."""

    def __init__(self, client: redis.Redis, tokens: TokenStore) -> None:
        self._redis = client
        self._tokens = tokens
        self._keys = SystemKeys()
        self._serializer: URLSafeTimedSerializer | None = None

    def _signer(self) -> URLSafeTimedSerializer:
        if self._serializer is None:
            key = self._keys.console_key
            self._redis.set(key, secrets.token_urlsafe(48), nx=True)  # the first worker makes it
            self._serializer = URLSafeTimedSerializer(str(self._redis.get(key)), salt="flagsvc-console")
        return self._serializer

    def sign_in(self, token: Token) -> tuple[str, int]:
        """A new session for ``token``: the cookie value and its lifetime in seconds."""
        session_id = secrets.token_urlsafe(32)
        lifetime = SESSION_SECONDS
        if token.expires_at:
            expires = datetime.fromisoformat(token.expires_at.replace("Z", "+00:00"))
            left = (expires - self._tokens.now()).total_seconds()
            lifetime = max(1, min(lifetime, int(left)))
        record = {"token": token.id, "sha256": token.sha256, "csrf": secrets.token_urlsafe(32)}
        self._redis.set(self._record_key(session_id), json.dumps(record), ex=lifetime)
        return self._signer().dumps(session_id), lifetime

    def current(self, cookie: str | None) -> Session | None:
        """The session of ``cookie``: signed by us, not expired, not signed out, and its token
        still active (not revoked, not expired); else ``None``."""
        if not cookie:
            return None
        try:
            session_id = str(self._signer().loads(cookie, max_age=SESSION_SECONDS))
        except BadSignature:
            return None
        raw = self._redis.get(self._record_key(session_id))
        if raw is None:
            return None
        record = json.loads(raw)
        token = self._tokens.by_id(record["token"])
        if token is None or not hmac.compare_digest(token.sha256, record["sha256"]):
            return None
        return Session(session_id, token, record["csrf"])

    def sign_out(self, session: Session) -> None:
        self._redis.delete(self._record_key(session.id))

    def _record_key(self, session_id: str) -> str:
        return self._keys.console_session(hashlib.sha256(session_id.encode()).hexdigest())
