"""Automatic reverts of temporary changes (``for`` on kill, restore and playbook apply), and the
housekeeping of SDK instance records (:meth:`Scheduler.housekeep`).

A temporary change schedules its revert in the same commit: a member of the environment's
``reverts`` sorted set, scored by when it is due. Any number of schedulers may run - in every
gunicorn worker (``flagsvc serve`` and ``ops/gunicorn.conf.py`` start one), or as
``flagsvc worker`` processes - and each due revert still happens exactly once: the revert commit
removes the scheduled member and re-checks the audit head, so of two schedulers racing for the
same revert one commits and the other finds it gone. State is only in Redis, so a revert due
while nothing ran happens as soon as a scheduler starts.

A flag changed by hand since the temporary change is left alone: the revert is skipped and the
skip is audited (``flag.auto_revert``, nothing changed). Reverts are audited with actor
``system`` and a reason naming the original change.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from .clients import ClientRegistry
from .commit import Op
from .envs import EnvStore
from .errors import OutcomeUnknown, WriteContention
from .flags import bump_version, flag_change, live_flag, next_version, parse_flag
from .keys import EnvKeys
from .metrics import REVERTS
from .playbooks import PlaybookNotApplied, PlaybookNotFound, PlaybookStore
from .writes import Change, State, WriteContext, Writer, audit_entry

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "system"
BATCH = 50
#: How often the housekeeping pass runs (purge of silent SDK instances, their counts).
HOUSEKEEPING_SECONDS = 5.0
#: What a revert attempt did: "reverted", "skipped" (changed by hand since), or None (not done:
#: another scheduler did it, or it will be tried again on the next pass).
Result = str | None


class Scheduler:
    """Performs due reverts; :meth:`run_once` is one pass over every environment."""

    def __init__(
        self, client: redis.Redis, *, interval: float = 1.0, clients: ClientRegistry | None = None
    ) -> None:
        """``clients``: the registry whose silent instances housekeeping purges (its limits say
        how long an instance stays live); a default one if None."""
        self._redis = client
        self._envs = EnvStore(client)
        self._writer = Writer(client)
        self._playbooks = PlaybookStore(client)
        self._clients = clients or ClientRegistry(client)
        self._interval = interval
        self._stop = threading.Event()

    def run_once(self, now: float | None = None) -> int:
        """Perform every revert due at ``now`` (default: Redis' clock, the one every host shares);
        the number of reverts performed or skipped."""
        if now is None:
            seconds, micros = self._redis.time()
            now = int(seconds) + int(micros) / 1e6
        done = 0
        for env in self._envs.list():
            due = self._redis.zrangebyscore(EnvKeys(env).reverts, "-inf", now, start=0, num=BATCH)
            for member in due:
                outcome = self._revert(env, member)
                if outcome is not None:
                    REVERTS.labels(env, outcome).inc()
                    done += 1
        return done

    def _revert(self, env: str, member: str) -> Result:
        """One due revert. Contention or a Redis failure leaves it scheduled, for the next pass."""
        item = json.loads(member)
        original = item["original"]
        ctx = WriteContext(
            actor=SYSTEM_ACTOR,
            reason=f"automatic revert of {original['action']} by {original['actor']} at {original['time']}"
            f" (reason: {original['reason']})",
            incident=original.get("incident", ""),
        )
        try:
            if item["kind"] == "playbook":
                return self._revert_playbook(env, member, item, ctx)
            return self._revert_flag(env, member, item, ctx)
        except (WriteContention, OutcomeUnknown, redis.RedisError) as exc:
            log.warning("scheduled revert in %s not done (%s); it stays scheduled and is retried", env, exc)
            return None

    def _revert_flag(self, env: str, member: str, item: dict[str, Any], ctx: WriteContext) -> Result:
        k = EnvKeys(env)
        key = item["flag"]

        def read(pipe: Any) -> None:
            pipe.get(k.version)
            pipe.hget(k.flags, key)
            pipe.zscore(k.reverts, member)

        def decide(state: State) -> Change[Result]:
            version, raw, scheduled = state.values
            if scheduled is None:
                return Change(None)  # another scheduler did it
            unschedule = Op("ZREM", k.reverts, (member,))
            flag = live_flag(parse_flag(raw))
            if flag is None or flag["version"] != item["expect_version"]:
                have = "deleted" if flag is None else f"at version {flag['version']}"
                reason = (
                    f"skipped: changed by hand since (expected version {item['expect_version']}, {have}); "
                )
                entry = audit_entry(
                    ctx, "flag.auto_revert", flag=key, before=parse_flag(raw), reason=reason + ctx.reason
                )
                return Change("skipped", ops=[unschedule], audit=[entry])
            env_version = int(version or 0) + 1
            after = next_version(flag, item["restore"], SYSTEM_ACTOR, state.now)
            write, entry = flag_change(k, flag, after, ctx, "flag.auto_revert", env_version)
            return Change(
                "reverted",
                ops=[write, *bump_version(k, env_version), unschedule],
                audit=[entry],
                notify={"env": env, "version": env_version, "flag": key, "action": "flag.auto_revert"},
            )

        return self._writer.run(k, read, decide).result

    def _revert_playbook(self, env: str, member: str, item: dict[str, Any], ctx: WriteContext) -> Result:
        k = EnvKeys(env)
        if self._redis.zscore(k.reverts, member) is None:
            return None
        try:
            self._playbooks.revert(env, item["playbook"], ctx, only_operation=item["operation"])
        except (PlaybookNotApplied, PlaybookNotFound) as exc:  # reverted by hand already, or gone
            if not self._redis.zrem(k.reverts, member):
                return None  # another scheduler got there first
            log.info("scheduled revert of playbook %s skipped: %s", item["playbook"], exc.detail)
            return "skipped"
        return "reverted"

    def housekeep(self) -> None:
        """Forget SDK instances silent for a day and count the live ones, in every environment."""
        for env in self._envs.list():
            self._clients.housekeep(env, int(self._redis.get(EnvKeys(env).version) or 0))

    def run_forever(self) -> None:
        """Loop until :meth:`stop`: due reverts every interval, housekeeping every few seconds.
        Redis errors are logged and retried."""
        next_housekeeping = 0.0
        while not self._stop.is_set():
            try:
                self.run_once()
                if time.monotonic() >= next_housekeeping:
                    self.housekeep()
                    next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
            except redis.RedisError as exc:
                log.warning("scheduler: Redis unavailable (%s); retrying", exc)
            except Exception:
                log.exception("scheduler: unexpected error")
            self._stop.wait(self._interval)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="flagsvc-scheduler", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
