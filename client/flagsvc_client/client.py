"""``FlagClient``: local evaluation, kept current by a data source (``_stream`` or ``_poll``)."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_args

from ._datasource import DataSource, Sink, fetch_snapshot
from ._http import SnapshotFetcher
from ._poll import PollingSource
from ._report import Reporter, default_app_name
from ._snapshot import Snapshot, load_cache, save_cache
from ._stream import StreamingSource
from .engine import ErrorCode, EvaluationDetails, FlagType, Reason, value_matches_type

log = logging.getLogger("flagsvc_client")

F = TypeVar("F", bound=Callable[..., Any])
ChangeListener = Callable[["FlagChange"], None]

_NO_VALUE = object()  # marks "fell back to the default" on the is_enabled fast path
_FLAG_TYPES = frozenset(get_args(FlagType))


@dataclass(frozen=True)
class FlagChange:
    """What ``on_change`` listeners receive after a new snapshot is applied."""

    old_version: int
    new_version: int
    changed_keys: frozenset[str]


@dataclass(frozen=True)
class ClientStatus:
    """Health of the client, for logs and readiness checks."""

    env: str
    version: int
    source: str  # "server", "cache" or "defaults"
    #: A snapshot of flagsvc's serves (from the service, or the cache file), not the code's
    #: defaults; the same whether the service refused the connection, timed out or refused the token.
    ready: bool
    stale: bool
    last_success: float | None  # wall-clock time of the last good answer from the server
    last_error: str | None
    fatal: bool  # polling stopped for good (token refused, environment unknown)
    closed: bool


class FlagClient:
    """Evaluate flags of one environment locally; a daemon thread keeps the snapshot current.

    Evaluations never raise and never block on the network: an unknown flag gives the caller's
    default (or ``defaults[key]``); when the service is unreachable the last known good snapshot
    keeps serving; at a cold start with no service, ``cache_path`` (if readable), else defaults.
    """

    def __init__(
        self,
        url: str,
        token: str,
        env: str,
        *,
        defaults: Mapping[str, Any] | None = None,
        poll_interval: float = 5.0,
        cache_path: str | None = None,
        init_timeout: float = 3.0,
        request_timeout: float = 5.0,
        mode: str = "stream",
        app_name: str | None = None,
        report_interval: float = 30.0,
        stream_read_timeout: float = 45.0,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if mode not in ("stream", "poll"):
            raise ValueError("mode must be 'stream' or 'poll'")
        self.env = env
        self.mode = mode
        self.app_name = app_name or default_app_name()
        self._stream_read_timeout = stream_read_timeout
        self.poll_interval = float(poll_interval)
        self._url = url
        self._defaults = dict(defaults or {})
        self._cache_path = cache_path
        self._fetcher = SnapshotFetcher(url, token, env, timeout=request_timeout)
        self._snapshot = Snapshot.empty(env)
        self._listeners: list[ChangeListener] = []
        self._health_listeners: list[Callable[[ClientStatus], None]] = []
        self._closed = False
        self._pending_counts: dict[str, int] = {}
        self._has_evaluated = False  # in this process
        self._forked_children = False  # a pre-fork parent (gunicorn --preload): silent until it evaluates
        self._write_lock = threading.Lock()
        self._sink = Sink(env, lambda: self._snapshot, self._apply)
        self._sink.on_health = self._health_changed
        self._reporter = Reporter(self._fetcher, self._report_body, report_interval)
        self._source = self._new_source()
        self._source.start()
        _register_process_hooks(self)
        self._sink.ready.wait(init_timeout)
        if self._snapshot.source == "defaults" and cache_path:
            cached = load_cache(cache_path, env)
            if cached is not None:
                self._apply(cached, from_cache=True)
                log.warning(
                    "flagsvc: service not reachable at start; serving cached version %d", cached.version
                )
        self._reporter.start()  # the first heartbeat reports the version start-up ended with

    def _new_source(self) -> DataSource:
        if self.mode == "stream":
            return StreamingSource(
                self._fetcher, self._sink, self.poll_interval, self.env, self._stream_read_timeout
            )
        return PollingSource(self._fetcher, self._sink, self.poll_interval, self.env)

    # -- evaluation (hot path: no locks, no I/O) -----------------------------------------------

    def is_enabled(
        self, key: str, context: Mapping[str, Any] | None = None, default: bool | None = None
    ) -> bool:
        """The boolean value of ``key``: for a kill switch, ``False`` once it is killed."""
        flag = self._snapshot.flags.get(key)
        if flag is not None:
            flag.evaluations += 1
            details = flag.static
            if details is None:
                details = flag.evaluate(context, _NO_VALUE)  # never raises
            value = details.value
            if value.__class__ is bool:
                return value  # a bool: the fast path's answer
        else:
            return bool(default if default is not None else self._defaults.get(key, False))
        return bool(self._details(key, context, default, "boolean", counted=True).value)

    def get_boolean(
        self, key: str, context: Mapping[str, Any] | None = None, default: bool | None = None
    ) -> bool:
        """The value of boolean flag ``key``; ``default`` if there is none (see :meth:`evaluate`)."""
        return bool(self._details(key, context, default, "boolean").value)

    def get_string(
        self, key: str, context: Mapping[str, Any] | None = None, default: str | None = None
    ) -> str:
        """The value of string flag ``key``; ``default`` if there is none (see :meth:`evaluate`)."""
        value: str = self._details(key, context, default, "string").value
        return value

    def get_number(
        self, key: str, context: Mapping[str, Any] | None = None, default: float | None = None
    ) -> float:
        """The value of number flag ``key``; ``default`` if there is none (see :meth:`evaluate`)."""
        value: float = self._details(key, context, default, "number").value
        return value

    def get_json(self, key: str, context: Mapping[str, Any] | None = None, default: Any = None) -> Any:
        """The value of JSON flag ``key``; ``default`` if there is none (see :meth:`evaluate`)."""
        return self._details(key, context, default, "json").value

    def evaluate(
        self,
        key: str,
        context: Mapping[str, Any] | None = None,
        default: Any = None,
        *,
        expected_type: FlagType | None = None,
    ) -> EvaluationDetails:
        """Value, variant, reason and error of ``key`` for ``context``; never raises.

        ``default`` (else ``defaults[key]``) is the value when there is an error. With
        ``expected_type`` (``"boolean"``, ``"string"``, ``"number"`` or ``"json"``), a value of
        another type is an error too (``TYPE_MISMATCH``), and a boolean's default is ``False``.
        """
        return self._details(key, context, default, expected_type)

    def all_values(self, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every flag's value for ``context`` (flags that error give ``defaults[key]`` or ``None``)."""
        snapshot = self._snapshot
        return {
            key: flag.evaluate(context, self._defaults.get(key)).value for key, flag in snapshot.flags.items()
        }

    def _details(
        self,
        key: str,
        context: Mapping[str, Any] | None,
        default: Any,
        expected: FlagType | None,
        *,
        counted: bool = False,
    ) -> EvaluationDetails:
        if default is None:
            default = self._defaults.get(key, False if expected == "boolean" else None)
        try:
            flag = self._snapshot.flags.get(key)
            if flag is None:
                return _error(key, default, ErrorCode.FLAG_NOT_FOUND, f"no flag {key!r}")
            if not counted:
                flag.evaluations += 1
            details = flag.evaluate(context, default)
            if expected is None or details.reason == Reason.ERROR:
                return details
            if expected not in _FLAG_TYPES:
                return _error(key, default, ErrorCode.GENERAL, f"unknown expected_type {expected!r}")
            if not value_matches_type(details.value, expected):
                message = f"flag {key!r} does not hold a {expected} value"
                return _error(key, default, ErrorCode.TYPE_MISMATCH, message, details.flag_version)
            return details
        except Exception as exc:  # noqa: BLE001 - an evaluation never raises into the caller
            return _error(key, default, ErrorCode.GENERAL, f"{type(exc).__name__}")

    def kill_switch(
        self, key: str, fallback: Any = None, *, context: Callable[..., Mapping[str, Any]] | None = None
    ) -> Callable[[F], F]:
        """Decorate a function that runs only while ``key`` is enabled; else ``fallback`` runs.

        ``fallback`` is called with the same arguments if callable, else returned as is.
        ``context`` (optional) builds the evaluation context from the same arguments.
        """

        def decorator(func: F) -> F:
            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                ctx = None
                if context is not None:
                    try:
                        ctx = context(*args, **kwargs)
                    except Exception:
                        log.exception("flagsvc: kill_switch context builder for %r failed", key)
                if self.is_enabled(key, ctx, default=True):
                    return func(*args, **kwargs)
                return fallback(*args, **kwargs) if callable(fallback) else fallback

            return wrapper  # type: ignore[return-value]

        return decorator

    # -- state -----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._snapshot.version

    def on_change(self, listener: ChangeListener) -> ChangeListener:
        """Call ``listener(FlagChange)`` after each new snapshot (from the updater thread)."""
        self._listeners.append(listener)
        return listener

    def on_status(self, listener: Callable[[ClientStatus], None]) -> Callable[[ClientStatus], None]:
        """Call ``listener(status())`` when fetching starts working, starts failing, or stops for
        good (from the updater thread)."""
        self._health_listeners.append(listener)
        return listener

    def _health_changed(self) -> None:
        status = self.status()
        for listener in list(self._health_listeners):
            try:
                listener(status)
            except Exception:
                log.exception("flagsvc: status listener failed")

    def status(self) -> ClientStatus:
        """Where the values come from and how fetching them goes; never blocks."""
        sink = self._sink
        last = sink.last_success
        stale = sink.failing or last is None or time.time() - last > 2 * self.poll_interval + 5
        return ClientStatus(
            env=self.env,
            version=self._snapshot.version,
            source=self._snapshot.source,
            ready=self._snapshot.source != "defaults",
            stale=stale,
            last_success=last,
            last_error=sink.last_error,
            fatal=sink.fatal,
            closed=self._closed,
        )

    def _report_body(self) -> dict[str, Any] | None:
        """The heartbeat: applied version, health, and evaluations since the last report; ``None``
        (no heartbeat, a goodbye) in a process that forked children and never evaluated a flag: a
        pre-fork parent is not an instance anyone waits for."""
        counts: dict[str, int] = {}
        for key, flag in self._snapshot.flags.items():
            n = flag.evaluations
            if n != flag.reported:
                counts[key] = n - flag.reported
                flag.reported = n
        for key, n in self._pending_counts.items():
            counts[key] = counts.get(key, 0) + n
        self._pending_counts = {}
        self._has_evaluated = self._has_evaluated or bool(counts)
        if self._forked_children and not self._has_evaluated:
            return None
        status = self.status()
        return {
            "app": self.app_name,
            "mode": self.mode,
            "applied_version": status.version,
            "source": status.source,
            "stale": status.stale,
            "last_error": status.last_error,
            "counts": counts,
        }

    def _apply(self, snapshot: Snapshot, *, from_cache: bool = False) -> None:
        with self._write_lock:
            old = self._snapshot
            if from_cache and old.source == "server":
                return  # a fresher snapshot arrived meanwhile
            if not snapshot.supersedes(old):
                return
            self._snapshot = snapshot
            # Evaluations counted on the replaced flags still belong in the next heartbeat.
            for key, flag in old.flags.items():
                if flag.evaluations != flag.reported:
                    self._pending_counts[key] = (
                        self._pending_counts.get(key, 0) + flag.evaluations - flag.reported
                    )
        self._reporter.changed()
        changed = frozenset(
            k
            for k in old.raw.get("flags", {}).keys() | snapshot.raw.get("flags", {}).keys()
            if old.raw["flags"].get(k) != snapshot.raw["flags"].get(k)
        )
        if not from_cache and self._cache_path:
            try:
                save_cache(self._cache_path, self._url, snapshot)
            except OSError as exc:
                log.warning("flagsvc: cannot write cache %s: %s", self._cache_path, exc)
        if changed:
            event = FlagChange(old.version, snapshot.version, changed)
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("flagsvc: on_change listener failed")

    def poll_once(self, *, keep_alive: bool = True) -> None:
        """Fetch once and apply a new snapshot; raises ``FetchError``. Without ``keep_alive``
        the connection is not kept open afterwards."""
        fetch_snapshot(self._fetcher, self._sink, keep_alive=keep_alive)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop updates and heartbeats, say goodbye to the service (this instance no longer counts
        as live), and release the HTTP session. Idempotent. Evaluations keep answering from the
        last snapshot; the cache file is kept."""
        if self._closed:
            return
        self._closed = True
        self._source.stop()
        self._reporter.stop()
        self._source.join(self._fetcher.timeout + 1)
        self._fetcher.close()

    def __enter__(self) -> FlagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_fork_in_parent(self) -> None:
        """This process forked a child: if it never evaluates, it stops counting as an instance."""
        self._forked_children = True
        self._reporter.poke()

    def _after_fork_in_child(self) -> None:
        """In a forked child: new locks, a new HTTP session, a new data source (the parent's
        thread and stream are not this process's); keep the warm snapshot."""
        self._write_lock = threading.Lock()
        self._sink.after_fork()
        self._pending_counts = {}
        self._has_evaluated = self._forked_children = False  # a new instance
        for flag in self._snapshot.flags.values():
            flag.reported = flag.evaluations  # the parent reports what it counted before the fork
        self._fetcher.reset_session()
        self._reporter.after_fork()
        self._source = self._new_source()
        if not self._closed and not self._sink.fatal:
            self._source.start()
            self._reporter.start()


def _error(
    key: str, default: Any, code: ErrorCode, message: str, flag_version: int | None = None
) -> EvaluationDetails:
    return EvaluationDetails(key, default, None, Reason.ERROR, code, message, flag_version)


_clients: weakref.WeakSet[FlagClient] = weakref.WeakSet()
_process_hooks_installed = False


def _after_fork() -> None:
    for client in list(_clients):
        client._after_fork_in_child()


def _after_fork_parent() -> None:
    for client in list(_clients):
        client._after_fork_in_parent()


def _at_exit() -> None:
    """The process ends: every open client says goodbye (its reporter stops)."""
    for client in list(_clients):
        if not client._closed:
            client._reporter.stop()


def _register_process_hooks(client: FlagClient) -> None:
    """Track ``client`` for the fork hooks (child: a new instance; parent: maybe not one) and the
    exit hook (goodbye), installed once per process."""
    global _process_hooks_installed
    _clients.add(client)
    if not _process_hooks_installed:
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork, after_in_parent=_after_fork_parent)
        atexit.register(_at_exit)
        _process_hooks_installed = True
