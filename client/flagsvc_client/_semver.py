"""Semantic Versioning 2.0.0 parsing into sort keys (build metadata ignored).

``parse`` returns a tuple that compares by SemVer precedence with plain ``<``/``==``:
``(major, minor, patch, is_release, pre-release identifiers)``, where a release sorts after its
pre-releases, numeric identifiers sort numerically and before alphanumeric ones, and a longer
set of identifiers sorts after its prefix.
"""

from __future__ import annotations

import functools
import re

_SEMVER = re.compile(
    r"v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?",
    re.ASCII,  # \d is 0-9 only, not any Unicode digit
)

SemVerKey = tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> SemVerKey | None:
    """``"1.4.0-rc.1"`` -> sort key; ``None`` if not a semantic version."""
    match = _SEMVER.fullmatch(text)
    if not match:
        return None
    major, minor, patch, pre = match.groups()
    if pre is None:
        return int(major), int(minor), int(patch), 1, ()
    idents = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), 0, idents
