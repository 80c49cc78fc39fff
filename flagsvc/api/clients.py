"""SDK heartbeats (sdk role) and the propagation view (reader role)."""

from __future__ import annotations

import re
from typing import Any

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint

from ..auth import current_token, require
from ..clients import ClientNotFound, Pace
from ..extensions import stores
from ..schemas import INSTANCE_ID, HeartbeatSchema, PropagationSchema
from ..tokens import Role
from .common import check_env, path_error

blp = Blueprint("clients", __name__, url_prefix="/api/v1/envs/<env>/clients", description="SDK instances")

_INSTANCE = re.compile(INSTANCE_ID)
#: Heartbeat answers: how often the SDK should report, and over how long it spreads a report
#: after a change (seconds).
REPORT_INTERVAL_HEADER = "X-Flagsvc-Report-Interval"
REPORT_JITTER_HEADER = "X-Flagsvc-Report-Jitter"


@blp.route("")
class Clients(MethodView):
    @require(Role.READER)
    @blp.response(200, PropagationSchema)
    def get(self, env: str) -> dict[str, Any]:
        """Live SDK instances (and those gone silent): which applied the current version, which lag."""
        check_env(env)
        return stores().clients.view(env, stores().flags.version(env)).to_dict()


@blp.route("/<instance>")
class ClientInstance(MethodView):
    @require(Role.SDK)
    @blp.arguments(HeartbeatSchema())  # an instance: not built again for every heartbeat
    @blp.response(204)
    def post(self, body: dict[str, Any], env: str, instance: str) -> tuple[None, int, dict[str, str]]:
        """Heartbeat of one SDK instance: at start, soon after applying a version, every interval.

        The answer tells the SDK the interval and the spread after a change to use
        (``X-Flagsvc-Report-Interval``, ``X-Flagsvc-Report-Jitter``, seconds): 30 s and 1 s, both
        stretched for a fleet larger than ``FLEET_HEARTBEATS_PER_SECOND`` allows. 429
        (``Retry-After``) beyond the limits: instances per token, heartbeats per minute."""
        check_env(env)
        check_instance(instance)
        published = stores().snapshots.get(env)
        stores().clients.report(  # a version claimed ahead is checked once written, if admitted
            env,
            instance,
            body,
            source=request.remote_addr or "",
            token_id=current_token().id,
            token_name=current_token().name,
            flags=published.flags,
            known_version=published.version,
        )
        return None, 204, dict(report_headers(stores().clients.pace(env)))

    @require(Role.SDK)
    @blp.response(204)
    @blp.alt_response(404, description="No such instance registered with this token")
    def delete(self, env: str, instance: str) -> None:
        """Goodbye of one SDK instance (its client closed, its process ends): it no longer counts
        as live, nor as lagging. Only the token that registered the instance may say it."""
        check_env(env)
        check_instance(instance)
        if not stores().clients.forget(env, instance, token_id=current_token().id):
            raise ClientNotFound(f"no SDK instance {instance!r} of this token in {env!r}")


def report_headers(pace: Pace) -> list[tuple[str, str]]:
    """What a heartbeat's answer tells the SDK: the report interval and the spread after a change."""
    return [(REPORT_INTERVAL_HEADER, f"{pace.interval:g}"), (REPORT_JITTER_HEADER, f"{pace.jitter:g}")]


def check_instance(instance: str) -> None:
    if not _INSTANCE.fullmatch(instance):
        raise path_error("instance", "1-128 characters of [A-Za-z0-9._:-]")
