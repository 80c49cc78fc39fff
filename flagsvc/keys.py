"""Redis key names.

Everything of one environment lives under one hash tag (``flagsvc:{<env>}:...``) so that
every multi-key operation on it is atomic and runs on Redis Cluster. Global records
(tokens, the list of environments, their audit log) live under the ``{_system}`` tag; the
leading underscore cannot start an environment name, so the two never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "flagsvc"
SYSTEM = "_system"


@dataclass(frozen=True)
class Namespace:
    """The keys of one hash-tagged namespace: an environment or the system one."""

    name: str

    @property
    def base(self) -> str:
        return f"{PREFIX}:{{{self.name}}}"

    @property
    def audit(self) -> str:
        """Append-only audit Stream."""
        return f"{self.base}:audit"

    @property
    def audit_head(self) -> str:
        """``<seq>:<hash>`` of the newest audit entry: the tip of the hash chain."""
        return f"{self.base}:audit:head"

    @property
    def audit_base(self) -> str:
        """``<seq>:<hash>`` of the newest entry trimmed to an archive: where the live chain starts."""
        return f"{self.base}:audit:base"

    @property
    def changes_channel(self) -> str:
        """Pub/sub channel announcing each committed change."""
        return f"{self.base}:changes"

    def audit_index(self, field: str, value: str) -> str:
        """Sorted set of the ids of the audit entries whose ``field`` is ``value``."""
        return f"{self.base}:audit:by-{field}:{value}"

    def idempotency(self, actor: str, key: str) -> str:
        return f"{self.base}:idem:{actor}:{key}"


@dataclass(frozen=True)
class EnvKeys(Namespace):
    """Keys of one environment."""

    @property
    def flags(self) -> str:
        """Hash: flag key -> flag JSON (definition and metadata, archived ones included)."""
        return f"{self.base}:flags"

    @property
    def version(self) -> str:
        """Integer bumped by one on every flag change of the environment."""
        return f"{self.base}:version"

    @property
    def reverts(self) -> str:
        """Sorted set of scheduled automatic reverts (score: when, epoch seconds)."""
        return f"{self.base}:reverts"


@dataclass(frozen=True)
class SystemKeys(Namespace):
    """Keys of the system namespace."""

    name: str = SYSTEM

    @property
    def envs(self) -> str:
        """Set of environment names."""
        return f"{self.base}:envs"

    @property
    def tokens(self) -> str:
        """Hash: token id -> token record JSON (only the SHA-256 of the secret)."""
        return f"{self.base}:tokens"

    @property
    def token_names(self) -> str:
        """Hash: token name -> token id (names are unique)."""
        return f"{self.base}:token-names"
