"""SDK instances: their heartbeats, the propagation view, and evaluation counts per minute.

A heartbeat is recorded by ``heartbeat.lua`` in one atomic step, within limits that keep one
token from flooding Redis: at most ``per_token`` instances per token and environment (a new one
takes the place of the token's longest silent instance, else it is refused), at most
``per_minute`` heartbeats per instance, and evaluation counts only for flags that exist.
An instance whose SDK closes says goodbye (:meth:`ClientRegistry.forget`).
Instances silent for a day are purged by the housekeeping pass (:meth:`ClientRegistry.housekeep`,
run by every scheduler), which also counts the live and current instances that ``/metrics``
reports, so a scrape costs the same whatever the size of the fleet.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis

from .errors import ProblemError, TooManyRequests
from .keys import EnvKeys

#: An instance is live if it reported within this many seconds (SDKs report every 30 s).
LIVE_SECONDS = 90
#: Instances silent for longer are forgotten.
FORGET_SECONDS = 24 * 3600
#: A dry run shows who evaluated the affected flags in the last this many minutes.
BLAST_RADIUS_MINUTES = 15
#: Evaluation counts are kept per minute for this long.
COUNTS_TTL_SECONDS = 3 * 3600
#: How many silent instances one housekeeping pass forgets at most, per environment.
PURGE_BATCH = 1000

_HEARTBEAT = resources.files(__package__).joinpath("lua/heartbeat.lua").read_text()


class ClientNotFound(ProblemError):
    status, slug, title = 404, "client-not-found", "SDK instance not found"


@dataclass(frozen=True)
class Limits:
    """What one token may do: instances per environment, heartbeats per instance per minute."""

    per_token: int = 10_000
    per_minute: int = 30


@dataclass(frozen=True)
class PropagationView:
    env: str
    version: int
    instances: list[dict[str, Any]]
    #: OFREP consumers: they evaluate on the server, so they hold no version to wait for.
    ofrep: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        live = [i for i in self.instances if i["live"]]
        current = [i for i in live if i["applied_version"] >= self.version]
        return {
            "env": self.env,
            "version": self.version,
            "summary": {
                "live": len(live),
                "applied_current": len(current),
                "lagging": len(live) - len(current),
                "silent": len(self.instances) - len(live),
            },
            "instances": self.instances,
            "ofrep": self.ofrep,
        }


class ClientRegistry:
    """Heartbeats of SDK instances per environment."""

    def __init__(self, client: redis.Redis, limits: Limits | None = None) -> None:
        self._redis = client
        self._limits = limits or Limits()
        self._heartbeat = client.register_script(_HEARTBEAT)

    def report(
        self,
        env: str,
        instance: str,
        body: dict[str, Any],
        *,
        source: str,
        token_id: str,
        flags: Collection[str],
    ) -> None:
        """Record a heartbeat of ``instance`` sent with token ``token_id``; evaluation counts of
        flags not in ``flags`` (the environment's) are dropped. 429 beyond the limits."""
        now = time.time()
        counts: dict[str, int] = body.pop("counts", {}) or {}
        record = {
            **body,
            "instance": instance,
            "address": source,
            "seen_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "seen_ts": now,
        }
        k, minute = EnvKeys(env), int(now // 60)
        app = str(body.get("app", ""))
        pairs = [
            x for flag, n in counts.items() if flag in flags and n for x in (f"{flag}|{app}|{instance}", n)
        ]
        status, *wait = self._heartbeat(
            keys=[
                k.clients,
                k.clients_seen,
                k.clients_of_token(token_id),
                k.heartbeats(minute),
                k.evaluations(minute),
                k.clients_applied,
            ],
            args=[
                instance,
                json.dumps(record),
                now,
                int(body.get("applied_version") or 0),
                self._limits.per_token,
                self._limits.per_minute,
                LIVE_SECONDS,
                FORGET_SECONDS,
                COUNTS_TTL_SECONDS,
                *pairs,
            ],
        )
        if status == "rate":
            raise TooManyRequests(
                f"instance {instance!r} sent {self._limits.per_minute} heartbeats this minute", int(wait[0])
            )
        if status == "cap":
            raise TooManyRequests(
                f"this token already has {self._limits.per_token} live SDK instances in {env!r}", int(wait[0])
            )

    def forget(self, env: str, instance: str, *, token_id: str) -> bool:
        """An instance said goodbye (its SDK closed): forget it at once, rather than count it as
        live for :data:`LIVE_SECONDS`. Only the token that registered it may; False if it did not."""
        k = EnvKeys(env)
        if self._redis.zscore(k.clients_of_token(token_id), instance) is None:
            return False
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(k.clients, instance)
        pipe.zrem(k.clients_seen, instance)
        pipe.zrem(k.clients_applied, instance)
        pipe.zrem(k.clients_of_token(token_id), instance)
        pipe.execute()
        return True

    def view(self, env: str, current_version: int) -> PropagationView:
        now = time.time()
        instances = []
        for value in self._redis.hvals(EnvKeys(env).clients):
            record = json.loads(value)
            age = now - float(record.pop("seen_ts", 0))
            if age > FORGET_SECONDS:
                continue  # the next housekeeping pass forgets it
            record["live"] = age <= LIVE_SECONDS
            record["age_seconds"] = round(age, 1)
            record["lag"] = max(0, current_version - int(record.get("applied_version") or 0))
            instances.append(record)
        instances.sort(key=lambda r: (not r["live"], -r["lag"], r.get("app", ""), r["instance"]))
        return PropagationView(env, current_version, instances, self._ofrep_consumers(env, now))

    def _ofrep_consumers(self, env: str, now: float) -> list[dict[str, Any]]:
        consumers = []
        for value in self._redis.hvals(EnvKeys(env).ofrep_consumers):
            record = json.loads(value)
            age = now - float(record.pop("seen_ts", 0))
            if age <= FORGET_SECONDS:
                consumers.append({**record, "live": age <= LIVE_SECONDS, "age_seconds": round(age, 1)})
        return sorted(consumers, key=lambda r: (not r["live"], r["consumer"]))

    def summary(self, env: str) -> dict[str, int]:
        """Live instances and those on the current version, as the last housekeeping pass counted."""
        raw = self._redis.hgetall(EnvKeys(env).clients_summary)
        return {"live": int(raw.get("live", 0)), "current": int(raw.get("current", 0))}

    def housekeep(self, env: str, current_version: int) -> None:
        """Forget instances silent for a day, and count the live and current ones."""
        k, now = EnvKeys(env), time.time()
        gone = self._redis.zrangebyscore(
            k.clients_seen, "-inf", now - FORGET_SECONDS, start=0, num=PURGE_BATCH
        )
        pipe = self._redis.pipeline(transaction=False)
        self._forget_silent_consumers(k, now)
        if gone:
            pipe.hdel(k.clients, *gone)
            pipe.zrem(k.clients_seen, *gone)
            pipe.zrem(k.clients_applied, *gone)
        pipe.zrangebyscore(k.clients_seen, now - LIVE_SECONDS, "+inf")
        live = pipe.execute()[-1]
        applied = self._redis.zmscore(k.clients_applied, live) if live else []
        current = sum(1 for v in applied if v is not None and v >= current_version)
        self._redis.hset(k.clients_summary, mapping={"live": len(live), "current": current, "at": now})

    def _forget_silent_consumers(self, k: EnvKeys, now: float) -> None:
        records = self._redis.hgetall(k.ofrep_consumers)  # at most MAX_OFREP_APPS per token
        gone = [c for c, raw in records.items() if now - float(json.loads(raw)["seen_ts"]) > FORGET_SECONDS]
        if gone:
            self._redis.hdel(k.ofrep_consumers, *gone)

    def evaluations(self, env: str, minutes: int) -> dict[str, dict[str, Any]]:
        """Per flag, over the last ``minutes``: evaluations, and per app the instances that evaluated it."""
        now_minute = int(time.time() // 60)
        pipe = self._redis.pipeline(transaction=False)
        for m in range(now_minute - minutes + 1, now_minute + 1):
            pipe.hgetall(EnvKeys(env).evaluations(m))
        out: dict[str, dict[str, Any]] = {}
        for bucket in pipe.execute():
            for name, n in bucket.items():
                flag, app, instance = name.split("|", 2)
                entry = out.setdefault(flag, {"evaluations": 0, "apps": {}})
                entry["evaluations"] += int(n)
                entry["apps"].setdefault(app, set()).add(instance)
        for entry in out.values():
            entry["apps"] = {app: len(instances) for app, instances in sorted(entry["apps"].items())}
        return out


#: Distinct app names (``X-Flagsvc-App``) one token's OFREP evaluations are counted under, per
#: process; beyond, they count under the token's name.
MAX_OFREP_APPS = 20


class OfrepUsage:
    """OFREP evaluations, counted in memory on the request path (which never waits on Redis) and
    written into the same per-minute counts as SDK heartbeats once a second, by the change
    listener (:meth:`refresh`). An OFREP consumer is a token and an app name: it counts as one
    instance of that app, under the id ``ofrep:<token name>:<app>``."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, str, str]] = Counter()  # env, flag, app, token -> n
        self._seen: dict[tuple[str, str, str], tuple[float, str]] = {}  # env, app, token -> when, from
        self._apps: dict[str, set[str]] = {}  # token -> app names counted

    def count(self, env: str, token: str, app: str, flags: Collection[str], source: str) -> None:
        """``flags`` were evaluated in ``env`` by ``token`` for ``app`` (``""``: the token's name)."""
        with self._lock:
            apps = self._apps.setdefault(token, set())
            if not app or (app not in apps and len(apps) >= MAX_OFREP_APPS):
                app = token
            apps.add(app)
            for flag in flags:
                self._counts[(env, flag, app, token)] += 1
            self._seen[(env, app, token)] = (time.time(), source)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._seen.clear()
            self._apps.clear()

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        """Nothing: counts do not depend on changes."""

    def refresh(self) -> None:
        """Write the counts gathered since the last call; kept for the next call if Redis fails."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            seen, self._seen = self._seen, {}
        if not counts and not seen:
            return
        try:
            self._write(counts, seen)
        except redis.RedisError:
            with self._lock:
                self._counts.update(counts)
                self._seen = {**seen, **self._seen}
            raise

    def _write(
        self, counts: Counter[tuple[str, str, str, str]], seen: dict[tuple[str, str, str], tuple[float, str]]
    ) -> None:
        minute = int(time.time() // 60)
        pipe = self._redis.pipeline(transaction=False)
        for (env, flag, app, token), n in counts.items():
            key = EnvKeys(env).evaluations(minute)
            pipe.hincrby(key, f"{flag}|{app}|ofrep:{token}:{app}", n)
            pipe.expire(key, COUNTS_TTL_SECONDS)
        for (env, app, token), (when, source) in seen.items():
            consumer = f"ofrep:{token}:{app}"
            at = datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            record = {"consumer": consumer, "app": app, "token": token, "address": source, "seen_at": at}
            pipe.hset(EnvKeys(env).ofrep_consumers, consumer, json.dumps({**record, "seen_ts": when}))
        pipe.execute()
