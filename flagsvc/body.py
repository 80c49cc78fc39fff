"""Request body checks that run before schema validation: JSON media type, valid JSON."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from .errors import ProblemError

_BODY_METHODS = {"POST", "PUT", "PATCH"}
#: Deepest JSON nesting accepted: a flag is ~6 levels before its JSON values; deeper bodies could
#: exhaust the interpreter's recursion when rendered back.
MAX_DEPTH = 32


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Body must be JSON"


class MalformedJSON(ProblemError):
    status, slug, title = 400, "malformed-json", "Body is not valid JSON"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_body() -> None:
    """A body must be a JSON document (``application/json`` or ``+json``), and valid JSON."""
    if request.method not in _BODY_METHODS or not request.path.startswith("/api/"):
        return
    data = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    if not data:
        return
    if not request.is_json:
        raise UnsupportedMediaType(f"Content-Type {request.mimetype or '(none)'!r}; send application/json")
    try:
        document = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedJSON(f"body nests deeper than {MAX_DEPTH} levels") from None
    if _depth(document) > MAX_DEPTH:
        raise MalformedJSON(f"body nests deeper than {MAX_DEPTH} levels")


def _depth(document: Any) -> int:
    """Nesting depth of a JSON document, without recursion."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            return level
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest
