"""Request authentication: ``Authorization: Bearer <token>``, roles and environment scope.

:func:`authorize` is the one check, used by the Flask views (:func:`require`), the snapshot fast
path and OFREP alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import g, request

from .body import check_body
from .errors import Forbidden, TooManyRequests, Unauthorized
from .extensions import stores
from .tokens import Role, Token, TokenStore

F = TypeVar("F", bound=Callable[..., Any])


def current_token() -> Token:
    token: Token = g.token
    return token


def bearer(header: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header, or ``None``."""
    scheme, _, credentials = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def authorize(
    tokens: TokenStore, secret: str | None, role: Role, env: str | None, *, may_wait: bool
) -> Token:
    """The active token ``secret`` if it has at least ``role`` and may use ``env`` (when given);
    401 or 403 otherwise. ``may_wait=False``: judged from the token cache (see
    :meth:`TokenStore.authenticate`)."""
    if secret is None:
        raise Unauthorized("send Authorization: Bearer <token>")
    token = tokens.authenticate(secret, may_wait=may_wait)
    if token is None:
        raise Unauthorized("token unknown, revoked or expired")
    if token.role_level < role:
        raise Forbidden(f"this needs the {role} role; token {token.name!r} is {token.role}")
    if env is not None and not token.allows_env(env):
        raise Forbidden(f"token {token.name!r} is not allowed on environment {env!r}")
    return token


_READS = ("GET", "HEAD", "OPTIONS")


def _spend_write(token: Token) -> None:
    """One write of ``token`` from its budget, or (after a pause) 429."""
    budget = stores().writes
    wait = budget.take(token.id)
    if wait:
        budget.tarpit(wait)
        raise TooManyRequests(
            f"token {token.name!r} sent more than {budget.burst} writes at once "
            f"({budget.rate:g} per second sustained)",
            budget.retry_after(wait),
        )


def require(role: Role, *, cached: bool = False) -> Callable[[F], F]:
    """Decorate a view: a token of at least ``role``, scoped to the ``env`` in the URL if any.
    ``cached``: authenticate from the token cache alone (the SDK's reads never wait on Redis)."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            env = (request.view_args or {}).get("env")
            secret = bearer(request.headers.get("Authorization"))
            g.token = authorize(stores().tokens, secret, role, env, may_wait=not cached)
            if request.method not in _READS and g.token.role_level >= Role.OPERATOR:
                _spend_write(g.token)
            check_body()
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator
