"""The audit log of an environment: filters, cursor pagination, CSV and NDJSON export."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from typing import Any

from flask import Response, request
from flask.views import MethodView
from flask_smorest import Blueprint

from ..audit import AuditFilter, change_summary, decode_entry
from ..auth import require
from ..commit import AUDIT_FIELDS
from ..extensions import stores
from ..schemas import AuditPageSchema, AuditQuerySchema
from ..tokens import Role
from .common import check_env

blp = Blueprint("audit", __name__, url_prefix="/api/v1/envs/<env>", description="Audit log")

CSV = "text/csv"
NDJSON = "application/x-ndjson"
#: ``change``: the readable before -> after of :func:`~flagsvc.audit.change_summary`.
EXPORT_COLUMNS = ("id", *AUDIT_FIELDS, "change")
# A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV Injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(text: str) -> str:
    """``text`` as a spreadsheet shows it and never runs it: a formula start gets a leading quote."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def export_lines(entries: Iterator[tuple[str, dict[str, str]]], mimetype: str) -> Iterator[str]:
    """Rows as they are read: the whole log is never in memory. CSV adds a readable ``change``
    column, and quotes cells that a spreadsheet would run as formulas (:func:`_csv_cell`); NDJSON
    keeps the exact text."""
    if mimetype == NDJSON:
        for stream_id, fields in entries:
            yield json.dumps(decode_entry(stream_id, fields)) + "\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for stream_id, fields in entries:
        entry = decode_entry(stream_id, fields)
        change = change_summary(entry.get("before"), entry.get("after"))
        row = [stream_id, *(fields.get(name, "") for name in AUDIT_FIELDS), change]
        writer.writerow([_csv_cell(cell) for cell in row])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def audit_filter(query: dict[str, Any]) -> AuditFilter:
    """The filter of a loaded :class:`~flagsvc.schemas.AuditQuerySchema` query."""
    names = ("flag", "actor", "action", "incident", "since", "until")
    return AuditFilter(**{name: query.get(name) for name in names})


@blp.route("/audit")
class Audit(MethodView):
    @require(Role.READER)
    @blp.arguments(AuditQuerySchema, location="query", unknown="raise")
    @blp.response(200, AuditPageSchema)
    @blp.doc(
        responses={
            "200": {
                "description": "A page of entries (JSON), or every matching entry (CSV, NDJSON)",
                "content": {
                    "application/json": {"schema": AuditPageSchema},
                    CSV: {"schema": {"type": "string"}},
                    NDJSON: {"schema": {"type": "string"}},
                },
            }
        }
    )
    def get(self, query: dict[str, Any], env: str) -> Any:
        """Audit entries matching the filters, newest first (``order=oldest`` for the reverse).

        ``since``/``until`` take ISO 8601 or a duration ago (``2h``). Pass ``next_cursor`` back as
        ``cursor`` for the next page. ``Accept: text/csv`` or ``application/x-ndjson`` streams
        every matching entry (no ``limit``)."""
        check_env(env)
        criteria = audit_filter(query)
        log = stores().audit(env)
        oldest_first = query["order"] == "oldest"
        wanted = request.accept_mimetypes.best_match(["application/json", CSV, NDJSON], "application/json")
        if wanted in (CSV, NDJSON):
            rows = log.iter_matching(criteria, cursor=query.get("cursor"), oldest_first=oldest_first)
            chunks = export_lines(rows, wanted)
            first = next(chunks, "")  # a failure before the first row is still a problem+json answer
            filename = f"flagsvc-audit-{env}.{'csv' if wanted == CSV else 'ndjson'}"
            return Response(
                itertools.chain([first], chunks),
                mimetype=wanted,
                headers={"Content-Disposition": f'attachment; filename="{filename}"'},
            )
        page = log.query(
            criteria, limit=query["limit"], cursor=query.get("cursor"), oldest_first=oldest_first
        )
        # Entries are already in their documented shape (decode_entry): serialize them directly,
        # a schema dump of every field of 100 entries costs more than the Redis reads.
        body = json.dumps({"entries": page.entries, "next_cursor": page.next_cursor})
        return Response(body, mimetype="application/json")
