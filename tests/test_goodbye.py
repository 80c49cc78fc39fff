"""An SDK instance that is gone does not count as live: its client says goodbye when it closes or
when its process exits, and the service forgets it at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import requests

from flagsvc_client import FlagClient

from .helpers import ENV, ENV_URL, heartbeats_written, wait_for


def listed(client, auth) -> set[str]:
    view = client.get(f"{ENV_URL}/clients", headers=auth("reader")).json
    return {i["instance"] for i in view["instances"]}


def beat(client, token: str, instance: str):
    body, headers = {"app": "shop", "applied_version": 0}, {"Authorization": f"Bearer {token}"}
    return client.post(f"{ENV_URL}/clients/{instance}", json=body, headers=headers)


def test_the_token_that_registered_an_instance_can_say_its_goodbye(app, client, auth, tokens, make_token):
    other = make_token("sdk", name="other-app")
    assert beat(client, tokens["sdk"], "i-1").status_code == 204
    assert beat(client, other, "i-2").status_code == 204
    heartbeats_written(app)
    assert listed(client, auth) == {"i-1", "i-2"}

    foreign = client.delete(f"{ENV_URL}/clients/i-2", headers=auth("sdk"))
    assert foreign.status_code == 404 and foreign.mimetype == "application/problem+json"
    assert listed(client, auth) == {"i-1", "i-2"}, "another token's instance stays"

    assert client.delete(f"{ENV_URL}/clients/i-1", headers=auth("sdk")).status_code == 204
    assert listed(client, auth) == {"i-2"}
    assert client.delete(f"{ENV_URL}/clients/i-1", headers=auth("sdk")).status_code == 404
    bad = client.delete(f"{ENV_URL}/clients/i-1%0A", headers=auth("sdk"))
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "instance"
    assert client.delete(f"{ENV_URL}/clients/i-2", headers=auth("admin")).status_code == 404, "not its own"


def test_a_closed_client_is_no_longer_listed(server, tokens, auth):
    view = f"{server.url}{ENV_URL}/clients"

    def instances() -> list[dict]:
        return requests.get(view, headers=auth("reader"), timeout=5).json()["instances"]

    sdk = FlagClient(server.url, tokens["sdk"], ENV, mode="poll", poll_interval=0.2, app_name="shop")
    try:
        wait_for(lambda: len(instances()) == 1, 5, "the client's first heartbeat")
    finally:
        sdk.close()
    assert instances() == [], "close() said goodbye"


@pytest.mark.slow  # a python subprocess
def test_a_process_that_exits_without_closing_its_client_says_goodbye(server, tokens, auth):
    script = textwrap.dedent(
        f"""
        import time
        from flagsvc_client import FlagClient
        client = FlagClient({server.url!r}, {tokens["sdk"]!r}, {ENV!r}, mode="poll", app_name="batch")
        client.is_enabled("anything")
        time.sleep(0.5)  # the first heartbeat is out
        """
    )
    view = f"{server.url}{ENV_URL}/clients"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert requests.get(view, headers=auth("reader"), timeout=5).json()["instances"] == []


def test_a_pre_fork_parent_that_never_evaluates_is_not_an_instance(server, tokens, auth):
    """gunicorn --preload: the master creates the client and forks the workers; only the workers
    evaluate, so only they are instances (the parent would otherwise be a laggard for --wait)."""
    view = f"{server.url}{ENV_URL}/clients"
    recs = {"kind": "kill_switch", "enabled": True}
    assert requests.put(f"{server.url}{ENV_URL}/flags/recs", json=recs, headers=auth("admin"), timeout=5).ok

    def instances() -> list[dict]:
        return requests.get(view, headers=auth("reader"), timeout=5).json()["instances"]

    parent = FlagClient(server.url, tokens["sdk"], ENV, mode="poll", poll_interval=0.2, app_name="web")
    try:
        wait_for(lambda: [i["pid"] for i in instances()] == [os.getpid()], 5, "the parent's first heartbeat")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: it evaluates, reports, then waits for the parent's go
            os.close(write_end)
            try:
                parent.is_enabled("recs")
                os.read(read_end, 1)
            finally:
                os._exit(0)
        os.close(read_end)
        try:
            wait_for(lambda: [i["pid"] for i in instances()] == [pid], 5, "only the worker listed")
        finally:
            os.write(write_end, b"1")
            os.waitpid(pid, 0)
            os.close(write_end)
        parent.is_enabled("recs")  # the parent now evaluates too: an instance again
        parent._reporter.poke()
        wait_for(lambda: os.getpid() in [i["pid"] for i in instances()], 5, "the parent listed again")
    finally:
        parent.close()
