"""`flagsvc serve` as a subprocess, the way an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from .processes import stop_tree
from .redis_server import free_port

#: How long `flagsvc serve` gets to answer /readyz (the CI machine has 2 shared cores).
READY_TIMEOUT_S = 30.0
#: The workers of the main listener (one more with a control listener).
WORKERS = 2


class Served:
    """`flagsvc serve` on a free (or given) port, ready when /readyz answers 200.

    If it does not come up, the constructor stops every process it started (`flagsvc serve`,
    gunicorn, the embedded redis-server) before raising ``RuntimeError``."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        control_port: int | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        """``control_port``: also the control listener (``--control-port``), ready too."""
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.control_url = f"http://127.0.0.1:{control_port}" if control_port else None
        if control_port:
            extra = (*extra, "--control-port", str(control_port))
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self._log_file = self.log.open("a")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FLAGSVC_")}
        environ.update(env or {})
        command = [sys.executable, "-m", "flagsvc.cli", "serve", "--data-dir", str(data_dir)]
        command += ["--port", str(self.port), "--workers", str(WORKERS), *extra]
        try:
            self.proc = subprocess.Popen(
                command, stdout=self._log_file, stderr=subprocess.STDOUT, env=environ
            )
        except BaseException:
            self._log_file.close()
            raise
        try:
            self._wait_ready(time.monotonic() + ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        """Until every listener answers ``/readyz`` and gunicorn has forked all its workers (it is
        ready once one worker answers: under load the last ones may not be forked yet)."""
        for url in filter(None, (self.url, self.control_url)):
            self._wait(deadline, lambda url=url: self._ready(url))
        workers = WORKERS + (1 if self.control_url else 0)
        self._wait(deadline, lambda: len(self.workers()) == workers)

    def _wait(self, deadline: float, condition: Callable[[], bool]) -> None:
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flagsvc serve did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    @staticmethod
    def _ready(url: str) -> bool:
        try:
            return requests.get(f"{url}/readyz", timeout=1).status_code == 200
        except requests.RequestException:  # not listening yet, or slow under load
            return False

    def workers(self) -> list[psutil.Process]:
        """The gunicorn workers (children of the gunicorn master under ``flagsvc serve``)."""
        try:
            masters = [p for p in psutil.Process(self.proc.pid).children() if "gunicorn" in p.cmdline()]
            return [worker for master in masters for worker in master.children()]
        except psutil.Error:
            return []

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; whatever is still running after 30 s is killed."""
        try:
            return stop_tree(self.proc)
        finally:
            self._log_file.close()

    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()
