"""Environments: independent namespaces of flags (``production``, ``staging``...)."""

from __future__ import annotations

import json
import re

import redis

from .commit import Committer, Op, retry_on_conflict
from .errors import EnvNotFound
from .keys import SystemKeys

ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class EnvStore:
    """The set of environments. Environments are never deleted, so existence is cached."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._keys = SystemKeys()
        self._committer = Committer(client)
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

    def create(self, env: str, *, actor: str, source: str = "", request_id: str = "") -> bool:
        """Create ``env``; ``False`` if it already existed (nothing written then)."""
        k = self._keys

        def attempt() -> bool:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(k.audit_head)
            pipe.sismember(k.envs, env)
            head, exists = pipe.execute()
            if exists:
                return False
            self._committer.commit(
                k,
                head,
                ops=[Op("SADD", k.envs, (env,))],
                audit={
                    "actor": actor,
                    "action": "env.create",
                    "after": json.dumps({"env": env}),
                    "source": source,
                    "request_id": request_id,
                },
            )
            return True

        created = retry_on_conflict(attempt)
        self._known.add(env)
        return created
