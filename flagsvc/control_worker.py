"""The workers of flagsvc's gunicorn: how many serve the main listener, and the control worker of
``flagsvc serve --control-port``, one worker of its own for the control listener among the workers
of the one gunicorn that binds both addresses.

``flagsvc/gunicorn_conf.py`` uses these functions: how many workers, which worker about to be
forked is the control one (in the arbiter), and which listening sockets a worker keeps (after its
fork). Side-effect free, so that tests and benchmarks can import it (``gunicorn_conf`` patches
for gevent).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any


def main_workers(configured: str | None) -> int:
    """The workers of the main listener: ``configured`` (``FLAGSVC_WORKERS``), else one per core
    and at least 2. A worker already multiplexes its connections; more workers only add processes
    competing for the cores (and one more snapshot reload per change). Measured on 2 cores:
    2 workers serve more polls, and flips wait less, than 4 (``bench/api.py --workers 2,4``)."""
    return int(configured or 0) or max(2, os.cpu_count() or 1)


def control_wanted(workers: Iterable[Any], num_workers: int) -> bool:
    """Must the worker about to be forked serve the control listener? Yes unless a worker that
    stays already does. gunicorn keeps the youngest ``num_workers`` (after a HUP, the new ones:
    the old control worker goes), so the ones that stay beside the new one are the youngest
    ``num_workers - 1`` of ``workers`` (each with its ``age``, the control one marked
    ``flagsvc_control``)."""
    stay = num_workers - 1
    if stay <= 0:
        return True
    youngest = sorted(workers, key=lambda w: w.age)[-stay:]
    return not any(getattr(w, "flagsvc_control", False) for w in youngest)


def own_listeners(listeners: Sequence[Any], control_address: Any, control: bool) -> list[Any]:
    """The listeners a worker serves: the control one's (``cfg_addr == control_address``) for the
    control worker, every other one for the others."""
    return [s for s in listeners if (s.cfg_addr == control_address) == control]
