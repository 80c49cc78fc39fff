"""SDK instances: their heartbeats, the propagation view, and evaluation counts per app and minute.

A heartbeat never waits on Redis: :meth:`ClientRegistry.report` checks it against this process's
limits and keeps it in memory, and the change listener writes what the process gathered once a
second (:meth:`ClientRegistry.refresh`, ``heartbeats.lua``): the newest record of each instance,
and the evaluation counts added up per flag and app. So a fleet costs Redis one write per process
per second, whatever the number of instances or how often they report, and the usage data grows
with flags x apps, not with instances.

Limits that keep one token from flooding: at most ``per_minute`` heartbeats per instance in a
process (429 beyond); at most ``per_token`` instances per token and environment (a new one takes
the place of the token's longest silent instance, else it is refused when written, and its next
heartbeats get 429); counts only for flags that exist; at most :data:`MAX_APPS_PER_TOKEN` app
names per token in a process. An instance whose SDK closes says goodbye (:meth:`ClientRegistry.forget`).

The housekeeping pass (:meth:`ClientRegistry.housekeep`, run by every scheduler) forgets instances
silent for a day, takes those that went silent out of the lagging count, and counts the live and
current instances that ``/metrics`` reports; the propagation view and the blast radius read counts
and a bounded list, so their cost does not grow with the fleet either.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis

from .errors import ProblemError, TooManyRequests
from .keys import EnvKeys

log = logging.getLogger(__name__)

#: An instance is live if it reported within this many seconds: three of the intervals the
#: service announces (:attr:`Pace.live_seconds`), and at least this.
LIVE_SECONDS = 90
#: Instances silent for longer are forgotten.
FORGET_SECONDS = 24 * 3600
#: A dry run shows who evaluated the affected flags in the last this many minutes.
BLAST_RADIUS_MINUTES = 15
#: Evaluation counts are kept per minute for this long (twice what the blast radius reads).
COUNTS_TTL_SECONDS = 30 * 60
#: How many instances one housekeeping pass handles at most, per environment and task.
PURGE_BATCH = 1000
#: The propagation view lists at most this many lagging instances, and this many recent ones.
SHOWN_INSTANCES = 100
#: Distinct app names one token's heartbeats are counted under, per process; beyond, the
#: token's name.
MAX_APPS_PER_TOKEN = 50
#: Instances written in one script call at most: Redis runs nothing else meanwhile. 200 with
#: 20 counts each take it 7 to 8 ms on 2 shared cores; 1,000 took 46 to 74 ms (SLOWLOG), which
#: operators' kills and dry runs waited behind.
WRITE_BATCH = 200
#: Instances one process holds unwritten at most (a second's heartbeats); beyond, 429.
MAX_PENDING = 100_000
#: An evaluation count larger than this in one heartbeat is taken as this.
MAX_COUNT = 2**40
#: A goodbye is remembered this long (longer than a report can wait in a process's buffer).
GOODBYE_SECONDS = 120

_HEARTBEATS = resources.files(__package__).joinpath("lua/heartbeats.lua").read_text()


class ClientNotFound(ProblemError):
    status, slug, title = 404, "client-not-found", "SDK instance not found"


@dataclass(frozen=True)
class Limits:
    """What one token may do (instances per environment, heartbeats per instance per minute),
    and the pace SDKs are told: the report interval and the spread of the reports after a change,
    stretched so that the whole fleet sends about ``fleet_rate`` heartbeats a second (0: never)."""

    per_token: int = 10_000
    per_minute: int = 30
    interval: float = 30.0
    jitter: float = 1.0
    fleet_rate: float = 1_000.0


@dataclass(frozen=True)
class Pace:
    """What a heartbeat's answer tells the SDK (seconds)."""

    interval: float
    jitter: float

    @property
    def live_seconds(self) -> float:
        """How long an instance told this interval stays live: it may miss two reports."""
        return max(float(LIVE_SECONDS), 3 * self.interval)


def pace_for(limits: Limits, live_instances: int) -> Pace:
    """The pace for a fleet of ``live_instances``: every instance reports once per interval, and
    all of them once within the spread after a change, so both last at least the fleet's size
    over ``fleet_rate`` (whole seconds, within what the SDK accepts: 1 h, 600 s)."""
    stretched = math.ceil(live_instances / limits.fleet_rate) if limits.fleet_rate > 0 else 0
    return Pace(min(max(limits.interval, stretched), 3600.0), min(max(limits.jitter, stretched), 600.0))


@dataclass(frozen=True)
class PropagationView:
    env: str
    version: int
    #: live, applied_current, lagging, silent: counts over the whole fleet
    summary: dict[str, int]
    #: the lagging live instances first, then the most recent (at most :data:`SHOWN_INSTANCES` each)
    instances: list[dict[str, Any]]
    #: OFREP consumers: they evaluate on the server, so they hold no version to wait for.
    ofrep: list[dict[str, Any]] = field(default_factory=list)
    #: what SDK instances are told: every instance reports a change within ``pace.jitter`` seconds
    pace: Pace = field(default_factory=lambda: Pace(30.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "version": self.version,
            "summary": self.summary,
            "pace": {"interval_seconds": self.pace.interval, "jitter_seconds": self.pace.jitter},
            "instances": self.instances,
            "ofrep": self.ofrep,
        }


@dataclass
class _Pending:
    """One instance's newest heartbeat in this process, not yet written."""

    record: str
    applied: int
    seen: float
    token_id: str
    app: str
    #: the version it applied is newer than this process's snapshot (evidence of a rollback?)
    ahead: bool = False


@dataclass
class _Gathered:
    """What this process gathered since its last write to Redis."""

    heartbeats: dict[tuple[str, str], _Pending] = field(default_factory=dict)  # (env, instance) ->
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (env, flag, app) -> n

    def batches(self, size: int) -> Iterator[tuple[str, _Gathered]]:
        """Per environment, parts of at most ``size`` instances (its counts go with the first)."""
        envs = sorted({env for env, _ in self.heartbeats} | {env for env, _, _ in self.counts})
        for env in envs:
            mine = [(key, p) for key, p in self.heartbeats.items() if key[0] == env]
            counts = Counter({key: n for key, n in self.counts.items() if key[0] == env})
            for start in range(0, max(len(mine), 1), size):
                yield env, _Gathered(dict(mine[start : start + size]), counts if start == 0 else Counter())

    def merge_older(self, older: _Gathered) -> None:
        """Take back what a failed write held, under what came since."""
        self.heartbeats = {**older.heartbeats, **self.heartbeats}
        self.counts.update(older.counts)


class ClientRegistry:
    """Heartbeats of SDK instances per environment; see the module docstring. Driven by the
    change listener (:meth:`refresh` writes the heartbeats gathered, once a second)."""

    def __init__(
        self,
        client: redis.Redis,
        limits: Limits | None = None,
        *,
        on_claim: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_claim(env, version)`` hears, once written, the newest version an admitted instance
        claimed beyond this process's snapshot (:meth:`flagsvc.history.HistoryGuard.sdk_applied`)."""
        self._redis = client
        self._limits = limits or Limits()
        self._fleet: dict[str, int] = {}  # env -> live instances, as housekeeping last counted
        self._on_claim = on_claim
        self._write_script = client.register_script(_HEARTBEATS)
        self._lock = threading.Lock()
        self._gathered = _Gathered()
        self._sent: Counter[tuple[str, str]] = Counter()  # (env, instance) -> heartbeats this minute
        self._minute = 0
        self._refused: dict[tuple[str, str], float] = {}  # (env, instance) -> refused until
        self._apps: dict[str, set[str]] = {}  # token id -> app names counted

    # -- the request path: memory only -----------------------------------------------------------

    def report(
        self,
        env: str,
        instance: str,
        body: dict[str, Any],
        *,
        source: str,
        token_id: str,
        token_name: str = "",
        flags: Collection[str],
        known_version: int | None = None,
    ) -> None:
        """Take a heartbeat of ``instance`` sent with token ``token_id``, to be written within a
        second; evaluation counts of flags not in ``flags`` (the environment's) are dropped. 429
        beyond the limits, and for an instance the per-token cap refused. An applied version above
        ``known_version`` (this process's snapshot) is checked for a rollback once written."""
        now = time.time()
        counts: dict[str, int] = body.pop("counts", {}) or {}
        record = {
            **body,
            "instance": instance,
            "address": source,
            "seen_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "seen_ts": now,
        }
        key = (env, instance)
        with self._lock:
            self._check_limits(key, now)
            app = self._app_name(token_id, str(body.get("app", "")), token_name or token_id)
            applied = int(body.get("applied_version") or 0)
            ahead = known_version is not None and applied > known_version
            self._gathered.heartbeats[key] = _Pending(json.dumps(record), applied, now, token_id, app, ahead)
            for flag, n in counts.items():
                if flag in flags and n:
                    self._gathered.counts[(env, flag, app)] += min(int(n), MAX_COUNT)

    def sent(self, env: str, instance: str) -> int:
        """Heartbeats ``instance`` sent this process this minute (what its rate limit counts)."""
        with self._lock:
            return self._sent[(env, instance)] if self._minute == int(time.time() // 60) else 0

    def pace(self, env: str) -> Pace:
        """What to tell the SDK instances of ``env`` (the fleet size is learnt at every write)."""
        return pace_for(self._limits, self._fleet.get(env, 0))

    def _stored_pace(self, k: EnvKeys) -> Pace:
        """The pace for the fleet size the last housekeeping pass stored (any process reads it)."""
        return pace_for(self._limits, int(self._redis.hget(k.clients_summary, "live") or 0))

    def _check_limits(self, key: tuple[str, str], now: float) -> None:
        refused_until = self._refused.get(key, 0.0)
        if refused_until > now:
            raise TooManyRequests(
                f"this token already has {self._limits.per_token} live SDK instances in {key[0]!r}",
                int(refused_until - now) + 1,
            )
        minute = int(now // 60)
        if minute != self._minute:
            self._sent.clear()
            self._minute = minute
        if self._sent[key] >= self._limits.per_minute:
            raise TooManyRequests(
                f"instance {key[1]!r} sent {self._limits.per_minute} heartbeats this minute",
                60 - int(now) % 60,
            )
        if key not in self._gathered.heartbeats and len(self._gathered.heartbeats) >= MAX_PENDING:
            raise TooManyRequests("too many SDK instances reported in the last second; retry", 1)
        self._sent[key] += 1

    def _app_name(self, token_id: str, app: str, fallback: str) -> str:
        apps = self._apps.setdefault(token_id, set())
        if not app or (app not in apps and len(apps) >= MAX_APPS_PER_TOKEN):
            return fallback
        apps.add(app)
        return app

    # -- driven by the change listener -----------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._gathered = _Gathered()
            self._sent.clear()
            self._refused.clear()
            self._apps.clear()
            self._fleet.clear()

    def on_change(self, namespace: str, notice: dict[str, Any]) -> None:
        """Nothing: heartbeats do not depend on changes."""

    def refresh(self) -> None:
        """Write the heartbeats gathered since the last call, in batches of at most
        :data:`WRITE_BATCH` instances; what a Redis failure left unwritten is kept for the next call."""
        with self._lock:
            gathered, self._gathered = self._gathered, _Gathered()
            now = time.time()
            self._refused = {k: until for k, until in self._refused.items() if until > now}
        batches = list(gathered.batches(WRITE_BATCH))
        for i, (env, batch) in enumerate(batches):
            try:
                refused = self._write(env, batch)
            except redis.RedisError:
                with self._lock:
                    for _, unwritten in batches[i:]:
                        self._gathered.merge_older(unwritten)
                raise
            with self._lock:
                self._refused.update(refused)
            self._check_claims(env, batch, refused)

    def _check_claims(self, env: str, batch: _Gathered, refused: Collection[tuple[str, str]]) -> None:
        """Show ``on_claim`` the newest version an admitted instance of ``batch`` claimed ahead: a
        refused instance is evidence of nothing."""
        ahead = [p.applied for key, p in batch.heartbeats.items() if p.ahead and key not in refused]
        if not ahead or self._on_claim is None:
            return
        try:
            self._on_claim(env, max(ahead))
        except (redis.RedisError, ProblemError) as exc:
            log.warning("could not check the version an SDK of %s claimed (%s)", env, exc)

    def _write(self, env: str, batch: _Gathered) -> dict[tuple[str, str], float]:
        """One script call; the instances the per-token cap refused, until when."""
        now = time.time()
        keys, plan = self._plan(env, batch, now)
        live, *refused = self._write_script(keys=keys, args=[json.dumps(plan)])
        self._fleet[env] = int(live)
        return {(env, str(i)): now + int(wait) for i, wait in zip(refused[::2], refused[1::2], strict=True)}

    def _plan(self, env: str, gathered: _Gathered, now: float) -> tuple[list[str], dict[str, Any]]:
        """The KEYS and the plan of ``heartbeats.lua`` for ``env``."""
        k = EnvKeys(env)
        fixed = [k.clients, k.clients_seen, k.clients_applied, k.evaluations(int(now // 60))]
        positions = {
            key: i + 1 for i, key in enumerate([*fixed, k.clients_gone, k.clients_apps, k.clients_summary])
        }

        def index(key: str) -> int:
            return positions.setdefault(key, len(positions) + 1)

        instances = [
            [
                instance,
                p.record,
                p.applied,
                p.seen,
                index(k.clients_of_token(p.token_id)),
                index(k.clients_of_app(p.app)),
                p.app,
            ]
            for (_, instance), p in gathered.heartbeats.items()
        ]
        counts = [[f"{flag}|{app}", n] for (_, flag, app), n in gathered.counts.items()]
        plan = {
            "now": now,
            "per_token": self._limits.per_token,
            "live": self.pace(env).live_seconds,
            "forget": FORGET_SECONDS,
            "counts_ttl": COUNTS_TTL_SECONDS,
            "instances": instances,
            "counts": counts,
        }
        return list(positions), plan

    # -- goodbyes, reads, housekeeping -----------------------------------------------------------

    def forget(self, env: str, instance: str, *, token_id: str) -> bool:
        """An instance said goodbye (its SDK closed): forget it at once, rather than count it as
        live for three report intervals. Only the token that registered it may; False if it did not."""
        k, key = EnvKeys(env), (env, instance)
        with self._lock:
            pending = self._gathered.heartbeats.pop(key, None)
        known = self._redis.zscore(k.clients_of_token(token_id), instance) is not None
        if not known and not (pending and pending.token_id == token_id):
            return False
        raw = self._redis.hget(k.clients, instance)
        app = str(json.loads(raw).get("app", "")) if raw else pending.app if pending else ""
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(k.clients_gone, {instance: time.time()})
        pipe.hdel(k.clients, instance)
        pipe.zrem(k.clients_seen, instance)
        pipe.zrem(k.clients_applied, instance)
        pipe.zrem(k.clients_of_token(token_id), instance)
        pipe.zrem(k.clients_of_app(app), instance)
        pipe.execute()
        return True

    def view(self, env: str, current_version: int) -> PropagationView:
        """Counts over the whole fleet, and the instances most worth a look: the lagging live ones
        first, then the most recent; a constant cost whatever the size of the fleet."""
        k, now = EnvKeys(env), time.time()
        pace = self._stored_pace(k)
        live_window = pace.live_seconds
        pipe = self._redis.pipeline(transaction=False)
        pipe.zcount(k.clients_seen, now - live_window, "+inf")
        pipe.zcard(k.clients_seen)
        pipe.zcount(k.clients_applied, "-inf", f"({current_version}")
        pipe.zrangebyscore(k.clients_applied, "-inf", f"({current_version}", start=0, num=SHOWN_INSTANCES)
        pipe.zrevrange(k.clients_seen, 0, SHOWN_INSTANCES - 1)
        live, total, lagging, behind, recent = pipe.execute()
        shown = list(dict.fromkeys([*behind, *recent]))
        instances = []
        for value in self._redis.hmget(k.clients, shown) if shown else []:
            if value is None:
                continue  # forgotten in between
            record = json.loads(value)
            age = now - float(record.pop("seen_ts", 0))
            record["live"] = age <= live_window
            record["age_seconds"] = round(age, 1)
            record["lag"] = max(0, current_version - int(record.get("applied_version") or 0))
            instances.append(record)
        instances.sort(key=lambda r: (not r["live"], -r["lag"], r.get("app", ""), r["instance"]))
        lagging = min(lagging, live)  # instances gone silent leave the lagging count within seconds
        summary = {
            "live": live,
            "applied_current": live - lagging,
            "lagging": lagging,
            "silent": total - live,
        }
        return PropagationView(
            env, current_version, summary, instances, self._ofrep_consumers(env, now), pace
        )

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
        """Forget instances silent for a day; take those that went silent since the last pass out
        of the lagging count; count the live and current ones. Batches of :data:`PURGE_BATCH`."""
        k, now = EnvKeys(env), time.time()
        live_window = self._stored_pace(k).live_seconds
        self._forget_silent(k, now)
        self._take_silent_out_of_lagging(k, now - live_window)
        self._forget_silent_consumers(k, now)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zremrangebyscore(k.clients_gone, "-inf", now - GOODBYE_SECONDS)
        for app in self._redis.smembers(k.clients_apps):
            pipe.zremrangebyscore(k.clients_of_app(app), "-inf", now - live_window)
        pipe.zcount(k.clients_seen, now - live_window, "+inf")
        pipe.zcount(k.clients_applied, "-inf", f"({current_version}")
        *_, live, lagging = pipe.execute()
        current = live - min(live, lagging)
        self._redis.hset(k.clients_summary, mapping={"live": live, "current": current, "at": now})

    def _forget_silent(self, k: EnvKeys, now: float) -> None:
        gone = self._redis.zrangebyscore(
            k.clients_seen, "-inf", now - FORGET_SECONDS, start=0, num=PURGE_BATCH
        )
        if gone:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hdel(k.clients, *gone)
            pipe.zrem(k.clients_seen, *gone)
            pipe.zrem(k.clients_applied, *gone)
            pipe.execute()

    def _take_silent_out_of_lagging(self, k: EnvKeys, live_since: float) -> None:
        """The instances whose last report left the live window (reports since ``live_since``)
        since the last pass (the summary remembers how far passes went) no longer count among
        those that applied a version."""
        since = self._redis.hget(k.clients_summary, "silent_to") or "-inf"
        went_silent = self._redis.zrangebyscore(
            k.clients_seen, since, live_since, start=0, num=PURGE_BATCH, withscores=True
        )
        if went_silent:
            self._redis.zrem(k.clients_applied, *[instance for instance, _ in went_silent])
        reached = went_silent[-1][1] if len(went_silent) == PURGE_BATCH else live_since
        self._redis.hset(k.clients_summary, "silent_to", repr(reached))

    def _forget_silent_consumers(self, k: EnvKeys, now: float) -> None:
        records = self._redis.hgetall(k.ofrep_consumers)  # at most MAX_OFREP_APPS per token
        gone = [c for c, raw in records.items() if now - float(json.loads(raw)["seen_ts"]) > FORGET_SECONDS]
        if gone:
            self._redis.hdel(k.ofrep_consumers, *gone)

    def blast_radius(self, env: str, flags: Collection[str]) -> dict[str, dict[str, Any]]:
        """Per flag of ``flags``, over the last :data:`BLAST_RADIUS_MINUTES`: its evaluations, and
        per app that evaluated it that app's live instances. Two round trips, and only the counts
        of these flags (one per app and minute): the cost grows with the flags asked and the apps,
        not with the instances nor with the environment's other flags."""
        k, now = EnvKeys(env), time.time()
        out: dict[str, dict[str, Any]] = {flag: {"evaluations": 0, "apps": {}} for flag in flags}
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(k.clients_apps)
        pipe.hget(k.clients_summary, "live")
        known_apps, fleet = pipe.execute()
        apps = sorted(known_apps)
        fields = [f"{flag}|{app}" for flag in out for app in apps]
        if not fields:
            return out
        now_minute, live_since = int(now // 60), now - pace_for(self._limits, int(fleet or 0)).live_seconds
        pipe = self._redis.pipeline(transaction=False)
        for m in range(now_minute - BLAST_RADIUS_MINUTES + 1, now_minute + 1):
            pipe.hmget(k.evaluations(m), fields)
        for app in apps:
            pipe.zcount(k.clients_of_app(app), live_since, "+inf")
        answers = pipe.execute()
        live = dict(zip(apps, answers[BLAST_RADIUS_MINUTES:], strict=True))
        for bucket in answers[:BLAST_RADIUS_MINUTES]:
            for name, n in zip(fields, bucket, strict=True):
                if n is not None:
                    flag, app = name.split("|", 1)
                    out[flag]["evaluations"] += int(n)
                    out[flag]["apps"][app] = live[app]
        for entry in out.values():
            entry["apps"] = dict(sorted(entry["apps"].items()))
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
        for (env, flag, app, _token), n in counts.items():
            key = EnvKeys(env).evaluations(minute)
            pipe.hincrby(key, f"{flag}|{app}", n)
            pipe.expire(key, COUNTS_TTL_SECONDS)
        for (env, app, token), (when, source) in seen.items():
            k, consumer = EnvKeys(env), f"ofrep:{token}:{app}"
            at = datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            record = {"consumer": consumer, "app": app, "token": token, "address": source, "seen_at": at}
            pipe.hset(k.ofrep_consumers, consumer, json.dumps({**record, "seen_ts": when}))
            pipe.zadd(k.clients_of_app(app), {consumer: when})  # one instance of its app
            pipe.expire(k.clients_of_app(app), FORGET_SECONDS)
            pipe.sadd(k.clients_apps, app)
        pipe.execute()
