"""The one write skeleton: read with the audit head, let the caller decide, commit, retry.

Every store writes through :meth:`Writer.run`. One attempt reads, in one MULTI/EXEC, the audit
head, Redis' clock and whatever the caller asks for; the caller's ``decide`` turns that state into
a :class:`Change` (writes, audit entries built by :func:`audit_entry`, a notification and the
result to return), or refuses with a problem. The change is committed by ``commit.lua`` only if
the head has not moved; otherwise the attempt is made again on fresh state.

With an ``Idempotency-Key`` (:class:`IdempotencyRequest`), the result is stored in the same
commit - a decision that changes nothing too - so a retry of the request replays it, even after
other changes. A Redis failure while reading means nothing was written (503, store unavailable);
a failure while the commit is in flight means the outcome is unknown, and the answer says so.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from redis.cluster import RedisCluster

from .commit import Committer, Conflict, Idempotency, Op, Replayed, iso_from_ms
from .connection import Unconfirmed
from .errors import IdempotencyKeyReused, OutcomeUnknown, WriteContention
from .keys import Namespace
from .metrics import FLAG_CHANGES

T = TypeVar("T")

#: How many Idempotency-Key records one token keeps per namespace; older ones are forgotten.
IDEMPOTENCY_RECORDS_PER_TOKEN = 1000


@dataclass(frozen=True)
class WriteContext:
    """Who writes, from where and why: what the audit entry records."""

    actor: str
    source: str = ""
    request_id: str = ""
    reason: str = ""
    incident: str = ""


@dataclass(frozen=True)
class IdempotencyRequest:
    """A request's ``Idempotency-Key``, kept per token (``actor``) in the namespace written."""

    actor: str
    digest: str  #: of the key
    fingerprint: str  #: of method, path and body: the same key with another request is refused
    ttl: int


@dataclass(frozen=True)
class State:
    """What one attempt read: the audit head, Redis' time, and the caller's reads in order."""

    head: str
    now_ms: int
    values: list[Any]

    @property
    def now(self) -> str:
        """Redis' time written like an audit entry's ``time``."""
        return iso_from_ms(self.now_ms)


@dataclass(frozen=True)
class Change(Generic[T]):
    """A decision: ``result`` to return, and what to commit for it (nothing, for a no-op)."""

    result: T
    ops: Sequence[Op] = ()
    audit: Sequence[Mapping[str, str]] = ()
    notify: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a result is stored in an idempotency record and read back."""

    encode: Callable[[T], Any]
    decode: Callable[[Any], T]


@dataclass(frozen=True)
class Done(Generic[T]):
    """What :meth:`Writer.run` returns: the result, and whether it is a replay of an earlier one."""

    result: T
    replayed: bool = False


def next_record(
    fields: dict[str, Any], actor: str, now: str, *, version_of: Any = None, created_of: Any = None
) -> dict[str, Any]:
    """``fields`` as the next version of a stored record: one version past ``version_of``'s (the
    first without one), created when ``created_of`` was (else now), updated now by ``actor``."""
    return {
        **fields,
        "version": (version_of["version"] if version_of else 0) + 1,
        "created_at": created_of["created_at"] if created_of else now,
        "updated_at": now,
        "updated_by": actor,
    }


def audit_entry(
    ctx: WriteContext,
    action: str,
    *,
    flag: str = "",
    playbook: str = "",
    token: str = "",
    before: Any = None,
    after: Any = None,
    env_version: int | None = None,
    operation: str = "",
    reason: str | None = None,
    incident: str | None = None,
) -> dict[str, str]:
    """One audit entry's fields (``commit`` adds seq, time and the hashes). ``before`` and
    ``after`` are JSON-encoded; ``reason`` and ``incident`` default to the context's."""
    return {
        "actor": ctx.actor,
        "action": action,
        "flag": flag,
        "token": token,
        "before": "" if before is None else json.dumps(before),
        "after": "" if after is None else json.dumps(after),
        "reason": ctx.reason if reason is None else reason,
        "incident": ctx.incident if incident is None else incident,
        "request_id": ctx.request_id,
        "source": ctx.source,
        "env_version": "" if env_version is None else str(env_version),
        "operation": operation,
        "playbook": playbook,
    }


@dataclass
class Writer:
    """Runs read -> decide -> commit units of work on one Redis connection."""

    client: redis.Redis
    committer: Committer = field(init=False)
    #: Milliseconds since the epoch; ``None``: Redis' own clock (``TIME``), shared by every host.
    clock_ms: Callable[[], int] | None = None

    def __post_init__(self) -> None:
        self.committer = Committer(self.client, clock_ms=self.clock_ms)

    def run(
        self,
        ns: Namespace,
        read: Callable[[Any], object],
        decide: Callable[[State], Change[T]],
        *,
        idempotency: IdempotencyRequest | None = None,
        codec: Codec[T] | None = None,
        deadline_seconds: float = 5.0,
    ) -> Done[T]:
        """Read (``read`` queues commands on a transaction pipeline), decide, commit; again on a
        conflict until ``deadline_seconds`` (then 503, nothing written). ``decide`` may raise
        :class:`~flagsvc.commit.Conflict` too, when what it read shows a concurrent change."""
        if idempotency is not None:
            with outcome_unknown_on_failure(redis_errors=()):
                prior = self.committer.replay(
                    ns.idempotency(idempotency.actor, idempotency.digest), idempotency.ttl
                )
            if prior:
                return Done(_replayed(prior, idempotency, codec), replayed=True)
        deadline = time.monotonic() + deadline_seconds
        delay = 0.0005
        while True:
            try:
                state = self._read(ns, read)
                return self._commit(ns, state, decide(state), idempotency, codec)
            except Conflict:
                if time.monotonic() > deadline:
                    raise WriteContention("the data kept changing; nothing was written") from None
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.02)

    def _read(self, ns: Namespace, read: Callable[[Any], object]) -> State:
        cluster = isinstance(self.client, RedisCluster)  # no keyless command in its transactions
        clock = self.client.time() if cluster else None
        pipe = self.client.pipeline(transaction=True)
        pipe.get(ns.audit_head)
        if clock is None:
            pipe.time()
        read(pipe)
        head, *values = pipe.execute()
        seconds, micros = clock if clock is not None else values.pop(0)
        now_ms = self.clock_ms() if self.clock_ms else int(seconds) * 1000 + int(micros) // 1000
        return State(head or "", now_ms, values)

    def _commit(
        self,
        ns: Namespace,
        state: State,
        change: Change[T],
        idempotency: IdempotencyRequest | None,
        codec: Codec[T] | None,
    ) -> Done[T]:
        assert change.audit or not change.ops, "every change has its audit entry"
        if not change.audit and idempotency is None:
            return Done(change.result)  # nothing to write, nothing to remember
        record = None
        if idempotency is not None:
            stored = {"fingerprint": idempotency.fingerprint, "result": _encode(change.result, codec)}
            record = Idempotency(
                ns.idempotency(idempotency.actor, idempotency.digest),
                json.dumps(stored),
                idempotency.ttl,
                ns.idempotency_index(idempotency.actor),
                IDEMPOTENCY_RECORDS_PER_TOKEN,
            )
        with outcome_unknown_on_failure():
            outcome = self.committer.commit(
                ns,
                state.head,
                ops=change.ops,
                audit=change.audit,
                idempotency=record,
                notify=json.dumps(change.notify) if change.notify is not None else None,
                time_ms=state.now_ms,
            )
        if isinstance(outcome, Replayed):
            assert idempotency is not None
            return Done(_replayed(outcome.value, idempotency, codec), replayed=True)
        for entry in change.audit:
            if entry.get("flag") and entry.get("after"):  # a flag's new state, not a skip
                FLAG_CHANGES.labels(ns.name, entry["action"]).inc()
        return Done(change.result)


@contextlib.contextmanager
def outcome_unknown_on_failure(
    redis_errors: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError),
) -> Iterator[None]:
    """Answer a write that Redis may have applied, but did not confirm, with ``outcome-unknown``:
    a commit not known to survive a failover, or (``redis_errors``) one whose answer was lost."""
    try:
        yield
    except Unconfirmed as exc:
        raise OutcomeUnknown(
            f"{exc}. Retry with the same Idempotency-Key (it replays, and confirms, a change that "
            "landed), or read the current state before trying again."
        ) from exc
    except redis_errors as exc:
        raise OutcomeUnknown(
            f"Redis failed while the change was being committed ({type(exc).__name__}): it may or "
            "may not have been applied. Retry with the same Idempotency-Key, or read the current "
            "state before trying again."
        ) from exc


def _encode(result: Any, codec: Codec[Any] | None) -> Any:
    return codec.encode(result) if codec is not None else result


def _replayed(stored: str, idempotency: IdempotencyRequest, codec: Codec[T] | None) -> T:
    record = json.loads(stored)
    if record.get("fingerprint") != idempotency.fingerprint:
        raise IdempotencyKeyReused("this Idempotency-Key was used for a different request; use a new key")
    result: T = codec.decode(record["result"]) if codec is not None else record["result"]
    return result
