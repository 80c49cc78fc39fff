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
#: Pattern of every namespace's change channel (see :attr:`Namespace.changes_channel`).
ALL_CHANGES = f"{PREFIX}:{{*}}:changes"


def listener_wakeup(listener_id: str) -> str:
    """Pub/sub channel on which one change listener is told to look up (it is stopping)."""
    return f"{PREFIX}:listener:{listener_id}"


def is_system(namespace: str) -> bool:
    """Whether ``namespace`` is the system one (an environment name cannot start with ``_``)."""
    return namespace.startswith("_")


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
        """An ``Idempotency-Key`` record: the result of the request that first used it."""
        return f"{self.base}:idem:{actor}:{key}"

    def idempotency_index(self, actor: str) -> str:
        """Sorted set of a token's idempotency records (score: when), kept to the newest ones."""
        return f"{self.base}:idem-index:{actor}"


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
    def snapshot(self) -> str:
        """The serialized snapshot of the current version (what SDKs read), set by every commit
        that moves the version: a worker reloads a changed environment with one GET."""
        return f"{self.base}:snapshot"

    @property
    def snapshot_flags(self) -> str:
        """Hash: flag key -> its member of the serialized snapshot, ``<kind rank>|"<key>":{...}``
        (``""`` for an archived flag): what the commit builds :attr:`snapshot` from."""
        return f"{self.base}:snapshot:flags"

    @property
    def version_mark(self) -> str:
        """``<seq>:<hash>`` of the audit head when the version last moved: with the version, the
        snapshot's identity (a version number reused after a rollback has another mark)."""
        return f"{self.base}:version:mark"

    @property
    def reverts(self) -> str:
        """Sorted set of scheduled automatic reverts (score: when, epoch seconds)."""
        return f"{self.base}:reverts"

    @property
    def playbooks(self) -> str:
        """Hash: playbook name -> playbook record JSON."""
        return f"{self.base}:playbooks"

    def playbook_applied(self, name: str) -> str:
        """The current application of a playbook (what a revert restores); absent if not applied."""
        return f"{self.base}:playbook-applied:{name}"

    @property
    def alert_applies(self) -> str:
        """Hash: playbook name -> its last application by an alert (when, operation) and how many
        its UTC day had, JSON: the cooldown and the daily cap of alert-driven containment."""
        return f"{self.base}:alerts:applies"

    @property
    def clients(self) -> str:
        """Hash: SDK instance id -> its last heartbeat record JSON."""
        return f"{self.base}:clients"

    @property
    def clients_seen(self) -> str:
        """Sorted set of SDK instance ids by when they last reported (epoch seconds)."""
        return f"{self.base}:clients:seen"

    @property
    def clients_applied(self) -> str:
        """Sorted set of SDK instance ids by the environment version they applied last."""
        return f"{self.base}:clients:applied"

    @property
    def clients_summary(self) -> str:
        """Hash: live and current instance counts, as the last housekeeping pass found them."""
        return f"{self.base}:clients:summary"

    @property
    def clients_gone(self) -> str:
        """Sorted set of the SDK instances that said goodbye, by when (a report from before it,
        still in a process's buffer, does not bring one back)."""
        return f"{self.base}:clients:gone"

    @property
    def clients_apps(self) -> str:
        """Set of the app names SDK instances and OFREP consumers reported."""
        return f"{self.base}:clients:apps"

    def clients_of_app(self, app: str) -> str:
        """Sorted set of the SDK instances (and OFREP consumers) of one app, by when they reported."""
        return f"{self.base}:clients:app:{app}"

    def clients_of_token(self, token_id: str) -> str:
        """Sorted set of the SDK instance ids one token reported, by when (the per-token cap)."""
        return f"{self.base}:clients:token:{token_id}"

    def evaluations(self, minute: int) -> str:
        """Hash of evaluation counts in one minute: ``flag|app`` -> count."""
        return f"{self.base}:evals:{minute}"

    @property
    def ofrep_consumers(self) -> str:
        """Hash: OFREP consumer (``ofrep:<token name>:<app>``) -> its record JSON (app, token, seen)."""
        return f"{self.base}:ofrep:consumers"

    @property
    def webhooks(self) -> str:
        """Hash: webhook subscription name -> its record JSON (with its signing secrets)."""
        return f"{self.base}:webhooks"

    def webhook_lease(self, name: str) -> str:
        """Which deliverer delivers subscription ``name`` now (expires unless renewed)."""
        return f"{self.base}:webhook:{name}:lease"

    def webhook_state(self, name: str) -> str:
        """Hash: the entry being delivered to ``name``, its attempts and first attempt time."""
        return f"{self.base}:webhook:{name}:state"

    def webhook_log(self, name: str) -> str:
        """Stream: the delivery log of ``name`` (capped)."""
        return f"{self.base}:webhook:{name}:log"

    def webhook_redeliver(self, name: str) -> str:
        """List: audit entry ids to send to ``name`` again."""
        return f"{self.base}:webhook:{name}:redeliver"


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

    @property
    def console_key(self) -> str:
        """The key that signs console session cookies (made by the first worker that needs it)."""
        return f"{self.base}:console:key"

    def console_session(self, digest: str) -> str:
        """A console session (token id, CSRF token), by the SHA-256 of its id; expires with it."""
        return f"{self.base}:console:session:{digest}"
