"""Open event streams sleep until something concerns them: a new version of their environment, a
client that hung up, a token that no longer passes, the process shutting down. Nothing wakes an
idle stream every second, so thousands of them cost no CPU between heartbeats."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flagsvc import streaming
from flagsvc.envs import EnvStore
from flagsvc.flags import FlagStore, Mutation, definition_of, switch
from flagsvc.snapshots import SnapshotCache
from flagsvc.streaming import REVOKED_EVENT, SHUTDOWN_EVENT, OpenStreams, Stream, events
from flagsvc.writes import WriteContext

from .helpers import ENV

OTHER_ENV = "staging"
CTX = WriteContext(actor="test", reason="stream test")
SWEEP = 0.2


class Reader:
    """One stream's events, read by a thread into a queue, as a server's greenlet would send them."""

    def __init__(self, cache: SnapshotCache, stream: Stream, *, patches: bool = False) -> None:
        self.stream = stream
        self.received: queue.Queue[bytes | None] = queue.Queue()
        first = cache.get(stream.env)
        body = events(cache, stream, first, None, patches=patches)
        self._thread = threading.Thread(target=self._read, args=(body,))
        self._thread.start()

    def _read(self, body: Iterator[bytes]) -> None:
        for event in body:
            self.received.put(event)
        self.received.put(None)  # the stream ended

    def next(self, timeout: float = 3.0) -> bytes | None:
        return self.received.get(timeout=timeout)

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.received.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def join(self) -> None:
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the stream did not end"


@pytest.fixture
def flags(r: Any) -> FlagStore:
    for env in (ENV, OTHER_ENV):
        EnvStore(r).create(env, actor="test-setup")
    store = FlagStore(r)
    for env in (ENV, OTHER_ENV):
        store.write(
            env,
            "payments.kill",
            lambda _: Mutation("flag.create", {"kind": "kill_switch", "enabled": True}),
            CTX,
        )
    return store


@pytest.fixture
def streams() -> OpenStreams:
    return OpenStreams(per_token=50, sweep_seconds=SWEEP)


@pytest.fixture
def cache(r: Any, flags: FlagStore, streams: OpenStreams) -> SnapshotCache:
    return SnapshotCache(r, flags, on_publish=streams.publish)


@pytest.fixture
def readers() -> Iterator[list[Reader]]:
    """Every reader a test starts ends with the test, as on a worker's shutdown (and none starts
    in the shutdown a stopped test server leaves behind)."""
    streaming.allow_streams()
    started: list[Reader] = []
    yield started
    streaming.end_streams()
    try:
        for reader in started:
            reader.join()
    finally:
        streaming.allow_streams()


def counting(verdict: Callable[[], bool]) -> tuple[Callable[[], bool], list[int]]:
    calls = [0]

    def check() -> bool:
        calls[0] += 1
        return verdict()

    return check, calls


def kill(flags: FlagStore, cache: SnapshotCache, env: str) -> None:
    flags.write(env, "payments.kill", switch(env, "payments.kill", "flag.kill", False), CTX)
    cache.refresh()  # what the change listener does on the commit's notice


def test_idle_streams_sleep_until_their_environment_changes(
    flags: FlagStore, cache: SnapshotCache, streams: OpenStreams, readers: list[Reader]
) -> None:
    check, calls = counting(lambda: True)
    for _ in range(20):
        stream = streams.open(ENV, "tok-a", None, check)
        assert stream is not None
        readers.append(Reader(cache, stream))
    other = streams.open(OTHER_ENV, "tok-a", None, check)
    assert other is not None
    readers.append(Reader(cache, other))
    for reader in readers:
        assert reader.next().startswith(b"retry:")
        assert b"event: snapshot" in (reader.next() or b"")

    time.sleep(5 * SWEEP)
    assert all(reader.nothing_within(0.01) for reader in readers), "an idle stream sent nothing"
    assert 1 <= calls[0] <= 7, f"the token was checked once per sweep, not once per stream: {calls[0]}"

    kill(flags, cache, ENV)
    delivered = [reader.next() for reader in readers[:20]]
    assert all(event is not None and b'"enabled":false' in event for event in delivered)
    assert all(event is delivered[0] for event in delivered), "the event's bytes are built once per version"
    assert readers[20].nothing_within(2 * SWEEP), (
        "a change elsewhere does not reach this environment's streams"
    )


def test_the_sweep_ends_streams_whose_client_hung_up_or_whose_token_was_revoked(
    cache: SnapshotCache, streams: OpenStreams, readers: list[Reader]
) -> None:
    server_end, client_end = socket.socketpair()
    revoked = threading.Event()
    try:
        hanging = streams.open(ENV, "tok-a", server_end, lambda: True)
        revocable = streams.open(ENV, "tok-b", None, lambda: not revoked.is_set())
        assert hanging is not None and revocable is not None
        readers.extend([Reader(cache, hanging), Reader(cache, revocable)])
        for reader in readers:
            reader.next(), reader.next()  # retry, snapshot

        assert all(reader.nothing_within(3 * SWEEP) for reader in readers), "an open client stays served"
        client_end.close()
        revoked.set()
        assert readers[0].next() is None, "a stream whose client hung up ends without writing"
        assert readers[1].next() == REVOKED_EVENT and readers[1].next() is None
    finally:
        server_end.close()
        client_end.close()
    for reader in readers:
        reader.join()


def test_the_per_token_limit_counts_open_streams_and_frees_closed_ones() -> None:
    small = OpenStreams(per_token=2, sweep_seconds=SWEEP)
    first, second = small.open(ENV, "tok-a", None, lambda: True), small.open(ENV, "tok-a", None, lambda: True)
    assert first is not None and second is not None
    assert small.open(OTHER_ENV, "tok-a", None, lambda: True) is None, (
        "the limit is per token, across environments"
    )
    assert small.open(ENV, "tok-b", None, lambda: True) is not None
    small.close(first)
    small.close(first)  # a second close frees nothing more
    assert small.open(ENV, "tok-a", None, lambda: True) is not None
    assert small.open(ENV, "tok-a", None, lambda: True) is None


def test_every_stream_ends_with_a_shutdown_event_within_a_sweep(
    cache: SnapshotCache, streams: OpenStreams, readers: list[Reader]
) -> None:
    for env in (ENV, OTHER_ENV):
        stream = streams.open(env, "tok-a", None, lambda: True)
        assert stream is not None
        readers.append(Reader(cache, stream))
    for reader in readers:
        reader.next(), reader.next()
    streaming.end_streams()
    try:
        start = time.monotonic()
        for reader in readers:
            assert reader.next() == SHUTDOWN_EVENT and reader.next() is None
        assert time.monotonic() - start < 1 + 2 * SWEEP
    finally:
        streaming.allow_streams()


def test_an_idle_stream_gets_its_heartbeat_from_the_sweep(
    cache: SnapshotCache, streams: OpenStreams, readers: list[Reader], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "HEARTBEAT_SECONDS", 4 * SWEEP)
    stream = streams.open(ENV, "tok-a", None, lambda: True)
    assert stream is not None
    readers.append(Reader(cache, stream))
    readers[0].next(), readers[0].next()
    start = time.monotonic()
    assert readers[0].next() == b": heartbeat\n\n"
    assert readers[0].next() == b": heartbeat\n\n"
    assert 2 * 4 * SWEEP <= time.monotonic() - start < 2 * 4 * SWEEP + 2.0, "one heartbeat per quiet period"


def event_fields(event: bytes | None) -> tuple[str, str, Any]:
    """An event's ``id``, ``event`` and parsed ``data``."""
    assert event is not None
    fields = dict(line.split(": ", 1) for line in event.decode().strip().split("\n"))
    return fields["id"], fields["event"], json.loads(fields["data"])


def test_a_stream_asking_for_patches_gets_one_only_from_the_version_it_holds(
    r: Any, flags: FlagStore, streams: OpenStreams, readers: list[Reader]
) -> None:
    cache = SnapshotCache(r, flags)  # new versions reach the stream when the test publishes them
    stream = streams.open(ENV, "tok-a", None, lambda: True)
    assert stream is not None
    readers.append(reader := Reader(cache, stream, patches=True))
    assert reader.next().startswith(b"retry:")
    held, kind, _ = event_fields(reader.next())
    assert kind == "snapshot"

    kill(flags, cache, ENV)
    streams.publish(ENV)
    _, kind, _ = event_fields(reader.next())
    assert kind == "snapshot", "one flag: a patch would not be smaller than the snapshot"

    for i in range(10):
        flags.write(
            ENV,
            f"other.{i}",
            lambda _: Mutation("flag.create", {"kind": "kill_switch", "enabled": True}),
            CTX,
        )
    cache.refresh()  # ten commits, one version loaded: a patch from the one before, ten flags added
    streams.publish(ENV)
    held, kind, patch = event_fields(reader.next())
    assert kind == "patch" and sorted(patch["flags"]) == [f"other.{i}" for i in range(10)]

    flags.write(ENV, "payments.kill", switch(ENV, "payments.kill", "flag.restore", True), CTX)
    cache.refresh()
    streams.publish(ENV)
    identity, kind, patch = event_fields(reader.next())
    assert kind == "patch" and identity == cache.get(ENV).identity
    assert patch["base"] == held and f"{patch['version']}-{patch['history']}" == identity
    assert list(patch["flags"]) == ["payments.kill"] and patch["flags"]["payments.kill"]["enabled"] is True
    assert patch["removed"] == []

    delete(flags, "other.1")
    cache.refresh()
    streams.publish(ENV)
    _, kind, patch = event_fields(reader.next())
    assert kind == "patch" and patch["flags"] == {} and patch["removed"] == ["other.1"]

    kill(flags, cache, ENV)  # two versions while the stream sleeps: it holds neither's base
    delete(flags, "other.0")
    cache.refresh()
    streams.publish(ENV)
    identity, kind, snapshot = event_fields(reader.next())
    assert kind == "snapshot" and identity == cache.get(ENV).identity
    assert "other.0" not in snapshot["flags"] and snapshot["flags"]["payments.kill"]["enabled"] is False


def delete(flags: FlagStore, key: str) -> None:
    flags.write(ENV, key, lambda current: Mutation("flag.delete", definition_of(current), archived=True), CTX)
