"""Durations such as ``30m``, ``2h``, ``30d``."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``"30m"`` -> 30 minutes. Raises ``ValueError`` with a readable message."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration such as 90s, 30m, 2h, 30d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
