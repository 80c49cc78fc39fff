"""Who may do what: the role matrix, bad and dead tokens, environment scope, token records, CLI.

Every route is called with a request that succeeds with the right token (the matrix proves it),
so a refusal can only come from authentication or authorization; refused requests must leave
Redis exactly as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from flagsvc.audit import AuditLog
from flagsvc.cli import main
from flagsvc.envs import EnvStore
from flagsvc.keys import EnvKeys, SystemKeys
from flagsvc.tokens import Role, TokenStore

from .conftest import SharedStack, dataset
from .helpers import ENV_URL, FLAGS_URL

PROBLEM = "application/problem+json"
ROLES = ("sdk", "reader", "operator", "admin")


@dataclasses.dataclass(frozen=True)
class Route:
    id: str
    method: str
    path: str
    role: str  # the least role allowed
    ok: int  # status with that role
    body: dict[str, Any] | None = None
    env: str | None = "production"  # the environment in the URL

    @property
    def writes(self) -> bool:
        return self.method != "GET"


WRITES = [
    Route("env-create", "PUT", "/api/v1/envs/qa", "admin", 201, env="qa"),
    Route("flag-put", "PUT", f"{FLAGS_URL}/new-flag", "admin", 201, {"kind": "release", "enabled": True}),
    Route("flag-patch", "PATCH", f"{FLAGS_URL}/live", "admin", 200, {"description": "changed"}),
    Route("flag-delete", "DELETE", f"{FLAGS_URL}/live", "admin", 200),
    Route(
        "flag-kill",
        "POST",
        f"{FLAGS_URL}/live/kill",
        "operator",
        200,
        {"reason": "P0: payments", "incident": "INC-1"},
    ),
    Route("flag-restore", "POST", f"{FLAGS_URL}/dead/restore", "operator", 200, {"reason": "fixed"}),
]
READS = [
    Route("envs-list", "GET", "/api/v1/envs", "reader", 200, env=None),
    Route("flags-list", "GET", FLAGS_URL, "reader", 200),
    Route("flag-get", "GET", f"{FLAGS_URL}/live", "reader", 200),
    Route("snapshot", "GET", f"{ENV_URL}/snapshot", "sdk", 200),
    Route("audit", "GET", f"{ENV_URL}/audit", "reader", 200),
]
ROUTES = WRITES + READS


def call(client: Any, route: Route, authorization: str | None, **headers: str) -> Any:
    if authorization is not None:
        headers["Authorization"] = authorization
    return client.open(route.path, method=route.method, json=route.body, headers=headers)


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


def assert_problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    body = json.loads(resp.get_data(as_text=True))
    assert body["status"] == status
    assert all(isinstance(body.get(k), str) and body[k] for k in ("type", "title", "detail")), body
    return body


def build_world(client: Any, auth: Any, r: Any) -> dict[str, str]:
    """Flags ``live`` (enabled) and ``dead`` (killed); Authorization values that must all get 401."""
    for key, enabled in (("live", True), ("dead", False)):
        resp = client.put(
            f"{FLAGS_URL}/{key}", json={"kind": "kill_switch", "enabled": enabled}, headers=auth("admin")
        )
        assert resp.status_code == 201
    store = TokenStore(r)
    _, revoked = store.create(name="revoked-admin", role=Role.ADMIN, envs=[], actor="t")
    store.revoke("revoked-admin", actor="t")
    _, expired = store.create(
        name="expired-admin", role=Role.ADMIN, envs=[], expires_in=timedelta(milliseconds=1), actor="t"
    )
    time.sleep(0.01)
    admin = auth("admin")["Authorization"].removeprefix("Bearer ")
    return {
        "garbage": "Bearer garbage",
        "wrong-scheme": f"Basic {admin}",
        "empty-bearer": "Bearer ",
        "malformed-fsk": "Bearer fsk_short_secret",
        "wrong-secret": bearer(admin[:-4] + ("AAAA" if not admin.endswith("AAAA") else "BBBB")),
        "revoked": bearer(revoked),
        "expired": bearer(expired),
    }


@pytest.fixture
def world(client: Any, auth: Any, r: Any) -> dict[str, str]:
    return build_world(client, auth, r)


@pytest.fixture(scope="module")
def world_once(shared: SharedStack) -> dict[str, str]:
    """The world, shared by the refused requests (each proves that it wrote nothing)."""
    return build_world(shared.client, shared.auth, shared.r)


# -- the role matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "role"),
    [pytest.param(route, role, id=f"{route.id}-{role}") for route in ROUTES for role in ROLES],
)
def test_role_matrix(
    client: Any, auth: Any, world: Any, snapshot_redis: Any, route: Route, role: str
) -> None:
    before = snapshot_redis()
    resp = call(client, route, auth(role)["Authorization"])
    if ROLES.index(role) < ROLES.index(route.role):
        problem = assert_problem(resp, 403)
        assert route.role in problem["detail"]
        assert snapshot_redis() == before
    else:
        assert resp.status_code == route.ok, resp.get_data(as_text=True)
        assert (snapshot_redis() != before) is route.writes


def test_no_authorization_is_401_with_a_bearer_challenge(
    client: Any, world: Any, snapshot_redis: Any
) -> None:
    before = snapshot_redis()
    for route in ROUTES:
        resp = call(client, route, None)
        assert_problem(resp, 401)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer"), route.id
    assert snapshot_redis() == before


@pytest.mark.parametrize("route", [pytest.param(r, id=r.id) for r in ROUTES])
@pytest.mark.parametrize(
    "credential",
    ["garbage", "wrong-scheme", "empty-bearer", "malformed-fsk", "wrong-secret", "revoked", "expired"],
)
def test_bad_or_dead_token_is_401(
    shared: SharedStack, world_once: dict[str, str], route: Route, credential: str
) -> None:
    before = dataset(shared.r)
    resp = call(shared.client, route, world_once[credential])
    assert_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert dataset(shared.r) == before


@pytest.mark.parametrize("route", [pytest.param(r, id=r.id) for r in ROUTES if r.env])
def test_token_scoped_to_another_env_is_403(
    client: Any, world: Any, make_token: Any, snapshot_redis: Any, route: Route
) -> None:
    elsewhere = make_token("admin", name="staging-admin", envs=["staging"])
    here = make_token("admin", name="here-admin", envs=[route.env])
    before = snapshot_redis()
    problem = assert_problem(call(client, route, bearer(elsewhere)), 403)
    assert route.env in problem["detail"]
    assert snapshot_redis() == before
    assert call(client, route, bearer(here)).status_code == route.ok


def test_env_list_shows_only_the_token_envs(client: Any, r: Any, make_token: Any) -> None:
    EnvStore(r).create("staging", actor="t")
    staging_reader = make_token("reader", name="staging-reader", envs=["staging"])
    resp = client.get("/api/v1/envs", headers={"Authorization": bearer(staging_reader)})
    assert resp.status_code == 200
    assert resp.json["envs"] == ["staging"]


# -- token lifetime ----------------------------------------------------------------------------


@pytest.mark.slow  # waits for the expiry (Redis's clock)
def test_token_stops_working_when_it_expires(client: Any, r: Any) -> None:
    record, secret = TokenStore(r).create(
        name="short-lived", role=Role.READER, envs=[], expires_in=timedelta(seconds=2), actor="t"
    )
    headers = {"Authorization": bearer(secret)}
    assert client.get(FLAGS_URL, headers=headers).status_code == 200
    assert record.expires_at is not None
    expires = datetime.fromisoformat(record.expires_at.replace("Z", "+00:00")).timestamp()
    time.sleep(max(0.0, expires - time.time()) + 0.05)
    resp = client.get(FLAGS_URL, headers=headers)
    assert_problem(resp, 401)


def test_revocation_takes_effect_within_a_second(live_server: str, r: Any, make_token: Any) -> None:
    secret = make_token("reader", name="leaked")
    url = f"{live_server}{FLAGS_URL}"
    headers = {"Authorization": bearer(secret)}
    ok_sent: list[float] = []  # when each request still accepted was sent, after revoke() began
    with requests.Session() as http:
        assert http.get(url, headers=headers, timeout=5).status_code == 200  # the server caches it now
        start = time.monotonic()
        TokenStore(r).revoke("leaked", actor="t")
        while (sent := time.monotonic() - start) < 1.5:
            status = http.get(url, headers=headers, timeout=5).status_code
            if status != 200:
                break
            ok_sent.append(sent)
            time.sleep(0.01)
    assert status == 401, "revoked token still accepted 1.5 s after revoke()"
    # no request sent a second or more after revoke() began was accepted
    assert not ok_sent or ok_sent[-1] < 1.0, f"accepted a request sent {ok_sent[-1]:.3f}s after revoke()"


def stream_until_closed(url: str, secret: str, timeout: float) -> tuple[list[str], float]:
    """Open an event stream; its lines until the server closes it, and when that happened."""
    lines: list[str] = []
    with requests.get(
        f"{url}/api/v1/envs/production/stream",
        headers={"Authorization": bearer(secret)},
        stream=True,
        timeout=timeout,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines(decode_unicode=True):
            lines.append(line)
            if line == "event: snapshot":
                opened = time.monotonic()
    return lines, time.monotonic() - opened


def test_an_open_stream_ends_within_a_second_of_its_revocation(
    live_server: str, r: Any, make_token: Any
) -> None:
    secret = make_token("sdk", name="leaked-sdk")
    revoked_at: list[float] = []

    def revoke_soon() -> None:
        time.sleep(1.0)
        revoked_at.append(time.monotonic())
        TokenStore(r).revoke("leaked-sdk", actor="t")

    threading.Thread(target=revoke_soon, daemon=True).start()
    lines, _ = stream_until_closed(live_server, secret, timeout=10)
    ended = time.monotonic()
    assert "event: revoked" in lines, lines
    assert ended - revoked_at[0] < 2.0, f"the stream outlived its revocation by {ended - revoked_at[0]:.1f} s"


@pytest.mark.slow  # waits for the expiry (Redis's clock)
def test_an_open_stream_ends_when_its_token_expires(live_server: str, r: Any) -> None:
    _, secret = TokenStore(r).create(
        name="short-sdk", role=Role.SDK, envs=[], expires_in=timedelta(seconds=2), actor="t"
    )
    lines, lasted = stream_until_closed(live_server, secret, timeout=10)
    assert "event: revoked" in lines, lines
    assert lasted < 4.0


def test_token_creation_and_revocation_are_in_the_system_audit_log(r: Any) -> None:
    store = TokenStore(r)
    record, secret = store.create(name="ci-bot", role=Role.OPERATOR, envs=["production"], actor="alice")
    store.revoke("ci-bot", actor="t", reason="rotated")
    log = AuditLog(r, SystemKeys())
    revoke, create = log.query(limit=10).entries
    assert create["action"] == "token.create"
    assert (create["actor"], create["token"]) == ("alice", "ci-bot")
    assert create["after"]["role"] == "operator" and create["after"]["envs"] == ["production"]
    assert create["after"]["id"] == record.id and create["after"]["active"] is True
    assert revoke["action"] == "token.revoke"
    assert (revoke["actor"], revoke["token"], revoke["reason"]) == ("t", "ci-bot", "rotated")
    assert revoke["before"]["active"] is True
    assert revoke["after"]["active"] is False and revoke["after"]["revoked_by"] == "t"
    assert log.verify().ok
    text = json.dumps([create, revoke])
    assert "sha256" not in text and secret.split("_", 2)[2] not in text


def test_only_the_sha256_of_a_secret_is_stored(
    client: Any, r: Any, make_token: Any, snapshot_redis: Any
) -> None:
    secret = make_token("admin", name="root")
    headers = {"Authorization": bearer(secret)}
    # use it, so that request handling (audit entries, caches) had every chance to leak it
    assert (
        client.put(
            f"{FLAGS_URL}/live", json={"kind": "kill_switch", "enabled": True}, headers=headers
        ).status_code
        == 201
    )
    assert client.post(f"{FLAGS_URL}/live/kill", json={"reason": "r"}, headers=headers).status_code == 200
    dump = json.dumps(snapshot_redis(), default=repr)
    random_part = secret.split("_", 2)[2]
    assert secret.startswith("fsk_")
    assert random_part not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump
    (stored,) = [t for t in TokenStore(r).list() if t.name == "root"]
    assert stored.sha256 == hashlib.sha256(secret.encode()).hexdigest()


def test_kill_actor_is_the_token_name_whatever_the_request_claims(
    client: Any, auth: Any, r: Any, make_token: Any, snapshot_redis: Any
) -> None:
    assert (
        client.put(
            f"{FLAGS_URL}/live", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin")
        ).status_code
        == 201
    )
    oncall = {"Authorization": bearer(make_token("operator", name="oncall-alice"))}
    before = snapshot_redis()
    claimed = client.post(f"{FLAGS_URL}/live/kill", json={"reason": "r", "actor": "mallory"}, headers=oncall)
    assert_problem(claimed, 422)
    assert snapshot_redis() == before
    resp = client.post(
        f"{FLAGS_URL}/live/kill?actor=mallory",
        json={"reason": "P0", "incident": "INC-9"},
        headers={
            **oncall,
            "X-Actor": "mallory",
            "X-Forwarded-User": "mallory",
            "X-Forwarded-For": "203.0.113.9",
        },
    )
    assert resp.status_code == 200 and resp.json["updated_by"] == "oncall-alice"
    entry = AuditLog(r, EnvKeys("production")).query(limit=1).entries[0]
    assert (entry["action"], entry["actor"], entry["reason"]) == ("flag.kill", "oncall-alice", "P0")
    assert entry["source"] == "127.0.0.1"  # no trusted proxy configured: X-Forwarded-For is ignored
    api_entry = client.get(f"{ENV_URL}/audit?limit=1", headers=auth("reader")).json["entries"][0]
    assert api_entry["actor"] == "oncall-alice"


# -- the flagsvc token CLI ---------------------------------------------------------------------


def flagsvc(redis_url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["token", *args, "--redis-url", redis_url])


def test_cli_token_create_list_revoke(r: Any, redis_url: str) -> None:
    created = flagsvc(
        redis_url, "create", "--name", "deploy-bot", "--role", "operator", "--env", "production"
    )
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("fsk_") and "\n" not in secret
    assert created.output.count(secret) == 1
    token = TokenStore(r).authenticate(secret)
    assert token is not None
    assert (token.name, token.role, token.envs) == ("deploy-bot", "operator", ["production"])

    listed = flagsvc(redis_url, "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert secret.split("_", 2)[2] not in listed.output
    (entry,) = json.loads(listed.stdout)
    assert (entry["name"], entry["role"], entry["active"]) == ("deploy-bot", "operator", True)
    assert "sha256" not in entry and "token" not in entry
    plain = flagsvc(redis_url, "list")
    assert plain.exit_code == 0 and "deploy-bot" in plain.output
    assert secret.split("_", 2)[2] not in plain.output

    revoked = flagsvc(redis_url, "revoke", "deploy-bot", "--reason", "rotated")
    assert revoked.exit_code == 0, revoked.output
    assert "deploy-bot" in revoked.output
    assert TokenStore(r).authenticate(secret) is None
    (entry,) = json.loads(flagsvc(redis_url, "list", "--json").stdout)
    assert entry["active"] is False and entry["revoked_at"]
    actions = [e["action"] for e in AuditLog(r, SystemKeys()).query().entries]
    assert actions == ["token.revoke", "token.create"]


def test_cli_token_create_with_expiry(r: Any, redis_url: str) -> None:
    created = flagsvc(redis_url, "create", "--name", "temp", "--role", "reader", "--expires", "12h", "--json")
    assert created.exit_code == 0, created.output
    shown = json.loads(created.stdout)
    assert shown["token"].startswith("fsk_") and created.output.count(shown["token"]) == 1
    assert shown["expires_at"] and shown["role"] == "reader"
    (stored,) = TokenStore(r).list()
    assert stored.expires_at == shown["expires_at"]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--name", "x", "--role", "superuser"], id="bad-role"),
        pytest.param(["--name", "x", "--role", "admin", "--expires", "forever"], id="expires-forever"),
        pytest.param(["--name", "x", "--role", "admin", "--expires", "0d"], id="expires-zero"),
        pytest.param(["--name", "x", "--role", "admin", "--expires", "30"], id="expires-no-unit"),
        pytest.param(["--name", "x", "--role", "admin", "--env", "Prod"], id="bad-env"),
        pytest.param(["--role", "admin"], id="no-name"),
    ],
)
def test_cli_token_create_usage_errors(r: Any, redis_url: str, snapshot_redis: Any, args: list[str]) -> None:
    before = snapshot_redis()
    result = flagsvc(redis_url, "create", *args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output or "Error" in result.output
    assert not result.stdout.startswith("fsk_")
    assert snapshot_redis() == before


def test_cli_refuses_duplicate_names_and_unknown_tokens(r: Any, redis_url: str) -> None:
    assert flagsvc(redis_url, "create", "--name", "dup", "--role", "sdk").exit_code == 0
    before = [t.id for t in TokenStore(r).list()]
    again = flagsvc(redis_url, "create", "--name", "dup", "--role", "admin")
    assert again.exit_code != 0 and "dup" in again.output
    assert [t.id for t in TokenStore(r).list()] == before
    missing = flagsvc(redis_url, "revoke", "nobody")
    assert missing.exit_code != 0 and "nobody" in missing.output
