"""Environments: independent namespaces of flags (``production``, ``staging``...)."""

from __future__ import annotations

import re

import redis

from .commit import Op
from .errors import EnvNotFound
from .keys import SystemKeys
from .writes import Change, Done, IdempotencyRequest, State, WriteContext, Writer, audit_entry

ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class EnvStore:
    """The set of environments. Environments are never deleted, so existence is cached."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._keys = SystemKeys()
        self._writer = Writer(client)
        self._known: set[str] = set()

    def list(self) -> list[str]:
        envs = sorted(self._redis.smembers(self._keys.envs))
        self._known.update(envs)  # environments are never deleted: remember them for outages
        return envs

    def exists(self, env: str) -> bool:
        if env in self._known:
            return True
        if self._redis.sismember(self._keys.envs, env):
            self._known.add(env)
            return True
        return False

    def require(self, env: str) -> None:
        if not self.exists(env):
            raise EnvNotFound(f"environment {env!r} does not exist")

    def create(
        self,
        env: str,
        *,
        actor: str,
        source: str = "",
        request_id: str = "",
        idempotency: IdempotencyRequest | None = None,
    ) -> Done[bool]:
        """Create ``env``; ``False`` if it already existed (nothing written then)."""
        k = self._keys
        ctx = WriteContext(actor=actor, source=source, request_id=request_id)

        def decide(state: State) -> Change[bool]:
            if state.values[0]:
                return Change(False)
            entry = audit_entry(ctx, "env.create", after={"env": env})
            return Change(True, ops=[Op("SADD", k.envs, (env,))], audit=[entry])

        done = self._writer.run(k, lambda pipe: pipe.sismember(k.envs, env), decide, idempotency=idempotency)
        self._known.add(env)
        return done
