"""Alert-driven containment end to end: the real Alertmanager (Debian's prometheus-alertmanager)
notifies `flagsvc serve`, which applies a playbook that a real SDK client sees, reverts it when the
alert resolves, and holds the playbook's cooldown and an `auto: false` refusal. And the shipped
Alertmanager configuration is one that amtool accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from flagsvc_client import FlagClient

from .helpers import TIMEOUT_FLAG, wait_for
from .processes import stop_tree
from .redis_server import free_port
from .served import Served

ROOT = Path(__file__).parent.parent
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"
API = "/api/v1/envs/production"
#: How long a notification may take: group_wait and group_interval are 1 s, the CI has 2 cores.
NOTIFIED_S = 30.0

CHECKOUT = {
    "alertname": "CheckoutP95High",
    "service": "checkout",
    "containment": "production",
    "incident": "INC-9",
}
SEARCH = {"alertname": "SearchErrors", "service": "search", "containment": "production"}
PLAYBOOKS = {
    "checkout-degraded": {
        "description": "shed load when checkout is slow",
        "changes": {"checkout.recs": {"enabled": False}, "payments.timeout-ms": {"default_variant": "short"}},
        "triggers": [{"match": {"alertname": "CheckoutP95High", "service": "checkout"}}],
        "auto": True,
        "revert_on_resolve": True,
        "cooldown": "1h",
        "incident_label": "incident",
    },
    "search-off": {
        "description": "a person decides: alerts may not apply it",
        "changes": {"search.v2": {"enabled": False}},
        "triggers": [{"match": {"alertname": "SearchErrors"}}],
    },
}


def require(binary: str) -> None:
    if not Path(binary).exists():
        pytest.skip(
            f"{Path(binary).name.upper()} IS ABSENT: install Debian's prometheus-alertmanager "
            "to run the Alertmanager tests (.ci/run does)"
        )


def test_the_shipped_alertmanager_config_is_valid() -> None:
    require(AMTOOL)
    checked = subprocess.run(
        [AMTOOL, "check-config", str(ROOT / "ops/alertmanager/alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Alertmanager:
    """prometheus-alertmanager on a free loopback port, its one receiver flagsvc's webhook with an
    operator token; stopped by :meth:`stop`, also when it does not come up."""

    def __init__(self, workdir: Path, webhook_url: str, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "route": {
                "receiver": "flagsvc",
                "group_by": ["alertname", "service"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {
                    "name": "flagsvc",
                    "webhook_configs": [
                        {
                            "url": webhook_url,
                            "send_resolved": True,
                            "http_config": {"authorization": {"type": "Bearer", "credentials": token}},
                        }
                    ],
                }
            ],
        }
        config_file = workdir / "alertmanager.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = workdir / "alertmanager.log"
        self._log_file = self.log.open("w")
        command = [
            ALERTMANAGER,
            f"--config.file={config_file}",
            f"--storage.path={workdir / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # one instance: no gossip port
            "--log.level=debug",
        ]
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, 30, "Alertmanager ready", interval=0.1)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"Alertmanager exited:\n{self.log.read_text()}"
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def fire(self, labels: dict[str, str], starts_at: datetime, *, ends_at: datetime | None = None) -> None:
        """Post the alert to Alertmanager's API, as Prometheus does (resolved: ``ends_at`` past)."""
        alert: dict[str, Any] = {
            "labels": labels,
            "annotations": {"summary": f"{labels['alertname']} on {labels['service']}"},
            "startsAt": rfc3339(starts_at),
            "generatorURL": "http://prometheus.example:9090/graph",
        }
        if ends_at is not None:
            alert["endsAt"] = rfc3339(ends_at)
        posted = requests.post(f"{self.url}/api/v2/alerts", json=[alert], timeout=5)
        assert posted.status_code == 200, posted.text

    def stop(self) -> None:
        try:
            stop_tree(self.proc)
        finally:
            self._log_file.close()


def create_token(data_dir: Path, name: str, role: str) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "flagsvc.cli", "token", "create", "--name", name, "--role", role,
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return created.stdout.strip()


def seed(url: str, admin: dict[str, str]) -> None:
    flags = {
        "checkout.recs": {"kind": "kill_switch", "enabled": True},
        "payments.timeout-ms": TIMEOUT_FLAG,
        "search.v2": {"kind": "release", "enabled": True},
    }
    for key, body in flags.items():
        assert requests.put(f"{url}{API}/flags/{key}", json=body, headers=admin, timeout=5).status_code == 201
    for name, book in PLAYBOOKS.items():
        saved = requests.put(f"{url}{API}/playbooks/{name}", json=book, headers=admin, timeout=5)
        assert saved.status_code == 201, saved.text


def audit(url: str, admin: dict[str, str], action: str) -> list[dict[str, Any]]:
    """The environment's audit entries of ``action``, oldest first."""
    page = requests.get(
        f"{url}{API}/audit", params={"action": action, "order": "oldest"}, headers=admin, timeout=5
    )
    assert page.status_code == 200, page.text
    entries: list[dict[str, Any]] = page.json()["entries"]
    return entries


@pytest.mark.slow  # flagsvc serve, Alertmanager, an SDK client
def test_alertmanager_contains_then_reverts_and_the_guardrails_hold(tmp_path: Path) -> None:
    require(ALERTMANAGER)
    data_dir = tmp_path / "data"
    served = Served(data_dir)
    am: Alertmanager | None = None
    sdk: FlagClient | None = None
    try:
        url, admin = served.url, {"Authorization": f"Bearer {served.admin_token()}"}
        seed(url, admin)
        operator = create_token(data_dir, "alertmanager", "operator")
        am = Alertmanager(tmp_path, f"{url}{API}/alerts/alertmanager", operator)
        sdk = FlagClient(url, create_token(data_dir, "checkout-app", "sdk"), "production", mode="stream")
        assert sdk.is_enabled("checkout.recs") is True and sdk.get_number("payments.timeout-ms") == 3000

        def outcomes() -> list[str]:
            return [e["after"]["outcome"] for e in audit(url, admin, "alert.decision")]

        started = datetime.now(UTC)
        am.fire(CHECKOUT, started)
        wait_for(lambda: sdk.is_enabled("checkout.recs") is False, NOTIFIED_S, "the SDK sees the apply")
        assert sdk.get_number("payments.timeout-ms") == 800
        [applied] = audit(url, admin, "playbook.apply")
        assert applied["actor"] == "alertmanager:alertmanager" and applied["incident"] == "INC-9"
        assert applied["reason"].startswith("alert CheckoutP95High firing: CheckoutP95High on checkout")
        assert "http://prometheus.example:9090/graph" in applied["reason"]

        am.fire(CHECKOUT, started, ends_at=datetime.now(UTC) - timedelta(seconds=1))
        wait_for(lambda: sdk.is_enabled("checkout.recs") is True, NOTIFIED_S, "the SDK sees the revert")
        assert sdk.get_number("payments.timeout-ms") == 3000
        [reverted] = audit(url, admin, "playbook.revert")
        assert reverted["actor"] == "alertmanager:alertmanager" and reverted["incident"] == "INC-9"

        am.fire(CHECKOUT, datetime.now(UTC))  # fires again within the cooldown
        wait_for(lambda: "cooldown" in outcomes(), NOTIFIED_S, "the cooldown refusal audited")
        am.fire(SEARCH, datetime.now(UTC))  # its playbook is not auto
        wait_for(lambda: "not_auto" in outcomes(), NOTIFIED_S, "the auto: false refusal audited")
        assert sdk.is_enabled("checkout.recs") is True and sdk.is_enabled("search.v2") is True
        assert len(audit(url, admin, "playbook.apply")) == 1
        decisions = {e["after"]["outcome"]: e for e in audit(url, admin, "alert.decision")}
        assert {"applied", "reverted", "cooldown", "not_auto"} <= set(decisions), decisions
        assert decisions["not_auto"]["playbook"] == "search-off"
        assert decisions["cooldown"]["after"]["detail"].startswith("an alert applied it at")
        assert decisions["applied"]["operation"] == applied["operation"]
    finally:
        if sdk is not None:
            sdk.close()
        if am is not None:
            am.stop()
        served.stop()
