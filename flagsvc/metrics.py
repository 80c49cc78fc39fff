"""Prometheus metrics, correct across gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``flagsvc serve`` sets it, ``ops/gunicorn.conf.py``
documents it) every worker writes its samples to files there and ``/metrics`` aggregates them
(prometheus-client's multiprocess mode; gunicorn's ``child_exit`` hook marks dead workers).
Without it - a single process - the default registry is used. SDK instances are counted by the
schedulers' housekeeping pass; a scrape reads the counts, whatever the size of the fleet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REQUESTS = Counter("flagsvc_http_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram(
    "flagsvc_http_request_duration_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
FLAG_CHANGES = Counter("flagsvc_flag_changes_total", "Committed flag changes", ["env", "action"])
ENV_VERSION = Gauge("flagsvc_env_version", "Environment version served", ["env"], multiprocess_mode="max")
POLLS = Counter("flagsvc_snapshot_polls_total", "Snapshot polls", ["env", "outcome"])
OPEN_STREAMS = Gauge("flagsvc_open_streams", "Open event streams", multiprocess_mode="livesum")
REVERTS = Counter("flagsvc_scheduler_reverts_total", "Automatic reverts", ["env", "outcome"])
HISTORY_ROLLBACKS = Counter(
    "flagsvc_history_rollbacks_total", "Times Redis' history was seen going back (lost changes)", ["env"]
)
REDIS_ERRORS = Counter("flagsvc_redis_errors_total", "Requests that failed because Redis was unavailable")


class SdkInstancesCollector(Collector):
    """Live SDK instances and how many run the current version, read at scrape time."""

    def __init__(self, app: Flask) -> None:
        self._app = app

    def collect(self) -> Iterator[Any]:
        redis_up = GaugeMetricFamily("flagsvc_redis_up", "1 if Redis answered this scrape (readiness)")
        disabled = GaugeMetricFamily(
            "flagsvc_kill_switch_disabled_seconds",
            "How long each disabled kill switch has been off",
            labels=["env", "flag"],
        )
        live = GaugeMetricFamily(
            "flagsvc_sdk_instances_live",
            "SDK instances that reported in the last 90 s (counted every 5 s)",
            labels=["env"],
        )
        current = GaugeMetricFamily(
            "flagsvc_sdk_instances_current",
            "Live SDK instances running the current version (counted every 5 s)",
            labels=["env"],
        )
        stores = self._app.extensions["flagsvc"]
        now = datetime.now(UTC)
        try:
            for env in stores.envs.list():
                summary = stores.clients.summary(env)
                live.add_metric([env], summary["live"])
                current.add_metric([env], summary["current"])
                for flag in stores.flags.list(env):
                    if flag["kind"] == "kill_switch" and not flag["enabled"]:
                        since = datetime.fromisoformat(flag["updated_at"].replace("Z", "+00:00"))
                        disabled.add_metric([env, flag["key"]], (now - since).total_seconds())
            redis_up.add_metric([], 1)
        except Exception:  # noqa: BLE001 - a scrape during a Redis outage still returns the rest
            REDIS_ERRORS.inc()
            redis_up.add_metric([], 0)
        yield redis_up
        yield disabled
        yield live
        yield current


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count a request and its latency (also called by :mod:`flagsvc.fastpath` for polls)."""
    LATENCY.labels(route, method).observe(seconds)
    REQUESTS.labels(route, method, str(status)).inc()


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


def init_app(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.metrics_start = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        start = g.pop("metrics_start", None)
        if start is not None and request.path != "/metrics":
            observe_request(_route(), request.method, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            from prometheus_client import REGISTRY as registry
        scrape = CollectorRegistry()
        scrape.register(SdkInstancesCollector(app))
        body = generate_latest(registry) + generate_latest(scrape)
        return Response(body, mimetype=CONTENT_TYPE_LATEST)
