"""Webhook subscriptions (admin): define, list, delete, rotate the secret, the delivery log and
redelivery."""

from __future__ import annotations

import re
from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from ..auth import current_token, require
from ..extensions import stores
from ..schemas import (
    FLAG_KEY,
    WebhookDefinitionSchema,
    WebhookDeliveriesSchema,
    WebhookListSchema,
    WebhookSchema,
)
from ..tokens import Role
from ..webhooks import public
from .common import check_env, idempotency, path_error, write_context

blp = Blueprint(
    "webhooks",
    __name__,
    url_prefix="/api/v1/envs/<env>/webhooks",
    description="Webhooks to the incident channel",
)
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _check(env: str, name: str | None = None) -> None:
    check_env(env)
    if name is not None and not FLAG_KEY.fullmatch(name):
        raise path_error("name", "lower-case [a-z0-9] then [a-z0-9._-], at most 128 characters")


@blp.route("")
class Webhooks(MethodView):
    @require(Role.ADMIN)
    @blp.response(200, WebhookListSchema)
    def get(self, env: str) -> dict[str, Any]:
        """The environment's subscriptions (never their secrets)."""
        _check(env)
        return {"webhooks": stores().webhooks.list(env)}


@blp.route("/<name>")
class WebhookResource(MethodView):
    @require(Role.ADMIN)
    @blp.response(200, WebhookSchema)
    def get(self, env: str, name: str) -> dict[str, Any]:
        """One subscription (never its secret)."""
        _check(env, name)
        return public(stores().webhooks.get(env, name))

    @require(Role.ADMIN)
    @blp.arguments(WebhookDefinitionSchema)
    @blp.response(200, WebhookSchema)
    @blp.alt_response(201, schema=WebhookSchema, description="Created: the answer carries the secret, once")
    def put(self, definition: dict[str, Any], env: str, name: str) -> tuple[dict[str, Any], int]:
        """Create or replace a subscription. The signing secret is made by the service and shown
        once, in the answer that creates the subscription."""
        _check(env, name)
        actor = current_token().name
        done = stores().webhooks.put(
            env, name, definition, write_context(actor), idempotency=idempotency(actor, definition)
        )
        record, secret = done.result
        return ({**record, "secret": secret}, 201) if secret else (record, 200)

    @require(Role.ADMIN)
    @blp.response(204)
    def delete(self, env: str, name: str) -> None:
        """Delete a subscription and its delivery state."""
        _check(env, name)
        stores().webhooks.delete(env, name, write_context(current_token().name))


@blp.route("/<name>/rotate-secret", methods=["POST"])
@require(Role.ADMIN)
@blp.response(200, WebhookSchema)
def rotate_secret(env: str, name: str) -> dict[str, Any]:
    """A new signing secret, shown once; the previous one keeps signing beside it for 24 h."""
    _check(env, name)
    record, secret = stores().webhooks.rotate_secret(env, name, write_context(current_token().name))
    return {**record, "secret": secret}


@blp.route("/<name>/deliveries", methods=["GET"])
@require(Role.ADMIN)
@blp.response(200, WebhookDeliveriesSchema)
def deliveries(env: str, name: str) -> dict[str, Any]:
    """The delivery log, newest first: event, status, attempts, last error, latency."""
    _check(env, name)
    return {"deliveries": stores().webhooks.deliveries(env, name)}


@blp.route("/<name>/deliveries/<event_id>/redeliver", methods=["POST"])
@require(Role.ADMIN)
@blp.response(202)
def redeliver(env: str, name: str, event_id: str) -> None:
    """Send one audit entry to the subscription again (with the same ``webhook-id``)."""
    _check(env, name)
    if not _EVENT_ID.fullmatch(event_id):
        raise path_error("event_id", "an audit entry id such as 1733000000000-0")
    stores().webhooks.redeliver(env, name, event_id)
