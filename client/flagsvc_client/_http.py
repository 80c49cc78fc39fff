"""Fetching the snapshot over HTTP with ``If-None-Match``, one keep-alive session."""

from __future__ import annotations

from collections.abc import Mapping
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
        self.base = f"{base_url.rstrip('/')}/api/v1/envs/{quote(env, safe='')}"
        self.url = f"{self.base}/snapshot"
        # Changes as patches of the flags that changed (a server that does not know the
        # parameter sends whole snapshots, which the stream takes as well).
        self.stream_url = f"{self.base}/stream?patches=true"
        self._token = token
        self._timeout = timeout
        self.session = self._new_session()

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update({"Authorization": f"Bearer {self._token}", "User-Agent": USER_AGENT})
        return session

    @property
    def timeout(self) -> float:
        """Seconds to connect, and to wait for each answer but the event stream's."""
        return self._timeout

    def reset_session(self) -> None:
        """A fresh session (after ``fork()``: never share sockets with the parent)."""
        self.session = self._new_session()

    def open_stream(self, known: str | None, read_timeout: float) -> requests.Response:
        """Open the Server-Sent Events stream; the caller iterates and closes the response."""
        # A stream's connection is not reused afterwards.
        headers = {"Accept": "text/event-stream", "Connection": "close"}
        if known is not None:
            headers["Last-Event-ID"] = known
        try:
            resp = self.session.get(
                self.stream_url, headers=headers, stream=True, timeout=(self._timeout, read_timeout)
            )
        except requests.RequestException as exc:
            raise FetchError(f"cannot reach flagsvc: {type(exc).__name__}") from None
        if resp.status_code != 200:
            fatal = resp.status_code in (401, 403, 404)
            detail = f" {_problem_detail(resp)}" if fatal else ""  # what to fix: the server says
            resp.close()
            message = f"flagsvc refused the stream: {resp.status_code}{detail}"
            raise FetchError(message, fatal=fatal, status=resp.status_code)
        return resp

    def report(self, session: requests.Session, instance: str, body: dict[str, Any]) -> Mapping[str, str]:
        """POST a heartbeat (``/clients/{instance}``): the answer's headers; raises ``FetchError``."""
        url = f"{self.base}/clients/{quote(instance, safe='')}"
        try:
            # Reports are 30 s apart: no idle keep-alive connection to hold a server's shutdown.
            resp = session.post(url, json=body, timeout=self._timeout, headers={"Connection": "close"})
        except requests.RequestException as exc:
            raise FetchError(f"cannot report to flagsvc: {type(exc).__name__}") from None
        if resp.status_code >= 300:
            raise FetchError(f"flagsvc refused the report: {resp.status_code}", status=resp.status_code)
        return resp.headers

    def forget(self, instance: str) -> None:
        """DELETE ``/clients/{instance}``: the instance is gone; raises ``FetchError``."""
        url = f"{self.base}/clients/{quote(instance, safe='')}"
        try:
            with self._new_session() as session:
                resp = session.delete(url, timeout=min(self._timeout, 1.0), headers={"Connection": "close"})
        except requests.RequestException as exc:
            raise FetchError(f"cannot say goodbye to flagsvc: {type(exc).__name__}") from None
        if resp.status_code >= 300 and resp.status_code != 404:
            raise FetchError(f"flagsvc refused the goodbye: {resp.status_code}", status=resp.status_code)

    def new_session(self) -> requests.Session:
        """Another session with the same credentials (one per thread)."""
        return self._new_session()

    def fetch(self, known: str | None, *, keep_alive: bool = True) -> Fetched:
        """The snapshot, unless ``known`` (a snapshot identity, ``<version>-<history>``) is current."""
        headers = {"If-None-Match": f'"{known}"'} if known is not None else {}
        if not keep_alive:
            headers["Connection"] = "close"
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
