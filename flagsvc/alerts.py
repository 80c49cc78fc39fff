"""Alert-driven containment: Prometheus Alertmanager's notifications apply and revert playbooks.

A playbook opts in with ``triggers`` (an alert triggers it when its labels include every label of
one trigger's ``match``) and ``auto: true``. For each alert of a notification and each playbook it
triggers, :class:`AlertReceiver` decides, and records the decision in the environment's audit log
(action ``alert.decision``, ``after.outcome``), refusals included:

- firing: ``applied``; or, without applying, ``not_auto`` (``auto`` is not true),
  ``already_applied``, ``cooldown`` (an alert applied it less than ``cooldown`` ago), ``daily_cap``
  (alerts applied it ``max_auto_applies_per_day`` times this UTC day), ``would_apply``
  (``mode: dry_run``: what would change is recorded instead), ``failed`` (it cannot apply);
- resolved, with ``revert_on_resolve``: ``reverted``; or ``not_applied``, ``applied_by_other`` (a
  person applied it: a person reverts it), ``still_firing`` (another alert of the notification
  triggers it and fires), ``would_revert`` (dry run); without ``revert_on_resolve``: ``no_revert``;
- an alert that triggers no playbook: ``no_match``.

Applying and reverting go through :class:`~flagsvc.playbooks.PlaybookStore`, with actor
``alertmanager:<token name>``, the reason made of the alert's annotations and the incident from the
playbook's ``incident_label`` (default: ``<alertname>-<fingerprint>``). The cooldown, the daily cap
and the ``applied`` decision are checked and written in the apply's own commit (:class:`AutoApply`),
so that workers receiving the same alert at once apply it once and count it once; the other
decisions of a notification are committed together after its applies and reverts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import redis

from .commit import Op, iso_from_ms
from .durations import parse_duration
from .errors import ProblemError
from .keys import EnvKeys
from .playbooks import Outcome, PlaybookConflict, PlaybookNotApplied, PlaybookNotFound, PlaybookStore
from .writes import Change, State, WriteContext, Writer, audit_entry

ACTION = "alert.decision"
ACTOR = "alertmanager"
FIRING, RESOLVED = "firing", "resolved"


@dataclass(frozen=True)
class Alert:
    """One alert of a notification, as :class:`~flagsvc.schemas.AlertmanagerAlertSchema` loads it."""

    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    ends_at: str = ""
    generator_url: str = ""
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def identity(self) -> str:
        """Alertmanager's fingerprint, else one of the labels (the same alert, the same identity)."""
        if self.fingerprint:
            return self.fingerprint
        return hashlib.sha256(json.dumps(self.labels, sort_keys=True).encode()).hexdigest()[:16]

    def incident(self, playbook: dict[str, Any] | None = None) -> str:
        """The playbook's ``incident_label`` of the alert, else ``<alertname>-<fingerprint>``."""
        label = (playbook or {}).get("incident_label")
        found = self.labels.get(label, "").strip() if label else ""
        return (found or f"{self.name or 'alert'}-{self.identity}")[:128]

    def reason(self) -> str:
        """What the audit log says why: the alert, its summary and description, where it comes from."""
        notes = [self.annotations.get(k, "").strip() for k in ("summary", "description")]
        text = " - ".join(n for n in notes if n) or "(no summary)"
        where = f" ({self.generator_url})" if self.generator_url else ""
        return f"alert {self.name or self.identity} {self.status}: {text}{where}"[:1000]

    def triggers(self, playbook: dict[str, Any]) -> bool:
        """Whether every label of one of the playbook's triggers equals the alert's."""
        return any(
            all(self.labels.get(k) == v for k, v in t["match"].items()) for t in playbook.get("triggers", [])
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "fingerprint": self.identity,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "labels": self.labels,
            "generator_url": self.generator_url,
        }


@dataclass
class Decision:
    """What was decided for one alert and one playbook it triggers (``playbook`` empty: none)."""

    alert: Alert
    playbook: str
    outcome: str
    detail: str
    incident: str
    operation: str = ""
    env_version: int | None = None
    changes: dict[str, Any] | None = None  #: what the apply or revert changed, or would change

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert.name,
            "fingerprint": self.alert.identity,
            "status": self.alert.status,
            "playbook": self.playbook or None,
            "outcome": self.outcome,
            "detail": self.detail,
            "incident": self.incident,
            "operation": self.operation or None,
            "env_version": self.env_version,
        }

    def audit(self, ctx: WriteContext) -> dict[str, str]:
        """The decision's ``alert.decision`` audit entry; its reason says the outcome first (what
        a listing shows), then the alert's reason."""
        after: dict[str, Any] = {
            "outcome": self.outcome,
            "detail": self.detail,
            "alert": self.alert.summary(),
        }
        if self.changes is not None:
            after.update(self.changes)
        return audit_entry(
            ctx, ACTION, playbook=self.playbook, after=after, operation=self.operation,
            reason=f"{self.outcome}: {self.detail}. {self.alert.reason()}"[:1000], incident=self.incident,
        )  # fmt: skip


class Refused(ProblemError):
    """An automatic apply refused by its guard (the decision is recorded, the answer is 200)."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome


@dataclass
class AutoApply:
    """The guard of an apply by an alert: ``auto``, the cooldown and the daily cap checked on what
    the apply's attempt reads, the count and the ``applied`` decision committed with it."""

    keys: EnvKeys
    decision: Decision
    ctx: WriteContext

    def read(self, pipe: Any) -> None:
        pipe.hget(self.keys.alert_applies, self.decision.playbook)

    def decide(
        self, state: State, values: list[Any], playbook: dict[str, Any], outcome: Outcome
    ) -> Change[None]:
        last = json.loads(values[0]) if values[0] else None
        if not playbook.get("auto"):
            raise Refused("not_auto", "the playbook is not auto: alerts do not apply it")
        if playbook.get("cooldown") and last:
            until = last["at_ms"] + int(parse_duration(playbook["cooldown"]).total_seconds() * 1000)
            if state.now_ms < until:
                raise Refused(
                    "cooldown",
                    f"an alert applied it at {last['at']}; cooldown {playbook['cooldown']}: "
                    f"not again before {iso_from_ms(until)}",
                )
        day = state.now[:10]
        count = last["count"] if last and last["day"] == day else 0
        cap = playbook.get("max_auto_applies_per_day")
        if cap is not None and count >= cap:
            raise Refused(
                "daily_cap",
                f"alerts applied it {count} times on {day} (UTC): max_auto_applies_per_day is {cap}",
            )
        operation = outcome.operation
        record = {
            "at_ms": state.now_ms,
            "at": state.now,
            "day": day,
            "count": count + 1,
            "operation": operation,
        }
        decision = self.decision
        decision.outcome, decision.operation = "applied", operation
        decision.detail = f"applied: changed {_flags(outcome.changed)} ({count + 1} today)"
        decision.changes = {"changed": outcome.changed, "unchanged": outcome.unchanged}
        return Change(
            None,
            ops=[Op("HSET", self.keys.alert_applies, (self.decision.playbook, json.dumps(record)))],
            audit=[self.decision.audit(self.ctx)],
        )


class AlertReceiver:
    """Decides, applies, reverts and records what the alerts of one notification call for."""

    def __init__(self, client: redis.Redis, playbooks: PlaybookStore) -> None:
        self._redis = client
        self._playbooks = playbooks
        self._writer = Writer(client)

    def receive(self, env: str, alerts: list[Alert], ctx: WriteContext) -> list[Decision]:
        """Every decision, per alert and triggered playbook, in order; each one audited."""
        books = [p for p in self._playbooks.list(env) if p.get("triggers")]
        firing = {p["name"] for a in alerts if a.status == FIRING for p in books if a.triggers(p)}
        decisions, unrecorded = [], []
        for alert in alerts:
            names = [p["name"] for p in books if alert.triggers(p)]
            if not names:
                decision = Decision(alert, "", "no_match", "the alert triggers no playbook", alert.incident())
                decisions.append(decision)
                unrecorded.append(decision)
            for name in names:
                if alert.status == FIRING:
                    decision, recorded = self._fire(env, alert, name, ctx)
                else:
                    decision, recorded = self._resolve(env, alert, name, ctx, name in firing)
                decisions.append(decision)
                if not recorded:
                    unrecorded.append(decision)
        if unrecorded:
            entries = [d.audit(ctx) for d in unrecorded]
            self._writer.run(EnvKeys(env), lambda pipe: None, lambda state: Change(None, audit=entries))
        return decisions

    def _fire(self, env: str, alert: Alert, name: str, ctx: WriteContext) -> tuple[Decision, bool]:
        """Apply ``name`` for a firing alert; ``(decision, whether it is recorded already)``."""
        try:
            book = self._playbooks.get(env, name)
        except PlaybookNotFound as exc:
            return Decision(alert, name, "failed", exc.detail, alert.incident()), False
        decision = Decision(alert, name, "applied", "", alert.incident(book))
        dry_run = book.get("mode") == "dry_run"
        if not book.get("auto"):
            return _refused(decision, "not_auto", "the playbook is not auto: alerts do not apply it"), False
        if book["applied"]:
            return _refused(decision, "already_applied", _applied(book["applied"])), False
        act = replace(ctx, reason=alert.reason(), incident=decision.incident)
        try:
            done = self._playbooks.apply(
                env, name, act, dry_run=dry_run, guard=AutoApply(EnvKeys(env), decision, act)
            )
        except Refused as exc:
            return _refused(decision, exc.outcome, exc.detail), False
        except (PlaybookConflict, PlaybookNotFound) as exc:
            applied = self._applied(env, name)
            if applied is not None:  # another worker applied it meanwhile
                return _refused(decision, "already_applied", _applied(applied)), False
            return _refused(decision, "failed", exc.detail), False
        outcome = done.result
        if dry_run:
            detail = f"dry run: would change {_flags(outcome.changed)}; nothing was applied"
            changes = {"would_change": outcome.changed, "unchanged": outcome.unchanged}
            return _refused(decision, "would_apply", detail, changes), False
        decision.env_version = outcome.env_version
        return decision, True  # the guard committed the decision with the apply

    def _resolve(
        self, env: str, alert: Alert, name: str, ctx: WriteContext, still_firing: bool
    ) -> tuple[Decision, bool]:
        """Revert ``name`` for a resolved alert; ``(decision, whether it is recorded already)``."""
        try:
            book = self._playbooks.get(env, name)
        except PlaybookNotFound as exc:
            return Decision(alert, name, "failed", exc.detail, alert.incident()), False
        decision = Decision(alert, name, "reverted", "", alert.incident(book))
        applied = book["applied"]
        if not book.get("auto"):
            return _refused(decision, "not_auto", "the playbook is not auto: alerts do not revert it"), False
        if not book.get("revert_on_resolve"):
            detail = "revert_on_resolve is not set: a person reverts the playbook"
            return _refused(decision, "no_revert", detail), False
        if book.get("mode") == "dry_run":
            detail = "dry run: an application made by an alert would be reverted; nothing was"
            return _refused(decision, "would_revert", detail), False
        if applied is None:
            return _refused(decision, "not_applied", "the playbook is not applied"), False
        last = self._redis.hget(EnvKeys(env).alert_applies, name)
        if not last or json.loads(last)["operation"] != applied["operation"]:
            detail = f"{_applied(applied)}, not by an alert: a person reverts it"
            return _refused(decision, "applied_by_other", detail), False
        if still_firing:
            detail = "another alert of the notification that triggers the playbook still fires"
            return _refused(decision, "still_firing", detail), False
        act = replace(ctx, reason=alert.reason(), incident=decision.incident)
        try:
            done = self._playbooks.revert(env, name, act, only_operation=applied["operation"])
        except (PlaybookNotApplied, PlaybookNotFound) as exc:
            return _refused(decision, "not_applied", exc.detail), False
        outcome = done.result
        decision.operation, decision.env_version = outcome.operation, outcome.env_version
        decision.changes = {"reverted": outcome.changed, "skipped": outcome.skipped}
        decision.detail = f"reverted {_flags(outcome.changed)}" + (
            f"; left alone (changed since): {_flags(outcome.skipped)}" if outcome.skipped else ""
        )
        return decision, False  # the revert's own entries are committed; the decision follows

    def _applied(self, env: str, name: str) -> dict[str, Any] | None:
        try:
            applied: dict[str, Any] | None = self._playbooks.get(env, name)["applied"]
        except PlaybookNotFound:
            return None
        return applied


def _refused(
    decision: Decision, outcome: str, detail: str, changes: dict[str, Any] | None = None
) -> Decision:
    decision.outcome, decision.detail, decision.changes = outcome, detail, changes
    decision.operation, decision.env_version = "", None
    return decision


def _applied(applied: dict[str, Any]) -> str:
    return f"applied at {applied['applied_at']} by {applied['applied_by']} (operation {applied['operation']})"


def _flags(changes: list[dict[str, Any]]) -> str:
    return ", ".join(c["flag"] for c in changes) or "no flag"
