"""Small pieces shared by the benchmarks (api.py, propagation.py, abuse.py).

The bigger shared parts (``Server``, ``CpuMeter``, ``percentiles``, ``setup_flags``...) stay in
``api.py`` and are imported from there.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def flagsvc_command() -> list[str]:
    """The ``flagsvc`` console script of this interpreter's environment.

    (``python -m flagsvc.cli`` is not usable: the module has no ``__main__`` guard and exits
    at once without serving.)
    """
    script = Path(sys.executable).with_name("flagsvc")
    if script.exists():
        return [str(script)]
    found = shutil.which("flagsvc")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from flagsvc.cli import main; sys.exit(main())"]


def create_token(data_dir: Path, name: str, role: str) -> str:
    """``flagsvc token create --role <role>`` against the server running on ``data_dir``; the secret."""
    cmd = [*flagsvc_command(), "token", "create", "--name", name, "--role", role]
    cmd += ["--data-dir", str(data_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()[0].strip()


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE (inherited by ``flagsvc serve``, gunicorn, wrk and the client processes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the server


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark like Ctrl-C does: through the ``finally`` blocks that stop the
    server and the load generators."""
    signal.signal(signal.SIGTERM, _terminate)
