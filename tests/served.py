"""`flagsvc serve` as a subprocess, the way an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from .redis_server import free_port


class Served:
    """`flagsvc serve` on a free (or given) port, ready when /readyz answers 200."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        control_port: int | None = None,
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
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flagsvc.cli",
                "serve",
                "--data-dir",
                str(data_dir),
                "--port",
                str(self.port),
                "--workers",
                "2",
                *extra,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=environ,
        )
        deadline = time.monotonic() + 30
        for url in filter(None, (self.url, self.control_url)):
            while True:
                try:
                    if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"flagsvc serve did not start:\n{self.log.read_text()}")
                time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=30)
        finally:
            self._log_file.close()

    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()
