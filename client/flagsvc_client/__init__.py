"""flagsvc SDK: evaluate feature flags locally, kept current from a flagsvc server.

This distribution is a skeleton for now: the evaluation engine, ``FlagClient`` and
``flagctl`` arrive with the SDK issue.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
