"""Scheduled reverts of temporary changes: the record a temporary change leaves for the scheduler.

A temporary change (``for`` on kill, restore and playbook apply) adds, in its own commit, a member
to the environment's ``reverts`` sorted set, scored by when it is due (seconds since the epoch on
Redis' clock). :mod:`flagsvc.scheduler` performs it.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

from .commit import Op, iso_from_ms
from .keys import EnvKeys
from .writes import State, WriteContext


def revert_at(state: State, revert_in: timedelta) -> tuple[float, str]:
    """When a change made at ``state`` and temporary for ``revert_in`` reverts: epoch seconds
    (Redis' clock) and the same time as shown on the flag (ISO 8601, to the second)."""
    due_ms = state.now_ms + int(revert_in.total_seconds() * 1000)
    due_ms -= due_ms % 1000
    return due_ms / 1000, iso_from_ms(due_ms).replace(".000Z", "Z")


def schedule(
    keys: EnvKeys, due: float, ctx: WriteContext, action: str, state: State, **target: Any
) -> tuple[Op, str]:
    """The op that schedules a revert due at ``due`` of ``target`` (``kind``, and ``flag`` or
    ``playbook``...), remembering the original change; and the member (to unschedule it)."""
    member = json.dumps(
        {
            "id": uuid.uuid4().hex,
            **target,
            "original": {
                "action": action,
                "actor": ctx.actor,
                "time": state.now,
                "reason": ctx.reason,
                "incident": ctx.incident,
            },
        }
    )
    return Op("ZADD", keys.reverts, (str(due), member)), member
