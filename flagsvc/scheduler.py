"""Automatic reverts of temporary changes (``for`` on kill, restore and playbook apply).

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

import redis

from .commit import Committer, Conflict, Op, retry_on_conflict, utcnow_iso
from .envs import EnvStore
from .errors import ProblemError
from .flags import WriteContext, next_version
from .keys import EnvKeys
from .metrics import REVERTS
from .playbooks import PlaybookStore

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "system"
BATCH = 50


class Scheduler:
    """Performs due reverts; :meth:`run_once` is one pass over every environment."""

    def __init__(self, client: redis.Redis, *, interval: float = 1.0) -> None:
        self._redis = client
        self._envs = EnvStore(client)
        self._committer = Committer(client)
        self._playbooks = PlaybookStore(client)
        self._interval = interval
        self._stop = threading.Event()

    def run_once(self, now: float | None = None) -> int:
        """Perform every revert due at ``now``; the number of reverts performed or skipped."""
        now = time.time() if now is None else now
        done = 0
        for env in self._envs.list():
            due = self._redis.zrangebyscore(EnvKeys(env).reverts, "-inf", now, start=0, num=BATCH)
            for member in due:
                if self._revert(env, member):
                    done += 1
        return done

    def _revert(self, env: str, member: str) -> bool:
        item = json.loads(member)
        original = item["original"]
        reason = (
            f"automatic revert of {original['action']} by {original['actor']} at {original['time']}"
            f" (reason: {original['reason']})"
        )
        if item["kind"] == "playbook":
            return self._revert_playbook(env, member, item, reason)
        return self._revert_flag(env, member, item, reason)

    def _revert_flag(self, env: str, member: str, item: dict, reason: str) -> bool:
        k = EnvKeys(env)

        def attempt() -> bool:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(k.audit_head)
            pipe.get(k.version)
            pipe.hget(k.flags, item["flag"])
            pipe.zscore(k.reverts, member)
            head, version, raw, scheduled = pipe.execute()
            if scheduled is None:
                return False  # another scheduler did it
            flag = json.loads(raw) if raw else None
            audit = {
                "actor": SYSTEM_ACTOR,
                "action": "flag.auto_revert",
                "flag": item["flag"],
                "incident": item["original"].get("incident", ""),
            }
            ops = [Op("ZREM", k.reverts, (member,))]
            if flag is None or flag.get("archived") or flag["version"] != item["expect_version"]:
                have = "deleted" if flag is None or flag.get("archived") else f"at version {flag['version']}"
                audit["reason"] = (
                    f"skipped: changed by hand since (expected version {item['expect_version']}, {have}); "
                    + reason
                )
                audit["before"] = raw or ""
            else:
                env_version = int(version or 0) + 1
                after = next_version(flag, item["restore"], SYSTEM_ACTOR, utcnow_iso())
                ops += [
                    Op("HSET", k.flags, (item["flag"], json.dumps(after))),
                    Op("SET", k.version, (str(env_version),)),
                ]
                audit.update(reason=reason, before=raw, after=json.dumps(after), env_version=str(env_version))
            self._committer.commit(
                k,
                head,
                ops=ops,
                audit=audit,
                notify=json.dumps({"env": env, "flag": item["flag"], "action": "flag.auto_revert"}),
            )
            REVERTS.labels(env, "skipped" if audit["reason"].startswith("skipped") else "reverted").inc()
            return True

        return retry_on_conflict(attempt)

    def _revert_playbook(self, env: str, member: str, item: dict, reason: str) -> bool:
        k = EnvKeys(env)
        if self._redis.zscore(k.reverts, member) is None:
            return False
        ctx = WriteContext(actor=SYSTEM_ACTOR, reason=reason, incident=item["original"].get("incident", ""))
        try:
            self._playbooks.revert(
                env,
                item["playbook"],
                ctx,
                only_operation=item["operation"],
            )
        except ProblemError as exc:  # reverted by hand already, or the playbook is gone
            log.info("scheduled revert of playbook %s skipped: %s", item["playbook"], exc.detail)
            self._redis.zrem(k.reverts, member)
            REVERTS.labels(env, "skipped").inc()
            return True
        except Conflict:
            return False
        REVERTS.labels(env, "reverted").inc()
        return True

    def run_forever(self) -> None:
        """Loop until :meth:`stop`; Redis errors are logged and retried."""
        while not self._stop.is_set():
            try:
                self.run_once()
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
