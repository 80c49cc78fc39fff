"""SDK evaluation cost: ns per evaluation against a same-run baseline, import time, memory.

    python bench/sdk_eval.py [--repeat 7] [--number 200000]

Rollouts memoize the bucket of the last 4,096 values per rule (a user evaluated again costs a
dict lookup); the "always a new user" line shows the cost with the SHA-256 every time.

The client is a real FlagClient that fetched its snapshot over HTTP from a local stub server
(no flagsvc, no Redis needed: this measures the SDK alone). Figures are medians of --repeat
runs; the ratios against the baseline (a method returning ``dict.get``) are what to compare
across machines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import timeit
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flagsvc_client import FlagClient


def make_snapshot(n_extra: int) -> dict:
    flags = {
        "checkout.recs": {
            "kind": "kill_switch",
            "type": "boolean",
            "enabled": True,
            "variants": {"on": True, "off": False},
            "default_variant": "on",
            "off_variant": "off",
            "rules": [],
            "version": 1,
        },
        "search.v2": {
            "kind": "release",
            "type": "boolean",
            "enabled": True,
            "variants": {"on": True, "off": False},
            "default_variant": "off",
            "off_variant": "off",
            "rules": [
                {
                    "conditions": [{"attribute": "country", "operator": "in", "values": ["FR", "BE", "DE"]}],
                    "variant": "on",
                },
                {
                    "conditions": [
                        {"attribute": "plan", "operator": "in", "values": ["enterprise"]},
                        {"attribute": "seats", "operator": "gte", "values": [50]},
                    ],
                    "variant": "on",
                },
                {
                    "conditions": [
                        {"attribute": "app_version", "operator": "semver_gte", "values": ["4.2.0"]}
                    ],
                    "variant": "on",
                },
            ],
            "version": 1,
        },
        "new.checkout": {
            "kind": "release",
            "type": "boolean",
            "enabled": True,
            "variants": {"on": True, "off": False},
            "default_variant": "off",
            "off_variant": "off",
            "rules": [
                {
                    "conditions": [],
                    "rollout": [{"variant": "on", "weight": 50}, {"variant": "off", "weight": 50}],
                    "bucket_by": "targeting_key",
                }
            ],
            "version": 1,
        },
    }
    for i in range(n_extra):
        flags[f"feature.{i:04d}"] = {
            "kind": "release",
            "type": "boolean",
            "enabled": i % 3 != 0,
            "variants": {"on": True, "off": False},
            "default_variant": "on",
            "off_variant": "off",
            "rules": [
                {
                    "conditions": [{"attribute": "country", "operator": "in", "values": ["FR", "US"]}],
                    "variant": "off",
                }
            ]
            if i % 2
            else [],
            "version": 1,
        }
    return {"env": "production", "version": 1, "flags": flags}


def serve_snapshot(body: bytes) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("ETag", '"1"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Baseline:
    def __init__(self) -> None:
        self._d = {"checkout.recs": True}

    def get(self, key: str) -> bool | None:
        return self._d.get(key)


def per_call_ns(stmt, number: int, repeat: int) -> float:
    runs = timeit.repeat(stmt, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e9


def import_time_ms(repeat: int) -> float:
    code = "import time; t=time.perf_counter(); import flagsvc_client; print(time.perf_counter()-t)"
    times = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(repeat)]
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()

    snapshot = make_snapshot(997)  # 1,000 flags in all
    server = serve_snapshot(json.dumps(snapshot).encode())
    url = f"http://127.0.0.1:{server.server_port}"

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    client = FlagClient(url, "fsk_bench", "production", mode="poll", poll_interval=3600, init_timeout=5)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    memory_kib = sum(s.size_diff for s in after.compare_to(before, "filename")) / 1024
    assert client.status().version == 1 and len(client.all_values()) == 1000

    baseline = Baseline()
    fr = {
        "targeting_key": "user-42",
        "country": "US",
        "plan": "enterprise",
        "seats": 10,
        "app_version": "4.3.1",
    }
    user = {"targeting_key": "user-42"}
    assert client.is_enabled("checkout.recs") is True
    assert client.evaluate("search.v2", fr).reason == "TARGETING_MATCH"
    assert client.evaluate("new.checkout", user).reason == "SPLIT"

    n, r = args.number, args.repeat
    # More distinct users than the per-rule memo holds: every evaluation hashes.
    distinct = itertools.cycle([{"targeting_key": f"user-{i}"} for i in range(50_000)])
    results = {
        "baseline: method returning dict.get": per_call_ns(lambda: baseline.get("checkout.recs"), n, r),
        "kill switch: is_enabled": per_call_ns(lambda: client.is_enabled("checkout.recs"), n, r),
        "3 rules (match on the 3rd): is_enabled": per_call_ns(
            lambda: client.is_enabled("search.v2", fr), n, r
        ),
        "50% rollout: is_enabled": per_call_ns(lambda: client.is_enabled("new.checkout", user), n, r),
        "50% rollout, always a new user (no memo)": per_call_ns(
            lambda: client.is_enabled("new.checkout", next(distinct)), n, r
        ),
        "unknown flag: is_enabled (default)": per_call_ns(lambda: client.is_enabled("nope"), n, r),
        "evaluate() details, kill switch": per_call_ns(lambda: client.evaluate("checkout.recs"), n, r),
    }
    base = results["baseline: method returning dict.get"]
    client.close()
    server.shutdown()

    print(
        f"# {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; medians of {r} runs x {n:,} calls"
    )
    print(f"# reproduce: python bench/sdk_eval.py --repeat {r} --number {n}")
    print(f"{'case':<42} {'ns/call':>9} {'x baseline':>11}")
    for name, ns in results.items():
        print(f"{name:<42} {ns:>9.0f} {ns / base:>11.2f}")
    print(f"{'import flagsvc_client (ms, median)':<42} {import_time_ms(r):>9.1f}")
    print(f"{'client holding 1,000 flags (KiB)':<42} {memory_kib:>9.0f}")
    kill, rollout = results["kill switch: is_enabled"] / base, results["50% rollout: is_enabled"] / base
    print(
        f"targets: kill switch <= 3x baseline: {kill:.2f}x {'OK' if kill <= 3 else 'MISSED'}; "
        f"rollout <= 10x: {rollout:.2f}x {'OK' if rollout <= 10 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
