"""The change fan-out costs the same whatever the environment or the number of tokens: every commit
stores the serialized snapshot, a worker reloads it with one GET, and an idle worker follows token
changes in the system log instead of reading every token each second."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flagsvc.envs import EnvStore
from flagsvc.flags import FlagStore, Mutation, switch
from flagsvc.history import HistoryGuard
from flagsvc.keys import EnvKeys, SystemKeys
from flagsvc.snapshots import SnapshotCache
from flagsvc.tokens import Role, TokenStore
from flagsvc.writes import WriteContext

from .helpers import ENV

KEYS = EnvKeys(ENV)
CTX = WriteContext(actor="test", reason="fan-out test")


def commands_of(r: Any, action: Callable[[], object]) -> dict[str, int]:
    """The Redis commands ``action`` sent (INFO commandstats; the test Redis has no other client)."""

    def counts() -> dict[str, int]:
        stats = r.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}

    before = counts()
    action()
    after = counts()
    delta = {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}
    delta.pop("info", None)
    return delta


def put(flags: FlagStore, key: str, definition: dict[str, Any]) -> int:
    create = Mutation("flag.create", {"enabled": True, **definition})
    return flags.write(ENV, key, lambda _: create, CTX).result.env_version


def archive(flags: FlagStore, key: str) -> None:
    flags.write(ENV, key, lambda _: Mutation("flag.delete", {"kind": "release", "enabled": True}, True), CTX)


def kill(flags: FlagStore, key: str) -> int:
    return flags.write(ENV, key, switch(ENV, key, "flag.kill", False), CTX).result.env_version


@pytest.fixture
def flags(r: Any) -> Iterator[FlagStore]:
    EnvStore(r).create(ENV, actor="test-setup")
    yield FlagStore(r)


def stored_snapshot(r: Any) -> dict[str, Any]:
    snapshot: dict[str, Any] = json.loads(r.get(KEYS.snapshot))
    return snapshot


def test_every_commit_stores_the_snapshot_sdks_read(r: Any, flags: FlagStore) -> None:
    put(flags, "zeta.release", {"kind": "release"})
    put(flags, "old.feature", {"kind": "release"})
    put(flags, "alpha.release", {"kind": "release", "description": "not in the snapshot"})
    version = put(flags, "payments.kill", {"kind": "kill_switch"})
    archive(flags, "old.feature")
    version = kill(flags, "payments.kill")

    stored = stored_snapshot(r)
    r.delete(KEYS.snapshot, KEYS.snapshot_flags)  # what an older release left: read from the flags
    rebuilt = flags.rebuild_snapshot(ENV)
    assert stored == rebuilt.to_dict()
    assert stored["version"] == version and stored["history"] == rebuilt.history != "0" * 12
    assert list(stored["flags"]) == ["payments.kill", "alpha.release", "zeta.release"], "kill switches first"
    assert stored["flags"]["payments.kill"]["enabled"] is False
    assert "description" not in stored["flags"]["alpha.release"]


def test_a_worker_reloads_a_changed_environment_with_one_get(r: Any, flags: FlagStore) -> None:
    for i in range(300):
        put(flags, f"feature.{i:03}", {"kind": "release"})
    put(flags, "payments.kill", {"kind": "kill_switch"})
    cache = SnapshotCache(r, flags)
    assert cache.get(ENV).flags["payments.kill"]["enabled"] is True
    version = kill(flags, "payments.kill")

    reload = commands_of(r, lambda: cache.on_change(ENV, {"env": ENV, "version": version}))

    assert reload == {"get": 1}, "one GET, whatever the number of flags"
    published = cache.get(ENV)
    assert published.version == version and published.flags["payments.kill"]["enabled"] is False
    assert len(published.flags) == 301


def test_a_read_from_before_a_commit_does_not_take_the_process_back_a_version(
    r: Any, flags: FlagStore
) -> None:
    """The change listener's loads and a request's (after a write of this process) interleave at
    their Redis round trips under gevent. A load that read the snapshot before a commit and
    published after a newer one took the process back a version, and the history guard took
    that for Redis losing acknowledged changes: an ERROR, /readyz, and a version committed."""
    put(flags, "payments.kill", {"kind": "kill_switch"})
    guard = HistoryGuard(r)
    cache = SnapshotCache(r, flags, observe=guard.observe)
    before = cache.get(ENV).version
    read, resume = threading.Event(), threading.Event()
    real_read = flags.serialized_snapshot

    def read_then_wait(env: str) -> Any:
        body = real_read(env)
        if not read.is_set():  # the first load has its answer, and waits for its turn to run
            read.set()
            resume.wait(10)
        return body

    flags.serialized_snapshot = read_then_wait  # type: ignore[method-assign]
    first = threading.Thread(target=cache.on_change, args=(ENV, {"env": ENV}))
    first.start()
    assert read.wait(10)
    version = kill(flags, "payments.kill")
    second = threading.Thread(target=cache.refresh)  # the commit's notice
    second.start()
    second.join(0.5)  # it waits for the first load, or (before) took the new version
    resume.set()
    first.join(10)
    second.join(10)

    assert cache.get(ENV).version == version > before
    assert guard.rollbacks() == {}
    assert int(r.get(KEYS.version)) == version, "no version committed past a rollback that did not happen"


def test_flags_from_before_stored_snapshots_are_rebuilt_once_then_committed_whole(
    r: Any, flags: FlagStore
) -> None:
    put(flags, "a", {"kind": "release"})
    put(flags, "b", {"kind": "kill_switch"})
    r.delete(KEYS.snapshot, KEYS.snapshot_flags)  # written by a release that did not store snapshots
    cache = SnapshotCache(r, flags)
    assert set(cache.get(ENV).flags) == {"a", "b"}
    assert set(stored_snapshot(r)["flags"]) == {"a", "b"}, "the first reader stored it"
    version = kill(flags, "a")
    assert stored_snapshot(r)["version"] == version
    assert set(stored_snapshot(r)["flags"]) == {"a", "b"}, "the next commit builds it whole"


def test_a_commit_over_partial_members_leaves_no_snapshot_rather_than_a_wrong_one(
    r: Any, flags: FlagStore
) -> None:
    put(flags, "a", {"kind": "release"})
    put(flags, "b", {"kind": "release"})
    r.delete(KEYS.snapshot_flags)  # members of some flags only
    kill(flags, "a")
    assert r.get(KEYS.snapshot) is None
    cache = SnapshotCache(r, flags)
    assert set(cache.get(ENV).flags) == {"a", "b"} and cache.get(ENV).flags["a"]["enabled"] is False


def make_tokens(r: Any, n: int) -> list[str]:
    store = TokenStore(r)
    return [store.create(name=f"app-{i}", role=Role.SDK, envs=[ENV], actor="t")[1] for i in range(n)]


@pytest.mark.parametrize("n", [3, 300])
def test_an_idle_token_refresh_reads_no_token(r: Any, n: int) -> None:
    secrets = make_tokens(r, n)
    store = TokenStore(r)
    store.refresh()  # the first refresh reads every token
    assert store.authenticate(secrets[-1], may_wait=False) is not None

    assert commands_of(r, store.refresh) == {"time": 1, "xrevrange": 1}


def test_a_revocation_is_followed_from_the_system_log_without_its_notice(r: Any) -> None:
    secrets = make_tokens(r, 50)
    worker = TokenStore(r)  # no change listener: it never hears the revocation's notice
    worker.refresh()
    TokenStore(r).revoke("app-7", actor="t")

    followed = commands_of(r, worker.refresh)

    assert followed == {"time": 1, "xrevrange": 1, "xrange": 1, "hmget": 1}, "only the revoked token is read"
    assert worker.authenticate(secrets[7], may_wait=False) is None
    assert worker.authenticate(secrets[8], may_wait=False) is not None


def test_changes_the_log_no_longer_shows_are_healed_by_reading_every_token(r: Any) -> None:
    secrets = make_tokens(r, 5)
    worker = TokenStore(r)
    worker.refresh()
    TokenStore(r).revoke("app-2", actor="t")
    TokenStore(r).revoke("app-3", actor="t")
    log = SystemKeys().audit
    r.xdel(log, r.xrevrange(log, count=2)[1][0])  # the first revocation's entry is gone (trimmed)

    healed = commands_of(r, worker.refresh)

    assert healed.get("hgetall") == 1
    assert worker.authenticate(secrets[2], may_wait=False) is None
    assert worker.authenticate(secrets[3], may_wait=False) is None
