"""The read tier: the shipped nginx cache (ops/nginx/flagsvc.conf) in front of `flagsvc serve`.

Many SDKs poll through one cache node; the origin sees about one conditional poll per second per
token, tokens never share an answer, a revocation and a kill get through within seconds, gzip is
what it claims to be, and no cache file holds a token (docs/read-tier.md)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from flagsvc.cli import main

from .helpers import wait_for
from .nginx import needs_nginx, nginx_conf, plain_site, running_nginx
from .redis_server import free_port
from .served import Served

pytestmark = [pytest.mark.slow, needs_nginx]  # flagsvc serve and nginx

#: ``X-Cache-Status`` of an answer nginx gave from its cache, without asking the origin first.
FROM_CACHE = {"HIT", "STALE", "UPDATING"}


@dataclass
class Tier:
    """`flagsvc serve` (the origin) behind the shipped nginx site (the cache node)."""

    served: Served
    edge: str  #: nginx's base URL
    cache_dir: Path
    admin: dict[str, str]

    @property
    def origin(self) -> str:
        return self.served.url

    def env(self, name: str, *flags: str) -> str:
        """A new environment with a kill switch per ``flags``; returns its path."""
        path = f"/api/v1/envs/{name}"
        assert requests.put(f"{self.origin}{path}", headers=self.admin, timeout=5).status_code in (200, 201)
        for key in flags:
            body = {"kind": "kill_switch", "enabled": True}
            created = requests.put(
                f"{self.origin}{path}/flags/{key}", json=body, headers=self.admin, timeout=5
            )
            assert created.status_code == 201, created.text
        return path

    def token(self, name: str, *envs: str) -> str:
        """A new ``sdk`` token (scoped to ``envs``, all if none), made as an operator makes one."""
        scope = [arg for env in envs for arg in ("--env", env)]
        args = ["token", "create", "--name", name, "--role", "sdk", *scope, "--json"]
        result = CliRunner().invoke(main, [*args, "--data-dir", str(self.served.data_dir)])
        assert result.exit_code == 0, result.output
        secret: str = json.loads(result.output)["token"]
        return secret

    def revoke(self, name: str) -> None:
        args = ["token", "revoke", name, "--data-dir", str(self.served.data_dir)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output

    def origin_polls(self, env: str) -> int:
        """Snapshot polls the origin answered (200 and 304) in ``env``, all workers together."""
        text = requests.get(f"{self.origin}/metrics", timeout=5).text
        prefix = f'flagsvc_snapshot_polls_total{{env="{env}",'
        return sum(
            int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(prefix)
        )


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    root = tmp_path_factory.mktemp("read-tier")
    served = Served(root / "data")
    try:
        port = free_port()
        log = "log_format tier '$msec $status $upstream_cache_status $uri';\n"  # for a post-mortem
        conf = nginx_conf(
            root, plain_site(port, served.port, served.port), f"{log}  access_log {root}/access.log tier;"
        )
        with running_nginx(root, conf, f"http://127.0.0.1:{port}"):
            admin = {"Authorization": f"Bearer {served.admin_token()}"}
            yield Tier(served, f"http://127.0.0.1:{port}", root / "cache", admin)
    finally:
        served.stop()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def poll(base: str, path: str, headers: dict[str, str]) -> requests.Response:
    return requests.get(f"{base}{path}/snapshot", headers=headers, timeout=5)


def test_the_origin_answers_about_one_poll_per_second_per_token_whatever_the_client_rate(tier: Tier) -> None:
    path = tier.env("tier-load", "recs")
    tokens = [tier.token("load-a", "tier-load"), tier.token("load-b", "tier-load")]
    etag = poll(tier.edge, path, bearer(tokens[0])).headers["ETag"]
    for secret in tokens:  # each token's answer is in the cache: from here on, revalidations only
        assert poll(tier.edge, path, bearer(secret)).status_code == 200
    before, answered, refused = tier.origin_polls("tier-load"), [0], []
    lock, stop_at = threading.Lock(), time.monotonic() + 2.0

    def sdk(secret: str) -> None:
        session = requests.Session()
        session.headers.update({**bearer(secret), "If-None-Match": etag})
        while time.monotonic() < stop_at:
            status = session.get(f"{tier.edge}{path}/snapshot", timeout=5).status_code
            with lock:
                answered[0] += 1
                if status not in (200, 304):
                    refused.append(status)

    started = time.monotonic()
    threads = [threading.Thread(target=sdk, args=(tokens[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    at_origin = tier.origin_polls("tier-load") - before
    print(f"{answered[0]} polls through nginx in {seconds:.1f} s, {at_origin} at the origin")
    assert not refused
    assert answered[0] >= 300, f"only {answered[0]} polls through nginx in {seconds:.1f} s"
    # Each token's entry is fresh for 1 to 2 s, then revalidated once in the background.
    allowed = len(tokens) * (int(seconds) + 2)
    assert at_origin <= allowed, f"{at_origin} polls reached the origin for {answered[0]} in {seconds:.1f} s"


def test_a_cached_answer_is_never_served_to_another_token_or_to_no_token(tier: Tier) -> None:
    path = tier.env("tier-tokens", "recs")
    tier.env("tier-other")
    owner = tier.token("owner", "tier-tokens")
    assert poll(tier.edge, path, bearer(owner)).status_code == 200
    assert poll(tier.edge, path, bearer(owner)).headers["X-Cache-Status"] in FROM_CACHE

    elsewhere = tier.token("elsewhere", "tier-other")
    refusals = {
        "no token": {},
        "an unknown token": bearer("fsk_unknown_0123456789abcdef"),
        "a token of another environment": bearer(elsewhere),
        "another scheme": {"Authorization": f"Basic {owner}"},
    }
    for what, headers in refusals.items():
        for _ in range(2):  # nor is the refusal kept
            refused = poll(tier.edge, path, headers)
            assert refused.status_code in (401, 403), f"{what}: {refused.status_code}"
            assert refused.headers["Content-Type"] == "application/problem+json", what
            assert refused.headers["Cache-Control"] == "no-store", what

    # Another valid token of the environment gets its own answer, from the origin.
    before = tier.origin_polls("tier-tokens")
    assert poll(tier.edge, path, bearer(tier.token("sibling", "tier-tokens"))).status_code == 200
    assert tier.origin_polls("tier-tokens") == before + 1


def test_a_revoked_token_is_refused_through_the_cache_within_seconds(tier: Tier) -> None:
    path = tier.env("tier-revoke", "recs")
    secret = tier.token("soon-revoked", "tier-revoke")
    session = requests.Session()
    session.headers.update(bearer(secret))
    seen = [session.get(f"{tier.edge}{path}/snapshot", timeout=5) for _ in range(3)]
    assert [r.status_code for r in seen] == [200, 200, 200]
    assert seen[-1].headers["X-Cache-Status"] in FROM_CACHE

    tier.revoke("soon-revoked")
    # The token's entry stays fresh for at most 2 s, then serves at most 1 s while revalidating:
    # the revalidation's 401 is not kept, so the stale entry stops serving (docs/read-tier.md).
    # 3 s, and 1 s for a busy machine.
    took = wait_for(
        lambda: session.get(f"{tier.edge}{path}/snapshot", timeout=5).status_code == 401,
        timeout=4.0,
        what="401 for a revoked token through the cache",
        interval=0.05,
    )
    print(f"revoked token refused through the cache after {took:.2f} s")
    for _ in range(5):
        assert session.get(f"{tier.edge}{path}/snapshot", timeout=5).status_code == 401


def test_a_kill_reaches_polls_through_the_cache_within_seconds(tier: Tier) -> None:
    path = tier.env("tier-kill", "checkout.recs")
    session = requests.Session()
    session.headers.update(bearer(tier.token("poller", "tier-kill")))
    url = f"{tier.edge}{path}/snapshot"
    first = session.get(url, timeout=5)
    etag, flags = first.headers["ETag"], first.json()["flags"]
    assert flags["checkout.recs"]["enabled"] is True
    cached = session.get(url, headers={"If-None-Match": etag}, timeout=5)
    assert cached.status_code == 304, "nginx answers the SDK's If-None-Match"
    assert cached.headers["X-Cache-Status"] in FROM_CACHE, "polls go through the cache"

    killed = requests.post(
        f"{tier.origin}{path}/flags/checkout.recs/kill",
        json={"reason": "INC-7"},
        headers=tier.admin,
        timeout=5,
    )
    assert killed.status_code == 200, killed.text

    def sees_the_kill() -> bool:
        resp = session.get(url, headers={"If-None-Match": etag}, timeout=5)
        return resp.status_code == 200 and resp.json()["flags"]["checkout.recs"]["enabled"] is False

    took = wait_for(sees_the_kill, timeout=3.5, what="the kill through the cache", interval=0.05)
    print(f"kill seen through the cache after {took:.2f} s")


def raw(base: str, path: str, headers: dict[str, str]) -> tuple[requests.Response, bytes]:
    """The answer and its body as sent (not decoded)."""
    resp = requests.get(f"{base}{path}/snapshot", headers=headers, timeout=5, stream=True)
    with resp:
        return resp, resp.raw.read(decode_content=False)


@pytest.mark.parametrize("via", ["nginx", "origin"])
def test_gzip_when_asked_identity_otherwise_the_same_json(tier: Tier, via: str) -> None:
    path = tier.env(f"tier-gzip-{via}", *(f"flag.{n}" for n in range(30)))
    auth = bearer(tier.token(f"gzip-{via}", f"tier-gzip-{via}"))
    base = tier.edge if via == "nginx" else tier.origin
    reference = poll(tier.origin, path, {**auth, "Accept-Encoding": "identity"}).content
    for _ in range(2):  # filled, then from the cache; each encoding is its own entry
        zipped, body = raw(base, path, {**auth, "Accept-Encoding": "gzip"})
        assert zipped.status_code == 200 and zipped.headers["Content-Encoding"] == "gzip"
        assert int(zipped.headers["Content-Length"]) == len(body) < len(reference)
        assert gzip.decompress(body) == reference
        plain, body = raw(base, path, {**auth, "Accept-Encoding": "identity"})
        assert plain.status_code == 200 and "Content-Encoding" not in plain.headers
        assert int(plain.headers["Content-Length"]) == len(body) and body == reference
        for resp in (zipped, plain):
            assert resp.headers["Vary"] == "Authorization, Accept-Encoding"
            assert resp.headers["ETag"] == zipped.headers["ETag"]
    assert json.loads(reference)["env"] == f"tier-gzip-{via}"


def test_a_direct_sdk_still_revalidates_every_poll(tier: Tier) -> None:
    """What lets nginx keep an answer tells a private cache to keep it for no time at all."""
    path = tier.env("tier-direct", "recs")
    auth = bearer(tier.token("direct", "tier-direct"))
    first = poll(tier.origin, path, auth)
    directives = {d.strip() for d in first.headers["Cache-Control"].split(",")}
    assert {"max-age=0", "s-maxage=1"} <= directives
    before = tier.origin_polls("tier-direct")
    for _ in range(5):
        assert poll(tier.origin, path, {**auth, "If-None-Match": first.headers["ETag"]}).status_code == 304
    assert tier.origin_polls("tier-direct") == before + 5


def test_no_cache_file_holds_a_token(tier: Tier) -> None:
    path = tier.env("tier-files", "recs")
    secrets = [tier.token(f"files-{n}", "tier-files") for n in range(3)]
    for secret in secrets:
        for encoding in ("gzip", "identity"):
            assert poll(tier.edge, path, {**bearer(secret), "Accept-Encoding": encoding}).status_code == 200
    files = [p for p in tier.cache_dir.rglob("*") if p.is_file()]
    contents = [p.read_bytes() for p in files]
    kept = [c for c in contents if f"{path}/snapshot".encode() in c]
    assert len(kept) >= len(secrets) * 2, "each token and encoding has an entry of its own"
    for content in contents:
        for secret in secrets:
            assert secret.encode() not in content
        assert b"Bearer" not in content
        assert b"HTTP/1.1 200" in content, "only answers are kept, never refusals"


def test_event_streams_bypass_the_cache(tier: Tier) -> None:
    """A streaming SDK behind the same nginx gets a kill as it happens, not a second later."""
    path = tier.env("tier-stream", "recs")
    auth = bearer(tier.token("streamer", "tier-stream"))
    with requests.get(f"{tier.edge}{path}/stream", headers=auth, stream=True, timeout=5) as stream:
        assert stream.status_code == 200 and "X-Cache-Status" not in stream.headers
        events = (line for line in stream.iter_lines() if line.startswith(b"data: "))
        assert json.loads(next(events)[6:])["flags"]["recs"]["enabled"] is True
        killed = requests.post(
            f"{tier.origin}{path}/flags/recs/kill", json={"reason": "INC-8"}, headers=tier.admin, timeout=5
        )
        assert killed.status_code == 200, killed.text
        started = time.monotonic()
        assert json.loads(next(events)[6:])["flags"]["recs"]["enabled"] is False
        assert time.monotonic() - started < 1.0
