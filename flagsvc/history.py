"""Rollbacks of Redis are detected, announced, and never served as if nothing happened.

A Redis failover to a replica that missed the newest writes, or a restore of an older backup,
rolls the data back: versions go back and their numbers are then reused for other content. Each
process remembers the newest environment version, version mark and audit head it has seen
(:class:`HistoryGuard`, shown what Redis holds by the snapshot cache's refresh every second),
and an SDK that reports a version Redis does not have is evidence too (up to
:data:`MAX_VERSIONS_LOST` versions ahead, and only from a heartbeat the limits accepted). On either, the guard
logs an error, counts it (``flagsvc_history_rollbacks_total``), keeps it for ``/readyz`` to
show, and commits an audited ``env.rollback_detected`` that moves the environment's version past
every version seen: every SDK then applies the current state, newer than anything it held.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from .commit import parse_head
from .errors import ProblemError
from .flags import bump_version
from .keys import EnvKeys
from .metrics import HISTORY_ROLLBACKS
from .writes import Change, State, WriteContext, Writer, audit_entry

log = logging.getLogger(__name__)

#: How long /readyz shows a detected rollback.
SHOWN_SECONDS = 3600
#: The most versions a rollback can plausibly have lost. An SDK claiming a version further ahead of
#: Redis is not believed (a heartbeat is not authenticated beyond its sdk token): it is logged as a
#: warning, and neither counted as a rollback nor allowed to move the version.
MAX_VERSIONS_LOST = 1000
SYSTEM = WriteContext(actor="system")


@dataclass(frozen=True)
class Seen:
    """The newest state of an environment this process has seen."""

    version: int
    history: str
    head: tuple[int, str]


class HistoryGuard:
    """Remembers what each environment's history looked like; see the module docstring."""

    def __init__(self, client: Any) -> None:
        self._redis = client
        self._writer = Writer(client)
        self._seen: dict[str, Seen] = {}
        self._detected: dict[str, tuple[float, str]] = {}  # env -> (when, what)

    # -- what /readyz shows ----------------------------------------------------------------------

    def rollbacks(self) -> dict[str, str]:
        """Environment -> what went back, for the rollbacks of the last hour."""
        now = time.time()
        return {env: what for env, (when, what) in self._detected.items() if now - when < SHOWN_SECONDS}

    # -- evidence --------------------------------------------------------------------------------

    def sdk_applied(self, env: str, version: int) -> None:
        """An SDK reports ``version`` applied: a rollback if Redis' version is older."""
        stored = int(self._redis.get(EnvKeys(env).version) or 0)
        if version > stored + MAX_VERSIONS_LOST:
            log.warning(
                "an SDK of environment %s claims version %d, Redis is at %d: more than %d versions "
                "ahead, not believed", env, version, stored, MAX_VERSIONS_LOST,
            )  # fmt: skip
        elif version > stored:
            self._rolled_back(env, f"an SDK applied version {version}, Redis is at {stored}", version)

    def _check(self, env: str, now: Seen) -> None:
        before = self._seen.get(env)
        if before is not None:
            went_back = now.version < before.version or now.head[0] < before.head[0]
            rewritten = (now.version == before.version and now.history != before.history) or (
                now.head[0] == before.head[0] and now.head[1] != before.head[1]
            )
            if went_back or rewritten:
                what = (
                    f"version {before.version} -> {now.version}, "
                    f"audit entry {before.head[0]} -> {now.head[0]}"
                    + (" (rewritten)" if rewritten and not went_back else "")
                )
                # A version already past the newest seen needs no move: SDKs take it anyway.
                self._rolled_back(env, what, before.version if now.version <= before.version else None)
                return
        self._seen[env] = now

    def _rolled_back(self, env: str, what: str, newest_seen: int | None) -> None:
        """Log, count and show it; move the version past ``newest_seen`` unless that is ``None``."""
        log.error("the history of environment %s went back (%s): Redis lost acknowledged changes", env, what)
        HISTORY_ROLLBACKS.labels(env).inc()
        self._detected[env] = (time.time(), what)
        self._seen.pop(env, None)
        if newest_seen is not None:
            self._move_past(env, newest_seen, what)

    def _move_past(self, env: str, newest_seen: int, what: str) -> None:
        """Commit a version above ``newest_seen`` (once, whichever process gets there first)."""
        k = EnvKeys(env)

        def decide(state: State) -> Change[int]:
            version = int(state.values[0] or 0)
            if version > newest_seen:
                return Change(version)  # moved on already
            entry = audit_entry(
                SYSTEM,
                "env.rollback_detected",
                before={"version": version},
                after={"version": newest_seen + 1},
                env_version=newest_seen + 1,
                reason=f"Redis' history went back ({what}): the version moves past every version served",
            )
            notify = {"env": env, "version": newest_seen + 1, "action": "env.rollback_detected"}
            return Change(newest_seen + 1, ops=bump_version(k, newest_seen + 1), audit=[entry], notify=notify)

        self._writer.run(k, lambda pipe: pipe.get(k.version), decide)

    # -- fed by the snapshot cache's refresh, every second ----------------------------------------

    def observe(self, env: str, version: int, history: str, head: str | None) -> None:
        """What Redis holds for ``env`` now: its version, that version's history, the audit head
        (``None``: not read, as when a changed snapshot is loaded; the version is checked alone)."""
        before = self._seen.get(env)
        seen_head = parse_head(head) if head is not None else before.head if before else (0, "")
        try:
            self._check(env, Seen(version, history, seen_head))
        except (redis.RedisError, ProblemError) as exc:
            log.warning("history guard: could not move %s past its rollback yet (%s)", env, exc)
