"""Fetching the snapshot over HTTP with ``If-None-Match``, one keep-alive session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from ._version import __version__

USER_AGENT = f"flagsvc-python/{__version__}"


class FetchError(Exception):
    """The snapshot could not be fetched. ``fatal``: retrying will not help (401, 403, 404)."""

    def __init__(self, message: str, *, fatal: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.status = status


@dataclass(frozen=True)
class Fetched:
    not_modified: bool
    document: dict[str, Any] | None


class SnapshotFetcher:
    """GET ``/api/v1/envs/{env}/snapshot``; never logs or exposes the token."""

    def __init__(self, base_url: str, token: str, env: str, *, timeout: float) -> None:
        self.url = f"{base_url.rstrip('/')}/api/v1/envs/{quote(env, safe='')}/snapshot"
        self._token = token
        self._timeout = timeout
        self.session = self._new_session()

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update({"Authorization": f"Bearer {self._token}", "User-Agent": USER_AGENT})
        return session

    def reset_session(self) -> None:
        """A fresh session (after ``fork()``: never share sockets with the parent)."""
        self.session = self._new_session()

    def fetch(self, known_version: int | None) -> Fetched:
        headers = {"If-None-Match": f'"{known_version}"'} if known_version is not None else {}
        try:
            resp = self.session.get(self.url, headers=headers, timeout=self._timeout)
        except requests.RequestException as exc:
            raise FetchError(f"cannot reach flagsvc: {type(exc).__name__}") from None
        if resp.status_code == 304:
            return Fetched(True, None)
        if resp.status_code in (401, 403, 404):
            detail = _problem_detail(resp)
            raise FetchError(
                f"flagsvc refused the snapshot: {resp.status_code} {detail}",
                fatal=True,
                status=resp.status_code,
            )
        if resp.status_code != 200:
            raise FetchError(f"flagsvc answered {resp.status_code}", status=resp.status_code)
        try:
            return Fetched(False, resp.json())
        except ValueError:
            raise FetchError("flagsvc sent a snapshot that is not JSON", status=200) from None

    def close(self) -> None:
        self.session.close()


def _problem_detail(resp: requests.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("detail") or body.get("title") or "")
    except ValueError:
        return ""
