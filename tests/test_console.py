"""The console's rules over HTTP: sessions, CSRF, roles, the write paths it shares with the API.
The same flows in a real browser: tests/test_console_browser.py."""

from __future__ import annotations

import json
import re

from .helpers import ENV_URL, FLAGS_URL, TIMEOUT_FLAG

UI = "/ui/envs/production"


def csrf_of(page: bytes) -> str:
    match = re.search(rb'name="csrf" value="([^"]+)"', page)
    assert match, "every page of a signed-in user carries its CSRF token"
    return match.group(1).decode()


def sign_in(client, tokens, role: str) -> str:
    """Sign ``client`` in with the token of ``role``; the session's CSRF token."""
    resp = client.post("/ui/signin", data={"token": tokens[role]})
    assert resp.status_code == 302, resp.data
    return csrf_of(client.get(f"{UI}").data)


def seed(client, auth) -> None:
    admin = auth("admin")
    client.put(f"{FLAGS_URL}/checkout.recs", json={"kind": "kill_switch", "enabled": True}, headers=admin)
    client.put(f"{FLAGS_URL}/payments.timeout-ms", json=TIMEOUT_FLAG, headers=admin)


def test_root_and_ui_lead_to_sign_in_and_a_bad_token_is_refused(client):
    assert client.get("/").headers["Location"] == "/ui/"
    assert "/ui/signin" in client.get("/ui/").headers["Location"]
    page = client.get("/ui/signin")
    assert page.status_code == 200 and b"<title>" in page.data and b'type="password"' in page.data
    refused = client.post("/ui/signin", data={"token": "fsk_000000000000_nope"})
    assert refused.status_code == 401 and b"unknown, revoked or expired" in refused.data


def test_the_session_cookie_is_signed_httponly_strict_and_expires_and_holds_no_secret(client, tokens):
    resp = client.post("/ui/signin", data={"token": tokens["operator"]})
    cookie = resp.headers["Set-Cookie"]
    assert (
        "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=" in cookie and "Path=/ui" in cookie
    )
    assert "Secure" not in cookie, "plain HTTP here; over TLS the cookie is Secure"
    secret = tokens["operator"].split("_", 2)[2]  # after fsk_ and the id (the secret may hold "_")
    assert tokens["operator"] not in cookie and secret not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert "." in value, "signed"
    client.set_cookie(
        "flagsvc_console", value[:-2] + ("AA" if not value.endswith("AA") else "BB"), path="/ui"
    )
    assert "/ui/signin" in client.get(UI).headers["Location"], "a tampered cookie is no session"
    secure = client.post("/ui/signin", data={"token": tokens["operator"]}, base_url="https://localhost")
    assert "Secure" in secure.headers["Set-Cookie"]


def test_an_operator_kills_with_a_reason_and_the_api_and_audit_see_it(client, tokens, auth):
    seed(client, auth)
    csrf = sign_in(client, tokens, "operator")
    overview = client.get(UI)
    assert b"Kill checkout.recs" in overview.data and overview.headers["Content-Security-Policy"].startswith(
        "default-src 'self'"
    )
    assert b"Blast radius" in client.get(f"{UI}/flags/checkout.recs/kill").data
    no_reason = client.post(f"{UI}/flags/checkout.recs/kill", data={"csrf": csrf, "reason": " "})
    assert no_reason.status_code == 422 and b"reason" in no_reason.data
    done = client.post(
        f"{UI}/flags/checkout.recs/kill",
        data={"csrf": csrf, "reason": "p95 at 9 s", "incident": "INC-9", "for": "30m"},
    )
    assert done.status_code == 302 and "killed" in done.headers["Location"]
    flag = client.get(f"{FLAGS_URL}/checkout.recs", headers=auth("reader")).json
    assert flag["enabled"] is False and flag["revert_at"] and flag["updated_by"] == "operator"
    entry = client.get(f"{ENV_URL}/audit?flag=checkout.recs&limit=1", headers=auth("reader")).json["entries"][
        0
    ]
    assert (entry["action"], entry["reason"], entry["incident"]) == ("flag.kill", "p95 at 9 s", "INC-9")
    page = client.get(UI).data
    assert b"KILLED" in page and b"p95 at 9 s" in page and b"data-countdown" in page


def test_a_reader_sees_no_kill_button_and_a_forged_post_is_refused(client, tokens, auth, snapshot_redis):
    seed(client, auth)
    csrf = sign_in(client, tokens, "reader")
    page = client.get(UI).data
    assert b"Kill checkout.recs" not in page and b"checkout.recs" in page
    before = snapshot_redis()
    forged = client.post(f"{UI}/flags/checkout.recs/kill", data={"csrf": csrf, "reason": "x"})
    assert forged.status_code == 403 and b"operator role" in forged.data
    assert snapshot_redis() == before


def test_a_post_without_the_csrf_token_is_refused(client, tokens, auth, snapshot_redis):
    seed(client, auth)
    sign_in(client, tokens, "operator")
    before = snapshot_redis()
    for data in ({"reason": "x"}, {"reason": "x", "csrf": "forged"}):
        resp = client.post(f"{UI}/flags/checkout.recs/kill", data=data)
        assert resp.status_code == 403 and b"CSRF" in resp.data
    assert snapshot_redis() == before


def test_sign_out_and_token_revocation_end_the_session(client, tokens, auth, make_token, app):
    csrf = sign_in(client, tokens, "operator")
    cookie = client.get_cookie("flagsvc_console", path="/ui").value
    assert client.post("/ui/signout", data={"csrf": csrf}).status_code == 302
    client.set_cookie("flagsvc_console", cookie, path="/ui")  # the old cookie, replayed
    assert "/ui/signin" in client.get(UI).headers["Location"]

    short = make_token("operator", name="leaked")
    assert client.post("/ui/signin", data={"token": short}).status_code == 302
    assert client.get(UI).status_code == 200
    app.extensions["flagsvc"].tokens.revoke("leaked", actor="test")
    app.extensions["flagsvc"].tokens.reload(short.split("_")[1])
    assert "/ui/signin" in client.get(UI).headers["Location"], "a revoked token's session ends"


def test_an_environment_outside_the_token_is_not_shown(client, make_token):
    staging_only = make_token("operator", name="staging-op", envs=["staging"])
    client.post("/ui/signin", data={"token": staging_only})
    assert client.get(UI).status_code == 404


def test_an_admin_edit_is_saved_with_if_match_and_a_stale_one_is_explained(client, tokens, auth):
    seed(client, auth)
    csrf = sign_in(client, tokens, "admin")
    page = client.get(f"{UI}/flags/payments.timeout-ms").data.decode()
    assert 'name="definition"' in page and 'name="version" value="1"' in page
    edited = json.dumps({**TIMEOUT_FLAG, "variants": {"normal": 2500, "short": 800}})
    saved = client.post(
        f"{UI}/flags/payments.timeout-ms", data={"csrf": csrf, "version": "1", "definition": edited}
    )
    assert saved.status_code == 302
    assert (
        client.get(f"{FLAGS_URL}/payments.timeout-ms", headers=auth("reader")).json["variants"]["normal"]
        == 2500
    )
    client.patch(f"{FLAGS_URL}/payments.timeout-ms", json={"owner": "payments"}, headers=auth("admin"))
    stale = client.post(
        f"{UI}/flags/payments.timeout-ms", data={"csrf": csrf, "version": "2", "definition": edited}
    )
    text = stale.data.decode()
    assert stale.status_code == 409 and "changed since you opened it" in text and "owner" in text
    assert "2500" in text, "the edit is shown again, not lost"
    assert client.get(f"{FLAGS_URL}/payments.timeout-ms", headers=auth("reader")).json["owner"] == "payments"
    operator_csrf = sign_in(client, tokens, "operator")
    assert b'name="definition"' not in client.get(f"{UI}/flags/payments.timeout-ms").data
    refused = client.post(
        f"{UI}/flags/payments.timeout-ms", data={"csrf": operator_csrf, "version": "3", "definition": edited}
    )
    assert refused.status_code == 403


def test_audit_filters_paging_exports_and_the_report(client, tokens, auth):
    seed(client, auth)
    csrf = sign_in(client, tokens, "operator")
    for i in range(3):
        action = "kill" if i % 2 == 0 else "restore"
        client.post(
            f"{UI}/flags/checkout.recs/{action}",
            data={"csrf": csrf, "reason": f"step {i}", "incident": "INC-5"},
        )
    page = client.get(f"{UI}/audit?incident=INC-5").data.decode()
    assert page.count("<tr>") == 1 + 3 and "step 2" in page and "enabled: true -&gt; false" in page
    assert "422" not in page and client.get(f"{UI}/audit?since=yesterday").status_code == 422
    exported = client.get(f"{UI}/audit.csv?incident=INC-5")
    assert exported.mimetype == "text/csv" and exported.data.decode().count("INC-5") == 3
    report = client.get(f"{UI}/report?incident=INC-5").data.decode()
    assert "Incident INC-5: flag changes" in report and "step 1" in report


def test_the_live_strip_streams_the_propagation_while_the_session_lasts(client, tokens):
    csrf = sign_in(client, tokens, "operator")
    resp = client.get(f"{UI}/live", buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    first = next(resp.response)
    event = json.loads(first.decode().removeprefix("data: "))
    assert {"version", "live", "applied_current", "lagging", "ofrep"} <= set(event)
    resp.close()
    client.post("/ui/signout", data={"csrf": csrf})
    assert client.get(f"{UI}/live").status_code == 302, "no stream without a session"
