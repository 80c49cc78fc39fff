"""The evaluation engine: one flag definition + a context -> value, variant and reason.

Pure Python, no dependencies; the server imports it for server-side evaluation. Semantics are
pinned by the language-neutral vectors in ``client/spec/evaluation-cases.json``.

Rules, in order:

1. No flag -> the caller's default, reason ``ERROR`` (``FLAG_NOT_FOUND``). A malformed flag ->
   the caller's default, ``ERROR`` (``PARSE_ERROR``).
2. ``enabled: false`` -> ``off_variant``, reason ``DISABLED``.
3. No rules -> ``default_variant``, reason ``STATIC``.
4. The first rule whose conditions all match serves its ``variant`` (``TARGETING_MATCH``) or a
   rollout bucket (``SPLIT``). No rule matches -> ``default_variant``, ``DEFAULT``.

A condition on an attribute the context does not have (or has as ``null``) does not match -
whatever the operator, ``not_in`` included - so an anonymous user falls through to the default
instead of an error. An attribute of the wrong type for its operator (a string for ``gt``, a
number for ``starts_with``, a list for ``in``, not a semantic version for ``semver_*``) is an
error: the caller's default with ``ERROR`` (``INVALID_CONTEXT``). A rollout needs its
``bucket_by`` attribute (default ``targeting_key``): missing -> ``ERROR``
(``TARGETING_KEY_MISSING``).

Rollout bucketing, reproducible with any standard library::

    h      = first 4 bytes of SHA-256(UTF-8 of salt + "/" + value), as a big-endian uint32
    bucket = h mod (sum of weights)
    serve the first variant whose cumulative weight exceeds bucket

``salt`` is the flag's ``salt`` or, if unset, its key; ``value`` is the attribute as a string
(an integer in decimal; other types are ``INVALID_CONTEXT``; an empty string counts as missing).
A user keeps their variant as long as the cumulative boundaries around their bucket only widen:
with weights summing to a fixed total (e.g. 100), ramping the *first* variant up only adds users
to it; growing a later variant at the expense of an earlier one moves users between them.

Missing or ``null`` ``rules``, ``conditions``, ``salt`` and ``bucket_by`` take their defaults;
any other value of the wrong type (``{}``, ``""``, ``0``) makes the flag malformed.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, get_args

from . import _semver

__all__ = [
    "CompiledFlag",
    "ErrorCode",
    "EvaluationDetails",
    "FlagType",
    "Reason",
    "bucket",
    "compile_flag",
    "evaluate",
    "is_number",
    "is_semver",
    "value_matches_type",
]


class Reason(enum.StrEnum):
    """Why an evaluation gave its value: OpenFeature's resolution reasons (the same strings)."""

    STATIC = "STATIC"
    DEFAULT = "DEFAULT"
    TARGETING_MATCH = "TARGETING_MATCH"
    SPLIT = "SPLIT"
    DISABLED = "DISABLED"
    ERROR = "ERROR"


class ErrorCode(enum.StrEnum):
    """Why an evaluation gave the caller's default: OpenFeature's error codes (the same strings)."""

    PROVIDER_NOT_READY = "PROVIDER_NOT_READY"
    FLAG_NOT_FOUND = "FLAG_NOT_FOUND"
    PARSE_ERROR = "PARSE_ERROR"
    TYPE_MISMATCH = "TYPE_MISMATCH"
    TARGETING_KEY_MISSING = "TARGETING_KEY_MISSING"
    INVALID_CONTEXT = "INVALID_CONTEXT"
    GENERAL = "GENERAL"


@dataclass(frozen=True, slots=True)
class EvaluationDetails:
    """The outcome of one evaluation. ``variant`` is ``None`` when the default was served."""

    key: str
    value: Any
    variant: str | None
    reason: Reason
    error_code: ErrorCode | None = None
    error_message: str | None = None
    flag_version: int | None = None


class _ContextError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _ParseError(Exception):
    pass


FlagType: TypeAlias = Literal["boolean", "string", "number", "json"]
_TYPES: tuple[str, ...] = get_args(FlagType)


def is_number(value: Any) -> bool:
    """A finite JSON number (``True`` is not one)."""
    cls = value.__class__
    if cls is int:
        return True
    if cls is float:
        return math.isfinite(value)
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_semver(text: Any) -> bool:
    """A Semantic Versioning 2.0.0 version (``v`` prefix allowed)."""
    return isinstance(text, str) and _semver.parse(text) is not None


def value_matches_type(value: Any, flag_type: str) -> bool:
    """Whether ``value`` is a valid value of a ``flag_type`` flag."""
    if flag_type == "boolean":
        return isinstance(value, bool)
    if flag_type == "string":
        return isinstance(value, str)
    if flag_type == "number":
        return is_number(value)
    return value is not None


def bucket(salt: str, value: str, total: int) -> int:
    """The rollout bucket in ``[0, total)`` of ``value`` under ``salt``."""
    digest = hashlib.sha256(f"{salt}/{value}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % total


# -- conditions ---------------------------------------------------------------------------------

Matcher = Callable[[Any], bool]


def _string_attr(op: str, attribute: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _ContextError(ErrorCode.INVALID_CONTEXT, f"{attribute!r} must be a string for {op}")
    return value


def _number_attr(op: str, attribute: str, value: Any) -> float:
    if not is_number(value):
        raise _ContextError(ErrorCode.INVALID_CONTEXT, f"{attribute!r} must be a number for {op}")
    number: float = value
    return number


def _compile_condition(raw: Any) -> tuple[str, Matcher]:
    if not isinstance(raw, Mapping):
        raise _ParseError("condition is not an object")
    attribute, op, values = raw.get("attribute"), raw.get("operator"), raw.get("values")
    if not isinstance(attribute, str) or not attribute:
        raise _ParseError("condition attribute must be a non-empty string")
    if not isinstance(values, list) or not values:
        raise _ParseError(f"condition on {attribute!r}: values must be a non-empty list")
    if not isinstance(op, str) or op not in _OPERATORS:
        raise _ParseError(f"unknown operator {op!r}")
    return attribute, _OPERATORS[op](op, attribute, values)


def _membership(op: str, attribute: str, values: list[Any]) -> Matcher:
    """``in`` and ``not_in``: one set per JSON type, so that true never equals 1 while 1 equals 1.0."""
    if not all(isinstance(v, str | bool) or is_number(v) for v in values):
        raise _ParseError(f"{op} takes strings, numbers or booleans")
    strings = frozenset(v for v in values if isinstance(v, str))
    bools = frozenset(v for v in values if isinstance(v, bool))
    numbers = frozenset(v for v in values if is_number(v))
    negate = op == "not_in"

    def match_in(value: Any) -> bool:
        if isinstance(value, str):
            return (value in strings) != negate
        if isinstance(value, bool):
            return (value in bools) != negate
        if is_number(value):
            return (value in numbers) != negate
        raise _ContextError(ErrorCode.INVALID_CONTEXT, f"{attribute!r} must be a scalar for {op}")

    return match_in


def _text(op: str, attribute: str, values: list[Any]) -> Matcher:
    """``starts_with``, ``ends_with``, ``contains``: any of the strings."""
    if not all(isinstance(v, str) for v in values):
        raise _ParseError(f"{op} takes strings")
    needles = tuple(values)
    if op == "starts_with":
        return lambda v: _string_attr(op, attribute, v).startswith(needles)
    if op == "ends_with":
        return lambda v: _string_attr(op, attribute, v).endswith(needles)
    return lambda v: any(n in _string_attr(op, attribute, v) for n in needles)


def _order(op: str, attribute: str, values: list[Any]) -> Matcher:
    """``lt``, ``lte``, ``gt``, ``gte``: against one number."""
    if len(values) != 1 or not is_number(values[0]):
        raise _ParseError(f"{op} takes exactly one number")
    bound: float = values[0]
    compare: dict[str, Callable[[float], bool]] = {
        "lt": lambda a: a < bound,
        "lte": lambda a: a <= bound,
        "gt": lambda a: a > bound,
        "gte": lambda a: a >= bound,
    }
    test = compare[op]
    return lambda v: test(_number_attr(op, attribute, v))


def _version_order(op: str, attribute: str, values: list[Any]) -> Matcher:
    """``semver_eq``, ``semver_lt``, ``semver_lte``, ``semver_gt``, ``semver_gte``: by precedence."""
    target = _semver.parse(values[0]) if len(values) == 1 and isinstance(values[0], str) else None
    if target is None:
        raise _ParseError(f"{op} takes exactly one semantic version")
    compare: dict[str, Callable[[_semver.SemVerKey], bool]] = {
        "semver_eq": lambda a: a == target,
        "semver_lt": lambda a: a < target,
        "semver_lte": lambda a: a <= target,
        "semver_gt": lambda a: a > target,
        "semver_gte": lambda a: a >= target,
    }
    test = compare[op]

    def match_semver(value: Any) -> bool:
        parsed = _semver.parse(value) if isinstance(value, str) else None
        if parsed is None:
            raise _ContextError(ErrorCode.INVALID_CONTEXT, f"{attribute!r} is not a semantic version")
        return test(parsed)

    return match_semver


_OPERATORS: dict[str, Callable[[str, str, list[Any]], Matcher]] = {
    **dict.fromkeys(("in", "not_in"), _membership),
    **dict.fromkeys(("starts_with", "ends_with", "contains"), _text),
    **dict.fromkeys(("lt", "lte", "gt", "gte"), _order),
    **dict.fromkeys(("semver_eq", "semver_lt", "semver_lte", "semver_gt", "semver_gte"), _version_order),
}


# -- flags --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    conditions: tuple[tuple[str, Matcher], ...]
    details: EvaluationDetails | None  # what a variant rule serves; None for a rollout
    rollout: tuple[tuple[int, EvaluationDetails], ...]  # (cumulative weight, what it serves)
    total: int
    bucket_by: str
    memo: dict[str, EvaluationDetails] = field(default_factory=dict)  # bucket value -> served


_MEMO_MAX = 4096


class CompiledFlag:
    """A flag definition checked once and ready to evaluate many times.

    ``static`` is set when the result does not depend on the context (disabled, or no rules):
    evaluating it is then a lookup.
    """

    __slots__ = (
        "_default_details",
        "default",
        "error",
        "evaluations",
        "key",
        "off",
        "reported",
        "rules",
        "salt",
        "static",
        "type",
        "variants",
        "version",
    )

    def __init__(self, key: str, raw: Any) -> None:
        self.key = key
        # Evaluation counters for heartbeats, kept by FlagClient (approximate: unlocked increments).
        self.evaluations = 0
        self.reported = 0
        self.error: str | None = None
        self.static: EvaluationDetails | None = None
        self.version = raw.get("version") if isinstance(raw, Mapping) else None
        try:
            self._compile(raw)
        except _ParseError as exc:
            self.error = f"flag {key!r} is malformed: {exc}"
        except Exception as exc:  # noqa: BLE001 - a bad definition must never escape
            self.error = f"flag {key!r} is malformed: {type(exc).__name__}: {exc}"

    def _compile(self, raw: Any) -> None:
        if not isinstance(raw, Mapping):
            raise _ParseError("not an object")
        flag_type = raw.get("type", "boolean")
        if flag_type not in _TYPES:
            raise _ParseError(f"unknown type {flag_type!r}")
        enabled = raw.get("enabled")
        if not isinstance(enabled, bool):
            raise _ParseError("enabled must be true or false")
        variants = raw.get("variants")
        if variants is None and flag_type == "boolean":
            variants = {"on": True, "off": False}
        if not isinstance(variants, Mapping) or not variants:
            raise _ParseError("variants must be a non-empty object")
        for name, value in variants.items():
            if not value_matches_type(value, flag_type):
                raise _ParseError(f"variant {name!r} is not a {flag_type}")
        default = raw.get("default_variant", "on" if flag_type == "boolean" else None)
        off = raw.get("off_variant", "off" if flag_type == "boolean" else None)
        for label, name in (("default_variant", default), ("off_variant", off)):
            if name not in variants:
                raise _ParseError(f"{label} {name!r} is not a variant")
        salt = raw.get("salt")
        if salt is None:
            salt = self.key
        if not isinstance(salt, str) or not salt:
            raise _ParseError("salt must be a non-empty string")
        rules_raw = raw.get("rules")
        if rules_raw is None:
            rules_raw = []
        if not isinstance(rules_raw, list):
            raise _ParseError("rules must be a list")

        self.type, self.variants, self.default, self.off, self.salt = (
            flag_type,
            dict(variants),
            default,
            off,
            salt,
        )
        self._default_details = self._details(default, Reason.DEFAULT)
        self.rules = tuple(self._compile_rule(i, r) for i, r in enumerate(rules_raw))
        if not enabled:
            self.static = EvaluationDetails(
                self.key, variants[off], off, Reason.DISABLED, flag_version=self.version
            )
        elif not self.rules:
            self.static = EvaluationDetails(
                self.key, variants[default], default, Reason.STATIC, flag_version=self.version
            )

    def _compile_rule(self, index: int, raw: Any) -> _Rule:
        if not isinstance(raw, Mapping):
            raise _ParseError(f"rule {index} is not an object")
        conditions_raw = raw.get("conditions")
        if conditions_raw is None:
            conditions_raw = []
        if not isinstance(conditions_raw, list):
            raise _ParseError(f"rule {index}: conditions must be a list")
        conditions = tuple(_compile_condition(c) for c in conditions_raw)
        variant, rollout_raw = raw.get("variant"), raw.get("rollout")
        if (variant is None) == (rollout_raw is None):
            raise _ParseError(f"rule {index} needs exactly one of variant and rollout")
        if variant is not None:
            if variant not in self.variants:
                raise _ParseError(f"rule {index}: unknown variant {variant!r}")
            return _Rule(conditions, self._details(variant, Reason.TARGETING_MATCH), (), 0, "")
        if not isinstance(rollout_raw, list) or not rollout_raw:
            raise _ParseError(f"rule {index}: rollout must be a non-empty list")
        cumulative, parts = 0, []
        for part in rollout_raw:
            name, weight = part.get("variant"), part.get("weight")
            if name not in self.variants:
                raise _ParseError(f"rule {index}: unknown rollout variant {name!r}")
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                raise _ParseError(f"rule {index}: weights must be non-negative integers")
            cumulative += weight
            parts.append((cumulative, self._details(name, Reason.SPLIT)))
        if cumulative <= 0:
            raise _ParseError(f"rule {index}: weights add up to 0")
        bucket_by = raw.get("bucket_by")
        if bucket_by is None:
            bucket_by = "targeting_key"
        if not isinstance(bucket_by, str) or not bucket_by:
            raise _ParseError(f"rule {index}: bucket_by must be a non-empty string")
        return _Rule(conditions, None, tuple(parts), cumulative, bucket_by)

    def _details(self, variant: str, reason: Reason) -> EvaluationDetails:
        """Results are immutable: built once here, shared by every evaluation."""
        return EvaluationDetails(self.key, self.variants[variant], variant, reason, flag_version=self.version)

    def _error(self, default: Any, code: ErrorCode, message: str) -> EvaluationDetails:
        return EvaluationDetails(self.key, default, None, Reason.ERROR, code, message, self.version)

    def evaluate(self, context: Mapping[str, Any] | None, default: Any) -> EvaluationDetails:
        """Evaluate for ``context``; never raises."""
        if self.static is not None:
            return self.static
        if self.error is not None:
            return self._error(default, ErrorCode.PARSE_ERROR, self.error)
        ctx = context if context is not None else {}
        if ctx.__class__ is not dict and not isinstance(ctx, Mapping):
            return self._error(default, ErrorCode.INVALID_CONTEXT, "the context must be a mapping")
        try:
            for rule in self.rules:
                for attribute, matcher in rule.conditions:
                    value = ctx.get(attribute)
                    if value is None or not matcher(value):
                        break
                else:
                    return rule.details if rule.details is not None else self._split(rule, ctx)
            return self._default_details
        except _ContextError as exc:
            return self._error(default, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - evaluation never raises
            return self._error(default, ErrorCode.GENERAL, f"{type(exc).__name__}: {exc}")

    def _split(self, rule: _Rule, ctx: Mapping[str, Any]) -> EvaluationDetails:
        value = ctx.get(rule.bucket_by)
        if value is None or value == "":
            raise _ContextError(
                ErrorCode.TARGETING_KEY_MISSING, f"rollout needs the {rule.bucket_by!r} attribute"
            )
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _ContextError(
                ErrorCode.INVALID_CONTEXT, f"{rule.bucket_by!r} must be a string or an integer to bucket by"
            )
        text = value if value.__class__ is str else str(int(value))
        served = rule.memo.get(text)
        if served is not None:
            return served
        point = bucket(self.salt, text, rule.total)
        served = rule.rollout[-1][1]
        for cumulative, candidate in rule.rollout:
            if point < cumulative:
                served = candidate
                break
        if len(rule.memo) >= _MEMO_MAX:
            rule.memo.clear()
        rule.memo[text] = served
        return served


def compile_flag(key: str, raw: Any) -> CompiledFlag:
    """Check ``raw`` (a flag's wire shape) once; a malformed one evaluates to ``ERROR``."""
    return CompiledFlag(key, raw)


def evaluate(
    key: str, flag: Any, context: Mapping[str, Any] | None = None, default: Any = None
) -> EvaluationDetails:
    """Evaluate one flag definition (``None`` if unknown) for ``context``; never raises."""
    if flag is None:
        return EvaluationDetails(
            key, default, None, Reason.ERROR, ErrorCode.FLAG_NOT_FOUND, f"no flag {key!r}"
        )
    return compile_flag(key, flag).evaluate(context, default)
