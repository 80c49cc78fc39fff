"""The console's pages. Each page reads through the stores and writes through the same write
paths as the API (:func:`~flagsvc.flags.switch`, the playbook store), with the signed-in token's
role and environments applied exactly as the API applies them."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from flask import Blueprint, Response, abort, g, redirect, render_template, request, url_for
from marshmallow import EXCLUDE, ValidationError
from werkzeug.exceptions import HTTPException

from flagsvc_client._incident import build_report

from ..api.audit import CSV, NDJSON, audit_filter, export_lines
from ..api.common import write_context
from ..audit import change_summary, decode_entry
from ..errors import ProblemError, flatten_validation_messages
from ..extensions import stores
from ..flags import EVALUATION_FIELDS, Flag, Mutation, definition_of, switch
from ..schemas import ActionSchema, AuditQuerySchema, FlagDefinitionSchema, PlaybookApplySchema
from ..tokens import Role
from .sessions import COOKIE, ConsoleSessions, Session

bp = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

#: How long one live-update stream stays open (the browser reconnects by itself).
LIVE_STREAM_SECONDS = 300
_DEFINITION_SHOWN = (*(f for f in EVALUATION_FIELDS if f != "version"), "description", "owner", "tags")


def sessions() -> ConsoleSessions:
    return stores().console


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Any:
    """Pages answer pages, not problem+json."""
    return _refused(exc.code or 500, exc.description or "")


@bp.after_request
def _protect(response: Response) -> Response:
    """No page is cached, framed or allowed to run a script from elsewhere."""
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def signed_in(role: Role = Role.READER) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A page for a signed-in user: to the sign-in page otherwise. The token's environments apply
    to ``env``; a POST needs the session's CSRF token and ``role`` (403 otherwise)."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            session = sessions().current(request.cookies.get(COOKIE))
            if session is None:
                return redirect(url_for("console.signin", next=request.path))
            g.console = session
            env = kwargs.get("env")
            if env is not None and (not session.token.allows_env(env) or not stores().envs.exists(env)):
                return _refused(404, f"no environment {env!r} for token {session.token.name!r}")
            if request.method == "POST":
                if not session.csrf_matches(request.form.get("csrf")):
                    return _refused(
                        403, "this form is stale or forged (no valid CSRF token): reload the page"
                    )
                if session.token.role_level < role:
                    return _refused(
                        403, f"this needs the {role} role; you are signed in as {session.token.role}"
                    )
            return view(*args, **kwargs)

        return wrapper

    return decorator


def _refused(status: int, message: str) -> tuple[str, int]:
    return render_template("console/refused.html", message=message, status=status), status


def _page(template: str, **context: Any) -> str:
    session: Session | None = g.get("console")
    envs = [e for e in stores().envs.list() if session and session.token.allows_env(e)]
    return render_template(
        f"console/{template}",
        session=session,
        envs=envs,
        can_operate=bool(session and session.token.role_level >= Role.OPERATOR),
        can_edit=bool(session and session.token.role_level >= Role.ADMIN),
        **context,
    )


def _ctx(reason: str = "", incident: str = "") -> Any:
    return write_context(g.console.token.name, reason, incident)


def _form_errors(exc: ValidationError) -> list[str]:
    return [f"{e['field']}: {e['message']}" for e in flatten_validation_messages(exc.messages)]


# -- signing in and out ------------------------------------------------------------------------


@bp.route("/signin", methods=["GET", "POST"])
def signin() -> Any:
    if request.method == "GET":
        return _page("signin.html", next=request.args.get("next", ""), error=None)
    token = stores().tokens.authenticate(request.form.get("token", "").strip())
    if token is None or token.role_level < Role.READER:
        return _page("signin.html", next="", error="This token is unknown, revoked or expired."), 401
    cookie, lifetime = sessions().sign_in(token)
    target = request.form.get("next", "")
    response = redirect(target if target.startswith("/ui/") else url_for("console.home"))
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=lifetime,
        httponly=True,
        samesite="Strict",
        secure=request.is_secure,
        path="/ui",
    )
    return response


@bp.post("/signout")
@signed_in()
def signout() -> Any:
    sessions().sign_out(g.console)
    response = redirect(url_for("console.signin"))
    response.delete_cookie(COOKIE, path="/ui")
    return response


@bp.get("/")
@signed_in()
def home() -> Any:
    envs = [e for e in stores().envs.list() if g.console.token.allows_env(e)]
    if not envs:
        return _refused(404, "this token may use no environment")
    return redirect(url_for("console.overview", env="production" if "production" in envs else envs[0]))


# -- the overview and its live strip -------------------------------------------------------------


@bp.get("/envs/<env>")
@signed_in()
def overview(env: str) -> Any:
    flags = stores().flags.list(env)
    view = stores().clients.view(env, stores().flags.version(env)).to_dict()
    return _page(
        "overview.html",
        title=f"{env}: overview",
        env=env,
        flags=flags,
        why=_latest_changes(env, [f["key"] for f in flags if not f["enabled"] or f.get("revert_at")]),
        applied=[
            stores().playbooks.get(env, p["name"]) for p in stores().playbooks.list(env) if p["applied"]
        ],
        view=view,
        health=_health(),
        done=request.args.get("done"),
    )


def _latest_changes(env: str, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Flag key -> its newest audit entry (who switched it, when, why)."""
    log = stores().audit(env)
    latest = {}
    for key in keys:
        page = log.query(audit_filter({"flag": key}), limit=1)
        if page.entries:
            latest[key] = page.entries[0]
    return latest


def _health() -> dict[str, Any]:
    try:
        problem = stores().unready()
    except redis.RedisError as exc:
        return {"ok": False, "text": f"Redis unavailable ({type(exc).__name__})"}
    rollbacks = stores().history.rollbacks()
    if problem:
        return {"ok": False, "text": f"Redis: {problem}"}
    if rollbacks:
        return {"ok": False, "text": "; ".join(f"ROLLBACK in {e}: {w}" for e, w in rollbacks.items())}
    return {"ok": True, "text": "service and Redis ready"}


@bp.get("/envs/<env>/live")
@signed_in()
def live(env: str) -> Response:
    """Server-Sent Events: the propagation strip, every second, while the session lasts."""
    cookie = request.cookies.get(COOKIE)
    s = stores()

    def events() -> Iterator[str]:
        end = time.monotonic() + LIVE_STREAM_SECONDS
        while time.monotonic() < end and s.console.current(cookie) is not None:
            try:
                view = s.clients.view(env, s.flags.version(env)).to_dict()
                data = {"version": view["version"], **view["summary"], "ofrep": len(view["ofrep"])}
                yield f"data: {json.dumps(data)}\n\n"
            except redis.RedisError:
                yield 'data: {"error": "Redis unavailable"}\n\n'
            time.sleep(1)

    return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-store"})


# -- kill and restore ----------------------------------------------------------------------------


@bp.route("/envs/<env>/flags/<key>/<any(kill, restore):action>", methods=["GET", "POST"])
@signed_in(Role.OPERATOR)
def switch_flag(env: str, key: str, action: str) -> Any:
    """A kill or restore: the dry run's blast radius first, then the change with a reason."""
    flag = _flag_or_404(env, key)
    errors: list[str] = []
    if request.method == "POST":
        try:
            body = ActionSchema().load(
                {name: request.form[name] for name in ("reason", "incident", "for") if request.form.get(name)}
            )
        except ValidationError as exc:
            errors = _form_errors(exc)
        else:
            return _do_switch(env, key, action, body)
    radius = stores().clients.blast_radius(env, [key])[key]
    status = 422 if errors else 200
    return _page("switch.html", title=f"{action} {key}", env=env, flag=flag, action=action, radius=radius,
                 errors=errors, form=request.form), status  # fmt: skip


def _do_switch(env: str, key: str, action: str, body: dict[str, Any]) -> Any:
    mutate = switch(env, key, f"flag.{action}", action == "restore")
    ctx = _ctx(body["reason"], body["incident"])
    try:
        result = stores().flags.write(env, key, mutate, ctx, revert_in=body["for_"]).result
    except ProblemError as exc:
        return _refused(exc.status, exc.detail)
    if result.changed:
        stores().snapshots.reload_after_write(env, result.env_version)
    verb = {"kill": "killed", "restore": "restored"}[action] if result.changed else f"{action}: already so"
    return redirect(url_for("console.overview", env=env, done=f"{key} {verb} (version {result.env_version})"))


def _flag_or_404(env: str, key: str) -> Flag:
    try:
        return stores().flags.get(env, key)
    except ProblemError:
        abort(404)


# -- the flag page and its edit ----------------------------------------------------------------


@bp.get("/envs/<env>/flags/<key>")
@signed_in()
def flag_page(env: str, key: str) -> Any:
    flag = _flag_or_404(env, key)
    text = json.dumps(definition_of(flag), indent=2)
    return _flag_page(env, flag, text=text, version=flag["version"])


def _flag_page(env: str, flag: Flag, *, status: int = 200, **context: Any) -> Any:
    history = stores().audit(env).query(audit_filter({"flag": flag["key"]}), limit=20).entries
    for entry in history:
        entry["change"] = change_summary(entry.get("before"), entry.get("after"))
    shown = {name: flag.get(name) for name in _DEFINITION_SHOWN}
    page = _page("flag.html", title=f"{flag['key']} in {env}", env=env, flag=flag, shown=shown,
                 history=history, **context)  # fmt: skip
    return page, status


@bp.post("/envs/<env>/flags/<key>")
@signed_in(Role.ADMIN)
def save_flag(env: str, key: str) -> Any:
    """Save an edited definition with ``If-Match``: a change made meanwhile is explained, and the
    edit is shown again, not lost."""
    current = _flag_or_404(env, key)
    text, seen = request.form.get("definition", ""), int(request.form.get("version", "0"))
    try:
        definition = FlagDefinitionSchema().load(json.loads(text))
    except ValueError as exc:
        return _flag_page(env, current, status=422, text=text, version=seen, errors=[f"not JSON: {exc}"])
    except ValidationError as exc:
        return _flag_page(env, current, status=422, text=text, version=seen, errors=_form_errors(exc))
    try:
        result = (
            stores()
            .flags.write(env, key, lambda _: Mutation("flag.update", definition), _ctx(), if_match=seen)
            .result
        )
    except ProblemError as exc:
        return _conflict(env, key, text, seen, exc)
    stores().snapshots.reload_after_write(env, result.env_version)
    return redirect(url_for("console.flag_page", env=env, key=key, saved=result.flag["version"]))


def _conflict(env: str, key: str, text: str, seen: int, exc: ProblemError) -> Any:
    now = _flag_or_404(env, key)
    if exc.status != 412:
        return _flag_page(env, now, status=exc.status, text=text, version=seen, errors=[exc.detail])
    changed = change_summary(_definition_at(env, key, seen), definition_of(now)) or "no field"
    conflict = {"seen": seen, "now": now, "changed": changed}
    return _flag_page(env, now, status=409, text=text, version=seen, conflict=conflict)


def _definition_at(env: str, key: str, version: int) -> dict[str, Any]:
    """The flag's definition as it was at ``version`` (from its audit history), or ``{}``."""
    for entry in stores().audit(env).query(audit_filter({"flag": key}), limit=50).entries:
        after = entry.get("after") or {}
        if after.get("version") == version:
            return definition_of(after)
    return {}


# -- playbooks -------------------------------------------------------------------------------------


@bp.get("/envs/<env>/playbooks")
@signed_in()
def playbooks(env: str) -> Any:
    books = stores().playbooks.list(env)
    return _page("playbooks.html", title=f"{env}: playbooks", env=env, playbooks=books)


@bp.get("/envs/<env>/playbooks/<name>")
@signed_in()
def playbook(env: str, name: str) -> Any:
    try:
        book = stores().playbooks.get(env, name)
    except ProblemError:
        abort(404)
    action = "revert" if book["applied"] else "apply"
    preview = _preview(env, name, action)
    return _page("playbook.html", title=f"playbook {name}", env=env, book=book, action=action,
                 preview=preview, errors=[], form={})  # fmt: skip


def _preview(env: str, name: str, action: str) -> dict[str, Any] | str:
    """The dry run of ``action``, with who evaluated each flag it changes; or why it cannot."""
    run = stores().playbooks.apply if action == "apply" else stores().playbooks.revert
    try:
        outcome = run(env, name, _ctx(), dry_run=True).result.to_dict()
    except ProblemError as exc:
        return exc.detail
    outcome["blast_radius"] = stores().clients.blast_radius(env, [c["flag"] for c in outcome["changed"]])
    return outcome


@bp.post("/envs/<env>/playbooks/<name>/<any(apply, revert):action>")
@signed_in(Role.OPERATOR)
def playbook_action(env: str, name: str, action: str) -> Any:
    fields = ("reason", "incident", "for") if action == "apply" else ("reason", "incident")
    raw = {f: request.form[f] for f in fields if request.form.get(f)}
    try:
        body = (
            PlaybookApplySchema().load(raw)
            if action == "apply"
            else ActionSchema(only=("reason", "incident")).load(raw)
        )
    except ValidationError as exc:
        book = stores().playbooks.get(env, name)
        preview = _preview(env, name, action)
        page = _page("playbook.html", title=f"playbook {name}", env=env, book=book, action=action,
                     preview=preview, errors=_form_errors(exc), form=request.form)  # fmt: skip
        return page, 422
    ctx = _ctx(body["reason"], body.get("incident", ""))
    try:
        if action == "apply":
            outcome = stores().playbooks.apply(env, name, ctx, revert_in=body.get("for_")).result
        else:
            outcome = stores().playbooks.revert(env, name, ctx).result
    except ProblemError as exc:
        return _refused(exc.status, exc.detail)
    if outcome.changed:
        stores().snapshots.reload_after_write(env, outcome.env_version)
    return _page("outcome.html", title=f"playbook {name}: {action}", env=env, name=name, action=action,
                 outcome=outcome.to_dict())  # fmt: skip


# -- audit and the report --------------------------------------------------------------------------

_AUDIT_ARGS = ("flag", "actor", "action", "incident", "since", "until", "cursor")


def _audit_query() -> tuple[dict[str, Any], list[str]]:
    raw = {name: request.args[name] for name in _AUDIT_ARGS if request.args.get(name)}
    try:
        return AuditQuerySchema(unknown=EXCLUDE).load({**raw, "limit": 50}), []
    except ValidationError as exc:
        return AuditQuerySchema().load({"limit": 50}), _form_errors(exc)


@bp.get("/envs/<env>/audit")
@signed_in()
def audit(env: str) -> Any:
    query, errors = _audit_query()
    page = stores().audit(env).query(audit_filter(query), limit=50, cursor=query.get("cursor"))
    for entry in page.entries:
        entry["change"] = change_summary(entry.get("before"), entry.get("after"))
    filters = {name: request.args.get(name, "") for name in _AUDIT_ARGS if name != "cursor"}
    active = {name: value for name, value in filters.items() if value}
    shown = _page("audit.html", title=f"{env}: audit", env=env, entries=page.entries, active=active,
                  next_cursor=page.next_cursor, filters=filters, errors=errors)  # fmt: skip
    return shown, 422 if errors else 200


@bp.get("/envs/<env>/audit.<any(csv, ndjson):fmt>")
@signed_in()
def audit_export(env: str, fmt: str) -> Response:
    query, errors = _audit_query()
    if errors:
        abort(422)
    mimetype = CSV if fmt == "csv" else NDJSON
    rows = stores().audit(env).iter_matching(audit_filter(query))
    filename = f"flagsvc-audit-{env}.{fmt}"
    return Response(export_lines(rows, mimetype), mimetype=mimetype,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})  # fmt: skip


@bp.get("/envs/<env>/report")
@signed_in()
def report(env: str) -> Any:
    incident = request.args.get("incident", "").strip()
    text = None
    if incident:
        rows = stores().audit(env).iter_matching(audit_filter({"incident": incident}), oldest_first=True)
        entries = [decode_entry(stream_id, fields) for stream_id, fields in rows]
        flags = stores().flags.list(env)
        text = build_report(entries, flags, env=env, title=f"Incident {incident}: flag changes")
    return _page("report.html", title=f"{env}: report {incident}", env=env, incident=incident, text=text)
