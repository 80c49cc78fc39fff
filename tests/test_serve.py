"""`flagsvc serve` as a subprocess: embedded Redis, first-start bootstrap, gunicorn over HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import requests
from click.testing import CliRunner

from flagsvc import embedded
from flagsvc.cli import main
from flagsvc.keys import EnvKeys

from .conftest import create_token
from .helpers import wait_for
from .redis_server import free_port
from .served import Served

pytestmark = pytest.mark.slow  # flagsvc serve: gunicorn and Redis processes

if sys.platform != "linux":  # pragma: no cover
    pytest.skip("unix sockets and gunicorn", allow_module_level=True)


def gunicorn_masters(served: Served) -> list[psutil.Process]:
    """The gunicorn masters among the children of `flagsvc serve` (the embedded Redis is one too)."""
    children = psutil.Process(served.proc.pid).children()
    return [p for p in children if "gunicorn" in p.cmdline()]


def listening_ports(proc: psutil.Process) -> set[int]:
    return {c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def test_serve_with_embedded_redis_end_to_end(tmp_path):
    data_dir = tmp_path / "data"
    served = Served(data_dir)
    try:
        token_file = data_dir / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token.startswith("fsk_") and token in served.output(), "the first admin token is printed once"
        assert "MonkeyPatchWarning" not in served.output(), "gevent patches before ssl is imported"
        headers = {"Authorization": f"Bearer {token}"}
        base = f"{served.url}/api/v1/envs/production"

        assert requests.get(f"{served.url}/api/v1/envs", headers=headers, timeout=5).json() == {
            "envs": ["production"]
        }
        created = requests.put(
            f"{base}/flags/checkout.recs",
            json={"kind": "kill_switch", "enabled": True},
            headers=headers,
            timeout=5,
        )
        assert created.status_code == 201
        killed = requests.post(
            f"{base}/flags/checkout.recs/kill", json={"reason": "INC-1"}, headers=headers, timeout=5
        )
        assert killed.status_code == 200 and killed.json()["enabled"] is False
        snap = requests.get(f"{base}/snapshot", headers=headers, timeout=5)
        assert snap.json()["flags"]["checkout.recs"]["enabled"] is False
        assert (
            requests.get(
                f"{base}/snapshot", headers={**headers, "If-None-Match": snap.headers["ETag"]}, timeout=5
            ).status_code
            == 304
        )

        # The embedded Redis: append-only, fsync on every write, unix socket only.
        socket_path = embedded.running_socket(data_dir)
        assert socket_path
        direct = redis.Redis(unix_socket_path=socket_path, decode_responses=True)
        assert direct.config_get("appendonly")["appendonly"] == "yes"
        assert direct.config_get("appendfsync")["appendfsync"] == "always"
        assert direct.config_get("port")["port"] == "0"

        # Several gunicorn workers share that Redis.
        (gunicorn_master,) = gunicorn_masters(served)
        assert len(gunicorn_master.children()) == 2

        # Admin commands reach the running server through --data-dir.
        runner = CliRunner()
        result = runner.invoke(
            main,
            [
                "token",
                "create",
                "--name",
                "ci-reader",
                "--role",
                "reader",
                "--env",
                "production",
                "--data-dir",
                str(data_dir),
            ],
        )
        assert result.exit_code == 0, result.output
        reader = result.output.strip().splitlines()[0]
        listed = requests.get(f"{base}/flags", headers={"Authorization": f"Bearer {reader}"}, timeout=5)
        assert listed.status_code == 200
        verify = runner.invoke(main, ["audit", "verify", "--env", "production", "--data-dir", str(data_dir)])
        assert verify.exit_code == 0, verify.output
        assert served.stop() == 0
    finally:
        served.stop()

    # The embedded Redis went down with the service; a second start keeps the data and the token.
    assert embedded.running_socket(data_dir) is None
    again = Served(data_dir)
    try:
        assert "first start" not in again.output()
        flag = requests.get(
            f"{again.url}/api/v1/envs/production/flags/checkout.recs",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert flag.status_code == 200 and flag.json()["enabled"] is False
    finally:
        again.stop()


def test_serve_with_external_redis(tmp_path, redis_url, r):
    served = Served(tmp_path / "data", env={"FLAGSVC_REDIS_URL": redis_url})
    try:
        assert not (tmp_path / "data" / embedded.STATE_FILE).exists(), "no embedded Redis when a URL is given"
        token = (tmp_path / "data" / "admin-token").read_text().strip()
        assert r.sismember("flagsvc:{_system}:envs", "production")
        resp = requests.get(
            f"{served.url}/api/v1/envs", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert resp.json() == {"envs": ["production"]}
        # A heartbeat taken just before a stop is written by the stopping worker.
        sdk = {"Authorization": f"Bearer {create_token(r, 'sdk')}"}
        reported = requests.post(
            f"{served.url}/api/v1/envs/production/clients/i-1",
            json={"app": "web", "applied_version": 1},
            headers=sdk,
            timeout=5,
        )
        assert reported.status_code == 204, reported.text
        assert served.stop() == 0
        assert r.hexists(EnvKeys("production").clients, "i-1")
    finally:
        served.stop()


def test_control_port_serves_the_same_api_from_a_worker_of_its_own(tmp_path):
    control_port = free_port()
    served = Served(tmp_path / "data", control_port=control_port)
    control = f"http://127.0.0.1:{control_port}"
    try:
        headers = {"Authorization": f"Bearer {served.admin_token()}"}
        created = requests.put(
            f"{control}/api/v1/envs/production/flags/exports",
            json={"kind": "kill_switch", "enabled": True},
            headers=headers,
            timeout=5,
        )
        assert created.status_code == 201
        killed = requests.post(
            f"{control}/api/v1/envs/production/flags/exports/kill",
            json={"reason": "INC-7"},
            headers=headers,
            timeout=5,
        )
        assert killed.status_code == 200
        version = killed.headers["X-Flagsvc-Env-Version"]
        # The main listener serves the kill at once (its workers hear it by pub/sub).
        deadline = time.monotonic() + 2
        while True:
            snap = requests.get(f"{served.url}/api/v1/envs/production/snapshot", headers=headers, timeout=5)
            if snap.json()["version"] == int(version):
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert snap.json()["flags"]["exports"]["enabled"] is False
        # One gunicorn master for both listeners: each worker holds the listening socket of one,
        # and one worker alone serves the control port. (The service is ready once one worker of
        # each listener answers: the last may still be forking.)
        (master,) = gunicorn_masters(served)
        wanted_ports = sorted([[control_port], [served.port], [served.port]])
        ports: dict[psutil.Process, set[int]] = {}

        def every_worker_listens() -> bool:
            ports.clear()
            ports.update({w: listening_ports(w) for w in master.children()})
            return sorted(map(sorted, ports.values())) == wanted_ports

        wait_for(every_worker_listens, what=f"a worker listening on each of {wanted_ports}")
        # The operators' worker wins the CPU over SDK traffic when both want it.
        base = os.nice(0)  # the workers' niceness adds to the one the service was started with
        wanted = {(control_port, base), (served.port, min(19, base + 5))}
        assert {(port, w.nice()) for w, (port,) in ports.items()} == wanted
        assert served.stop() == 0
        assert not (master.is_running() and master.status() != psutil.STATUS_ZOMBIE)
    finally:
        served.stop()


def test_fewer_workers_on_ttou_stop_a_main_worker_and_never_the_last(tmp_path):
    """TTOU lowers gunicorn's number of workers by stopping its oldest, which is the control
    worker: the control listener would be left without one (a kill sent there never answered)."""
    control_port = free_port()
    served = Served(tmp_path / "data", control_port=control_port)
    try:
        (master,) = gunicorn_masters(served)

        def listening() -> list[list[int]]:
            return sorted(sorted(listening_ports(w)) for w in master.children())

        def workers_on(*ports: int) -> None:
            wanted = sorted([port] for port in ports)
            wait_for(lambda: listening() == wanted, what=f"workers on {wanted}", ignoring=(psutil.Error,))

        workers_on(control_port, served.port, served.port)
        master.send_signal(signal.SIGTTOU)
        workers_on(control_port, served.port)
        master.send_signal(signal.SIGTTOU)
        wait_for_output(served, "need a worker each; kept 2")
        workers_on(control_port, served.port)
        headers = {"Authorization": f"Bearer {served.admin_token()}"}
        for url in (served.url, served.control_url):
            assert requests.get(f"{url}/api/v1/envs", headers=headers, timeout=5).status_code == 200
        master.send_signal(signal.SIGTTIN)
        workers_on(control_port, served.port, served.port)
    finally:
        served.stop()


def test_a_stop_closes_idle_kept_alive_connections_and_no_worker_is_killed(tmp_path):
    """SDK pollers and nginx keep connections open between requests. A stopping worker closes
    the idle ones instead of waiting for their next request until the arbiter kills it (SIGKILL)
    at the graceful timeout, as gunicorn's gevent worker did."""
    control_port = free_port()
    served = Served(tmp_path / "data", control_port=control_port)
    try:
        (master,) = gunicorn_masters(served)
        wait_for(lambda: len(master.children()) == 3, what="three workers")
        headers = {"Authorization": f"Bearer {served.admin_token()}"}
        with requests.Session() as poller:
            for url in (served.url, served.control_url):  # a kept-alive connection to each listener
                assert poller.get(f"{url}/api/v1/envs", headers=headers, timeout=5).status_code == 200
            assert served.stop() == 0
        log = served.output()
        assert log.count("Worker exiting") == log.count("Booting worker") == 3, log
        assert "SIGKILL" not in log and "graceful timeout" not in log and "[ERROR]" not in log, log
    finally:
        served.stop()


def test_a_request_that_has_begun_to_arrive_when_the_service_stops_is_served(tmp_path):
    """A stopping worker ends the kept-alive connections that wait for a next request, not one
    whose next request has begun to arrive: that one is answered (and the connection closed)."""
    served = Served(tmp_path / "data")
    try:
        token = served.admin_token()
        base = "/api/v1/envs/production/flags/exports"
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        try:
            body = json.dumps({"kind": "kill_switch", "enabled": True})
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            connection.request("PUT", base, body, headers)
            created = connection.getresponse()
            assert created.status == 201, created.read()
            created.read()
            assert connection.sock is not None, "a kept-alive connection"
            kill = json.dumps({"reason": "INC-7"}).encode()
            head = f"POST {base}/kill HTTP/1.1\r\nHost: flagsvc\r\nAuthorization: Bearer {token}\r\n"
            connection.sock.sendall(head.encode())  # the kill has begun to arrive
            time.sleep(0.3)  # and the worker has read it
            served.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            rest = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(kill), kill)
            connection.sock.sendall(rest)
            answer = http.client.HTTPResponse(connection.sock, method="POST")
            answer.begin()
            assert answer.status == 200, answer.read()
            assert json.loads(answer.read())["enabled"] is False
            answer.close()
        finally:
            connection.close()
        assert served.stop() == 0
    finally:
        served.stop()


def test_cli_help():
    runner = CliRunner()
    for args in (
        ["--help"],
        ["serve", "--help"],
        ["token", "create", "--help"],
        ["token", "list", "--help"],
        ["token", "revoke", "--help"],
        ["audit", "verify", "--help"],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Usage:" in result.output


def processes_of(data_dir: Path, known: set[int]) -> list[psutil.Process]:
    """Processes a `flagsvc serve` on ``data_dir`` left: children of this test process that were
    not there before (``known``), and any process working in or naming ``data_dir`` (an embedded
    redis-server need not be a descendant)."""
    found = [p for p in psutil.Process().children(recursive=True) if p.pid not in known]
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid not in known and (p.cwd() == str(data_dir) or str(data_dir) in " ".join(p.cmdline())):
                found.append(p)
    return [p for p in found if p.is_running()]


@pytest.mark.parametrize("ready_timeout", [None, 2.0], ids=["gunicorn-gives-up", "served-gives-up"])
def test_a_served_that_does_not_come_up_leaves_no_process_behind(tmp_path, ready_timeout):
    """The port is taken by a listener that never answers: /readyz hangs and gunicorn cannot
    bind. Whether gunicorn gives up first or the test's patience ends first, `Served` raises
    RuntimeError only after `flagsvc serve`, gunicorn and the embedded Redis are gone."""
    data_dir = tmp_path / "data"
    known = {p.pid for p in psutil.Process().children(recursive=True)}
    options = {} if ready_timeout is None else {"ready_timeout": ready_timeout}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="did not start"):
            Served(data_dir, port=taken.getsockname()[1], **options)
    assert processes_of(data_dir, known) == []


def embedded_redis_pid(socket_path: str) -> int:
    client = redis.Redis(unix_socket_path=socket_path)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def wait_for_output(served: Served, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in served.output():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{served.output()}"
        time.sleep(0.05)


def test_a_killed_embedded_redis_is_restarted_and_keeps_every_acknowledged_write(tmp_path):
    data_dir = tmp_path / "data"
    served = Served(data_dir)
    try:
        headers = {"Authorization": f"Bearer {served.admin_token()}"}
        flags = f"{served.url}/api/v1/envs/production/flags"
        switch = {"kind": "kill_switch", "enabled": True}
        assert requests.put(f"{flags}/recs", json=switch, headers=headers, timeout=5).status_code == 201
        killed = requests.post(f"{flags}/recs/kill", json={"reason": "INC-3"}, headers=headers, timeout=5)
        assert killed.status_code == 200
        socket_path = embedded.running_socket(data_dir)
        assert socket_path

        def writes_work(key: str) -> bool:
            answer = requests.put(f"{flags}/{key}", json=switch, headers=headers, timeout=5)
            return answer.status_code in (200, 201)

        pids = [embedded_redis_pid(socket_path)]
        for attempt in range(2):
            os.kill(pids[-1], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not writes_work(f"after-kill-{attempt}"):
                assert time.monotonic() < deadline, f"no write 10 s after the kill:\n{served.output()}"
                time.sleep(0.1)
            # The same socket the workers were given, the append-only file replayed.
            assert embedded.running_socket(data_dir) == socket_path
            pids.append(embedded_redis_pid(socket_path))
            # A worker may write to the new server before `flagsvc serve` has seen it answer: a kill
            # then would be a failed start to serve ("did not restart"), not a second death.
            wait_for_output(served, f"embedded Redis restarted (pid {pids[-1]})")
        recs = requests.get(f"{flags}/recs", headers=headers, timeout=5)
        assert recs.status_code == 200 and recs.json()["enabled"] is False, "the kill acknowledged before"
        direct = redis.Redis(unix_socket_path=socket_path, decode_responses=True)
        assert direct.config_get("appendfsync")["appendfsync"] == "always"
        direct.close()

        # One line per death and per restart; a second death soon after waits longer.
        out = served.output()
        assert f"embedded Redis (pid {pids[0]}) was killed by SIGKILL; restarting it in 0.5 s" in out
        assert f"embedded Redis (pid {pids[1]}) was killed by SIGKILL; restarting it in 1 s" in out
        assert f"embedded Redis restarted (pid {pids[1]})" in out

        # A clean stop still shuts the restarted server down and forgets it.
        assert served.stop() == 0
        assert not psutil.pid_exists(pids[2]) and embedded.running_socket(data_dir) is None
    finally:
        served.stop()
