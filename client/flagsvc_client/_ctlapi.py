"""flagctl's connection to the service: the REST calls, and the exit code of each failure."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests

from ._version import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_UNAVAILABLE = range(7)
EXIT_INVALID, EXIT_NOT_CONFIRMED, EXIT_DIFFERENT = 7, 8, 9
USER_AGENT = f"flagctl/{__version__}"


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _exit_code(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (409, 412):
        return EXIT_CONFLICT
    if status >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_INVALID


class Api:
    """Thin REST client; every failure becomes a :class:`CommandError` with one clear line."""

    def __init__(self, url: str, token: str, env: str, timeout: float) -> None:
        self.base = url.rstrip("/")
        self.env = env
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT})

    def env_path(self, *parts: str) -> str:
        return "/".join([f"/api/v1/envs/{quote(self.env, safe='')}", *(quote(p, safe="") for p in parts)])

    def call(self, method: str, path: str, *, retry: bool = False, **kwargs: Any) -> requests.Response:
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                resp = self.session.request(method, self.base + path, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                if attempt + 1 < attempts:
                    continue
                reason = type(exc).__name__
                raise CommandError(
                    f"cannot reach flagsvc at {self.base}: {reason}", EXIT_UNAVAILABLE
                ) from None
            if resp.status_code >= 500 and attempt + 1 < attempts:
                continue
            if resp.status_code >= 400:
                raise CommandError(_describe(resp), _exit_code(resp.status_code))
            return resp
        raise AssertionError("unreachable")


def _describe(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"{resp.status_code} {resp.reason}"
    detail = body.get("detail") or body.get("title") or resp.reason
    fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in body.get("errors") or [])
    return f"{resp.status_code} {body.get('title') or resp.reason}: {detail}" + (
        f" ({fields})" if fields else ""
    )
