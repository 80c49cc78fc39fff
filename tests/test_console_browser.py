"""The console in a real browser (Debian's Chromium driven by Playwright) against `flagsvc serve`:
an incident contained from the overview, seen by a real FlagClient, reviewed in the audit page;
an admin's edit and a stale one; a playbook applied and reverted with its preview; a reader's
view; CSRF; sign-out."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flagsvc_client import FlagClient

from .helpers import TIMEOUT_FLAG, wait_for
from .served import Served

pytestmark = pytest.mark.slow  # a browser and flagsvc serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
API = "/api/v1/envs/production"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`flagsvc serve` with two flags and a playbook, and a token of each role."""
    data_dir = tmp_path_factory.mktemp("console") / "data"
    served = Served(data_dir)
    try:
        admin = served.admin_token()
        headers = {"Authorization": f"Bearer {admin}"}
        for key, body in {
            "checkout.recs": {"kind": "kill_switch", "enabled": True},
            "payments.timeout-ms": TIMEOUT_FLAG,
        }.items():
            assert requests.put(f"{served.url}{API}/flags/{key}", json=body, headers=headers, timeout=5).ok
        book = {"description": "shed load", "changes": {"payments.timeout-ms": {"default_variant": "short"}}}
        assert requests.put(
            f"{served.url}{API}/playbooks/checkout-degraded", json=book, headers=headers, timeout=5
        ).ok
        tokens = {"admin": admin}
        for role in ("operator", "reader", "sdk"):
            tokens[role] = _token(data_dir, role)
        yield {"url": served.url, "tokens": tokens}
    finally:
        served.stop()


def _token(data_dir: Path, role: str) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "flagsvc.cli", "token", "create", "--name", f"oncall-{role}", "--role", role,
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return created.stdout.strip()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        warnings.warn("chromium not found: the console browser tests are SKIPPED", stacklevel=1)
        pytest.skip("CHROMIUM IS ABSENT: install Debian's chromium to run the console browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


def sign_in(page: Any, stack: dict[str, Any], role: str) -> None:
    page.goto(f"{stack['url']}/")
    page.get_by_label("API token").fill(stack["tokens"][role])
    page.keyboard.press("Enter")  # the keyboard alone
    page.wait_for_url(re.compile(r"/ui/envs/production$"))


def test_an_operator_contains_an_incident_and_the_sdk_sees_it(page: Any, stack: dict[str, Any]) -> None:
    sdk = FlagClient(stack["url"], stack["tokens"]["sdk"], "production", mode="stream", init_timeout=5)
    try:
        assert sdk.is_enabled("checkout.recs") is True
        sign_in(page, stack, "operator")
        assert page.title() == "production: overview · flagsvc console"
        page.get_by_role("link", name="Kill checkout.recs").click()
        assert page.get_by_role("heading", name="Blast radius (dry run, last 15 minutes)").is_visible()
        page.get_by_label("Reason").fill("INC-77: checkout p95 at 9 s")
        page.get_by_label("Incident id").fill("INC-77")
        page.get_by_role("button", name="Confirm: kill checkout.recs").click()
        page.wait_for_url(re.compile(r"done="))
        assert "checkout.recs killed" in page.get_by_role("status").first.inner_text()
        row = page.get_by_role("row").filter(has_text="checkout.recs")
        assert "KILLED" in row.inner_text(), "the state is a word, not only a colour"
        wait_for(lambda: sdk.is_enabled("checkout.recs") is False, 10, "the SDK sees the kill")
        _wait_for_the_strip(page, stack, r"1 of 1 live SDK instances current")

        page.get_by_role("link", name="Audit").click()
        page.get_by_label("Incident").fill("INC-77")
        page.get_by_role("button", name="Filter").click()
        entry = page.get_by_role("row").filter(has_text="flag.kill")
        assert "INC-77: checkout p95 at 9 s" in entry.inner_text() and "oncall-operator" in entry.inner_text()

        page.get_by_role("link", name="Overview").click()
        page.get_by_role("link", name="Restore checkout.recs").click()
        page.get_by_label("Reason").fill("INC-77 fixed")
        page.get_by_role("button", name="Confirm: restore checkout.recs").click()
        page.wait_for_url(re.compile(r"done="))
        wait_for(lambda: sdk.is_enabled("checkout.recs") is True, 10, "the SDK sees the restore")
    finally:
        sdk.close()
        _restored(stack, "checkout.recs")  # a failure above must not fail the tests that follow


def _wait_for_the_strip(page: Any, stack: dict[str, Any], pattern: str, timeout: float = 15.0) -> None:
    """Wait for the live propagation strip to match ``pattern``; else fail with what the strip
    and the API said."""
    strip = page.locator("[data-field=text]").first
    try:
        wait_for(lambda: re.search(pattern, strip.inner_text()), timeout, "the strip")
    except pytest.fail.Exception:
        clients = requests.get(
            f"{stack['url']}{API}/clients", headers=_bearer(stack, "admin"), timeout=5
        ).json()
        pytest.fail(
            f"the strip says {strip.inner_text()!r}, not /{pattern}/; /clients: "
            f"version {clients.get('version')}, {clients.get('summary')}, {clients.get('instances')}"
        )


def _restored(stack: dict[str, Any], key: str) -> None:
    flag = f"{stack['url']}{API}/flags/{key}"
    if not requests.get(flag, headers=_bearer(stack, "admin"), timeout=5).json()["enabled"]:
        restore = {"reason": "test clean-up after a failure"}
        assert requests.post(f"{flag}/restore", json=restore, headers=_bearer(stack, "admin"), timeout=5).ok


def test_an_admin_edits_a_rule_and_a_stale_edit_is_explained(page: Any, stack: dict[str, Any]) -> None:
    sign_in(page, stack, "admin")
    page.get_by_role("link", name="payments.timeout-ms", exact=True).click()
    editor = page.get_by_role("textbox", name=re.compile("^Definition"))
    condition = {"attribute": "region", "operator": "in", "values": ["eu"]}
    rule = '"rules": ' + json.dumps([{"conditions": [condition], "variant": "short"}])
    editor.fill(editor.input_value().replace('"rules": []', rule))
    page.get_by_role("button", name="Save").click()
    assert "Saved" in page.get_by_role("status").inner_text()
    assert "region in" in page.locator("dl.definition").inner_text()
    flag = requests.get(
        f"{stack['url']}{API}/flags/payments.timeout-ms", headers=_bearer(stack, "reader"), timeout=5
    )
    assert flag.json()["rules"][0]["variant"] == "short"

    # Someone else changes the flag while this page is open: the save is refused and explained.
    editor = page.get_by_role("textbox", name=re.compile("^Definition"))
    editor.fill(editor.input_value().replace('"eu"', '"eu", "uk"'))
    requests.patch(
        f"{stack['url']}{API}/flags/payments.timeout-ms",
        json={"owner": "payments"},
        headers=_bearer(stack, "admin"),
        timeout=5,
    )
    page.get_by_role("button", name="Save").click()
    alert = page.get_by_role("alert").inner_text()
    assert "changed since you opened it" in alert and "owner" in alert and "Nothing was overwritten" in alert
    assert '"uk"' in page.get_by_role("textbox", name=re.compile("^Definition")).input_value(), (
        "the edit is still there"
    )


def test_a_playbook_is_applied_and_reverted_with_its_preview(page: Any, stack: dict[str, Any]) -> None:
    sign_in(page, stack, "operator")
    page.get_by_role("link", name="Playbooks").click()
    page.get_by_role("link", name="checkout-degraded", exact=True).click()
    preview = page.locator("section.preview").inner_text()
    assert "payments.timeout-ms" in preview and '"normal"' in preview and '"short"' in preview
    page.get_by_label("Reason").fill("p95 high")
    page.get_by_label("Incident id").fill("INC-78")
    page.get_by_role("button", name="Confirm: apply checkout-degraded").click()
    assert "applied" in page.get_by_role("heading", level=1).inner_text()
    page.get_by_role("link", name="Back to the overview").click()
    assert "checkout-degraded" in page.get_by_role("region", name="Applied playbooks").inner_text()

    page.get_by_role("link", name="Playbooks").click()
    page.get_by_role("link", name="checkout-degraded", exact=True).click()
    assert "Preview: what revert would change" in page.locator("section.preview").inner_text()
    page.get_by_label("Reason").fill("p95 back to normal")
    page.get_by_role("button", name="Confirm: revert checkout-degraded").click()
    assert "reverted" in page.get_by_role("heading", level=1).inner_text()
    flag = requests.get(
        f"{stack['url']}{API}/flags/payments.timeout-ms", headers=_bearer(stack, "reader"), timeout=5
    )
    assert flag.json()["default_variant"] == "normal"


def test_a_reader_sees_no_kill_button_and_forged_or_csrf_less_posts_are_refused(
    page: Any, stack: dict[str, Any]
) -> None:
    sign_in(page, stack, "reader")
    assert page.get_by_role("row").filter(has_text="checkout.recs").is_visible()
    assert page.get_by_role("link", name=re.compile("^Kill ")).count() == 0
    csrf = page.locator("input[name=csrf]").first.input_value()
    url = f"{stack['url']}/ui/envs/production/flags/checkout.recs/kill"
    forged = page.request.post(url, form={"csrf": csrf, "reason": "forged"})
    assert forged.status == 403
    no_csrf = page.request.post(url, form={"reason": "no csrf"})
    assert no_csrf.status == 403
    flag = requests.get(
        f"{stack['url']}{API}/flags/checkout.recs", headers=_bearer(stack, "reader"), timeout=5
    )
    assert flag.json()["enabled"] is True


def test_sign_out_ends_the_session(page: Any, stack: dict[str, Any]) -> None:
    sign_in(page, stack, "operator")
    cookies = page.context.cookies()
    session = next(c for c in cookies if c["name"] == "flagsvc_console")
    assert (
        session["httpOnly"]
        and session["sameSite"] == "Strict"
        and stack["tokens"]["operator"] not in session["value"]
    )
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/ui/signin"))
    page.context.add_cookies([session])  # the old cookie, replayed
    page.goto(f"{stack['url']}/ui/envs/production")
    assert "/ui/signin" in page.url


def test_the_overview_reads_on_a_phone(browser: Any, stack: dict[str, Any]) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        sign_in(page, stack, "operator")
        kill = page.get_by_role("link", name="Kill checkout.recs")
        box = kill.bounding_box()
        assert box is not None and box["x"] + box["width"] <= 390, "the kill button is on the screen"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling"
    finally:
        context.close()


def _bearer(stack: dict[str, Any], role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack['tokens'][role]}"}
