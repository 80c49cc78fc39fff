"""Durations such as ``30m``, ``2h``, ``30d``."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^([0-9]{1,6})([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``"30m"`` -> 30 minutes. Raises ``ValueError`` with a readable message."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration such as 90s, 30m, 2h, 30d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_moment(text: str) -> datetime:
    """ISO 8601 (no zone means UTC) or a duration ago (``2h``). Raises ``ValueError``."""
    text = text.strip()
    try:
        return datetime.now(UTC) - parse_duration(text)
    except OverflowError:
        raise ValueError(f"{text!r} reaches before the year 1") from None
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time such as 2026-11-26T14:00:00Z, nor a duration ago such as 2h"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
