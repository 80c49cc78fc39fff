"""Webhooks: subscriptions, Standard Webhooks signatures verified by the `standardwebhooks`
package, delivery at least once and in order from the audit stream, retries, a dead receiver that
delays no one, a deliverer killed mid-batch, SSRF refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from flagsvc.audit import AuditLog
from flagsvc.keys import EnvKeys
from flagsvc.webhooks import Deliverer

from .helpers import ENV_URL, FLAGS_URL, wait_for
from .processes import stop_tree

HOOKS = f"{ENV_URL}/webhooks"


class Receiver:
    """A real HTTP receiver on loopback: records each request; can fail or hang on purpose."""

    def __init__(self, *, fail_first: int = 0, hang: bool = False, delay: float = 0.0) -> None:
        self.received: list[dict[str, Any]] = []
        self.answered: list[int] = []
        self.fail_first, self.hang, self.delay = fail_first, hang, delay
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"headers": dict(self.headers.items()), "body": body.decode()})
                if receiver.hang:
                    receiver._release.wait(30)
                    return
                time.sleep(receiver.delay)
                status = 500 if len(receiver.received) <= receiver.fail_first else 200
                receiver.answered.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict[str, Any]]:
        """The requests answered 2xx, in order."""
        return [r for r, status in zip(self.received, self.answered, strict=False) if status == 200]

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def deliverer(r: Any) -> Iterator[Deliverer]:
    d = Deliverer(r, interval=0.05, first_retry=0.05)
    d.start()
    yield d
    d.stop()


def subscribe(client: Any, auth: Any, name: str, url: str, **extra: Any) -> dict[str, Any]:
    resp = client.put(f"{HOOKS}/{name}", json={"url": url, **extra}, headers=auth("admin"))
    assert resp.status_code == 201, resp.json
    return resp.json


def kill_switch(client: Any, auth: Any, key: str = "checkout.recs") -> None:
    resp = client.put(
        f"{FLAGS_URL}/{key}", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
    )
    assert resp.status_code == 201


def flip(client: Any, auth: Any, action: str, reason: str, key: str = "checkout.recs") -> None:
    resp = client.post(
        f"{FLAGS_URL}/{key}/{action}", json={"reason": reason, "incident": "INC-7"}, headers=auth("operator")
    )
    assert resp.status_code == 200, resp.json


def verified(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    """The payload, verified as any receiver would, with the `standardwebhooks` package."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    payload: dict[str, Any] = Webhook(secret).verify(request["body"], headers)
    return payload


def test_a_subscription_is_created_with_a_secret_shown_once_and_never_again(client, auth, r):
    created = subscribe(client, auth, "incidents", "http://127.0.0.1:9/hook", events=["flag.kill"])
    assert created["secret"].startswith("whsec_") and created["events"] == ["flag.kill"]
    shown = client.get(f"{HOOKS}/incidents", headers=auth("admin")).json
    listed = client.get(HOOKS, headers=auth("admin")).json["webhooks"]
    assert "secret" not in shown and "secrets" not in shown and "secret" not in json.dumps(listed)
    audit = json.dumps([f for _, f in r.xrange(EnvKeys("production").audit)])
    assert created["secret"] not in audit and "whsec_" not in audit
    assert client.get(HOOKS, headers=auth("operator")).status_code == 403


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data", "https://10.0.0.5/hook", "http://192.168.1.1/", "https://[fd00::1]/",
     "http://93.184.216.34/hook", "ftp://127.0.0.1/", "http://user:pw@127.0.0.1/"],
)  # fmt: skip
def test_internal_and_plain_http_addresses_are_refused(client, auth, url, snapshot_redis):
    before = snapshot_redis()
    resp = client.put(f"{HOOKS}/bad", json={"url": url}, headers=auth("admin"))
    assert resp.status_code == 422 and resp.json["errors"][0]["field"] == "url", resp.json
    assert snapshot_redis() == before


def test_every_change_is_delivered_signed_with_who_and_why(client, auth, receivers, deliverer, r):
    rx = receivers()
    secret = subscribe(client, auth, "incidents", rx.url)["secret"]
    kill_switch(client, auth)
    flip(client, auth, "kill", "p95 at 9 s")
    wait_for(lambda: len(rx.delivered()) == 3, 10, "webhook.create, flag.create, flag.kill delivered")
    payloads = [verified(secret, req) for req in rx.delivered()]
    assert [p["type"] for p in payloads] == ["webhook.create", "flag.create", "flag.kill"]
    kill = payloads[-1]["data"]
    assert (kill["flag"], kill["reason"], kill["incident"], kill["actor"]) == (
        "checkout.recs",
        "p95 at 9 s",
        "INC-7",
        "operator",
    )
    assert kill["summary"] == "enabled: true -> false" and kill["env"] == "production"
    last_id = rx.delivered()[-1]["headers"]["webhook-id"]
    assert r.xrange(EnvKeys("production").audit, last_id, last_id), "the webhook-id is the audit entry's id"

    def newest_logged() -> dict:  # a delivery is logged once its receiver has answered
        return client.get(f"{HOOKS}/incidents/deliveries", headers=auth("admin")).json["deliveries"][0]

    wait_for(lambda: newest_logged()["event_id"] == last_id, 10, "the kill's delivery logged")
    logged = newest_logged()
    assert logged["status"] == "delivered" and logged["latency_ms"] >= 0
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(
            rx.delivered()[0]["body"], {k.lower(): v for k, v in rx.delivered()[0]["headers"].items()}
        )


def test_a_receiver_that_fails_three_times_gets_every_event_once_in_order(client, auth, receivers, deliverer):
    rx = receivers(fail_first=3)
    secret = subscribe(client, auth, "flaky", rx.url, events=["flag.kill", "flag.restore"])["secret"]
    kill_switch(client, auth)
    for i, action in enumerate(["kill", "restore", "kill", "restore"]):
        flip(client, auth, action, f"step {i}")
    wait_for(lambda: len(rx.delivered()) == 4, 20, "every event delivered")
    time.sleep(0.3)  # nothing more arrives
    ok = [verified(secret, req)["data"]["reason"] for req in rx.delivered()]
    assert ok == ["step 0", "step 1", "step 2", "step 3"], "once each, in order"
    assert (
        rx.answered[:3] == [500, 500, 500] and len({r["headers"]["webhook-id"] for r in rx.received[:4]}) == 1
    )
    log = client.get(f"{HOOKS}/flaky/deliveries", headers=auth("admin")).json["deliveries"]
    assert [e["status"] for e in log[-4:]] == ["delivered", "retrying", "retrying", "retrying"]


def test_a_dead_receiver_delays_no_other_subscription_and_no_write(client, auth, receivers, deliverer):
    dead, alive = receivers(hang=True), receivers()
    subscribe(client, auth, "dead", dead.url, events=["flag.kill"])
    subscribe(client, auth, "alive", alive.url, events=["flag.kill"])
    kill_switch(client, auth)
    started = time.monotonic()
    flip(client, auth, "kill", "INC")
    assert time.monotonic() - started < 2, "the write does not wait for any delivery"
    wait_for(lambda: dead.received, 5, "the dead receiver reached")
    wait_for(lambda: alive.delivered(), 3, "the live receiver served while the dead one hangs")
    assert len(dead.received) == 1 and not dead.answered


def test_rotation_signs_with_both_secrets_during_the_grace_period(client, auth, receivers, deliverer):
    rx = receivers()
    old = subscribe(client, auth, "rotating", rx.url, events=["flag.kill"])["secret"]
    rotated = client.post(f"{HOOKS}/rotating/rotate-secret", headers=auth("admin"))
    assert rotated.status_code == 200 and rotated.json["secret"] != old
    kill_switch(client, auth)
    flip(client, auth, "kill", "INC")
    wait_for(lambda: rx.delivered(), 10)
    assert verified(old, rx.delivered()[0])["type"] == "flag.kill"
    assert verified(rotated.json["secret"], rx.delivered()[0])["type"] == "flag.kill"


def test_redelivery_and_the_slack_format(client, auth, receivers, deliverer):
    rx = receivers()
    subscribe(client, auth, "chat", rx.url, events=["flag.kill"], format="slack")
    kill_switch(client, auth)
    flip(client, auth, "kill", "recs time out")
    wait_for(lambda: rx.delivered(), 10)
    text = json.loads(rx.delivered()[0]["body"])["text"]
    assert (
        "*flag.kill* `checkout.recs` in *production* by operator [INC-7]" in text and "recs time out" in text
    )
    event_id = rx.delivered()[0]["headers"]["webhook-id"]
    again = client.post(f"{HOOKS}/chat/deliveries/{event_id}/redeliver", headers=auth("admin"))
    assert again.status_code == 202
    wait_for(lambda: len(rx.delivered()) == 2, 10, "redelivered")
    assert rx.delivered()[1]["headers"]["webhook-id"] == event_id


@pytest.mark.slow  # a worker process, killed, and a lease that lapses (10 s)
def test_a_deliverer_killed_mid_batch_loses_nothing(client, auth, receivers, r, redis_url):
    rx = receivers(delay=0.3)
    secret = subscribe(client, auth, "ordered", rx.url, events=["flag.kill", "flag.restore"])["secret"]
    kill_switch(client, auth)
    worker = subprocess.Popen(
        [sys.executable, "-m", "flagsvc.cli", "worker", "--redis-url", redis_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for i, action in enumerate(["kill", "restore"] * 5):
            flip(client, auth, action, f"step {i}")
        wait_for(lambda: len(rx.received) >= 3, 15, "the worker delivering")
        worker.send_signal(signal.SIGKILL)  # mid-batch: no chance to ack or to let go of its lease
        worker.wait(10)
    finally:
        stop_tree(worker, timeout=10)
    taken_over = Deliverer(r, interval=0.05, first_retry=0.05)
    taken_over.start()
    try:
        every = {f"step {i}" for i in range(10)}
        seen = lambda: {verified(secret, q)["data"]["reason"] for q in rx.delivered()}  # noqa: E731
        wait_for(lambda: seen() >= every, 40, "the next deliverer takes over once the lease lapses")
    finally:
        taken_over.stop()
    ids = [q["headers"]["webhook-id"] for q in rx.delivered()]
    reasons = [verified(secret, q)["data"]["reason"] for q in rx.delivered()]
    first_seen = list(dict.fromkeys(reasons))
    assert first_seen == [f"step {i}" for i in range(10)], "in order"
    assert len(ids) - len(set(ids)) <= 1, (
        "at most the one in flight at the kill is sent twice, with the same id"
    )
    assert {i: reasons[ids.index(i)] for i in ids} == dict(zip(ids, reasons, strict=True)), (
        "a duplicate is the same event"
    )
    assert AuditLog(r, EnvKeys("production")).verify().ok
