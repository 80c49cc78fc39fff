"""Usage data grows with flags x apps, not with the fleet: heartbeats are gathered in memory and
written once a second, counts are kept per flag and app, and the propagation view and the blast
radius read counts and a bounded list."""

from __future__ import annotations

import time
from typing import Any

from flagsvc import create_app
from flagsvc.clients import LIVE_SECONDS, SHOWN_INSTANCES, WRITE_BATCH, ClientRegistry, Limits, Pace, pace_for
from flagsvc.envs import EnvStore
from flagsvc.extensions import make_stores
from flagsvc.keys import EnvKeys
from flagsvc.scheduler import Scheduler

from .conftest import create_token
from .helpers import ENV, heartbeats_written
from .test_fanout import commands_of

KEYS = EnvKeys(ENV)
FLAGS = [f"flag-{i}" for i in range(10)]


def report_fleet(registry: ClientRegistry, instances: int, *, apps: int = 5, version: int = 1) -> None:
    for i in range(instances):
        body = {"app": f"app-{i % apps}", "applied_version": version, "counts": dict.fromkeys(FLAGS, 3)}
        registry.report(ENV, f"i-{i}", body, source="10.0.0.1", token_id=f"t{i % 4}", flags=FLAGS)


def counted(r: Any, field: str) -> int:
    """Evaluations counted under ``field`` in this minute and the one before."""
    minute = int(time.time() // 60)
    return sum(int(r.hget(KEYS.evaluations(m), field) or 0) for m in (minute - 1, minute))


def registry_on(r: Any) -> ClientRegistry:
    EnvStore(r).create(ENV, actor="test-setup")
    return ClientRegistry(r, Limits(per_token=100_000))


def test_a_process_writes_its_heartbeats_in_one_call_a_second(r: Any) -> None:
    registry = registry_on(r)
    report_fleet(registry, 1)
    registry.refresh()  # (the script's first call loads it)
    for _ in range(3):  # every instance reports three times within the second
        report_fleet(registry, WRITE_BATCH)
    assert r.hlen(KEYS.clients) == 1, "nothing written on the request path"

    written = commands_of(r, registry.refresh)

    # commandstats counts the commands a script runs too: one call, and what it did inside
    assert written.pop("evalsha") == 1 and written["hset"] == WRITE_BATCH
    assert set(written) <= {
        "hset",
        "zadd",
        "sadd",
        "zscore",
        "zremrangebyscore",
        "zcard",
        "hincrby",
        "expire",
        "hget",  # the fleet size housekeeping counted, for the pace told to SDKs
    }
    assert r.hlen(KEYS.clients) == WRITE_BATCH
    assert counted(r, "flag-0|app-0") == 3 + WRITE_BATCH // 5 * 3 * 3


def test_a_process_that_stops_writes_what_it_gathered_since_its_last_second(r: Any) -> None:
    """A stopping worker (a deploy, say) writes its gathered heartbeats and OFREP counts: an
    instance that has just reported the version it applied is not shown behind until its next
    report."""
    EnvStore(r).create(ENV, actor="test-setup")
    stores = make_stores(r)  # its change listener, which writes once a second, never runs here
    body = {"app": "web", "applied_version": 1, "counts": {"flag-0": 2}}
    stores.clients.report(ENV, "i-1", body, source="10.0.0.1", token_id="t1", flags=FLAGS)
    stores.ofrep_usage.count(ENV, "reader", "php", ["flag-0"], "10.0.0.2")
    assert r.hlen(KEYS.clients) == 0

    stores.close()

    assert r.hexists(KEYS.clients, "i-1")
    assert counted(r, "flag-0|web") == 2 and counted(r, "flag-0|php") == 1


def test_usage_data_grows_with_flags_and_apps_not_with_instances(r: Any) -> None:
    registry = registry_on(r)
    sizes = []
    for fleet in (50, 2_000):
        r.delete(*r.keys(f"{KEYS.base}:evals:*") or ["-"])
        report_fleet(registry, fleet)
        registry.refresh()
        minute = int(time.time() // 60)
        sizes.append(r.hlen(KEYS.evaluations(minute)) + r.hlen(KEYS.evaluations(minute - 1)))
    assert sizes == [len(FLAGS) * 5, len(FLAGS) * 5]


def test_the_blast_radius_and_the_view_cost_the_same_whatever_the_fleet(r: Any) -> None:
    registry = registry_on(r)
    costs, reports = [], 0
    for fleet in (20, 3_000):
        report_fleet(registry, fleet, version=1)
        reports += fleet
        registry.refresh()
        radius = registry.blast_radius(ENV, ["flag-0", "unknown"])
        assert radius["flag-0"]["apps"] == {f"app-{a}": fleet // 5 for a in range(5)}
        assert radius["flag-0"]["evaluations"] == 3 * reports, "3 evaluations a report"
        assert radius["unknown"] == {"evaluations": 0, "apps": {}}
        view = registry.view(ENV, current_version=2).to_dict()
        assert view["summary"] == {"live": fleet, "applied_current": 0, "lagging": fleet, "silent": 0}
        assert len(view["instances"]) <= 2 * SHOWN_INSTANCES
        costs.append(
            (
                commands_of(r, lambda: registry.blast_radius(ENV, ["flag-0"])),
                commands_of(r, lambda: registry.view(ENV, current_version=2)),
            )
        )
    assert costs[0] == costs[1], costs


def test_the_view_lists_lagging_instances_first_and_counts_silent_ones_apart(r: Any) -> None:
    registry = registry_on(r)
    report_fleet(registry, 300, version=2)
    registry.report(ENV, "behind", {"app": "shop", "applied_version": 1}, source="", token_id="t9", flags=())
    registry.report(ENV, "gone", {"app": "shop", "applied_version": 1}, source="", token_id="t9", flags=())
    registry.refresh()
    r.zadd(KEYS.clients_seen, {"gone": time.time() - LIVE_SECONDS - 5})  # went silent
    Scheduler(r).housekeep()

    view = registry.view(ENV, current_version=2).to_dict()

    assert view["summary"] == {"live": 301, "applied_current": 300, "lagging": 1, "silent": 1}
    assert view["instances"][0]["instance"] == "behind" and view["instances"][0]["lag"] == 1


def test_a_goodbye_is_not_undone_by_a_report_another_process_still_holds(r: Any) -> None:
    one, other = registry_on(r), ClientRegistry(r)
    body = {"app": "shop", "applied_version": 1}
    one.report(ENV, "i-1", dict(body), source="", token_id="t1", flags=())
    one.refresh()
    one.report(ENV, "i-1", dict(body), source="", token_id="t1", flags=())  # held in memory...
    assert other.forget(ENV, "i-1", token_id="t1")  # ...when its SDK says goodbye elsewhere
    one.refresh()
    assert not r.hexists(KEYS.clients, "i-1")
    assert registry_view_live(other) == 0


def test_an_older_report_written_last_does_not_take_an_instance_back(r: Any) -> None:
    """Two reports of one instance reach two workers within their write second: the worker
    holding the newer one may write first. The view must not show the instance lagging then."""
    one, other = registry_on(r), ClientRegistry(r)
    for registry, version in ((one, 2), (other, 3)):
        body = {"app": "shop", "applied_version": version, "counts": {"f": 1}}
        registry.report(ENV, "i-1", body, source="", token_id="t1", flags=["f"])
    other.refresh()
    one.refresh()  # the older report, written last

    view = one.view(ENV, current_version=3).to_dict()
    assert view["summary"]["lagging"] == 0 and view["instances"][0]["applied_version"] == 3
    assert counted(r, "f|shop") == 2, "the older report's evaluations still count"


def registry_view_live(registry: ClientRegistry) -> int:
    live: int = registry.view(ENV, current_version=1).summary["live"]
    return live


def test_a_large_second_is_written_in_batches_that_do_not_hold_redis_long(r: Any) -> None:
    registry = registry_on(r)
    report_fleet(registry, 1)
    registry.refresh()  # (the script's first call loads it)
    report_fleet(registry, 2 * WRITE_BATCH + WRITE_BATCH // 2)

    written = commands_of(r, registry.refresh)

    assert written["evalsha"] == 3
    assert r.hlen(KEYS.clients) == 2 * WRITE_BATCH + WRITE_BATCH // 2
    assert counted(r, "flag-0|app-0") == 3 + (2 * WRITE_BATCH + WRITE_BATCH // 2) // 5 * 3


def test_a_version_claimed_ahead_is_checked_once_written_and_only_for_admitted_instances(r: Any) -> None:
    EnvStore(r).create(ENV, actor="test-setup")
    claims: list[tuple[str, int]] = []
    registry = ClientRegistry(r, Limits(per_token=1), on_claim=lambda env, v: claims.append((env, v)))
    ahead = {"app": "shop", "applied_version": 7}

    def report() -> None:
        registry.report(ENV, "i-1", dict(ahead), source="", token_id="t1", flags=(), known_version=5)

    taken = commands_of(r, report)
    assert taken == {}, "the request path never waits on Redis, even for a claim ahead"
    registry.refresh()
    assert claims == [(ENV, 7)]
    beyond_cap = {"app": "shop", "applied_version": 9}
    registry.report(ENV, "i-2", beyond_cap, source="", token_id="t1", flags=(), known_version=5)
    registry.refresh()
    assert claims == [(ENV, 7)], "an instance the cap refused is evidence of nothing"


def test_the_pace_told_to_sdks_stretches_with_the_fleet() -> None:
    base = Limits(interval=30, jitter=1, fleet_rate=1_000)
    assert pace_for(base, 800) == Pace(30, 1), "a fleet within the rate keeps the configured pace"
    assert pace_for(base, 20_000) == Pace(30, 20), "its reports of a change spread over 20 s, not 1"
    assert pace_for(base, 100_000) == Pace(100, 100), "100,000 instances: 1,000 reports a second"
    assert pace_for(base, 100_001) == Pace(101, 101)
    assert pace_for(base, 10**9) == Pace(3600, 600), "within what the SDK accepts"
    assert pace_for(Limits(fleet_rate=0), 10**6) == Pace(30, 1), "0: never stretched"
    assert Pace(100, 100).live_seconds == 300 and Pace(10, 1).live_seconds == LIVE_SECONDS


def test_a_large_fleet_is_told_a_longer_interval_and_stays_live_between_reports(
    r: Any, redis_url: str
) -> None:
    app = create_app({"REDIS_URL": redis_url, "TESTING": True, "FLEET_HEARTBEATS_PER_SECOND": 10})
    EnvStore(r).create(ENV, actor="test-setup")
    try:
        registry = app.extensions["flagsvc"].clients
        report_fleet(registry, 1_000)
        registry.refresh()
        Scheduler(r, clients=registry).housekeep()  # counts 1,000 live instances
        client = app.test_client()
        sdk = {"Authorization": f"Bearer {create_token(r, 'sdk')}"}

        def beat() -> Any:
            return client.post(
                f"/api/v1/envs/{ENV}/clients/i-0", json={"app": "shop", "applied_version": 1}, headers=sdk
            )

        first = beat()
        assert first.status_code == 204, first.get_data(as_text=True)
        assert first.headers["X-Flagsvc-Report-Interval"] == "30", "the pace is learnt at the next write"
        heartbeats_written(app)
        answer = beat()
        assert answer.status_code == 204
        assert (answer.headers["X-Flagsvc-Report-Interval"], answer.headers["X-Flagsvc-Report-Jitter"]) == (
            "100",
            "100",
        ), "1,000 instances at 10 reports a second: every 100 s, and within 100 s of a change"

        r.zadd(KEYS.clients_seen, {"i-1": time.time() - 250})  # on time for a 100 s interval, barely
        Scheduler(r, clients=registry).housekeep()
        summary = registry.view(ENV, current_version=1).to_dict()["summary"]
        assert summary["live"] == 1_000 and summary["silent"] == 0, summary
    finally:
        app.extensions["flagsvc"].close()
