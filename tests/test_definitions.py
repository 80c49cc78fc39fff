"""Flags as code: a definitions file applied over the API in one audited commit, exported back
exactly, planned field by field, and never undoing containment."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jsonschema
import pytest
import requests
import yaml

from flagsvc.audit import AuditLog
from flagsvc.keys import EnvKeys
from flagsvc_client.flagctl import main

from .helpers import ENV_URL, FLAGS_URL, TIMEOUT_FLAG

#: A definitions file in the canonical form ``flagctl export`` writes (defaults left out).
FILE = textwrap.dedent(
    """\
    format: flagsvc/1
    flags:
      checkout.recs:
        kind: kill_switch
        enabled: true
        owner: checkout
      payments.timeout-ms:
        kind: ops
        type: number
        enabled: true
        variants:
          normal: 3000
          short: 800
        default_variant: normal
        off_variant: short
        description: the payment provider's timeout
      search.v2:
        kind: release
        enabled: true
        default_variant: 'off'
        rules:
        - conditions:
          - attribute: country
            operator: in
            values:
            - FR
          variant: 'on'
        tags:
        - search
    playbooks:
      checkout-degraded:
        description: shed load when checkout is slow
        changes:
          checkout.recs:
            enabled: false
          payments.timeout-ms:
            default_variant: short
    """
)
APPLY_URL = f"{ENV_URL}/definitions/apply"


def document(text: str = FILE) -> dict:
    return yaml.safe_load(text)


@pytest.fixture
def ctl(server, tokens, capsys):
    def run(*args: str, role: str = "admin", stdin: str | None = None):
        code = main(["--url", server.url, "--token", tokens[role], *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def flagctl_process(server, token: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """flagctl as a user runs it: its own process, configured by the environment."""
    return subprocess.run(
        [sys.executable, "-m", "flagsvc_client.flagctl", *args],
        env={**os.environ, "FLAGSVC_URL": server.url, "FLAGSVC_TOKEN": token, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow  # flagctl subprocesses
def test_apply_to_an_empty_environment_then_export_round_trips_the_file_exactly(server, tokens, tmp_path):
    path = tmp_path / "production.yaml"
    path.write_text(FILE)
    admin = tokens["admin"]
    applied = flagctl_process(server, admin, "apply", "-f", str(path), "--reason", "PR #12", "--yes")
    assert applied.returncode == 0, applied.stderr
    assert "+ flag checkout.recs (create)" in applied.stdout and "applied to production" in applied.stdout

    exported = tmp_path / "exported.yaml"
    result = flagctl_process(server, tokens["reader"], "export", "-o", str(exported))
    assert result.returncode == 0, result.stderr
    assert exported.read_text() == FILE

    diff = flagctl_process(server, tokens["reader"], "diff", "-f", str(path), "--exit-code")
    assert diff.returncode == 0 and "already holds what the file defines" in diff.stdout, diff.stdout
    again = flagctl_process(server, admin, "apply", "-f", str(path), "--reason", "again", "--yes")
    assert again.returncode == 0 and "no changes" in again.stdout


def test_apply_is_one_audited_commit_with_the_reason(client, auth, r):
    done = client.post(
        APPLY_URL, json={"definitions": document(), "reason": "PR #12", "incident": ""}, headers=auth("admin")
    )
    assert done.status_code == 200, done.json
    plan = done.json
    assert plan["dry_run"] is False and plan["env_version"] == plan["base_version"] + 1
    assert [(c["op"], c["type"], c["name"]) for c in plan["changes"]] == [
        ("create", "flag", "checkout.recs"),
        ("create", "flag", "payments.timeout-ms"),
        ("create", "flag", "search.v2"),
        ("create", "playbook", "checkout-degraded"),
    ]
    entries = [fields for _, fields in r.xrange(EnvKeys("production").audit)]
    mine = [e for e in entries if e.get("operation") == plan["operation"]]
    assert len(mine) == 4 and {e["reason"] for e in mine} == {"PR #12"}
    assert {e["env_version"] for e in mine if e["flag"]} == {str(plan["env_version"])}
    assert AuditLog(r, EnvKeys("production")).verify().ok
    snapshot = client.get(f"{ENV_URL}/snapshot", headers=auth("sdk")).json
    assert snapshot["version"] == plan["env_version"] and set(snapshot["flags"]) == set(document()["flags"])


def test_the_plan_is_field_by_field_and_a_dry_run_changes_nothing(client, auth, snapshot_redis):
    admin = auth("admin")
    client.post(APPLY_URL, json={"definitions": document(), "reason": "seed"}, headers=admin)
    changed = document()
    changed["flags"]["payments.timeout-ms"]["variants"]["short"] = 500
    changed["flags"]["payments.timeout-ms"]["owner"] = "payments"
    changed["flags"]["new.banner"] = {"kind": "release", "enabled": False}
    before = snapshot_redis()
    plan = client.post(APPLY_URL, json={"definitions": changed, "dry_run": True}, headers=admin).json
    assert snapshot_redis() == before
    by_name = {c["name"]: c for c in plan["changes"]}
    assert by_name["payments.timeout-ms"] == {
        "op": "update",
        "type": "flag",
        "name": "payments.timeout-ms",
        "fields": {
            "variants": {"before": {"normal": 3000, "short": 800}, "after": {"normal": 3000, "short": 500}},
            "owner": {"before": "", "after": "payments"},
        },
    }
    assert by_name["new.banner"]["op"] == "create" and by_name["new.banner"]["fields"]["enabled"] == {
        "before": None,
        "after": False,
    }
    assert set(by_name) == {"payments.timeout-ms", "new.banner"}


def test_apply_never_undoes_containment(client, auth):
    """A file from git, applied during an incident, must not restore a killed flag, change a
    flag an applied playbook holds, or make a temporary kill permanent."""
    admin, operator = auth("admin"), auth("operator")
    client.post(APPLY_URL, json={"definitions": document(), "reason": "seed"}, headers=admin)
    client.put(f"{FLAGS_URL}/exports", json={"kind": "kill_switch", "enabled": True}, headers=admin)
    action = {"reason": "p95 9s", "incident": "INC-7"}
    applied = client.post(f"{ENV_URL}/playbooks/checkout-degraded/apply", json=action, headers=operator)
    assert applied.status_code == 200, applied.json
    killed = client.post(f"{FLAGS_URL}/search.v2/kill", json={**action, "for": "30m"}, headers=operator)
    assert killed.status_code == 200, killed.json
    edited = document()
    edited["flags"]["payments.timeout-ms"]["variants"]["normal"] = 2500  # held by the playbook
    edited["flags"]["search.v2"]["tags"] = ["search", "eu"]  # temporarily killed
    edited["flags"]["exports"] = {"kind": "kill_switch", "enabled": True, "owner": "data"}

    plan = client.post(
        APPLY_URL, json={"definitions": edited, "reason": "PR #13", "prune": True}, headers=admin
    ).json
    assert [(c["op"], c["name"]) for c in plan["changes"]] == [("update", "exports")]
    kept = {(k["name"], k["field"]): k["reason"] for k in plan["kept"]}
    assert "checkout-degraded" in kept[("payments.timeout-ms", "variants,default_variant")]
    assert "temporary change" in kept[("search.v2", "tags")]
    assert "apply never switches a flag" in kept[("search.v2", "enabled")]
    assert "apply never switches a flag" in kept[("checkout.recs", "enabled")]
    flags = {f["key"]: f for f in client.get(FLAGS_URL, headers=admin).json["flags"]}
    assert flags["checkout.recs"]["enabled"] is False and flags["search.v2"]["enabled"] is False
    assert flags["search.v2"]["revert_at"] and flags["payments.timeout-ms"]["default_variant"] == "short"
    assert flags["exports"]["owner"] == "data"


def test_prune_archives_what_the_file_omits_but_not_what_is_off(client, auth):
    admin = auth("admin")
    client.post(APPLY_URL, json={"definitions": document(), "reason": "seed"}, headers=admin)
    client.post(f"{FLAGS_URL}/checkout.recs/kill", json={"reason": "INC-8"}, headers=auth("operator"))
    smaller = document()
    for key in ("checkout.recs", "search.v2"):
        del smaller["flags"][key]
    del smaller["playbooks"]["checkout-degraded"]
    without = client.post(APPLY_URL, json={"definitions": smaller, "dry_run": True}, headers=admin).json
    assert without["changes"] == [] and {u["name"] for u in without["unmanaged"]} == {
        "checkout.recs",
        "search.v2",
        "checkout-degraded",
    }
    plan = client.post(
        APPLY_URL, json={"definitions": smaller, "reason": "cleanup", "prune": True}, headers=admin
    ).json
    assert [(c["op"], c["type"], c["name"]) for c in plan["changes"]] == [
        ("archive", "flag", "search.v2"),
        ("delete", "playbook", "checkout-degraded"),
    ]
    assert [k["name"] for k in plan["kept"]] == ["checkout.recs"], (
        "archiving a killed flag would undo the kill"
    )
    assert client.get(f"{FLAGS_URL}/search.v2", headers=admin).status_code == 404
    assert client.get(f"{ENV_URL}/playbooks/checkout-degraded", headers=admin).status_code == 404


def test_bad_documents_are_refused_with_the_field_and_change_nothing(client, auth, snapshot_redis):
    admin = auth("admin")
    before = snapshot_redis()
    cases = {
        "definitions.flags.bad.kind": {"flags": {"bad": {"kind": "nope", "enabled": True}}},
        "definitions.flags.Bad Key": {"flags": {"Bad Key": {"kind": "release", "enabled": True}}},
        "definitions.flag": {"flag": {}},
        "definitions.format": {"format": "flagsvc/9"},
        "definitions.playbooks.p.changes.no.such.flag": {
            "playbooks": {"p": {"changes": {"no.such.flag": {"enabled": False}}}}
        },
        "definitions.playbooks.p.changes.t.default_variant": {
            "flags": {"t": TIMEOUT_FLAG},
            "playbooks": {"p": {"changes": {"t": {"default_variant": "tiny"}}}},
        },
    }
    for field, definitions in cases.items():
        resp = client.post(APPLY_URL, json={"definitions": definitions, "reason": "x"}, headers=admin)
        assert resp.status_code == 422 and resp.mimetype == "application/problem+json", (field, resp.json)
        assert field in [e["field"] for e in resp.json["errors"]], (field, resp.json)
    no_reason = client.post(APPLY_URL, json={"definitions": document()}, headers=admin)
    assert no_reason.status_code == 422 and no_reason.json["errors"][0]["field"] == "reason"
    operator = client.post(
        APPLY_URL, json={"definitions": document(), "reason": "x"}, headers=auth("operator")
    )
    assert operator.status_code == 403
    assert snapshot_redis() == before


def test_a_plan_made_before_another_change_is_refused(client, auth):
    admin = auth("admin")
    plan = client.post(APPLY_URL, json={"definitions": document(), "dry_run": True}, headers=admin).json
    client.put(f"{FLAGS_URL}/other", json={"kind": "release", "enabled": True}, headers=admin)
    stale = client.post(
        APPLY_URL,
        json={"definitions": document(), "reason": "x", "base_version": plan["base_version"]},
        headers=admin,
    )
    assert stale.status_code == 409 and "plan again" in stale.json["detail"]
    assert client.get(f"{FLAGS_URL}/checkout.recs", headers=admin).status_code == 404


def test_the_json_schema_is_public_and_validates_the_file(client, auth):
    resp = client.get("/api/v1/schemas/definitions.json")
    assert resp.status_code == 200
    schema = resp.json
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(document())) == []
    exported = client.get(f"{ENV_URL}/definitions", headers=auth("reader")).json
    assert list(validator.iter_errors(exported)) == []
    bad = document()
    bad["flags"]["checkout.recs"]["kind"] = "nope"
    bad["flags"]["checkout.recs"]["enabeld"] = True
    paths = {tuple(e.absolute_path) for e in validator.iter_errors(bad)}
    assert ("flags", "checkout.recs", "kind") in paths and ("flags", "checkout.recs") in paths


def test_promotion_diff_between_environments(ctl, server, auth):
    admin = auth("admin")
    requests.put(f"{server.url}/api/v1/envs/staging", headers=admin, timeout=5)
    staging = document()
    staging["flags"]["search.v2"]["default_variant"] = "on"
    resp = requests.post(
        f"{server.url}/api/v1/envs/staging/definitions/apply",
        json={"definitions": staging, "reason": "staging"},
        headers=admin,
        timeout=5,
    )
    assert resp.ok, resp.text
    requests.post(
        f"{server.url}{APPLY_URL}", json={"definitions": document(), "reason": "p"}, headers=admin, timeout=5
    )
    code, out, _ = ctl("diff", "--from", "staging", "--env", "production", "--exit-code", role="reader")
    assert code == 9 and out.strip().splitlines() == [
        "~ flag search.v2 (update)",
        '    default_variant: "off" -> "on"',
    ], out
    code, out, _ = ctl("apply", "--from", "staging", "--reason", "promote search.v2", "--yes")
    assert code == 0, out
    assert ctl("diff", "--from", "staging", "--exit-code", role="reader")[0] == 0


def test_apply_without_yes_off_a_terminal_changes_nothing(ctl, tmp_path, snapshot_redis):
    path = tmp_path / "f.json"
    path.write_text(json.dumps(document()))
    before = snapshot_redis()
    code, out, err = ctl("apply", "-f", str(path), "--reason", "x")
    assert code == 2 and "--yes" in err and "+ flag checkout.recs (create)" in out
    assert ctl("apply", "-f", str(path))[0] == 2, "a reason is required"
    code, out, _ = ctl("apply", "-f", str(path), "--dry-run")
    assert code == 0 and "dry run, nothing changed" in out
    assert snapshot_redis() == before


def test_create_set_and_delete_a_flag(ctl, server, auth):
    code, out, err = ctl(
        "create", "payments.timeout-ms", "--kind", "ops", "--type", "number",
        "--variant", "normal=3000", "--variant", "short=800", "--default", "normal", "--off", "short",
        "--owner", "payments",
    )  # fmt: skip
    assert code == 0 and "created payments.timeout-ms in production (version 1)" in out, err
    flag = requests.get(
        f"{server.url}{FLAGS_URL}/payments.timeout-ms", headers=auth("reader"), timeout=5
    ).json()
    assert flag["variants"] == {"normal": 3000, "short": 800} and flag["owner"] == "payments"
    code, _, err = ctl("create", "payments.timeout-ms", "--kind", "ops")
    assert code == 5 and "412" in err, "create never replaces"
    code, _, err = ctl("create", "x", "--kind", "ops", "--type", "number", "--variant", "a=fast")
    assert code == 2 and "'fast' is not a number value" in err

    assert ctl("set", "payments.timeout-ms", "short")[1].startswith(
        "payments.timeout-ms in production: serves short"
    )
    assert "serves normal = 3000" in ctl("set", "payments.timeout-ms", "3000")[1], (
        "a variant's value names it"
    )
    code, out, _ = ctl("set", "payments.timeout-ms", "normal=2500")
    assert code == 0 and "serves normal = 2500 (version 4)" in out
    code, _, err = ctl("set", "payments.timeout-ms", "1234")
    assert code == 2 and "normal=2500, short=800" in err and "NAME=VALUE" in err

    code, _, err = ctl("delete", "payments.timeout-ms")
    assert code == 2 and "--yes" in err
    code, out, _ = ctl("delete", "payments.timeout-ms", "--yes")
    assert code == 0 and "archived payments.timeout-ms" in out
    assert (
        requests.get(
            f"{server.url}{FLAGS_URL}/payments.timeout-ms", headers=auth("reader"), timeout=5
        ).status_code
        == 404
    )


EDITOR = """\
import json, pathlib, sys, requests
path = pathlib.Path(sys.argv[1])
text = path.read_text()
{meanwhile}
path.write_text(text.replace("owner: ''", "owner: search").replace('"owner": ""', '"owner": "search"'))
"""


def test_edit_saves_with_if_match_and_keeps_a_refused_edit(ctl, server, auth, tmp_path, monkeypatch):
    admin = auth("admin")
    url = f"{server.url}{FLAGS_URL}/search.v2"
    requests.put(url, json={"kind": "release", "enabled": True}, headers=admin, timeout=5)
    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR.format(meanwhile=""))
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    code, out, err = ctl("edit", "search.v2")
    assert code == 0 and "saved search.v2 in production (version 2)" in out, err
    assert requests.get(url, headers=admin, timeout=5).json()["owner"] == "search"

    # Someone else changes the flag while the editor is open: the edit is refused, and kept.
    meanwhile = f"requests.patch({url!r}, json={{'description': 'theirs'}}, headers={admin!r})"
    editor.write_text(EDITOR.format(meanwhile=meanwhile))
    requests.patch(url, json={"owner": ""}, headers=admin, timeout=5)
    code, out, err = ctl("edit", "search.v2")
    assert (
        code == 5 and "changed meanwhile (version 4, by admin" in err and "nothing was overwritten" in err
    ), err
    kept = pathlib.Path(err.split("your edit is kept in ", 1)[1].split()[0])
    assert "owner: search" in kept.read_text()
    kept.unlink()
    flag = requests.get(url, headers=admin, timeout=5).json()
    assert flag["description"] == "theirs" and flag["owner"] == "", "their change stands, nothing overwritten"


@pytest.mark.slow  # bash
def test_bash_completion_completes_commands_and_examples_are_in_help(tmp_path, capsys):
    assert main(["completion", "bash"]) == 0
    script = tmp_path / "flagctl.bash"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = " ".join(("flagctl", *words))
        cmd = f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _shtab_flagctl"
        cmd += '; echo "${COMPREPLY[@]}"'
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30).stdout.split()

    assert complete("ki") == ["kill"]
    assert complete("playbook", "re") == ["revert"]
    assert "--timeout-wait" in complete("kill", "--ti")
    with pytest.raises(SystemExit):
        main(["kill", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:\n  flagctl kill checkout.recs --reason" in help_text
    assert re.search(r"--reason REASON +why", help_text)
