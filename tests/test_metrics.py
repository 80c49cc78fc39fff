"""/metrics across 2 gunicorn workers: counters move as the traffic says."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from flagsvc_client import FlagClient

from .helpers import wait_for
from .test_propagation import Stack, close_stream, next_event, open_stream

pytestmark = pytest.mark.slow  # 2 gunicorn workers


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_aggregate_across_workers(tmp_path):
    stack = Stack(tmp_path)
    client = None
    try:
        stack.wait_for_workers()
        stack.put("a", {"kind": "kill_switch", "enabled": True})
        url = f"{stack.url}/api/v1/envs/production/snapshot"
        before = scrape(stack.url)
        etag = requests.get(url, headers=stack.headers("sdk"), timeout=5).headers["ETag"]
        for _ in range(40):  # new connections: spread over both workers
            requests.get(url, headers={**stack.headers("sdk"), "If-None-Match": etag}, timeout=5)
        assert stack.flip("a", "kill").status_code == 200
        polled = scrape(stack.url)
        assert (
            value(polled, "flagsvc_snapshot_polls_total", env="production", outcome="304")
            - value(before, "flagsvc_snapshot_polls_total", env="production", outcome="304")
            == 40
        )
        resp, events = open_stream(stack)
        next_event(events)
        client = FlagClient(stack.url, stack.tokens["sdk"], "production", mode="poll", poll_interval=0.5)
        # SDK instances are counted by the housekeeping pass, every few seconds.
        wait_for(lambda: value(scrape(stack.url), "flagsvc_sdk_instances_current", env="production") == 1)
        after = scrape(stack.url)
        pids = {p for (name, labels), _ in after.items() for k, p in labels if k == "pid"}
        assert value(after, "flagsvc_flag_changes_total", env="production", action="flag.kill") == 1
        assert value(after, "flagsvc_env_version", env="production") == 2
        assert value(after, "flagsvc_open_streams") == 1
        assert value(after, "flagsvc_sdk_instances_live", env="production") == 1
        ok = value(
            after,
            "flagsvc_http_requests_total",
            route="/api/v1/envs/<env>/snapshot",
            method="GET",
            status="304",
        )
        assert ok >= 40
        assert (
            value(
                after,
                "flagsvc_http_request_duration_seconds_count",
                route="/api/v1/envs/<env>/flags/<key>/kill",
                method="POST",
            )
            == 1
        )
        assert not pids, "samples are aggregated, not per worker"
        close_stream(resp)
        wait_for(lambda: value(scrape(stack.url), "flagsvc_open_streams") == 0, timeout=5)
    finally:
        if client is not None:
            client.close()
        stack.close()
