"""SDK instances: their heartbeats, the propagation view, and evaluation counts per minute."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from .keys import EnvKeys

#: An instance is live if it reported within this many seconds (SDKs report every 30 s).
LIVE_SECONDS = 90
#: Instances silent for longer are forgotten.
FORGET_SECONDS = 24 * 3600
#: A dry run shows who evaluated the affected flags in the last this many minutes.
BLAST_RADIUS_MINUTES = 15
#: Evaluation counts are kept per minute for this long.
COUNTS_TTL_SECONDS = 3 * 3600


def clients_key(env: str) -> str:
    return f"{EnvKeys(env).base}:clients"


def counts_key(env: str, minute: int) -> str:
    return f"{EnvKeys(env).base}:evals:{minute}"


@dataclass(frozen=True)
class PropagationView:
    env: str
    version: int
    instances: list[dict[str, Any]]

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
        }


class ClientRegistry:
    """Heartbeats of SDK instances per environment."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def report(self, env: str, instance: str, body: dict[str, Any], source: str) -> None:
        now = time.time()
        counts: dict[str, int] = body.pop("counts", {}) or {}
        record = {
            **body,
            "instance": instance,
            "address": source,
            "seen_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "seen_ts": now,
        }
        minute = int(now // 60)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(clients_key(env), instance, json.dumps(record))
        if counts:
            key = counts_key(env, minute)
            app = str(body.get("app", ""))
            for flag, n in counts.items():
                pipe.hincrby(key, f"{flag}|{app}|{instance}", int(n))
            pipe.expire(key, COUNTS_TTL_SECONDS)
        pipe.execute()

    def view(self, env: str, current_version: int) -> PropagationView:
        now = time.time()
        raw = self._redis.hgetall(clients_key(env))
        instances, forgotten = [], []
        for instance, value in raw.items():
            record = json.loads(value)
            age = now - float(record.get("seen_ts", 0))
            if age > FORGET_SECONDS:
                forgotten.append(instance)
                continue
            record["live"] = age <= LIVE_SECONDS
            record["age_seconds"] = round(age, 1)
            record["lag"] = max(0, current_version - int(record.get("applied_version") or 0))
            record.pop("seen_ts", None)
            instances.append(record)
        if forgotten:
            self._redis.hdel(clients_key(env), *forgotten)
        instances.sort(key=lambda r: (not r["live"], -r["lag"], r.get("app", ""), r["instance"]))
        return PropagationView(env, current_version, instances)

    def evaluations(self, env: str, minutes: int) -> dict[str, dict[str, Any]]:
        """Per flag, over the last ``minutes``: evaluations, and per app the instances that evaluated it."""
        now_minute = int(time.time() // 60)
        pipe = self._redis.pipeline(transaction=False)
        for m in range(now_minute - minutes + 1, now_minute + 1):
            pipe.hgetall(counts_key(env, m))
        out: dict[str, dict[str, Any]] = {}
        for bucket in pipe.execute():
            for field, n in bucket.items():
                flag, app, instance = field.split("|", 2)
                entry = out.setdefault(flag, {"evaluations": 0, "apps": {}})
                entry["evaluations"] += int(n)
                entry["apps"].setdefault(app, set()).add(instance)
        for entry in out.values():
            entry["apps"] = {app: len(instances) for app, instances in sorted(entry["apps"].items())}
        return out
