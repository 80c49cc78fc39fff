"""Semantic Versioning 2.0.0 parsing and precedence (build metadata ignored)."""

from __future__ import annotations

import functools
import re

_SEMVER = re.compile(
    r"v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?",
    re.ASCII,  # \d is 0-9 only, not any Unicode digit
)

# A pre-release identifier sorts numerically if numeric, else lexically; numeric < alphanumeric.
_Ident = tuple[int, int, str]
SemVer = tuple[int, int, int, tuple[_Ident, ...] | None]


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> SemVer | None:
    """``"1.4.0-rc.1"`` -> comparable tuple; ``None`` if not a semantic version."""
    match = _SEMVER.fullmatch(text)
    if not match:
        return None
    major, minor, patch, pre = match.groups()
    idents = None
    if pre is not None:
        idents = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), idents


def compare(a: SemVer, b: SemVer) -> int:
    """-1, 0 or 1 by SemVer precedence: a release sorts after its pre-releases."""
    if a[:3] != b[:3]:
        return -1 if a[:3] < b[:3] else 1
    pa, pb = a[3], b[3]
    if pa == pb:
        return 0
    if pa is None:
        return 1
    if pb is None:
        return -1
    return -1 if pa < pb else 1
