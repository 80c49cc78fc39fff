"""Stopping what a test started, also when it fails: a process and everything it spawned."""

from __future__ import annotations

import contextlib
import signal
import subprocess

import psutil

#: How long descendants that outlived their parent get to exit before they are killed.
ORPHAN_GRACE_S = 5.0


def descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The processes ``proc`` spawned, while it runs (an exited one's pid may belong to another)."""
    if proc.poll() is not None:
        return []
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send ``sig`` to ``proc`` and wait up to ``timeout`` s, then SIGKILL it; any of its
    descendants still running after that is killed too. Returns ``proc``'s exit code."""
    family = descendants(proc)
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        family += [p for p in descendants(proc) if p not in family]
        proc.kill()
        proc.wait(10)
    reap(family)
    return int(proc.returncode)


def reap(procs: list[psutil.Process]) -> None:
    """Wait a little for ``procs`` to end by themselves, then SIGKILL those that did not."""
    _, alive = psutil.wait_procs([p for p in procs if running(p)], timeout=ORPHAN_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=ORPHAN_GRACE_S)


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
