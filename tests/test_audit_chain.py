"""`flagsvc audit verify`: passes on an intact log, names the first edited or removed entry."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from flagsvc.cli import main
from flagsvc.keys import EnvKeys, SystemKeys

from .helpers import FLAGS_URL


@pytest.fixture
def history(client, auth, r):
    """Five audited changes; returns the audit stream ids, oldest first."""
    client.put(f"{FLAGS_URL}/a", json={"kind": "kill_switch", "enabled": True}, headers=auth("admin"))
    for i in range(4):
        action = "kill" if i % 2 == 0 else "restore"
        resp = client.post(f"{FLAGS_URL}/a/{action}", json={"reason": f"step {i}"}, headers=auth("operator"))
        assert resp.status_code == 200
    return [stream_id for stream_id, _ in r.xrange(EnvKeys("production").audit)]


def verify(redis_url: str, *args: str):
    return CliRunner().invoke(main, ["audit", "verify", "--redis-url", redis_url, *args])


def test_intact_log_verifies(history, redis_url):
    result = verify(redis_url, "--env", "production")
    assert result.exit_code == 0, result.output
    assert "5 entries" in result.output
    system = verify(redis_url, "--system")
    assert system.exit_code == 0, system.output


def rewrite_entry(r, stream: str, stream_id: str, **changes: str) -> None:
    """Edit one entry in place, as someone with Redis access could: rebuild the stream with the
    same ids (a stream refuses ids below its top, so it is deleted and re-added whole)."""
    entries = r.xrange(stream)
    r.delete(stream)
    for sid, fields in entries:
        r.xadd(stream, {**fields, **changes} if sid == stream_id else fields, id=sid)


def test_edited_entry_is_named(history, redis_url, r):
    victim = history[2]
    rewrite_entry(r, EnvKeys("production").audit, victim, reason="nothing to see here")
    result = verify(redis_url, "--env", "production")
    assert result.exit_code == 1
    assert victim in result.output and "edited" in result.output


def test_rewritten_hash_breaks_the_next_link(history, redis_url, r):
    """Recomputing the edited entry's own hash is not enough: the next entry links to the old one."""
    from flagsvc.commit import entry_hash

    stream = EnvKeys("production").audit
    fields = dict(r.xrange(stream, min=history[1], max=history[1])[0][1])
    fields["actor"] = "someone-else"
    rewrite_entry(r, stream, history[1], actor="someone-else", hash=entry_hash(fields))
    result = verify(redis_url, "--env", "production")
    assert result.exit_code == 1 and history[2] in result.output


def test_removed_entry_is_detected(history, redis_url, r):
    r.xdel(EnvKeys("production").audit, history[1])
    result = verify(redis_url, "--env", "production")
    assert result.exit_code == 1
    assert history[2] in result.output and "removed" in result.output


def test_removed_newest_entry_is_detected(history, redis_url, r):
    r.xdel(EnvKeys("production").audit, history[-1])
    result = verify(redis_url, "--env", "production")
    assert result.exit_code == 1 and "newest" in result.output


def test_edited_system_log_is_detected(history, redis_url, r):
    first_id = r.xrange(SystemKeys().audit)[0][0]
    rewrite_entry(r, SystemKeys().audit, first_id, actor="someone-else")
    result = verify(redis_url, "--system")
    assert result.exit_code == 1 and first_id in result.output


def test_verify_needs_one_target(redis_url):
    assert verify(redis_url).exit_code == 2


def test_a_lost_tail_fails_against_a_head_copied_off_the_host(history, redis_url, r):
    """A rollback leaves a shorter chain that is valid as it is: only a head kept elsewhere shows
    that entries were lost."""
    ns = EnvKeys("production")
    copied = r.get(ns.audit_head)  # what an operator shipped off the host
    kept = r.xrange(ns.audit)[:3]
    r.delete(ns.audit)  # Redis rolled back to the third entry
    for stream_id, fields in kept:
        r.xadd(ns.audit, fields, id=stream_id)
    r.set(ns.audit_head, f"{kept[-1][1]['seq']}:{kept[-1][1]['hash']}")
    assert verify(redis_url, "--env", "production").exit_code == 0, "the shorter chain is valid"
    result = verify(redis_url, "--env", "production", "--expect-head", copied)
    assert result.exit_code == 1 and "tail was lost" in result.output
    assert verify(redis_url, "--env", "production", "--expect-head", "2:" + "0" * 64).exit_code == 1
    earlier = f"{kept[1][1]['seq']}:{kept[1][1]['hash']}"
    assert verify(redis_url, "--env", "production", "--expect-head", earlier).exit_code == 0
