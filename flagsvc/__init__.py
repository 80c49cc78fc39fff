"""flagsvc: feature flags and kill switches for production incidents.

``create_app`` (in :mod:`flagsvc.app`) is imported on first use, not with the package: the
processes that serve no request (``flagsvc serve``'s supervising parent, the admin commands)
import neither Flask nor the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__version__ = "0.1.0"  # also the SDK's (client/flagsvc_client/_version.py), pinned in setup.cfg

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> Any:
    """``flagsvc.create_app``, imported from :mod:`flagsvc.app` when first asked for."""
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
