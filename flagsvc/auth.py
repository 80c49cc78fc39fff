"""Request authentication: ``Authorization: Bearer <token>``, roles and environment scope."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import g, request

from .body import check_body
from .errors import Forbidden, Unauthorized
from .extensions import stores
from .tokens import Role, Token

F = TypeVar("F", bound=Callable[..., Any])


def current_token() -> Token:
    token: Token = g.token
    return token


def _authenticate() -> Token:
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("send Authorization: Bearer <token>")
    token = stores().tokens.authenticate(credentials.strip())
    if token is None:
        raise Unauthorized("token unknown, revoked or expired")
    return token


def require(role: Role) -> Callable[[F], F]:
    """Decorate a view: a token of at least ``role``, scoped to the ``env`` in the URL if any."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = _authenticate()
            if token.role_level < role:
                raise Forbidden(f"this needs the {role} role; token {token.name!r} is {token.role}")
            env = (request.view_args or {}).get("env")
            if env is not None and not token.allows_env(env):
                raise Forbidden(f"token {token.name!r} is not allowed on environment {env!r}")
            g.token = token
            check_body()
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator
