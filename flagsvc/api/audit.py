"""The audit log of an environment: newest first, by flag, cursor pagination."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from ..audit import AuditLog
from ..auth import require
from ..extensions import stores
from ..keys import EnvKeys
from ..schemas import AuditPageSchema, AuditQuerySchema
from ..tokens import Role
from .common import check_env

blp = Blueprint("audit", __name__, url_prefix="/api/v1/envs/<env>", description="Audit log")


@blp.route("/audit")
class Audit(MethodView):
    @require(Role.READER)
    @blp.arguments(AuditQuerySchema, location="query", unknown="raise")
    @blp.response(200, AuditPageSchema)
    def get(self, query: dict[str, Any], env: str) -> dict[str, Any]:
        """Audit entries, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
        check_env(env)
        page = AuditLog(stores().redis, EnvKeys(env)).query(
            flag=query.get("flag"), limit=query["limit"], cursor=query.get("cursor")
        )
        return {"entries": page.entries, "next_cursor": page.next_cursor}
