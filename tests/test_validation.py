"""Bad input anywhere in the API: a 4xx problem+json naming the field at fault, and no write.

Every case of :data:`BAD` runs against a seeded environment (a boolean kill switch ``live``,
a killed ``dead`` flag, a number flag ``timeout`` and an archived ``gone``); Redis is dumped after
seeding and must be identical after the refused request. :data:`GOOD` holds the valid twins of
the bad inputs, so a validator that refused everything would fail there.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from .conftest import SharedStack, dataset
from .helpers import ENV_URL, FLAGS_URL

NEW = f"{FLAGS_URL}/new-flag"
PROBLEM = "application/problem+json"

#: A valid boolean flag: every bad body below breaks exactly one thing of it.
MINIMAL = {"kind": "release", "enabled": True}
NUMBER = {
    "kind": "ops",
    "type": "number",
    "enabled": True,
    "variants": {"short": 500, "long": 5000},
    "default_variant": "long",
    "off_variant": "short",
}


def flag(**changes: Any) -> dict[str, Any]:
    return {**MINIMAL, **changes}


def rule(**parts: Any) -> dict[str, Any]:
    return flag(rules=[parts])


def cond(operator: str, values: list[Any], **extra: Any) -> dict[str, Any]:
    return rule(
        conditions=[{"attribute": "app_version", "operator": operator, "values": values, **extra}],
        variant="on",
    )


def rollout(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return rule(rollout=list(parts), **extra)


_NO_BODY = object()


@dataclasses.dataclass(frozen=True)
class Case:
    """One request and the error it must get. ``field``/``where`` name the entry of ``errors``."""

    id: str
    method: str
    path: str
    body: Any = _NO_BODY
    status: int = 422
    field: str | None = None
    where: str = "body"
    raw: str | bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    marks: tuple[Any, ...] = ()


BAD: list[Case] = [
    # -- unknown fields, top level and nested
    Case("unknown-top-level-field", "PUT", NEW, flag(colour="red"), field="colour"),
    Case("unknown-field-in-rule", "PUT", NEW, rule(variant="on", priority=1), field="rules.0.priority"),
    Case(
        "unknown-field-in-condition",
        "PUT",
        NEW,
        cond("in", ["1.0.0"], negate=True),
        field="rules.0.conditions.0.negate",
    ),
    Case(
        "unknown-field-in-rollout",
        "PUT",
        NEW,
        rollout({"variant": "on", "weight": 1, "sticky": True}),
        field="rules.0.rollout.0.sticky",
    ),
    # -- wrong types and missing required fields
    Case("enabled-yes", "PUT", NEW, flag(enabled="yes"), field="enabled"),
    Case(
        "enabled-1",
        "PUT",
        NEW,
        flag(enabled=1),
        field="enabled",
    ),
    Case("kind-number", "PUT", NEW, flag(kind=3), field="kind"),
    Case("kind-unknown", "PUT", NEW, flag(kind="feature"), field="kind"),
    Case("type-unknown", "PUT", NEW, flag(type="integer"), field="type"),
    Case("kind-missing", "PUT", NEW, {"enabled": True}, field="kind"),
    Case("enabled-missing", "PUT", NEW, {"kind": "release"}, field="enabled"),
    Case(
        "weight-string",
        "PUT",
        NEW,
        rollout({"variant": "on", "weight": "10"}),
        field="rules.0.rollout.0.weight",
    ),
    Case(
        "weight-float",
        "PUT",
        NEW,
        rollout({"variant": "on", "weight": 1.5}),
        field="rules.0.rollout.0.weight",
    ),
    Case(
        "weight-negative",
        "PUT",
        NEW,
        rollout({"variant": "on", "weight": -1}),
        field="rules.0.rollout.0.weight",
    ),
    Case("tags-not-strings", "PUT", NEW, flag(tags=["ok", 7]), field="tags.1"),
    Case("description-null", "PUT", NEW, flag(description=None), field="description"),
    Case("rules-not-a-list", "PUT", NEW, flag(rules={"variant": "on"}), field="rules"),
    # -- the URL: flag key and environment
    Case("key-uppercase", "PUT", f"{FLAGS_URL}/New-Flag", MINIMAL, field="key", where="path"),
    Case("key-leading-dot", "PUT", f"{FLAGS_URL}/.hidden", MINIMAL, field="key", where="path"),
    Case("key-129-chars", "PUT", f"{FLAGS_URL}/{'k' * 129}", MINIMAL, field="key", where="path"),
    Case("key-with-space", "PUT", f"{FLAGS_URL}/new%20flag", MINIMAL, field="key", where="path"),
    Case("key-bad-on-kill", "POST", f"{FLAGS_URL}/Live/kill", {"reason": "r"}, field="key", where="path"),
    Case(
        "env-uppercase", "PUT", "/api/v1/envs/Production/flags/new-flag", MINIMAL, field="env", where="path"
    ),
    Case("env-create-bad-name", "PUT", "/api/v1/envs/-qa", field="env", where="path"),
    Case("env-unknown-put", "PUT", "/api/v1/envs/staging/flags/new-flag", MINIMAL, status=404),
    Case("env-unknown-kill", "POST", "/api/v1/envs/staging/flags/live/kill", {"reason": "r"}, status=404),
    Case("env-unknown-snapshot", "GET", "/api/v1/envs/staging/snapshot", status=404),
    # -- variants, their types and the variants the flag refers to
    Case(
        "number-flag-string-value",
        "PUT",
        NEW,
        {**NUMBER, "variants": {"short": "500", "long": 5000}},
        field="variants",
    ),
    Case(
        "boolean-flag-custom-variants",
        "PUT",
        NEW,
        flag(variants={"yes": "y", "no": "n"}, default_variant="yes", off_variant="no"),
        field="variants",
    ),
    Case(
        "string-flag-null-value",
        "PUT",
        NEW,
        flag(type="string", variants={"a": "x", "b": None}, default_variant="a", off_variant="b"),
        field="variants",
    ),
    Case(
        "string-flag-without-variants",
        "PUT",
        NEW,
        flag(type="string", default_variant="a", off_variant="a"),
        field="variants",
    ),
    Case("default-variant-unknown", "PUT", NEW, flag(default_variant="maybe"), field="default_variant"),
    Case("off-variant-unknown", "PUT", NEW, flag(off_variant="maybe"), field="off_variant"),
    # -- rules
    Case("rule-unknown-variant", "PUT", NEW, rule(variant="maybe"), field="rules.0.variant"),
    Case(
        "second-rule-unknown-variant",
        "PUT",
        NEW,
        flag(rules=[{"variant": "on"}, {"variant": "maybe"}]),
        field="rules.1.variant",
    ),
    Case(
        "rollout-unknown-variant",
        "PUT",
        NEW,
        rollout({"variant": "on", "weight": 1}, {"variant": "maybe", "weight": 1}),
        field="rules.0.rollout.1.variant",
    ),
    Case(
        "rule-variant-and-rollout",
        "PUT",
        NEW,
        rollout({"variant": "on", "weight": 1}, variant="on"),
        field="rules.0.variant",
    ),
    Case("rule-neither-variant-nor-rollout", "PUT", NEW, rule(conditions=[]), field="rules.0.variant"),
    Case(
        "rollout-weights-sum-zero",
        "PUT",
        NEW,
        rollout({"variant": "on", "weight": 0}, {"variant": "off", "weight": 0}),
        field="rules.0.rollout",
    ),
    Case("rollout-empty", "PUT", NEW, rollout(), field="rules.0.rollout"),
    Case(
        "bucket-by-without-rollout",
        "PUT",
        NEW,
        rule(variant="on", bucket_by="user_id"),
        field="rules.0.bucket_by",
    ),
    Case("numeric-operator-string", "PUT", NEW, cond("gt", ["5"]), field="rules.0.conditions.0.values"),
    Case("numeric-operator-two-values", "PUT", NEW, cond("lte", [1, 2]), field="rules.0.conditions.0.values"),
    Case(
        "semver-operator-bad-version",
        "PUT",
        NEW,
        cond("semver_gte", ["1.2"]),
        field="rules.0.conditions.0.values",
    ),
    Case("string-operator-number", "PUT", NEW, cond("starts_with", [4]), field="rules.0.conditions.0.values"),
    Case("in-operator-no-values", "PUT", NEW, cond("in", []), field="rules.0.conditions.0.values"),
    Case("unknown-operator", "PUT", NEW, cond("matches", ["^1"]), field="rules.0.conditions.0.operator"),
    # -- fields the server owns
    *(
        Case(f"server-owned-{name}", "PUT", NEW, flag(**{name: value}), field=name)
        for name, value in [
            ("version", 7),
            ("updated_at", "2024-01-01T00:00:00Z"),
            ("updated_by", "mallory"),
            ("archived", False),
            ("key", "new-flag"),
            ("created_at", "2024-01-01T00:00:00Z"),
        ]
    ),
    # -- the body as a whole
    Case("body-over-64-kib", "PUT", NEW, flag(description="x" * (65 * 1024)), status=413),
    Case(
        "body-text-plain",
        "PUT",
        NEW,
        raw='{"kind": "release", "enabled": true}',
        content_type="text/plain",
        status=415,
    ),
    Case("body-malformed-json", "PUT", NEW, raw='{"kind": "release", "enabled": tru', status=400),
    Case(
        "body-nan",
        "PUT",
        NEW,
        raw='{"kind": "ops", "type": "number", "enabled": true, "salt": NaN}',
        status=400,
    ),
    Case("body-infinity", "POST", f"{FLAGS_URL}/timeout/kill", raw='{"reason": Infinity}', status=400),
    Case("body-json-array", "PUT", NEW, [MINIMAL], field="(body)"),
    Case("body-json-string", "POST", f"{FLAGS_URL}/live/kill", "stop it", field="(body)"),
    Case(
        "body-deeply-nested",
        "PUT",
        NEW,
        raw="[" * 20_000 + "]" * 20_000,
        status=400,
    ),
    # -- kill and restore
    Case("kill-no-body", "POST", f"{FLAGS_URL}/live/kill", field="reason"),
    Case("kill-reason-missing", "POST", f"{FLAGS_URL}/live/kill", {"incident": "INC-1"}, field="reason"),
    Case("kill-reason-blank", "POST", f"{FLAGS_URL}/live/kill", {"reason": " \t "}, field="reason"),
    Case("kill-reason-not-string", "POST", f"{FLAGS_URL}/live/kill", {"reason": 42}, field="reason"),
    Case("restore-reason-missing", "POST", f"{FLAGS_URL}/dead/restore", {}, field="reason"),
    Case("restore-reason-blank", "POST", f"{FLAGS_URL}/dead/restore", {"reason": ""}, field="reason"),
    Case(
        "kill-incident-too-long",
        "POST",
        f"{FLAGS_URL}/live/kill",
        {"reason": "r", "incident": "i" * 129},
        field="incident",
    ),
    Case(
        "kill-actor-claim-in-body",
        "POST",
        f"{FLAGS_URL}/live/kill",
        {"reason": "r", "actor": "mallory"},
        field="actor",
    ),
    Case("kill-missing-flag", "POST", f"{FLAGS_URL}/nope/kill", {"reason": "r"}, status=404),
    Case("restore-missing-flag", "POST", f"{FLAGS_URL}/nope/restore", {"reason": "r"}, status=404),
    Case("kill-archived-flag", "POST", f"{FLAGS_URL}/gone/kill", {"reason": "r"}, status=404),
    # -- headers
    Case(
        "if-match-not-a-version",
        "PUT",
        f"{FLAGS_URL}/live",
        MINIMAL,
        headers={"If-Match": "abc"},
        field="If-Match",
        where="header",
    ),
    Case(
        "if-match-not-a-version-kill",
        "POST",
        f"{FLAGS_URL}/live/kill",
        {"reason": "r"},
        headers={"If-Match": "v1"},
        field="If-Match",
        where="header",
    ),
    Case(
        "if-match-stale-put",
        "PUT",
        f"{FLAGS_URL}/live",
        flag(kind="kill_switch", description="x"),
        headers={"If-Match": '"7"'},
        status=412,
    ),
    Case(
        "if-match-stale-patch",
        "PATCH",
        f"{FLAGS_URL}/live",
        {"description": "x"},
        headers={"If-Match": '"7"'},
        status=412,
    ),
    Case(
        "if-match-stale-kill",
        "POST",
        f"{FLAGS_URL}/live/kill",
        {"reason": "r"},
        headers={"If-Match": '"7"'},
        status=412,
    ),
    Case("if-match-stale-delete", "DELETE", f"{FLAGS_URL}/live", headers={"If-Match": '"7"'}, status=412),
    Case(
        "if-none-match-star-existing",
        "PUT",
        f"{FLAGS_URL}/live",
        MINIMAL,
        headers={"If-None-Match": "*"},
        status=412,
    ),
    Case(
        "idempotency-key-invalid",
        "POST",
        f"{FLAGS_URL}/live/kill",
        {"reason": "r"},
        headers={"Idempotency-Key": "two words"},
        field="Idempotency-Key",
        where="header",
    ),
    # -- PATCH: the change itself, and the flag it would produce
    Case(
        "patch-default-variant-unknown",
        "PATCH",
        f"{FLAGS_URL}/live",
        {"default_variant": "nope"},
        field="default_variant",
    ),
    Case("patch-unknown-field", "PATCH", f"{FLAGS_URL}/live", {"colour": "red"}, field="colour"),
    Case("patch-server-owned-version", "PATCH", f"{FLAGS_URL}/live", {"version": 99}, field="version"),
    Case("patch-enabled-yes", "PATCH", f"{FLAGS_URL}/live", {"enabled": "yes"}, field="enabled"),
    Case("patch-type-breaks-variants", "PATCH", f"{FLAGS_URL}/live", {"type": "number"}, field="variants"),
    Case(
        "patch-number-string-value",
        "PATCH",
        f"{FLAGS_URL}/timeout",
        {"variants": {"short": "1", "long": 2}},
        field="variants",
    ),
    Case("patch-missing-flag", "PATCH", f"{FLAGS_URL}/nope", {"description": "x"}, status=404),
    Case("delete-missing-flag", "DELETE", f"{FLAGS_URL}/nope", status=404),
    # -- query strings
    Case("audit-limit-zero", "GET", f"{ENV_URL}/audit?limit=0", field="limit", where="query"),
    Case("audit-limit-abc", "GET", f"{ENV_URL}/audit?limit=abc", field="limit", where="query"),
    Case("audit-limit-too-big", "GET", f"{ENV_URL}/audit?limit=1001", field="limit", where="query"),
    Case("audit-unknown-param", "GET", f"{ENV_URL}/audit?actorr=admin", field="actorr", where="query"),
    Case("audit-bad-cursor", "GET", f"{ENV_URL}/audit?cursor=abc", field="cursor", where="query"),
    Case(
        "audit-cursor-beyond-64-bit",
        "GET",
        f"{ENV_URL}/audit?cursor=99999999999999999999-0",
        field="cursor",
        where="query",
    ),
    Case("audit-bad-flag-filter", "GET", f"{ENV_URL}/audit?flag=Live", field="flag", where="query"),
    Case(
        "flags-include-archived-maybe",
        "GET",
        f"{FLAGS_URL}?include_archived=maybe",
        field="include_archived",
        where="query",
    ),
    Case("flags-unknown-param", "GET", f"{FLAGS_URL}?kind=ops", field="kind", where="query"),
    Case("get-missing-flag", "GET", f"{FLAGS_URL}/nope", status=404),
    # -- identifiers match whole: a trailing newline is not part of a name
    Case("key-trailing-newline", "PUT", f"{FLAGS_URL}/abc%0A", MINIMAL, field="key", where="path"),
    Case("env-trailing-newline", "PUT", "/api/v1/envs/qa%0A", field="env", where="path"),
    Case(
        "playbook-trailing-newline",
        "PUT",
        f"{ENV_URL}/playbooks/p%0A",
        {"changes": {"live": {"enabled": False}}},
        field="name",
        where="path",
    ),
    Case(
        "instance-trailing-newline",
        "POST",
        f"{ENV_URL}/clients/i%0A",
        {"app": "a", "applied_version": 1},
        field="instance",
        where="path",
    ),
    Case(
        "variant-trailing-newline",
        "PUT",
        NEW,
        flag(variants={"on\n": True, "off": False}),
        field="variants.on\n.key",
    ),
    # -- digits are ASCII digits
    Case(
        "for-fullwidth-digits",
        "POST",
        f"{FLAGS_URL}/live/kill",
        {"reason": "r", "for": "\uff13\uff10m"},
        field="for",
    ),
    Case(
        "for-arabic-digits",
        "POST",
        f"{FLAGS_URL}/live/kill",
        {"reason": "r", "for": "\u0663\u0660m"},
        field="for",
    ),
    Case(
        "if-match-arabic-digit",
        "PUT",
        f"{FLAGS_URL}/live",
        flag(description="x"),
        headers={"If-Match": '"\u0661"'},
        field="If-Match",
        where="header",
    ),
    # -- time windows a stream id cannot express
    Case("audit-since-overflow", "GET", f"{ENV_URL}/audit?since=999999w", field="since", where="query"),
    Case(
        "audit-since-before-1970",
        "GET",
        f"{ENV_URL}/audit?since=1969-12-31T23:59:59Z",
        field="since",
        where="query",
    ),
    Case("audit-until-year-1", "GET", f"{ENV_URL}/audit?until=0001-01-01", field="until", where="query"),
    Case(
        "audit-csv-since-year-1",
        "GET",
        f"{ENV_URL}/audit?since=0001-01-01",
        headers={"Accept": "text/csv"},
        field="since",
        where="query",
    ),
    # -- numbers Redis cannot count, strings it cannot store
    Case(
        "heartbeat-count-2-63",
        "POST",
        f"{ENV_URL}/clients/i-1",
        {"app": "a", "applied_version": 1, "counts": {"live": 2**63}},
        field="counts.live.value",
    ),
    Case(
        "reason-lone-surrogate",
        "POST",
        f"{FLAGS_URL}/live/kill",
        raw='{"reason": "paged \\udfff"}',
        field="reason",
    ),
    Case(
        "incident-lone-surrogate",
        "POST",
        f"{FLAGS_URL}/live/kill",
        raw='{"reason": "r", "incident": "INC-\\ud800"}',
        field="incident",
    ),
    Case(
        "description-lone-surrogate",
        "PUT",
        NEW,
        raw='{"kind": "release", "enabled": true, "description": "\\udfff"}',
        field="description",
    ),
    Case(
        "tag-lone-surrogate",
        "PUT",
        NEW,
        raw='{"kind": "release", "enabled": true, "tags": ["ok", "\\udc00"]}',
        field="tags.1",
    ),
    # -- PATCH may leave out top-level fields, never part of a rule
    Case(
        "patch-condition-without-values",
        "PATCH",
        f"{FLAGS_URL}/live",
        {"rules": [{"conditions": [{"attribute": "a", "operator": "gt"}], "variant": "on"}]},
        field="rules.0.conditions.0.values",
    ),
    # -- a reason is required and not blank, on revert as on apply
    Case("revert-blank-reason", "POST", f"{ENV_URL}/playbooks/p/revert", {"reason": "   "}, field="reason"),
    # -- a route without a body still rejects one rather than silently dropping it
    Case(
        "env-create-with-body",
        "PUT",
        "/api/v1/envs/qa",
        {"description": "QA"},
        field="description",
    ),
]


def send(client: Any, case: Case, headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"headers": {**headers, **case.headers}}
    if case.raw is not None:
        kwargs.update(data=case.raw, content_type=case.content_type)
    elif case.body is not _NO_BODY:
        kwargs.update(data=json.dumps(case.body), content_type=case.content_type)
    return client.open(case.path, method=case.method, **kwargs)


def assert_problem(resp: Any, status: int) -> dict[str, Any]:
    """An RFC 9457 problem document of ``status``."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    body = json.loads(resp.get_data(as_text=True))
    for name in ("type", "title", "detail"):
        assert isinstance(body.get(name), str) and body[name], (name, body)
    assert body["status"] == status
    return body


def seed(client: Any, admin: dict[str, str]) -> None:
    """``live`` (enabled kill switch), ``dead`` (killed), ``timeout`` (number), ``gone`` (archived)."""
    for key, body in [
        ("live", {"kind": "kill_switch", "enabled": True}),
        ("dead", {"kind": "kill_switch", "enabled": False}),
        ("timeout", NUMBER),
        ("gone", MINIMAL),
    ]:
        assert client.put(f"{FLAGS_URL}/{key}", json=body, headers=admin).status_code == 201
    assert client.delete(f"{FLAGS_URL}/gone", headers=admin).status_code == 200


@pytest.fixture
def seeded(client: Any, auth: Any) -> None:
    seed(client, auth("admin"))


@pytest.fixture(scope="module")
def seeded_once(shared: SharedStack) -> SharedStack:
    """The seeded environment, shared by the refused requests (each proves that it wrote nothing)."""
    seed(shared.client, shared.auth("admin"))
    return shared


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in BAD])
def test_bad_input_is_a_problem_and_writes_nothing(seeded_once: SharedStack, case: Case) -> None:
    before = dataset(seeded_once.r)
    resp = send(seeded_once.client, case, seeded_once.auth("admin"))
    assert resp.status_code < 500, resp.get_data(as_text=True)
    problem = assert_problem(resp, case.status)
    if case.field is not None:
        errors = problem.get("errors")
        assert isinstance(errors, list) and errors, problem
        assert all(isinstance(e.get("field"), str) and e.get("message") for e in errors), errors
        assert (case.field, case.where) in {(e["field"], e.get("location")) for e in errors}, errors
    assert dataset(seeded_once.r) == before


GOOD: list[Case] = [
    Case("minimal-boolean", "PUT", NEW, MINIMAL, status=201),
    Case("number-flag", "PUT", NEW, NUMBER, status=201),
    Case("key-128-chars", "PUT", f"{FLAGS_URL}/{'k' * 128}", MINIMAL, status=201),
    Case("key-dots-dashes", "PUT", f"{FLAGS_URL}/checkout.recs_v2-b", MINIMAL, status=201),
    Case(
        "rules-of-every-shape",
        "PUT",
        NEW,
        flag(
            rules=[
                {
                    "conditions": [{"attribute": "country", "operator": "in", "values": ["FR", "BE"]}],
                    "variant": "on",
                },
                {"conditions": [{"attribute": "age", "operator": "gte", "values": [18]}], "variant": "off"},
                {
                    "conditions": [{"attribute": "v", "operator": "semver_lt", "values": ["1.4.0-rc.1"]}],
                    "variant": "on",
                },
                {
                    "rollout": [{"variant": "on", "weight": 0}, {"variant": "off", "weight": 3}],
                    "bucket_by": "user_id",
                },
            ],
            tags=["checkout"],
        ),
        status=201,
    ),
    Case("patch-description", "PATCH", f"{FLAGS_URL}/live", {"description": "x"}, status=200),
    Case(
        "put-if-match-current",
        "PUT",
        f"{FLAGS_URL}/live",
        flag(description="x"),
        headers={"If-Match": '"1"'},
        status=200,
    ),
    Case(
        "kill-full-body", "POST", f"{FLAGS_URL}/live/kill", {"reason": "r", "incident": "i" * 128}, status=200
    ),
    Case("restore", "POST", f"{FLAGS_URL}/dead/restore", {"reason": "fixed"}, status=200),
    Case("audit-limit-bounds", "GET", f"{ENV_URL}/audit?limit=1000", status=200),
    Case("flags-include-archived", "GET", f"{FLAGS_URL}?include_archived=true", status=200),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GOOD])
def test_valid_twins_of_the_bad_inputs_are_accepted(client: Any, auth: Any, seeded: None, case: Case) -> None:
    resp = send(client, case, auth("admin"))
    assert resp.status_code == case.status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"


def test_include_archived_true_lists_archived_flags(client: Any, auth: Any, seeded: None) -> None:
    keys = {
        f["key"]
        for f in client.get(f"{FLAGS_URL}?include_archived=true", headers=auth("reader")).json["flags"]
    }
    assert "gone" in keys
    keys = {
        f["key"]
        for f in client.get(f"{FLAGS_URL}?include_archived=false", headers=auth("reader")).json["flags"]
    }
    assert "gone" not in keys


def test_audit_cursor_before_the_first_entry_is_not_a_server_error(
    client: Any, auth: Any, seeded: None
) -> None:
    resp = client.get(f"{ENV_URL}/audit?cursor=0-0", headers=auth("reader"))
    if resp.status_code == 200:
        assert resp.json == {"entries": [], "next_cursor": None}
    else:
        assert_problem(resp, 422)


def test_an_accepted_flag_stays_readable(client: Any, auth: Any) -> None:
    """Whatever nesting depth the service accepts, it must be able to show it back, audit included.

    The exact depth at which Python's JSON recursion limit bites depends on the stack, so scan a
    range: each depth is either refused with a 4xx or fully readable afterwards.
    """
    admin = auth("admin")
    for depth in range(880, 1000):
        raw = json.dumps(
            {**NUMBER, "type": "json", "variants": {"a": "DEEP"}, "default_variant": "a", "off_variant": "a"}
        )
        raw = raw.replace('"DEEP"', "[" * depth + "]" * depth)
        resp = client.put(
            f"{FLAGS_URL}/deep-{depth}", data=raw, content_type="application/json", headers=admin
        )
        assert resp.status_code < 500, f"PUT at depth {depth}: {resp.status_code}"
        if resp.status_code >= 400:
            assert_problem(resp, resp.status_code)
            continue
        for path in (
            f"{FLAGS_URL}/deep-{depth}",
            FLAGS_URL,
            f"{ENV_URL}/snapshot",
            f"{ENV_URL}/audit?limit=1",
        ):
            got = client.get(path, headers=admin)
            assert got.status_code == 200, f"GET {path} after accepting depth {depth}: {got.status_code}"
