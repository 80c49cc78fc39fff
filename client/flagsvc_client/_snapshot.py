"""A snapshot compiled for evaluation, and its on-disk cache (atomic writes)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .engine import CompiledFlag, compile_flag

log = logging.getLogger("flagsvc_client")

CACHE_FORMAT = "flagsvc-snapshot/1"


@dataclass(frozen=True)
class Snapshot:
    """One environment version, flags compiled. Immutable: swapped whole, read without locks."""

    env: str
    version: int
    raw: Mapping[str, Any]
    flags: dict[str, CompiledFlag] = field(repr=False)
    source: str  # "server", "cache" or "defaults"

    @property
    def history(self) -> str:
        """Where the version moved in the service's history: a version number reused after a
        rollback of the service's store comes with another history ("" from an older service)."""
        value = self.raw.get("history", "")
        return value if isinstance(value, str) else ""

    @property
    def identity(self) -> str:
        """``<version>-<history>``, as the service names this snapshot (its ETag, its event id)."""
        return f"{self.version}-{self.history}" if self.history else str(self.version)

    def supersedes(self, held: Snapshot) -> bool:
        """Whether this snapshot replaces ``held``: a newer version, the same version of another
        history, or anything from the service over a cached or default one. Never an older
        version: behind a load balancer, a host that lags a second must not take flags back."""
        if held.source != self.source:
            return self.source == "server" or held.source == "defaults"
        return self.version > held.version or (self.version == held.version and self.history != held.history)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any], source: str) -> Snapshot:
        """Build from the server's snapshot document; raises ``ValueError`` if it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError("snapshot is not an object")
        env, version, flags = data.get("env"), data.get("version"), data.get("flags")
        if not isinstance(env, str) or not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("snapshot needs env (string) and version (integer)")
        if not isinstance(flags, Mapping):
            raise ValueError("snapshot flags must be an object")
        compiled = {str(k): compile_flag(str(k), v) for k, v in flags.items()}
        return cls(env, version, dict(data), compiled, source)

    def patched(self, patch: Mapping[str, Any]) -> Snapshot:
        """The snapshot a ``patch`` event makes of this one: its version and history, its flags
        added or changed, its ``removed`` keys gone. ``ValueError`` if the patch is not one of
        this snapshot (its ``base`` names another) or is malformed."""
        if not isinstance(patch, Mapping):
            raise ValueError("patch is not an object")
        if patch.get("base") != self.identity or patch.get("env") != self.env:
            raise ValueError(f"the patch applies to {patch.get('base')!r}, not to {self.identity!r}")
        changed, removed = patch.get("flags"), patch.get("removed", [])
        if not isinstance(changed, Mapping) or not isinstance(removed, list):
            raise ValueError("patch flags must be an object and removed a list")
        gone = set(removed)
        flags = {k: v for k, v in self.raw["flags"].items() if k not in gone}
        flags.update(changed)
        document = {**self.raw, "flags": flags}
        document.update(version=patch.get("version"), history=patch.get("history"))
        return Snapshot.from_wire(document, self.source)

    @classmethod
    def empty(cls, env: str) -> Snapshot:
        return cls(env, 0, {"env": env, "version": 0, "flags": {}}, {}, "defaults")


def save_cache(path: str, url: str, snapshot: Snapshot) -> None:
    """Write the snapshot to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    document = {"format": CACHE_FORMAT, "url": url, "snapshot": snapshot.raw}
    fd, tmp = tempfile.mkstemp(prefix=".flagsvc-cache-", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(document, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_cache(path: str, env: str) -> Snapshot | None:
    """The cached snapshot of ``env``, or ``None`` (with a warning) if absent, corrupt or foreign."""
    try:
        with open(path) as fh:
            document = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("flagsvc: ignoring unreadable cache file %s: %s", path, exc)
        return None
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
        log.warning("flagsvc: ignoring cache file %s: not a flagsvc snapshot cache", path)
        return None
    try:
        snapshot = Snapshot.from_wire(document.get("snapshot"), source="cache")  # type: ignore[arg-type]
    except ValueError as exc:
        log.warning("flagsvc: ignoring corrupt cache file %s: %s", path, exc)
        return None
    if snapshot.env != env:
        log.warning(
            "flagsvc: ignoring cache file %s: it holds environment %r, not %r", path, snapshot.env, env
        )
        return None
    return snapshot
