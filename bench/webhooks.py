"""Benchmark of webhook delivery: how soon the incident channel hears of a kill, and whether
subscriptions (one of them dead) slow the kill itself.

``flagsvc serve`` (2 gevent workers, their deliverers on) and 10 receivers in this process on
loopback, each verifying every delivery with the ``standardwebhooks`` package, as a real receiver
would. Three phases, each of ``--flips`` kill/restore pairs of one kill switch, one at a time,
``--pause`` apart (the deliveries of one change are over before the next):

1. no subscription: the kill's latency alone;
2. 10 subscriptions to live receivers: the kill's latency, and from the kill's response to each
   receiver's verified delivery of it (p50/p95; target p95 <= 250 ms);
3. the same with one of the 10 receivers dead (it accepts connections and never answers): the
   kill's latency and the 9 others' delivery (target: no difference beyond noise).

Example::

    .venv/bin/python bench/webhooks.py --flips 100 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

sys.path.insert(0, str(Path(__file__).parent))
import harness

KEY = harness.KILL_KEY


class Receiver:
    """Verifies each delivery and notes when the kill it announces arrived."""

    def __init__(self) -> None:
        self.secret = ""
        self.arrived: dict[str, float] = {}  # webhook-id -> perf_counter
        self.bad = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                now = time.perf_counter()
                try:
                    Webhook(receiver.secret).verify(body, {k.lower(): v for k, v in self.headers.items()})
                    receiver.arrived[self.headers["webhook-id"]] = now
                except WebhookVerificationError:
                    receiver.bad += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((harness.HOST, 0), Handler)
        self.url = f"http://{harness.HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def dead_receiver() -> Iterator[str]:
    """A URL whose server accepts connections (the backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind((harness.HOST, 0))
        sock.listen(64)
        yield f"http://{harness.HOST}:{sock.getsockname()[1]}/hook"


def subscribe(session: requests.Session, base: str, name: str, url: str) -> str:
    resp = harness.call(
        session, "PUT", f"{base}/webhooks/{name}", {201}, json={"url": url, "events": ["flag.kill"]}
    )
    return str(resp.json()["secret"])


def flips(
    server: harness.Server, n: int, receivers: list[Receiver], args_pause: float
) -> tuple[list[float], list[float], int]:
    """``n`` kill/restore pairs; kill latencies, delivery delays (ms), and deliveries missing."""
    flipper = harness.Flipper(server.base, server.token, harness.PROD)
    audit = f"{server.base}/api/v1/envs/{harness.PROD}/audit"
    kills, delays, missing = [], [], 0
    try:
        for _ in range(n):
            kills.append(flipper.flip())
            answered = time.perf_counter()
            entry = harness.call(
                flipper.session, "GET", audit, {200}, params={"action": "flag.kill", "limit": 1}
            )
            event_id = entry.json()["entries"][0]["id"]
            deadline = answered + 5
            while time.perf_counter() < deadline and not all(event_id in r.arrived for r in receivers):
                time.sleep(0.002)
            for r in receivers:
                if event_id in r.arrived:
                    delays.append((r.arrived[event_id] - answered) * 1000)
                else:
                    missing += 1
            flipper.flip()  # restore (not announced: the subscriptions want kills)
            time.sleep(args_pause)  # changes a moment apart, as operators make them
    finally:
        flipper.close()
    return kills, delays, missing


def one_run(args: argparse.Namespace, root: Path) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    with harness.Server(root, 2) as server, requests.Session() as admin:
        admin.headers["Authorization"] = f"Bearer {server.token}"
        harness.setup_flags(server, admin, 20)
        base = f"{server.base}/api/v1/envs/{harness.PROD}"
        kills, _, _ = flips(server, args.flips, [], args.pause)
        figures["kill, no subscription"] = harness.percentiles(kills)
        receivers = [Receiver() for _ in range(10)]
        try:
            for i, r in enumerate(receivers):
                r.secret = subscribe(admin, base, f"live-{i}", r.url)
            time.sleep(1.5)  # every deliverer holds its subscriptions
            kills, delays, missing = flips(server, args.flips, receivers, args.pause)
            figures["kill, 10 subscriptions"] = harness.percentiles(kills)
            figures["delivery, 10 live receivers"] = {**harness.percentiles(delays), "missing": missing}
            with dead_receiver() as dead_url:
                harness.call(admin, "DELETE", f"{base}/webhooks/live-9", {204})
                subscribe(admin, base, "dead", dead_url)
                time.sleep(1.5)
                kills, delays, missing = flips(server, args.flips, receivers[:9], args.pause)
                figures["kill, 10 subscriptions, 1 dead"] = harness.percentiles(kills)
                figures["delivery, 9 live beside 1 dead"] = {
                    **harness.percentiles(delays),
                    "missing": missing,
                }
            bad = sum(r.bad for r in receivers)
            figures["signature failures"] = {"p50": bad, "p95": bad}
        finally:
            for r in receivers:
                r.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flips", type=int, default=100, help="kill/restore pairs per phase (100)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between pairs (0.2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs; medians across them are reported")
    args = parser.parse_args()
    harness.exit_on_sigterm()
    harness.log(f"flagsvc webhook benchmark - {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    harness.log(f"machine : {harness.cpu_model()}; {harness.package_versions()}")
    harness.log(f"reproduce: cd {Path.cwd()} && {shlex.join([sys.executable, *sys.argv])}")
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="flagsvc-webhooks-") as tmp:
            runs.append(one_run(args, Path(tmp)))
        harness.log(f"[{i + 1}/{args.repeat}] done")
    rows = []
    for name in runs[0]:
        for stat in ("p50", "p95", "missing"):
            values = [run[name][stat] for run in runs if stat in run[name]]
            if values:
                rows.append(
                    (f"{name} {stat}", f"{harness.median(values):.2f}", " ".join(f"{v:.2f}" for v in values))
                )
    harness.print_table(("figure (ms; medians across runs)", "median", "runs"), rows)
    harness.log(
        "targets: delivery p95 <= 250 ms; kill latency with 10 subscriptions, one dead = none (noise)"
    )


if __name__ == "__main__":
    main()
