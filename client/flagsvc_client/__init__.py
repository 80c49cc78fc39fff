"""flagsvc SDK: evaluate feature flags locally, kept current from a flagsvc server.

>>> flags = FlagClient("http://flagsvc:8000", token, "production", defaults={"checkout.recs": True})
>>> if flags.is_enabled("checkout.recs", {"targeting_key": user_id}): ...
"""

from ._version import __version__
from .client import ClientStatus, FlagChange, FlagClient
from .engine import ErrorCode, EvaluationDetails, Reason

__all__ = [
    "ClientStatus",
    "ErrorCode",
    "EvaluationDetails",
    "FlagChange",
    "FlagClient",
    "Reason",
    "__version__",
]
