"""FlagClient end to end: a real server over HTTP, a real Redis, outages, cache, fork, threads."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import pytest
import requests

from flagsvc_client import ErrorCode, FlagClient, Reason
from flagsvc_client import _sse as sse
from flagsvc_client._snapshot import Snapshot

from .helpers import FLAGS_URL, TIMEOUT_FLAG, wait_for

POLL = 0.2


@pytest.fixture
def rest(server, auth):
    """Small REST helper against the running server."""

    class Rest:
        def put(self, key, body):
            resp = requests.put(f"{server.url}{FLAGS_URL}/{key}", json=body, headers=auth("admin"), timeout=5)
            assert resp.status_code in (200, 201), resp.text
            return resp.json()

        def kill(self, key, reason="test"):
            resp = requests.post(
                f"{server.url}{FLAGS_URL}/{key}/kill",
                json={"reason": reason},
                headers=auth("operator"),
                timeout=5,
            )
            assert resp.status_code == 200, resp.text

        def restore(self, key, reason="test"):
            resp = requests.post(
                f"{server.url}{FLAGS_URL}/{key}/restore",
                json={"reason": reason},
                headers=auth("operator"),
                timeout=5,
            )
            assert resp.status_code == 200, resp.text

    return Rest()


@pytest.fixture
def sdk_token(tokens):
    return tokens["sdk"]


@pytest.fixture
def make_client(server, sdk_token):
    clients = []

    def make(**kwargs):
        kwargs.setdefault("poll_interval", POLL)
        kwargs.setdefault("mode", "poll")  # streaming is tested against gunicorn in test_streaming.py
        kwargs.setdefault("init_timeout", 2)
        client = FlagClient(
            kwargs.pop("url", server.url), kwargs.pop("token", sdk_token), "production", **kwargs
        )
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def test_kill_through_rest_is_seen_within_one_poll_interval(rest, make_client):
    rest.put("checkout.recs", {"kind": "kill_switch", "enabled": True})
    client = make_client()
    assert client.is_enabled("checkout.recs") is True
    assert client.status().source == "server" and not client.status().stale
    rest.kill("checkout.recs")
    elapsed = wait_for(lambda: not client.is_enabled("checkout.recs"))
    assert elapsed <= POLL + 0.3  # one interval, plus the request itself on a busy machine
    details = client.evaluate("checkout.recs")
    assert (details.value, details.variant, details.reason) == (False, "off", Reason.DISABLED)


def test_outage_keeps_last_values_then_recovers(server, rest, make_client, caplog):
    rest.put("search.v2", {"kind": "release", "enabled": True})
    client = make_client()
    version = client.version
    server.stop()
    wait_for(lambda: client.status().stale, timeout=3)
    status = client.status()
    assert status.last_error and "cannot reach" in status.last_error
    assert client.is_enabled("search.v2") is True and client.version == version
    time.sleep(3 * POLL)
    warnings = [r for r in caplog.records if r.name == "flagsvc_client" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, "an outage is logged once, not once per poll"

    server.start()
    rest.kill("search.v2")
    wait_for(lambda: not client.is_enabled("search.v2"), timeout=10)
    assert not client.status().stale and client.status().last_error is None


def test_cold_start_without_service_uses_the_cache(server, rest, make_client, tmp_path):
    cache = str(tmp_path / "flags.json")
    rest.put("exports", {"kind": "kill_switch", "enabled": True})
    rest.kill("exports")
    warm = make_client(cache_path=cache)
    assert warm.is_enabled("exports") is False
    warm.close()
    assert (
        json.loads((tmp_path / "flags.json").read_text())["snapshot"]["flags"]["exports"]["enabled"] is False
    )
    server.stop()

    start = time.monotonic()
    cold = make_client(cache_path=cache, defaults={"exports": True}, init_timeout=3)
    assert time.monotonic() - start < 3
    assert cold.is_enabled("exports") is False, "the cached kill wins over the hard-coded default"
    assert cold.status().source == "cache" and cold.status().stale
    assert cold.status().ready, "a snapshot of flagsvc's serves, if an old one"


def test_ready_means_the_same_whether_the_service_refuses_or_hangs(make_client):
    """``status().ready``: a snapshot of flagsvc's serves, not the code's defaults, however the
    service failed: a refused connection fails at once, a hung one only after the timeout."""
    with socket.socket() as hung, socket.socket() as closed:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # accepts connections (the backlog), never answers
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        for port in (closed.getsockname()[1], hung.getsockname()[1]):
            client = make_client(url=f"http://127.0.0.1:{port}", init_timeout=0.5, defaults={"x": True})
            status = client.status()
            assert (status.ready, status.source, client.is_enabled("x")) == (False, "defaults", True), port


def test_corrupt_or_foreign_cache_falls_back_to_defaults(server, make_client, tmp_path, caplog):
    server.stop()
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "flagsvc-snapshot/1", "snapshot": {"env": "prod')
    client = make_client(cache_path=str(corrupt), defaults={"exports": True}, init_timeout=1)
    assert client.is_enabled("exports") is True and client.status().source == "defaults"
    assert any("ignoring" in r.getMessage() for r in caplog.records)

    foreign = tmp_path / "foreign.json"
    foreign.write_text(
        json.dumps(
            {
                "format": "flagsvc-snapshot/1",
                "snapshot": {"env": "staging", "version": 3, "flags": {"exports": {"enabled": False}}},
            }
        )
    )
    other = make_client(cache_path=str(foreign), defaults={"exports": True}, init_timeout=1)
    assert other.is_enabled("exports") is True


def test_bad_token_stops_polling_without_hanging(make_client):
    start = time.monotonic()
    client = make_client(token="fsk_000000000000_nope", init_timeout=5, defaults={"a": True})
    assert time.monotonic() - start < 2, "a refused token does not make start-up wait"
    status = client.status()
    assert status.fatal and "401" in status.last_error
    assert client.is_enabled("a") is True


def test_start_up_waits_at_most_init_timeout_on_a_silent_server(make_client):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts TCP, never answers HTTP
    try:
        start = time.monotonic()
        client = make_client(url=f"http://127.0.0.1:{silent.getsockname()[1]}", init_timeout=0.5)
        assert time.monotonic() - start < 1.5
        assert client.is_enabled("anything", default=True) is True
    finally:
        silent.close()


@pytest.mark.parametrize("mode", ["poll", "stream"])
def test_forked_child_sees_later_changes(rest, make_client, mode):
    rest.put("child.flag", {"kind": "kill_switch", "enabled": True})
    client = make_client(mode=mode)
    assert client.is_enabled("child.flag")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its own poller must pick up the parent's kill
        os.close(read_end)
        ok = False
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if not client.is_enabled("child.flag"):
                    ok = True
                    break
                time.sleep(0.02)
        finally:
            os.write(write_end, b"1" if ok else b"0")
            os._exit(0)
    os.close(write_end)
    time.sleep(0.3)
    rest.kill("child.flag")
    result = os.read(read_end, 1)
    os.waitpid(pid, 0)
    os.close(read_end)
    assert result == b"1", "the forked child never saw the kill"


@pytest.mark.slow  # 8 threads race 2,000 swaps
def test_readers_only_see_published_snapshots(make_client):
    """8 threads evaluate while snapshots are swapped: never an exception, never a mix."""
    client = make_client(url="http://127.0.0.1:9", init_timeout=0.1)
    client.close()  # drive snapshots by hand, no poller

    def snapshot(n: int) -> Snapshot:
        flags = {
            f"f{i}": {
                "kind": "ops",
                "type": "number",
                "enabled": True,
                "variants": {"v": n},
                "default_variant": "v",
                "off_variant": "v",
            }
            for i in range(20)
        }
        return Snapshot.from_wire({"env": "production", "version": n, "flags": flags}, source="server")

    client._apply(snapshot(1))
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                values = set(client.all_values().values())
                if len(values) != 1:
                    problems.append(f"mixed snapshot: {values}")
                if client.get_number("f3") not in range(1, 10_000):
                    problems.append("value from no snapshot")
            except Exception as exc:  # noqa: BLE001 - the test records any exception
                problems.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for n in range(2, 2000):
        client._apply(snapshot(n))
    stop.set()
    for t in threads:
        t.join()
    assert problems == []


def test_typed_getters_listeners_and_kill_switch_decorator(rest, make_client):
    rest.put(
        "payments.timeout-ms",
        TIMEOUT_FLAG,
    )
    rest.put("recs", {"kind": "kill_switch", "enabled": True})
    client = make_client()
    assert client.get_number("payments.timeout-ms", default=1000) == 3000
    mismatch = client.evaluate("payments.timeout-ms", default=1)
    assert mismatch.value == 3000
    assert client.get_string("payments.timeout-ms", default="x") == "x"
    assert client.get_boolean("missing", default=True) is True

    typed = client.evaluate("payments.timeout-ms", expected_type="number")
    assert (typed.value, typed.variant, typed.reason, typed.error_code) == (3000, "normal", "STATIC", None)
    wrong = client.evaluate("payments.timeout-ms", {}, "x", expected_type="string")
    assert (wrong.value, wrong.variant, wrong.reason) == ("x", None, Reason.ERROR)
    assert wrong.error_code == ErrorCode.TYPE_MISMATCH and wrong.flag_version == typed.flag_version
    assert client.evaluate("missing", expected_type="boolean").value is False
    assert client.evaluate("missing").value is None
    unknown = client.evaluate("payments.timeout-ms", expected_type="integer")  # not a flag type
    assert (unknown.value, unknown.error_code) == (None, ErrorCode.GENERAL)

    changes = []
    client.on_change(lambda change: 1 / 0)  # a broken listener cannot stop the others
    client.on_change(changes.append)

    @client.kill_switch("recs", fallback=lambda user: [])
    def recommendations(user):
        return ["a", "b"]

    assert recommendations("u1") == ["a", "b"]
    rest.kill("recs")
    wait_for(lambda: recommendations("u1") == [])
    wait_for(lambda: changes and "recs" in changes[-1].changed_keys)  # listeners run just after the swap
    rest.kill("payments.timeout-ms")
    wait_for(lambda: client.get_number("payments.timeout-ms") == 800)


def test_close_is_idempotent_and_stops_the_thread(make_client):
    client = make_client()
    with client:
        assert client._source.thread.is_alive()
    assert not client._source.thread.is_alive()
    client.close()
    assert client.status().closed
    assert client.is_enabled("x", default=True) is True


def updater_alive() -> bool:
    """Whether a client's updater thread (the stream or poll loop) is running."""
    return any(t.name == "flagsvc-poller-production" and t.is_alive() for t in threading.enumerate())


def test_unexpected_stream_error_ends_start_up_and_updates_go_on(make_client):
    """A token that HTTP headers cannot carry makes every request raise ``UnicodeEncodeError``,
    which is no requests error: start-up still ends at once, and the thread keeps retrying."""
    start = time.monotonic()
    client = make_client(mode="stream", token="fsk_000000000000_\u20ac", init_timeout=5)
    assert time.monotonic() - start < 2, "an unexpected stream error does not make start-up wait"
    status = client.status()
    assert not status.ready and status.stale and not status.fatal and status.source == "defaults"
    assert "UnicodeEncodeError" in status.last_error
    time.sleep(5 * POLL)  # the fallback polls meet the same error
    assert updater_alive(), "an unexpected error in a fallback poll does not end the updates"


def test_close_returns_at_once_while_the_stream_is_open(server, rest, make_client):
    rest.put("recs", {"kind": "kill_switch", "enabled": True})
    client = make_client(mode="stream", poll_interval=60)
    assert client.is_enabled("recs")
    rest.kill("recs")
    wait_for(lambda: not client.is_enabled("recs"), timeout=3)  # only the stream is this fast
    start = time.monotonic()
    client.close()  # the thread is blocked reading the stream until the next heartbeat (15 s)
    assert time.monotonic() - start < 1.5
    assert not updater_alive()


class StreamServer:
    """A raw HTTP server for the SDK's event stream: each stream request is answered by
    :meth:`_stream`, anything else (a fallback poll) with a 503."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            path = head.split(b"\r\n", 1)[0].split(b" ")[1]
            if not (path.split(b"?")[0].endswith(b"/stream") and self._stream(conn)):
                conn.sendall(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass

    def _stream(self, conn: socket.socket) -> bool:
        """Answer a stream request; ``False`` to answer it 503 instead."""
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class SlowStreamServer(StreamServer):
    """Answers the event stream's request after ``delay`` seconds with headers and no event."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        super().__init__()

    def _stream(self, conn: socket.socket) -> bool:
        time.sleep(self.delay)
        conn.sendall(STREAM_HEAD)
        return True


def test_close_while_the_stream_opens_returns_once_it_answers(make_client):
    slow = SlowStreamServer(delay=1.0)
    try:
        client = make_client(url=slow.url, mode="stream", init_timeout=0.2)
        start = time.monotonic()
        client.close()  # the stream's request is under way: its answer must not be read
        assert time.monotonic() - start < 2.5
        assert not updater_alive()
    finally:
        slow.close()


def test_event_stream_lines_are_the_same_however_the_bytes_arrive():
    """CRLF, LF and CR end lines, a CRLF split between two reads included."""
    body = b"event: snapshot\r\ndata: {}\r\n\r\n: heartbeat\n\nid: 3\rdata: x\r\r"
    expected = [b"event: snapshot", b"data: {}", b"", b": heartbeat", b"", b"id: 3", b"data: x", b""]
    for size in range(1, len(body) + 1):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert list(sse.lines(chunks)) == expected, size


@pytest.mark.parametrize("mode", ["poll", "stream"])
def test_a_refused_token_is_one_error_with_the_servers_detail(server, mode, caplog):
    """A wrong token is the operator's to fix: logged at ERROR once, with what the service said,
    and shown in status(); updates stop (retrying cannot help)."""
    refused = requests.get(
        f"{server.url}{FLAGS_URL.removesuffix('/flags')}/snapshot",
        headers={"Authorization": "Bearer fsk_000000000000_wrong"},
        timeout=5,
    )
    detail = refused.json()["detail"]
    with caplog.at_level("INFO", logger="flagsvc_client"):
        client = FlagClient(server.url, "fsk_000000000000_wrong", "production", mode=mode, init_timeout=2)
        try:
            status = client.status()
            assert status.fatal and not status.ready
            assert "401" in status.last_error and detail in status.last_error
            time.sleep(0.5)  # a while of not retrying: no second error
        finally:
            client.close()
    errors = [r for r in caplog.records if r.name == "flagsvc_client" and r.levelname == "ERROR"]
    assert len(errors) == 1 and detail in errors[0].getMessage()


def test_a_patch_applies_only_to_the_snapshot_it_names_as_its_base() -> None:
    held = Snapshot.from_wire(
        {
            "env": "production",
            "version": 4,
            "history": "ab12",
            "flags": {"a": {"enabled": True}, "b": {"enabled": True}},
        },
        source="server",
    )
    patch = {
        "env": "production",
        "version": 5,
        "history": "ab12",
        "base": "4-ab12",
        "flags": {"a": {"enabled": False}, "c": {"enabled": True}},
        "removed": ["b"],
    }
    patched = held.patched(patch)
    assert (patched.identity, patched.source) == ("5-ab12", "server")
    assert patched.raw["flags"] == {"a": {"enabled": False}, "c": {"enabled": True}}
    assert held.raw["flags"]["a"] == {"enabled": True}, "the snapshot held is not changed"
    for wrong in ({**patch, "base": "3-ab12"}, {**patch, "env": "staging"}, {**patch, "removed": "b"}, []):
        with pytest.raises(ValueError):
            held.patched(wrong)  # type: ignore[arg-type]


class ScriptedStreamServer(StreamServer):
    """Serves the event stream from a script: the events of each stream request in turn, after
    which the stream stays open (``hold``) or is cut without a ``shutdown`` event. A stream request
    beyond the script is a 503."""

    def __init__(self, streams: list[list[tuple[str, dict]]], *, hold: bool = True) -> None:
        self.streams = streams
        self.hold = hold
        self.opened: list[float] = []  # when each stream request arrived
        super().__init__()

    def _stream(self, conn: socket.socket) -> bool:
        if len(self.opened) >= len(self.streams):
            return False
        self.opened.append(time.monotonic())
        events = self.streams[len(self.opened) - 1]
        body = b"".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode() for kind, data in events)
        conn.sendall(STREAM_HEAD + b"%x\r\n%s\r\n" % (len(body), body))
        if not self.hold:
            conn.shutdown(socket.SHUT_RDWR)
        return True


def snapshot_event(version: int, flags: dict) -> tuple[str, dict]:
    return "snapshot", {"env": "production", "version": version, "history": "h", "flags": flags}


def patch_event(version: int, base: str, flags: dict) -> tuple[str, dict]:
    document = {"env": "production", "version": version, "history": "h", "base": base}
    return "patch", {**document, "flags": flags, "removed": []}


def test_a_patch_to_a_version_held_is_ignored_and_one_of_another_snapshot_reopens_the_stream(
    make_client, caplog
):
    """Neither is a failure: behind a load balancer the stream's worker can lag behind the one,
    or the poll, that brought the version held, and a new stream starts from a whole snapshot."""
    off, on = {"enabled": False}, {"enabled": True}
    script = ScriptedStreamServer(
        [
            [
                snapshot_event(5, {"a": on}),
                patch_event(6, "5-h", {"a": off}),  # applied
                patch_event(6, "4-h", {"a": on}),  # to the version held, from another: ignored
                patch_event(8, "7-h", {"a": on}),  # newer, of a snapshot not held: a new stream
            ],
            [snapshot_event(8, {"a": off, "b": on})],
        ]
    )
    try:
        with caplog.at_level("INFO", logger="flagsvc_client"):
            client = make_client(url=script.url, mode="stream", poll_interval=5)
            wait_for(lambda: client.status().version == 8, timeout=5)
            status = client.status()
        assert (client.is_enabled("a"), client.is_enabled("b")) == (False, True)
        assert len(script.opened) == 2
        assert status.last_error is None and not status.stale
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        script.close()


def test_a_stream_that_breaks_after_serving_reconnects_as_after_a_first_failure(make_client):
    """A stream that delivered events and then broke counts as the first failure of a series:
    backoff grew with every break of a healthy stream, and after a few the SDK waited 10 to 20 s
    (polling every 5 s) before it streamed kills again."""
    script = ScriptedStreamServer(
        [[snapshot_event(v, {"a": {"enabled": True}})] for v in range(1, 7)], hold=False
    )
    try:
        client = make_client(url=script.url, mode="stream", poll_interval=5)
        wait_for(
            lambda: len(script.opened) == 6, timeout=10, what="six streams, each broken after its snapshot"
        )
        gaps = [later - earlier for earlier, later in zip(script.opened, script.opened[1:], strict=False)]
        assert max(gaps) < 2.5, gaps  # the first failure's pause is 0.5 to 1 s; the fifth's 4 to 8 s
        wait_for(lambda: client.status().version == 6, timeout=5, what="the sixth stream's snapshot")
    finally:
        script.close()
