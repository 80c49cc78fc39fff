"""``FlagClient``: local evaluation, kept current by a background poller that cannot die."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from . import _sse as sse
from ._http import FetchError, SnapshotFetcher
from ._report import Reporter, default_app_name
from ._snapshot import Snapshot, load_cache, save_cache
from .engine import ErrorCode, EvaluationDetails, Reason, value_matches_type

log = logging.getLogger("flagsvc_client")

F = TypeVar("F", bound=Callable[..., Any])
ChangeListener = Callable[["FlagChange"], None]

_NO_VALUE = object()  # marks "fell back to the default" on the is_enabled fast path
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 30.0


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
    ready: bool
    stale: bool
    last_success: float | None  # wall-clock time of the last good answer from the server
    last_error: str | None
    fatal: bool  # polling stopped for good (token refused, environment unknown)
    closed: bool


class FlagClient:
    """Evaluate flags of one environment locally; a daemon thread polls the snapshot.

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
        self._stream_response: Any = None
        self.poll_interval = float(poll_interval)
        self._url = url
        self._defaults = dict(defaults or {})
        self._cache_path = cache_path
        self._fetcher = SnapshotFetcher(url, token, env, timeout=request_timeout)
        self._snapshot = Snapshot.empty(env)
        self._listeners: list[ChangeListener] = []
        self._closed = False
        self._pending_counts: dict[str, int] = {}
        self._last_success: float | None = None
        self._last_error: str | None = None
        self._failing = False
        self._fatal = False
        self._init_sync()
        self._reporter = Reporter(self._fetcher, self._report_body, report_interval)
        self._start_poller()
        _register_fork_handler(self)
        self._ready.wait(init_timeout)
        if self._snapshot.source == "defaults" and cache_path:
            cached = load_cache(cache_path, env)
            if cached is not None:
                self._apply(cached, from_cache=True)
                log.warning(
                    "flagsvc: service not reachable at start; serving cached version %d", cached.version
                )
        self._reporter.start()  # the first heartbeat reports the version start-up ended with

    def _init_sync(self) -> None:
        self._write_lock = threading.Lock()
        self._stream_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()

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
                return value  # type: ignore[no-any-return]
        else:
            return bool(default if default is not None else self._defaults.get(key, False))
        return bool(self._typed(key, context, default, "boolean", counted=True).value)

    def get_boolean(
        self, key: str, context: Mapping[str, Any] | None = None, default: bool | None = None
    ) -> bool:
        return bool(self._typed(key, context, default, "boolean").value)

    def get_string(
        self, key: str, context: Mapping[str, Any] | None = None, default: str | None = None
    ) -> str:
        return self._typed(key, context, default, "string").value  # type: ignore[no-any-return]

    def get_number(
        self, key: str, context: Mapping[str, Any] | None = None, default: float | None = None
    ) -> float:
        return self._typed(key, context, default, "number").value  # type: ignore[no-any-return]

    def get_json(self, key: str, context: Mapping[str, Any] | None = None, default: Any = None) -> Any:
        return self._typed(key, context, default, "json").value

    def evaluate(
        self, key: str, context: Mapping[str, Any] | None = None, default: Any = None
    ) -> EvaluationDetails:
        """Value, variant, reason and error of ``key`` for ``context``; never raises."""
        return self._typed(key, context, default, None)

    def all_values(self, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every flag's value for ``context`` (flags that error give ``defaults[key]`` or ``None``)."""
        snapshot = self._snapshot
        return {
            key: flag.evaluate(context, self._defaults.get(key)).value for key, flag in snapshot.flags.items()
        }

    def _typed(
        self,
        key: str,
        context: Mapping[str, Any] | None,
        default: Any,
        expected: str | None,
        *,
        counted: bool = False,
    ) -> EvaluationDetails:
        if default is None:
            default = self._defaults.get(key, False if expected == "boolean" else None)
        try:
            flag = self._snapshot.flags.get(key)
            if flag is None:
                return EvaluationDetails(
                    key, default, None, Reason.ERROR, ErrorCode.FLAG_NOT_FOUND, f"no flag {key!r}"
                )
            if not counted:
                flag.evaluations += 1
            details = flag.evaluate(context, default)
            if (
                expected is not None
                and details.reason != Reason.ERROR
                and not value_matches_type(details.value, expected)
            ):
                message = f"flag {key!r} does not hold a {expected} value"
                return EvaluationDetails(
                    key, default, None, Reason.ERROR, ErrorCode.TYPE_MISMATCH, message, details.flag_version
                )
            return details
        except Exception as exc:  # noqa: BLE001 - an evaluation never raises into the caller
            return EvaluationDetails(
                key, default, None, Reason.ERROR, ErrorCode.GENERAL, f"{type(exc).__name__}"
            )

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
        """Call ``listener(FlagChange)`` after each new snapshot (from the poller thread)."""
        self._listeners.append(listener)
        return listener

    def status(self) -> ClientStatus:
        last = self._last_success
        stale = self._failing or last is None or time.time() - last > 2 * self.poll_interval + 5
        return ClientStatus(
            env=self.env,
            version=self._snapshot.version,
            source=self._snapshot.source,
            ready=self._ready.is_set(),
            stale=stale,
            last_success=last,
            last_error=self._last_error,
            fatal=self._fatal,
            closed=self._closed,
        )

    def _report_body(self) -> dict[str, Any]:
        """The heartbeat: applied version, health, and evaluations since the last report."""
        counts: dict[str, int] = {}
        for key, flag in self._snapshot.flags.items():
            n = flag.evaluations
            if n != flag.reported:
                counts[key] = n - flag.reported
                flag.reported = n
        for key, n in self._pending_counts.items():
            counts[key] = counts.get(key, 0) + n
        self._pending_counts = {}
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
            if snapshot.version == old.version and old.source == snapshot.source:
                return
            self._snapshot = snapshot
            # Evaluations counted on the replaced flags still belong in the next heartbeat.
            for key, flag in old.flags.items():
                if flag.evaluations != flag.reported:
                    self._pending_counts[key] = (
                        self._pending_counts.get(key, 0) + flag.evaluations - flag.reported
                    )
        self._reporter.poke()
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

    # -- the poller ------------------------------------------------------------------------------

    def _start_poller(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"flagsvc-poller-{self.env}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.mode == "stream":
            self._run_stream()
        else:
            self._run_poll()

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter, so a restarted server is not hit by every client at once."""
        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(failures, 16), self.poll_interval * 4)
        return max(delay * random.uniform(0.5, 1.0), 0.05)

    def _fatal_stop(self, exc: FetchError) -> None:
        self._fatal = True
        self._record_failure(str(exc))
        log.error("flagsvc: %s; updates stopped, serving the last known values", exc)
        self._ready.set()

    def _run_stream(self) -> None:
        """Hold the event stream; while it is broken, poll, and reconnect with backoff + jitter."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._consume_stream()
                failures = 0
                delay = random.uniform(0.1, 1.0)  # the server closed it (restart): spread reconnects
            except FetchError as exc:
                if exc.fatal:
                    self._fatal_stop(exc)
                    return
                failures += 1
                self._record_failure(str(exc))
                self._ready.set()
                delay = self._backoff(failures)
            except Exception as exc:
                failures += 1
                self._record_failure(f"{type(exc).__name__}: {exc}")
                log.exception("flagsvc: unexpected error in the event stream")
                self._ready.set()
                delay = self._backoff(failures)
            if not self._poll_until(time.monotonic() + delay):
                return

    def _poll_until(self, deadline: float) -> bool:
        """Fallback polling until ``deadline``; ``False`` if updates must stop."""
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._stop.wait(min(self.poll_interval, remaining))
            if self._stop.is_set() or time.monotonic() >= deadline:
                return not self._stop.is_set()
            try:
                self.poll_once(keep_alive=False)
            except FetchError as exc:
                if exc.fatal:
                    self._fatal_stop(exc)
                    return False
                self._record_failure(str(exc))
            except Exception as exc:
                self._record_failure(f"{type(exc).__name__}: {exc}")
                log.exception("flagsvc: unexpected error while polling")
        return False

    def _consume_stream(self) -> None:
        known = self._snapshot.version if self._snapshot.source == "server" else None
        resp = self._fetcher.open_stream(known, self._stream_read_timeout)
        with self._stream_lock:
            if self._stop.is_set():
                resp.close()  # close() ran while the stream opened: nothing to read
                return
            self._stream_response = resp
        try:
            for event in sse.parse(resp.iter_lines(chunk_size=None)):
                if self._stop.is_set():
                    return
                if event.type == "snapshot":
                    self._apply_document(json.loads(event.data))
                    self._succeeded()
                elif event.type == "comment":
                    self._succeeded()
                elif event.type == "shutdown":
                    return
            if not self._stop.is_set():
                raise FetchError("the event stream ended")
        except FetchError:
            raise
        except ValueError as exc:
            raise FetchError(f"flagsvc sent an invalid event: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - requests/urllib3 raise various errors on a cut stream
            if not self._stop.is_set():
                raise FetchError(f"event stream broken: {type(exc).__name__}") from None
        finally:
            with self._stream_lock:
                self._stream_response = None
            resp.close()

    def _run_poll(self) -> None:
        failures = 0
        while not self._stop.is_set():
            delay = self.poll_interval
            try:
                self.poll_once()
                failures = 0
            except FetchError as exc:
                if exc.fatal:
                    self._fatal_stop(exc)
                    return
                failures += 1
                self._record_failure(str(exc))
                delay = self._backoff(failures)
            except Exception as exc:
                failures += 1
                self._record_failure(f"{type(exc).__name__}: {exc}")
                log.exception("flagsvc: unexpected error while polling")
            finally:
                if failures:
                    self._ready.set()  # start-up does not wait on a service that is down
            self._stop.wait(delay)

    def poll_once(self, *, keep_alive: bool = True) -> None:
        """Fetch once and apply a new snapshot; raises ``FetchError``. Without ``keep_alive``
        (stream mode's fallback polls) the connection is not kept open afterwards."""
        known = self._snapshot.version if self._snapshot.source == "server" else None
        fetched = self._fetcher.fetch(known, keep_alive=keep_alive)
        if not fetched.not_modified:
            self._apply_document(fetched.document or {})
        self._succeeded()

    def _apply_document(self, document: Any) -> None:
        try:
            snapshot = Snapshot.from_wire(document, source="server")
        except ValueError as exc:
            raise FetchError(f"flagsvc sent an invalid snapshot: {exc}") from None
        if snapshot.env != self.env:
            raise FetchError(f"flagsvc sent environment {snapshot.env!r}, not {self.env!r}", fatal=True)
        self._apply(snapshot)

    def _succeeded(self) -> None:
        self._last_success = time.time()
        self._last_error = None
        if self._failing:
            log.warning("flagsvc: service reachable again (version %d)", self._snapshot.version)
            self._failing = False
        self._ready.set()

    def _record_failure(self, message: str) -> None:
        self._last_error = message
        if not self._failing:
            self._failing = True
            snap = self._snapshot
            log.warning(
                "flagsvc: %s; serving %s version %d until it recovers", message, snap.source, snap.version
            )

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop polling and release the HTTP session. Idempotent. Evaluations keep answering
        from the last snapshot; the cache file is kept."""
        if self._closed:
            return
        self._closed = True
        with self._stream_lock:
            self._stop.set()
            if self._stream_response is not None:
                _interrupt(self._stream_response)
        self._reporter.stop()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._fetcher._timeout + 1)
        self._fetcher.close()

    def __enter__(self) -> FlagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        """In a forked child: new locks, a new HTTP session, a new poller; keep the warm snapshot."""
        self._init_sync()
        self._ready.set()
        self._stream_response = None
        self._pending_counts = {}
        for flag in self._snapshot.flags.values():
            flag.reported = flag.evaluations  # the parent reports what it counted before the fork
        self._fetcher.reset_session()
        self._reporter.after_fork()
        if not self._closed and not self._fatal:
            self._start_poller()
            self._reporter.start()


def _interrupt(response: Any) -> None:
    """Unblock the thread reading ``response``: closing it would wait for that thread's read;
    urllib3's ``HTTPResponse.shutdown()`` wakes it (the reader closes the response itself)."""
    # OSError: the peer closed it first; RuntimeError: urllib3 released it, the stream had ended.
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        response.raw.shutdown()


_clients: weakref.WeakSet[FlagClient] = weakref.WeakSet()
_fork_hook_installed = False


def _after_fork() -> None:
    for client in list(_clients):
        client._after_fork_in_child()


def _register_fork_handler(client: FlagClient) -> None:
    global _fork_hook_installed
    _clients.add(client)
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)
        _fork_hook_installed = True
