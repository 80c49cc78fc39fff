"""ops/: the Prometheus rules load and their unit tests pass (promtool, Debian's prometheus)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests

from .nginx import NGINX_SITE, needs_nginx, nginx, nginx_conf, openssl, plain_site, running_nginx
from .redis_server import RedisServer, free_port
from .served import Served

pytestmark = pytest.mark.slow  # promtool, nginx, sentinels

OPS = Path(__file__).parent.parent / "ops"

PROMETHEUS = Path(__file__).parent.parent / "ops/prometheus"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (.ci/run installs it)")


@needs_promtool
def test_alert_rules_are_valid():
    result = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


@needs_promtool
def test_alert_rule_unit_tests_pass():
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_nginx
def test_nginx_site_is_valid(tmp_path):
    key, cert = str(tmp_path / "privkey.pem"), str(tmp_path / "fullchain.pem")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=flags",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    site = NGINX_SITE.read_text().replace("/etc/ssl/flagsvc", str(tmp_path))
    conf = nginx_conf(tmp_path, site)
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_nginx
def test_nginx_sends_sdk_traffic_to_the_main_listener_and_the_rest_to_the_control_one(tmp_path):
    """The site as shipped, minus TLS, in front of `flagsvc serve --control-port`: nginx's own
    access log names the upstream that served each request."""
    control_port, nginx_port = free_port(), free_port()
    served = Served(tmp_path / "data", control_port=control_port)
    try:
        site = plain_site(nginx_port, served.port, control_port)
        conf = nginx_conf(
            tmp_path,
            site,
            "log_format upstream '$request_method $uri $upstream_addr';\n"
            f"  access_log {tmp_path}/access.log upstream;",
        )
        base = f"http://127.0.0.1:{nginx_port}"
        with running_nginx(tmp_path, conf, base):
            admin = {"Authorization": f"Bearer {served.admin_token()}"}
            env = f"{base}/api/v1/envs/production"
            calls = [
                ("PUT", f"{env}/flags/exports", {"kind": "kill_switch", "enabled": True}, 201),
                ("POST", f"{env}/flags/exports/kill", {"reason": "INC-9"}, 200),
                ("GET", f"{env}/snapshot", None, 200),
                ("POST", f"{env}/clients/web-1", {"app": "web", "applied_version": 1}, 204),
                ("GET", f"{env}/clients", None, 200),
                ("GET", f"{env}/audit", None, 200),
                # OFREP wants a token of one environment: the refusal still shows who answered.
                ("POST", f"{base}/ofrep/v1/evaluate/flags/exports", {"context": {}}, 403),
            ]
            for method, url, body, status in calls:
                resp = requests.request(method, url, json=body, headers=admin, timeout=5)
                assert resp.status_code == status, (method, url, resp.text)
            console = requests.Session()  # the console, and its live strip unbuffered
            signed_in = console.post(
                f"{base}/ui/signin", data={"token": served.admin_token()}, allow_redirects=False
            )
            assert signed_in.status_code == 302
            with console.get(f"{base}/ui/envs/production/live", stream=True, timeout=5) as live:
                assert next(live.iter_lines()).startswith(b"data: {")
            time.sleep(0.2)  # nginx writes its access log line after the response
            served_by = {}
            for line in (tmp_path / "access.log").read_text().splitlines():
                method, uri, upstream = line.split(" ", 2)
                served_by[(method, uri)] = upstream.split(",")[0].strip()
            main, control = f"127.0.0.1:{served.port}", f"127.0.0.1:{control_port}"
            path = "/api/v1/envs/production"
            assert served_by[("PUT", f"{path}/flags/exports")] == control
            assert served_by[("POST", f"{path}/flags/exports/kill")] == control
            assert served_by[("GET", f"{path}/clients")] == control
            assert served_by[("GET", f"{path}/audit")] == control
            assert served_by[("GET", f"{path}/snapshot")] == main
            assert served_by[("POST", f"{path}/clients/web-1")] == main
            assert served_by[("POST", "/ofrep/v1/evaluate/flags/exports")] == main
            assert served_by[("POST", "/ui/signin")] == control
    finally:
        served.stop()


def _shipped(name: str, tmp_path: Path, replacements: dict[str, str]) -> Path:
    """A shipped Redis config with this machine's names, paths and ports in place of the hosts'."""
    text = (OPS / "redis" / name).read_text()
    for old, new in replacements.items():
        text = text.replace(old, new)
    path = tmp_path / Path(name).name
    path.write_text(text)
    return path


def test_the_shipped_sentinel_setup_runs_and_fences(tmp_path):
    """ops/redis/sentinel/*.conf start as they are (names, paths and ports aside): a master that
    refuses writes without a replica, and a sentinel that monitors it."""
    master_port, sentinel_port = free_port(), free_port()
    (tmp_path / "data").mkdir()
    base = _shipped("redis.conf", tmp_path, {"/var/lib/flagsvc-redis": str(tmp_path / "data")})
    names = {
        "/etc/flagsvc-redis/redis.conf": str(base),
        "redis-a": "127.0.0.1",
        "0.0.0.0 -::*": "127.0.0.1",
        "/var/lib/flagsvc-sentinel": str(tmp_path),
    }
    master_conf = _shipped("sentinel/redis-master.conf", tmp_path, names)
    monitor = {"redis-a 6379": f"127.0.0.1 {master_port}", **names}
    sentinel_conf = _shipped("sentinel/sentinel.conf", tmp_path, monitor)
    master = RedisServer(tmp_path / "master", config=master_conf, port=master_port)
    sentinel = RedisServer(tmp_path / "sentinel", sentinel_conf=sentinel_conf, port=sentinel_port)
    try:
        master.start()
        sentinel.start()
        client = redis.Redis(port=master_port, decode_responses=True)
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            client.set("k", "v")  # no replica: fenced
        watcher = redis.Redis(port=sentinel_port, decode_responses=True)
        assert int(watcher.sentinel_master("flagsvc")["port"]) == master_port
    finally:
        sentinel.kill()
        master.kill()
