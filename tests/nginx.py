"""The real nginx in front of `flagsvc serve`: the shipped site, with this machine's ports and paths."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .processes import stop_tree

NGINX_SITE = Path(__file__).parent.parent / "ops/nginx/flagsvc.conf"
#: Where the shipped site keeps the snapshot cache (a test puts it under its tmp_path).
CACHE_DIR = "/var/cache/nginx/flagsvc"

nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
openssl = shutil.which("openssl")
needs_nginx = pytest.mark.skipif(
    nginx is None or openssl is None, reason="nginx or openssl not installed (.ci/run installs nginx)"
)


def nginx_conf(tmp_path: Path, site: str, extra_http: str = "") -> Path:
    """A main nginx.conf around ``site`` that keeps every file nginx writes under ``tmp_path``."""
    (tmp_path / "site.conf").write_text(site.replace(CACHE_DIR, str(tmp_path / "cache")))
    conf = tmp_path / "nginx.conf"
    # As root, nginx's workers would run as nobody, who cannot enter the test's private folders.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"{user}pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\ndaemon off;\nevents {{}}\n"
        f"http {{\n  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n"
        f"  {extra_http}\n  include {tmp_path}/site.conf;\n}}\n"
    )
    return conf


def plain_site(listen_port: int, main_port: int, control_port: int) -> str:
    """The shipped site on plain HTTP on ``listen_port``, in front of the given listeners."""
    site = NGINX_SITE.read_text()
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{listen_port};")
    site = "\n".join(line for line in site.splitlines() if "ssl_certificate" not in line)
    site = site.replace("127.0.0.1:8000", f"127.0.0.1:{main_port}")
    return site.replace("127.0.0.1:8001", f"127.0.0.1:{control_port}")


def start_nginx(tmp_path: Path, conf: Path, base: str, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """nginx on ``conf``, once ``base`` answers; stopped again if it does not."""
    assert nginx is not None
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not _answers(f"{base}/healthz", proc, time.monotonic() + timeout):
        stop_tree(proc, timeout=10)
        log = tmp_path / "error.log"
        raise RuntimeError(f"nginx did not start: {log.read_text() if log.exists() else ''}")
    return proc


@contextlib.contextmanager
def running_nginx(tmp_path: Path, conf: Path, base: str) -> Iterator[None]:
    """nginx on ``conf`` (see :func:`start_nginx`) while the block runs; stopped after, also on failure."""
    proc = start_nginx(tmp_path, conf, base)
    try:
        yield
    finally:
        stop_tree(proc, timeout=10)


def _answers(url: str, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return True
        except requests.ConnectionError:
            time.sleep(0.05)
    return False
