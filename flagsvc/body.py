"""Request body checks that run before schema validation: JSON media type, valid JSON."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import request

from .errors import InvalidInput, ProblemError

_BODY_METHODS = {"POST", "PUT", "PATCH"}
#: Deepest JSON nesting accepted: a flag is ~6 levels before its JSON values; deeper bodies could
#: exhaust the interpreter's recursion when rendered back.
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Body must be JSON"


class MalformedJSON(ProblemError):
    status, slug, title = 400, "malformed-json", "Body is not valid JSON"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_body() -> None:
    """A body must be a JSON document (``application/json`` or ``+json``), valid JSON, not nested
    too deep, and every string in it (keys too) valid Unicode: JSON can carry a lone surrogate
    (``"\\udfff"``), which no store can keep."""
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
    bad = _first_lone_surrogate(document)
    if bad is not None:
        raise InvalidInput(
            f"{bad} holds a lone UTF-16 surrogate: not a Unicode character",
            errors=[{"field": bad, "location": "body", "message": "not valid Unicode (lone surrogate)"}],
        )


def _first_lone_surrogate(document: Any) -> str | None:
    """The path (``a.b.0``) of the first string holding a lone surrogate, without recursion;
    :class:`MalformedJSON` past :data:`MAX_DEPTH` levels."""
    stack: list[tuple[Any, str, int]] = [(document, "", 1)]
    while stack:
        node, path, level = stack.pop()
        if level > MAX_DEPTH:
            raise MalformedJSON(f"body nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, str) and _SURROGATE.search(node):
            return path or "(body)"
        if isinstance(node, dict):
            for key, value in node.items():
                child = f"{path}.{key}" if path else str(key)
                if _SURROGATE.search(key):
                    return path or "(body)"
                stack.append((value, child, level + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}" if path else str(i), level + 1) for i, v in enumerate(node))
    return None
