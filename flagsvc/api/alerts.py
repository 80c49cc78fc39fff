"""Alerts: Prometheus Alertmanager's webhook applies and reverts the playbooks its alerts trigger."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_smorest import Blueprint

from ..alerts import ACTOR, Alert, AlertReceiver
from ..auth import current_token, require
from ..extensions import stores
from ..schemas import AlertmanagerWebhookSchema, AlertReceiptSchema
from ..tokens import Role
from .common import check_env, write_context

blp = Blueprint(
    "alerts",
    __name__,
    url_prefix="/api/v1/envs/<env>/alerts",
    description="Alert-driven containment: Alertmanager's alerts apply and revert playbooks",
)
#: Alertmanager's notifications may be larger than the API's other bodies (MAX_CONTENT_LENGTH,
#: 64 KiB): a hundred alerts with their annotations.
MAX_NOTIFICATION_BYTES = 1024 * 1024


@blp.before_request
def _larger_bodies() -> None:
    request.max_content_length = MAX_NOTIFICATION_BYTES


@blp.route("/alertmanager", methods=["POST"])
@require(Role.OPERATOR)
@blp.arguments(AlertmanagerWebhookSchema)
@blp.response(200, AlertReceiptSchema)
def alertmanager(body: dict[str, Any], env: str) -> dict[str, Any]:
    """Alertmanager's webhook: its alerts apply and revert the playbooks they trigger.

    The body is Alertmanager's notification (``webhook_configs``, payload version 4), the
    operator token in ``http_config.authorization``. A firing alert applies each playbook it
    triggers (``triggers``, ``auto: true``) within its cooldown and daily cap; a resolved one
    reverts it (``revert_on_resolve``). Every decision, refusals included, is audited
    (``alert.decision``) and answered. A retry applies nothing twice; 503 when Redis fails, so
    that Alertmanager retries."""
    check_env(env)
    ctx = write_context(f"{ACTOR}:{current_token().name}")
    alerts = [Alert(**alert) for alert in body["alerts"]]
    decisions = AlertReceiver(stores().redis, stores().playbooks).receive(env, alerts, ctx)
    versions = [d.env_version for d in decisions if d.env_version is not None]
    if versions:
        stores().snapshots.reload_after_write(env, max(versions))
    return {
        "env": env,
        "receiver": body["receiver"],
        "alerts": len(alerts),
        "decisions": [d.to_dict() for d in decisions],
    }
