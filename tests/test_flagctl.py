"""flagctl against a live server: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from flagsvc.scheduler import Scheduler
from flagsvc_client import FlagClient
from flagsvc_client.flagctl import main

from .helpers import ENV_URL, FLAGS_URL, TIMEOUT_FLAG, wait_for


@pytest.fixture
def ctl(server, tokens, capsys):
    def run(*args: str, role: str = "operator", url: str | None = None):
        code = main(["--url", url or server.url, "--token", tokens[role], *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def flags(server, auth):
    for key, body in {
        "search.v2": {
            "kind": "release",
            "enabled": True,
            "rules": [
                {
                    "conditions": [{"attribute": "country", "operator": "in", "values": ["FR"]}],
                    "variant": "on",
                }
            ],
        },
        "checkout.recs": {"kind": "kill_switch", "enabled": True},
        "exports": {"kind": "kill_switch", "enabled": True},
    }.items():
        assert requests.put(f"{server.url}{FLAGS_URL}/{key}", json=body, headers=auth("admin"), timeout=5).ok


def test_list_kill_restore_show_audit(ctl, flags):
    code, out, _ = ctl("kill", "checkout.recs", "--reason", "INC-42 checkout slow", "--incident", "INC-42")
    assert code == 0 and "killed checkout.recs in production: now KILLED (version 2)" in out

    code, out, _ = ctl("list", role="reader")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["STATE", "KEY", "KIND"]
    assert lines[1].split()[:2] == ["KILLED", "checkout.recs"], "kill switches first, killed state obvious"
    assert lines[2].split()[:2] == ["on", "exports"] and lines[3].split()[:2] == ["on", "search.v2"]

    code, out, _ = ctl("kill", "checkout.recs", "--reason", "again")
    assert code == 0 and "already disabled" in out

    code, out, _ = ctl("show", "search.v2", role="reader")
    assert code == 0 and "rule 0: if country in ['FR'] -> on" in out

    code, out, _ = ctl("restore", "checkout.recs", "--reason", "fixed", "--json")
    assert code == 0 and json.loads(out)["enabled"] is True

    code, out, _ = ctl("audit", "--flag", "checkout.recs", "--limit", "5", role="reader")
    lines = out.splitlines()
    assert code == 0 and "flag.restore" in lines[0] and "fixed" in lines[0]
    assert "flag.kill" in lines[1] and "[INC-42] INC-42 checkout slow" in lines[1]

    code, out, _ = ctl("audit", "--json", role="reader")
    assert [e["action"] for e in json.loads(out)][:2] == ["flag.restore", "flag.kill"]


@pytest.mark.parametrize(
    ("args", "role", "code", "message"),
    [
        (("kill", "nope", "--reason", "r"), "operator", 4, "404"),
        (("kill", "exports", "--reason", "r"), "reader", 3, "403"),
        (("list", "--env", "staging"), "reader", 4, "environment 'staging' does not exist"),
        (("kill", "exports", "--reason", " "), "operator", 7, "reason"),
    ],
)
def test_errors_are_one_line_with_exit_codes(ctl, flags, args, role, code, message):
    got, out, err = ctl(*args, role=role)
    assert got == code
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_bad_token_and_unreachable_service(ctl, flags, server, capsys):
    code = main(["--url", server.url, "--token", "fsk_000000000000_x", "list"])
    assert code == 3 and "401" in capsys.readouterr().err
    code, _, err = ctl("list", url="http://127.0.0.1:9")
    assert code == 6 and err.startswith("flagctl: cannot reach flagsvc at http://127.0.0.1:9")


def test_conflict_exit_code(ctl, flags, server, auth, tokens, capsys):
    # flagctl has no If-Match flag; a 412 from the API maps to exit code 5 through the same path.
    from flagsvc_client.flagctl import Api, CommandError

    api = Api(server.url, tokens["admin"], "production", 5)
    with pytest.raises(CommandError) as exc:
        api.call(
            "PATCH", api.env_path("flags", "exports"), json={"description": "x"}, headers={"If-Match": '"9"'}
        )
    assert exc.value.code == 5 and str(exc.value).startswith("412")


@pytest.mark.slow  # flagctl subprocesses
def test_console_script_and_env_variables(server, tokens, flags):
    env = {
        "FLAGSVC_URL": server.url,
        "FLAGSVC_TOKEN": tokens["reader"],
        "FLAGSVC_ENV": "production",
        "PATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "flagsvc_client.flagctl", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert {f["key"] for f in json.loads(result.stdout)} == {"search.v2", "checkout.recs", "exports"}
    missing = subprocess.run(
        [sys.executable, "-m", "flagsvc_client.flagctl", "list"],
        env={"PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "FLAGSVC_URL" in missing.stderr


def test_audit_shows_control_and_bidi_characters_escaped(ctl, flags, server, make_token):
    """Reasons, incidents and token names are anyone's text: flagctl audit never sends their
    control characters or bidi overrides raw to the terminal, and an entry stays one line."""
    actor = "eve\x1b]0;owned\x07"
    hostile = {"Authorization": f"Bearer {make_token('operator', name=actor)}"}
    for action, body in (
        ("kill", {"reason": "ok\x1b[2J\r\nforged", "incident": "INC\u202e-1"}),
        ("restore", {"reason": "\u202egnp.exe"}),
    ):
        resp = requests.post(
            f"{server.url}{FLAGS_URL}/exports/{action}", json=body, headers=hostile, timeout=5
        )
        assert resp.ok, resp.text

    code, out, _ = ctl("audit", "--flag", "exports", role="reader")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and all(line.isprintable() for line in lines)
    assert " eve\\x1b]0;owned\\x07 " in lines[0] and lines[0].endswith(" \\u202egnp.exe")
    assert lines[1].endswith(" [INC\\u202e-1] ok\\x1b[2J\\r\\nforged")


def test_list_show_and_kill_say_what_is_served_and_what_holds_it(ctl, flags, server, auth):
    """An ops value a playbook switched shows its variant and the playbook; a temporary kill shows
    when it reverts; rules and rollouts show at a glance."""
    admin = auth("admin")
    assert requests.put(f"{server.url}{FLAGS_URL}/timeout-ms", json=TIMEOUT_FLAG, headers=admin, timeout=5).ok
    playbook = {"changes": {"timeout-ms": {"default_variant": "short"}}}
    shed = f"{server.url}{ENV_URL}/playbooks/shed"
    assert requests.put(shed, json=playbook, headers=admin, timeout=5).ok
    action = {"reason": "p95", "incident": "INC-9"}
    assert requests.post(f"{shed}/apply", json=action, headers=admin, timeout=5).ok

    code, out, _ = ctl("kill", "exports", "--reason", "INC-9 exports hammer the DB", "--for", "30m")
    assert code == 0 and "now KILLED" in out and "; reverts at 20" in out

    code, out, _ = ctl("list", role="reader")
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    header = out.splitlines()[0].split()
    assert header[:6] == ["STATE", "KEY", "KIND", "TYPE", "RULES", "HELD"]
    assert rows["timeout-ms"][0] == "short" and rows["timeout-ms"][5] == "playbook:shed"
    assert rows["exports"][0] == "KILLED" and rows["exports"][5].startswith("until:20")
    assert rows["search.v2"][4] == "rules:1" and rows["checkout.recs"][4:6] == ["-", "-"]

    code, out, _ = ctl("show", "timeout-ms", role="reader")
    assert code == 0 and "held by playbook shed" in out
    code, out, _ = ctl("show", "exports", role="reader")
    assert code == 0 and "temporary: reverts at 20" in out


def test_kill_dry_run_and_audit_filters_and_exports(ctl, flags, server, tokens, capsys):
    base = f"{server.url}{ENV_URL}"
    heartbeat = {"app": "checkout", "applied_version": 3, "counts": {"exports": 4}}
    sdk = {"Authorization": f"Bearer {tokens['sdk']}"}
    assert requests.post(f"{base}/clients/i-1", json=heartbeat, headers=sdk, timeout=5).status_code == 204
    reader = {"Authorization": f"Bearer {tokens['reader']}"}
    wait_for(lambda: requests.get(f"{base}/clients", headers=reader, timeout=5).json()["summary"]["live"], 5)

    code, out, _ = ctl("kill", "exports", "--reason", "r", "--dry-run")
    assert code == 0 and "dry run, nothing changed: would kill exports" in out
    assert "4 times, by checkout (1 instances)" in out
    code, out, _ = ctl("show", "exports", "--json", role="reader")
    assert json.loads(out)["enabled"] is True, "a dry run changes nothing"

    assert ctl("kill", "exports", "--reason", "INC-5 db", "--incident", "INC-5")[0] == 0
    assert ctl("kill", "checkout.recs", "--reason", "other", "--incident", "INC-6")[0] == 0
    code, out, _ = ctl("audit", "--incident", "INC-5", role="reader")
    assert code == 0 and len(out.splitlines()) == 1 and "exports" in out and "INC-5 db" in out
    code, out, _ = ctl("audit", "--action", "flag.kill", "--actor", "operator", "--since", "1h", "--json")
    assert {e["flag"] for e in json.loads(out)} == {"exports", "checkout.recs"}
    code, out, _ = ctl("audit", "--incident", "INC-6", "--format", "ndjson", role="reader")
    assert [json.loads(line)["flag"] for line in out.splitlines()] == ["checkout.recs"]
    code, out, _ = ctl("audit", "--incident", "INC-6", "--format", "csv", role="reader")
    rows = out.splitlines()
    assert code == 0 and rows[0].startswith("id,") and len(rows) == 2 and "checkout.recs" in rows[1]


def test_playbook_apply_waits_for_the_fleet_and_the_control_url_is_preferred(
    ctl, flags, server, auth, tokens, monkeypatch, capsys
):
    shed = f"{server.url}{ENV_URL}/playbooks/shed"
    playbook = {"changes": {"exports": {"enabled": False}}}
    assert requests.put(shed, json=playbook, headers=auth("admin"), timeout=5).ok
    sdk = FlagClient(server.url, tokens["sdk"], "production", mode="poll", poll_interval=0.1, app_name="web")
    try:
        wait_for(lambda: requests.get(f"{server.url}{ENV_URL}/clients", headers=auth("reader"), timeout=5)
                 .json()["summary"]["live"] == 1, 5, "the SDK's first heartbeat")  # fmt: skip
        monkeypatch.setenv("FLAGSVC_URL", "http://127.0.0.1:9")  # nothing there
        monkeypatch.setenv("FLAGSVC_CONTROL_URL", server.url)
        monkeypatch.setenv("FLAGSVC_TOKEN", tokens["operator"])
        code = main(["playbook", "apply", "shed", "--reason", "INC-7 db", "--incident", "INC-7", "--wait"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "applied playbook shed" in out and "confirmed: " in out and "1/1" in out
        assert sdk.is_enabled("exports") is False
    finally:
        sdk.close()


def test_status_is_the_incident_screen_and_flagctl_alone_shows_it(ctl, flags, server, auth):
    admin = auth("admin")
    shed = f"{server.url}{ENV_URL}/playbooks/shed"
    playbook = {"changes": {"search.v2": {"enabled": False}}}
    assert requests.put(shed, json=playbook, headers=admin, timeout=5).ok
    action = {"reason": "p95 at 9 s", "incident": "INC-3"}
    assert requests.post(f"{shed}/apply", json=action, headers=admin, timeout=5).ok
    assert ctl("kill", "exports", "--reason", "db melts", "--incident", "INC-3", "--for", "1h")[0] == 0

    code, out, _ = ctl("status", role="reader")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "production: service ready"
    assert lines[1] == "off (2):"
    exports = next(line for line in lines if " exports " in line)
    assert exports.split()[0] == "KILLED" and "by operator, reverts at 20" in exports
    assert exports.endswith('[INC-3] "db melts"')
    assert any(line.startswith("  shed: 20") and "by admin (INC-3)" in line for line in lines)
    assert lines[-1].startswith("SDK: version ") and "no live SDK instance" in lines[-1]

    code, alone, _ = ctl(role="reader")
    assert code == 0 and alone == out, "flagctl alone is flagctl status"


def test_clients_status_and_dry_run_show_ofrep_consumers(ctl, flags, server, make_token):
    """A Node app on OFREP is listed as such, counts in the blast radius, and never makes
    --wait wait (it evaluates on the service: it has no version to apply)."""
    node = {
        "X-API-Key": make_token("sdk", name="node-token", envs=["production"]),
        "X-Flagsvc-App": "node-search",
    }
    for _ in range(5):
        resp = requests.post(
            f"{server.url}/ofrep/v1/evaluate/flags/search.v2", json={}, headers=node, timeout=5
        )
        assert resp.status_code == 200, resp.text

    def listed() -> str:
        return ctl("clients", role="reader")[1]

    wait_for(lambda: "node-search over OFREP (token node-token" in listed(), 5, "the consumer listed")
    code, out, _ = ctl("kill", "search.v2", "--reason", "why", "--dry-run")
    assert code == 0 and "5 times, by node-search (1 instances)" in out
    assert "1 OFREP consumers" in ctl("status", role="reader")[1]
    code, out, _ = ctl("kill", "search.v2", "--reason", "INC-9", "--wait", "--timeout-wait", "5s")
    assert code == 0 and "no live SDK instance reports" in out


def test_wait_counts_the_whole_fleet_not_the_instances_the_view_lists(ctl, flags, server, r):
    registry = server.app.extensions["flagsvc"].clients
    for i in range(300):  # more than the view lists (100 lagging, 100 recent)
        body = {"app": "shop", "applied_version": 1}
        registry.report("production", f"i-{i}", body, source="", token_id="t", flags=())
    registry.refresh()
    Scheduler(r, clients=registry).housekeep()

    code, _, err = ctl("kill", "search.v2", "--reason", "INC-9", "--wait", "--timeout-wait", "2s")

    assert code == 8 and "0/300 live SDK instances run version" in err, err


def test_playbook_show_says_what_an_alert_does_with_it(ctl, flags, server, auth):
    book = {
        "description": "shed load \x1b[31mNOW",
        "changes": {"exports": {"enabled": False}},
        "triggers": [{"match": {"alertname": "CheckoutLatency", "severity": "page"}}],
        "auto": True,
        "cooldown": "30m",
        "max_auto_applies_per_day": 3,
        "revert_on_resolve": True,
    }
    url = f"{server.url}{ENV_URL}/playbooks/shed-exports"
    assert requests.put(url, json=book, headers=auth("admin"), timeout=5).ok

    code, out, _ = ctl("playbook", "show", "shed-exports", role="reader")
    assert code == 0 and "\x1b" not in out and "shed load \\x1b[31mNOW" in out, "the escape shown, not run"
    assert (
        "  alerts: {alertname=CheckoutLatency, severity=page}: APPLIED BY THE ALERT "
        "(cooldown 30m, at most 3 a day, reverted when the alert resolves)"
    ) in out.splitlines()
    code, out, _ = ctl("playbook", "list", role="reader")
    assert out.split()[:3] == ["-", "AUTO", "shed-exports"]

    assert requests.put(url, json={**book, "auto": False}, headers=auth("admin"), timeout=5).ok
    code, out, _ = ctl("playbook", "show", "shed-exports", role="reader")
    assert "{alertname=CheckoutLatency, severity=page}: recorded, NOT applied (auto is off)" in out
    assert ctl("playbook", "list", role="reader")[1].split()[:3] == ["-", "-", "shed-exports"]
