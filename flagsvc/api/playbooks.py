"""Playbooks: definitions (admin), apply and revert (operator), with dry runs."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from ..auth import current_token, require
from ..extensions import stores
from ..playbooks import Outcome
from ..schemas import (
    FLAG_KEY,
    PlaybookApplySchema,
    PlaybookDefinitionSchema,
    PlaybookListSchema,
    PlaybookOutcomeSchema,
    PlaybookRevertSchema,
    PlaybookSchema,
)
from ..tokens import Role
from ..writes import Done
from .common import check_env, idempotency, if_match, path_error, replay_headers, write_context

blp = Blueprint("playbooks", __name__, url_prefix="/api/v1/envs/<env>/playbooks", description="Playbooks")


def _check(env: str, name: str | None = None) -> None:
    check_env(env)
    if name is not None and not FLAG_KEY.fullmatch(name):
        raise path_error("name", "lower-case [a-z0-9] then [a-z0-9._-], at most 128 characters")


def _answer(env: str, done: Done[Outcome]) -> tuple[dict[str, Any], int, dict[str, str]]:
    outcome = done.result
    body = outcome.to_dict()
    if outcome.dry_run:
        body["blast_radius"] = stores().clients.blast_radius(env, [c["flag"] for c in outcome.changed])
    elif outcome.changed and not done.replayed:
        stores().snapshots.reload_after_write(env, outcome.env_version)
    return body, 200, replay_headers(done)


@blp.route("")
class Playbooks(MethodView):
    @require(Role.READER)
    @blp.response(200, PlaybookListSchema)
    def get(self, env: str) -> dict[str, Any]:
        """Playbooks of the environment, with whether each is applied."""
        _check(env)
        return {"playbooks": stores().playbooks.list(env)}


@blp.route("/<name>")
class PlaybookResource(MethodView):
    @require(Role.READER)
    @blp.response(200, PlaybookSchema)
    def get(self, env: str, name: str) -> dict[str, Any]:
        """One playbook and its current application, if any."""
        _check(env, name)
        return stores().playbooks.get(env, name)

    @require(Role.ADMIN)
    @blp.arguments(PlaybookDefinitionSchema)
    @blp.response(200, PlaybookSchema)
    @blp.alt_response(201, schema=PlaybookSchema, description="Created")
    def put(
        self, definition: dict[str, Any], env: str, name: str
    ) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Create or replace a playbook (its flags are checked when it is applied)."""
        _check(env, name)
        actor = current_token().name
        done = stores().playbooks.put(
            env, name, definition, write_context(actor), idempotency=idempotency(actor, definition)
        )
        record, created = done.result
        return record, 201 if created else 200, replay_headers(done)

    @require(Role.ADMIN)
    @blp.response(204)
    def delete(self, env: str, name: str) -> tuple[None, int, dict[str, str]]:
        """Delete a playbook that is not applied."""
        _check(env, name)
        actor = current_token().name
        done = stores().playbooks.delete(env, name, write_context(actor), idempotency=idempotency(actor))
        return None, 204, replay_headers(done)


@blp.route("/<name>/apply", methods=["POST"])
@require(Role.OPERATOR)
@blp.arguments(PlaybookApplySchema)
@blp.response(200, PlaybookOutcomeSchema)
def apply(body: dict[str, Any], env: str, name: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Apply every change atomically (409, nothing applied, if any flag is in the way).

    ``dry_run: true`` answers what would change and who evaluated those flags lately.
    ``If-Match`` may name the playbook version that was reviewed."""
    _check(env, name)
    actor = current_token().name
    done = stores().playbooks.apply(
        env,
        name,
        write_context(actor, body["reason"], body["incident"]),
        dry_run=body["dry_run"],
        if_match=if_match(),
        revert_in=body["for_"],
        idempotency=idempotency(actor, body),
    )
    return _answer(env, done)


@blp.route("/<name>/revert", methods=["POST"])
@require(Role.OPERATOR)
@blp.arguments(PlaybookRevertSchema)
@blp.response(200, PlaybookOutcomeSchema)
def revert(body: dict[str, Any], env: str, name: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Restore the prior state of every flag the apply changed, skipping those changed since."""
    _check(env, name)
    actor = current_token().name
    ctx = write_context(actor, body["reason"], body["incident"])
    done = stores().playbooks.revert(
        env, name, ctx, dry_run=body["dry_run"], idempotency=idempotency(actor, body)
    )
    return _answer(env, done)
