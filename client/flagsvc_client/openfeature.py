"""OpenFeature provider backed by a :class:`~flagsvc_client.FlagClient` (extra ``[openfeature]``).

>>> from openfeature import api
>>> api.set_provider(FlagsvcProvider(FlagClient(url, token, "production")))
>>> api.get_client().get_boolean_value("checkout.recs", True, EvaluationContext("user-1"))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode as OFErrorCode
from openfeature.exception import ProviderFatalError, ProviderNotReadyError
from openfeature.flag_evaluation import FlagResolutionDetails
from openfeature.flag_evaluation import Reason as OFReason
from openfeature.provider import AbstractProvider
from openfeature.provider.metadata import Metadata

from .client import ClientStatus, FlagChange, FlagClient
from .engine import ErrorCode, EvaluationDetails, FlagType, Reason

__all__ = ["FlagsvcProvider"]


@dataclass(frozen=True)
class _Narrowing:
    """An OpenFeature type narrower than the flag's: an integer is a number, an object is JSON."""

    accepts: Callable[[Any], bool]
    name: str  # in the message: "flag 'k' is not <name>"


_INTEGER = _Narrowing(lambda value: isinstance(value, int) and not isinstance(value, bool), "an integer")
_OBJECT = _Narrowing(lambda value: isinstance(value, dict | list), "an object or a list")


def _refused(status: ClientStatus) -> str:
    return f"flagsvc refused this client: {status.last_error}"


def _not_ready(status: ClientStatus) -> str:
    why = f" ({status.last_error})" if status.last_error else ""
    return f"flagsvc has not sent a snapshot yet{why}: the default is served"


def _context(ctx: EvaluationContext | None) -> dict[str, Any]:
    if ctx is None:
        return {}
    attrs = dict(ctx.attributes or {})
    if ctx.targeting_key is not None:
        attrs["targeting_key"] = ctx.targeting_key
    return attrs


class FlagsvcProvider(AbstractProvider):
    """Resolves flags locally through a FlagClient; emits CONFIGURATION_CHANGED on new snapshots.

    Its state follows the client's: READY while the service answers; STALE while it does not and a
    snapshot (from the service or the cache file) serves; ERROR while nothing but defaults serve;
    FATAL once the service refused the client for good (a wrong token: 401/403, an unknown
    environment).
    """

    def __init__(self, client: FlagClient, *, close_client_on_shutdown: bool = True) -> None:
        super().__init__()
        self.client = client
        self._close = close_client_on_shutdown
        client.on_change(self._on_change)
        client.on_status(self._on_status)

    def get_metadata(self) -> Metadata:
        return Metadata(name="flagsvc")

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """READY, or the error that makes the state ERROR or FATAL; a snapshot that is not current
        makes it STALE just after."""
        status = self.client.status()
        if status.fatal:
            raise ProviderFatalError(_refused(status))
        if status.source == "defaults":
            raise ProviderNotReadyError(_not_ready(status))
        if status.stale:
            threading.Timer(0.05, lambda: self._on_status(self.client.status())).start()

    def _on_status(self, status: ClientStatus) -> None:
        if not hasattr(self, "_on_emit"):
            return  # not registered with the OpenFeature API (yet)
        if status.fatal:
            fatal = ProviderEventDetails(message=_refused(status), error_code=OFErrorCode.PROVIDER_FATAL)
            self.emit_provider_error(fatal)
        elif status.source == "defaults":
            self.emit_provider_error(ProviderEventDetails(message=_not_ready(status)))
        elif status.stale:
            message = (
                f"flagsvc unreachable ({status.last_error}): serving {status.source} version {status.version}"
            )
            self.emit_provider_stale(ProviderEventDetails(message=message))
        else:
            self.emit_provider_ready(ProviderEventDetails(message=f"version {status.version}"))

    def shutdown(self) -> None:
        if self._close:
            self.client.close()

    def _on_change(self, change: FlagChange) -> None:
        if hasattr(self, "_on_emit"):
            self.emit_provider_configuration_changed(
                ProviderEventDetails(
                    flags_changed=sorted(change.changed_keys), message=f"version {change.new_version}"
                )
            )

    def _resolve(
        self,
        key: str,
        default: Any,
        ctx: EvaluationContext | None,
        expected: FlagType,
        narrowing: _Narrowing | None = None,
    ) -> FlagResolutionDetails[Any]:
        details = self.client.evaluate(key, _context(ctx), default, expected_type=expected)
        if details.error_code == ErrorCode.FLAG_NOT_FOUND:
            details = self._not_found(details)
        if narrowing is not None and details.reason != Reason.ERROR and not narrowing.accepts(details.value):
            message = f"flag {key!r} is not {narrowing.name}"
            details = EvaluationDetails(key, default, None, Reason.ERROR, ErrorCode.TYPE_MISMATCH, message)
        metadata = {"version": details.flag_version} if details.flag_version is not None else {}
        return FlagResolutionDetails(
            value=details.value,
            variant=details.variant,
            reason=OFReason(details.reason),
            error_code=OFErrorCode(details.error_code) if details.error_code else None,
            error_message=details.error_message,
            flag_metadata=metadata,
        )

    def _not_found(self, details: EvaluationDetails) -> EvaluationDetails:
        """A flag missing because the client holds no snapshot is not a missing flag: say why."""
        status = self.client.status()
        if status.fatal:
            code, message = ErrorCode.GENERAL, _refused(status)
        elif status.source == "defaults":
            code, message = ErrorCode.PROVIDER_NOT_READY, _not_ready(status)
        else:
            return details
        return EvaluationDetails(details.key, details.value, None, Reason.ERROR, code, message)

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, evaluation_context, "boolean")

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, evaluation_context, "string")

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, evaluation_context, "number", _INTEGER)

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        resolved = self._resolve(flag_key, default_value, evaluation_context, "number")
        if resolved.error_code is None:
            resolved.value = float(resolved.value)
        return resolved

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[Any] | Mapping[str, Any],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[Any] | Mapping[str, Any]]:
        return self._resolve(flag_key, default_value, evaluation_context, "json", _OBJECT)
