"""marshmallow schemas: every body and query the API accepts, and what it returns.

Validation lives here, at the boundary: a definition that loads is one the store can keep and
the SDK's engine can evaluate (types match, every referenced variant exists, operators get
values they can compare).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import marshmallow as ma
from marshmallow import ValidationError, fields, validate

from flagsvc_client.engine import compile_flag, is_number, is_semver, value_matches_type

from .durations import parse_duration, parse_moment

T = TypeVar("T")

FLAG_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


class FullMatch(validate.Regexp):
    """``validate.Regexp`` that must match the whole value (``re.fullmatch``): ``$`` alone also
    matches before a trailing newline. The pattern is still documented in the OpenAPI document."""

    def __call__(self, value: Any) -> Any:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

KINDS = ("kill_switch", "release", "ops", "experiment")
TYPES = ("boolean", "string", "number", "json")
LIST_OPERATORS = ("in", "not_in")
STRING_OPERATORS = ("starts_with", "ends_with", "contains")
NUMERIC_OPERATORS = ("lt", "lte", "gt", "gte")
SEMVER_OPERATORS = ("semver_eq", "semver_lt", "semver_lte", "semver_gt", "semver_gte")
OPERATORS = LIST_OPERATORS + STRING_OPERATORS + NUMERIC_OPERATORS + SEMVER_OPERATORS
BOOLEAN_VARIANTS = {"on": True, "off": False}
MAX_STREAM_ID_PART = 2**64 - 1


class StrictBool(fields.Boolean):
    """A boolean that accepts only JSON ``true``/``false``: not ``"yes"``, ``1`` or ``0``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | bool) or is_number(value)


class JsonInteger(fields.Integer):
    """A JSON integer: ``3`` or ``3.0`` (the same number in JSON), never ``"3"``, ``3.5`` or ``true``."""

    def _validated(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid", input=value)
        return value


class Schema(ma.Schema):
    """Base: unknown fields are an error, never silently dropped."""

    class Meta:
        unknown = ma.RAISE


class ConditionSchema(Schema):
    attribute = fields.String(required=True, validate=validate.Length(1, 128))
    operator = fields.String(required=True, validate=validate.OneOf(OPERATORS))
    values = fields.List(fields.Raw(), required=True, validate=validate.Length(1, 1000))

    @ma.validates_schema(skip_on_field_errors=True)
    def _values_fit_operator(self, data: dict[str, Any], **_: Any) -> None:
        op, values = data["operator"], data["values"]
        if op in LIST_OPERATORS:
            ok, want = all(_is_scalar(v) for v in values), "strings, numbers or booleans"
        elif op in STRING_OPERATORS:
            ok, want = all(isinstance(v, str) for v in values), "strings"
        elif op in NUMERIC_OPERATORS:
            ok, want = len(values) == 1 and is_number(values[0]), "exactly one number"
        else:
            ok = len(values) == 1 and is_semver(values[0])
            want = "exactly one semantic version such as 1.4.0"
        if not ok:
            raise ValidationError(f"operator {op!r} takes {want}", "values")


class RolloutSchema(Schema):
    variant = fields.String(required=True)
    weight = JsonInteger(required=True, validate=validate.Range(0, 1_000_000))


class RuleSchema(Schema):
    conditions = fields.List(
        fields.Nested(ConditionSchema), load_default=list, validate=validate.Length(max=20)
    )
    variant = fields.String()
    rollout = fields.List(fields.Nested(RolloutSchema), validate=validate.Length(1, 100))
    bucket_by = fields.String(validate=validate.Length(1, 128))

    @ma.validates_schema(skip_on_field_errors=True)
    def _variant_or_rollout(self, data: dict[str, Any], **_: Any) -> None:
        if ("variant" in data) == ("rollout" in data):
            raise ValidationError("a rule serves either a variant or a rollout, exactly one", "variant")
        if "bucket_by" in data and "rollout" not in data:
            raise ValidationError("bucket_by only applies to a rollout", "bucket_by")
        if "rollout" in data and sum(r["weight"] for r in data["rollout"]) <= 0:
            raise ValidationError("rollout weights must add up to more than 0", "rollout")

    @ma.post_load
    def _default_bucket_by(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        if "rollout" in data:
            data.setdefault("bucket_by", "targeting_key")
        return data


class FlagDefinitionSchema(Schema):
    """A flag as a client defines it (PUT body; PATCH with ``partial=True``)."""

    kind = fields.String(required=True, validate=validate.OneOf(KINDS))
    type = fields.String(load_default="boolean", validate=validate.OneOf(TYPES))
    enabled = StrictBool(required=True)
    variants = fields.Dict(
        keys=fields.String(validate=FullMatch(VARIANT_NAME)),
        values=fields.Raw(allow_none=True),
        validate=validate.Length(1, 100),
    )
    default_variant = fields.String()
    off_variant = fields.String()
    rules = fields.List(fields.Nested(RuleSchema), load_default=list, validate=validate.Length(max=100))
    salt = fields.String(allow_none=True, load_default=None, validate=validate.Length(1, 128))
    description = fields.String(load_default="", validate=validate.Length(max=1024))
    owner = fields.String(load_default="", validate=validate.Length(max=128))
    tags = fields.List(
        fields.String(validate=validate.Length(1, 64)), load_default=list, validate=validate.Length(max=32)
    )

    @ma.post_load
    def _boolean_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("partial"):
            return data
        if data["type"] == "boolean":
            data.setdefault("variants", dict(BOOLEAN_VARIANTS))
            data.setdefault("default_variant", "on")
            data.setdefault("off_variant", "off")
        self._check_consistency(data)
        return data

    @staticmethod
    def _check_consistency(data: dict[str, Any]) -> None:
        errors: dict[str, Any] = {}
        for name in ("variants", "default_variant", "off_variant"):
            if name not in data:
                errors[name] = [f"required for a {data['type']} flag"]
        if errors:
            raise ValidationError(errors)
        variants = data["variants"]
        bad = sorted(n for n, v in variants.items() if not value_matches_type(v, data["type"]))
        if bad:
            errors["variants"] = [f"values of {', '.join(bad)} are not of type {data['type']}"]
        for name in ("default_variant", "off_variant"):
            if data[name] not in variants:
                errors[name] = [f"unknown variant {data[name]!r}"]
        for i, rule in enumerate(data["rules"]):
            if "variant" in rule and rule["variant"] not in variants:
                errors[f"rules.{i}.variant"] = [f"unknown variant {rule['variant']!r}"]
            for j, part in enumerate(rule.get("rollout", [])):
                if part["variant"] not in variants:
                    errors[f"rules.{i}.rollout.{j}.variant"] = [f"unknown variant {part['variant']!r}"]
        if errors:
            raise ValidationError(errors)
        # The SDK's engine is the judge of what can be evaluated: it must accept the flag too.
        compiled = compile_flag("flag", data)
        if compiled.error is not None:
            raise ValidationError(compiled.error, "_schema")


class FlagSchema(FlagDefinitionSchema):
    """A flag as the API returns it: the definition and the fields the server owns."""

    key = fields.String(dump_only=True)
    version = fields.Integer(dump_only=True)
    created_at = fields.String(dump_only=True)
    updated_at = fields.String(dump_only=True)
    updated_by = fields.String(dump_only=True)
    archived = fields.Boolean(dump_only=True)
    revert_at = fields.String(dump_only=True, metadata={"description": "a temporary change reverts then"})


class BlastRadiusSchema(Schema):
    """Who evaluated a flag in the last 15 minutes."""

    evaluations = fields.Integer()
    apps = fields.Dict(
        keys=fields.String(), values=fields.Integer(), metadata={"description": "app -> instances"}
    )


class SwitchStateSchema(Schema):
    enabled = fields.Boolean()
    version = fields.Integer()


class FlagPreviewSchema(Schema):
    """The answer of a dry run of kill or restore: what would change, and who would see it."""

    dry_run = fields.Boolean()
    flag = fields.String()
    changed = fields.Boolean()
    before = fields.Nested(SwitchStateSchema)
    after = fields.Nested(SwitchStateSchema)
    blast_radius = fields.Nested(BlastRadiusSchema)


class FlagListSchema(Schema):
    env = fields.String()
    flags = fields.List(fields.Nested(FlagSchema))


class FlagListQuerySchema(Schema):
    include_archived = fields.Boolean(truthy={"true", "1"}, falsy={"false", "0"}, load_default=False)


MAX_TEMPORARY = timedelta(days=7)
DURATION_PATTERN = r"^[0-9]{1,6}[smhdw]$"


class ParsedString(fields.Field[T]):
    """A JSON string parsed into another type (documented as a string: see ``api.init_app``)."""

    default_error_messages = {"invalid": "Not a valid string."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> T:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return self.parse(value)

    def parse(self, text: str) -> T:
        raise NotImplementedError


class DurationField(ParsedString[timedelta]):
    """``30m``, ``2h``, ``1d`` (at most 7 days) -> ``timedelta``."""

    def parse(self, text: str) -> timedelta:
        try:
            duration = parse_duration(text)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        if duration > MAX_TEMPORARY:
            raise ValidationError("at most 7 days; a longer change is not temporary")
        return duration


class ReasonedSchema(Schema):
    """What every operator action carries: why (not blank), under which incident, dry run or not."""

    reason = fields.String(required=True, validate=validate.Length(1, 1000))
    incident = fields.String(load_default="", validate=validate.Length(max=128))
    dry_run = StrictBool(
        load_default=False, metadata={"description": "answer what would change, change nothing"}
    )

    @ma.validates("reason")
    def _reason_not_blank(self, value: str, **_: Any) -> None:
        if not value.strip():
            raise ValidationError("a reason is required and cannot be blank")


class ActionSchema(ReasonedSchema):
    """Body of kill and restore: why, under which incident, and for how long (``for``)."""

    for_ = DurationField(
        data_key="for",
        load_default=None,
        metadata={
            "description": "make it temporary: 90s, 30m, 2h, 1d (at most 7 days)",
            "pattern": DURATION_PATTERN,
        },
    )


class EnvCreateSchema(Schema):
    """Body of ``PUT /envs/{env}``: optional and empty for now; anything else is refused."""


class EnvSchema(Schema):
    env = fields.String()
    version = fields.Integer()
    created = fields.Boolean()


class EnvListSchema(Schema):
    envs = fields.List(fields.String())


class SnapshotSchema(Schema):
    env = fields.String()
    version = fields.Integer()
    history = fields.String(
        metadata={"description": "12 hex digits: with version, the snapshot's identity (its ETag)"}
    )
    flags = fields.Dict(keys=fields.String(), values=fields.Dict())


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MomentField(ParsedString[datetime]):
    """ISO 8601 (``2026-11-26T14:00:00Z``; no zone means UTC) or relative to now (``2h``, ``30m``)."""

    def parse(self, text: str) -> datetime:
        try:
            moment = parse_moment(text)
        except ValueError:
            raise ValidationError(
                "an ISO 8601 time such as 2026-11-26T14:00:00Z, or a duration ago: 2h"
            ) from None
        if moment < EPOCH:
            raise ValidationError("must not be before 1970-01-01T00:00:00Z")
        return moment


class AuditQuerySchema(Schema):
    flag = fields.String(validate=FullMatch(FLAG_KEY))
    actor = fields.String(validate=validate.Length(1, 128))
    action = fields.String(validate=validate.Length(1, 64))
    incident = fields.String(validate=validate.Length(1, 128))
    since = MomentField(
        metadata={"description": "ISO 8601 (no zone: UTC), not before 1970, or a duration ago: 2h, 30m"}
    )
    until = MomentField(
        metadata={"description": "ISO 8601 (no zone: UTC), not before 1970, or a duration ago: 2h, 30m"}
    )
    order = fields.String(load_default="newest", validate=validate.OneOf(("newest", "oldest")))
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 1000))
    cursor = fields.String(validate=FullMatch(r"^[0-9]{1,20}-[0-9]{1,20}$"))

    @ma.validates("cursor")
    def _cursor_in_range(self, value: str, **_: Any) -> None:
        if any(int(part) > MAX_STREAM_ID_PART for part in value.split("-")):
            raise ValidationError("not an audit cursor: pass back a next_cursor")


class AuditEntrySchema(Schema):
    id = fields.String()
    seq = fields.Integer()
    time = fields.String()
    actor = fields.String()
    action = fields.String()
    flag = fields.String(allow_none=True)
    token = fields.String(allow_none=True)
    before = fields.Raw(allow_none=True)
    after = fields.Raw(allow_none=True)
    reason = fields.String(allow_none=True)
    incident = fields.String(allow_none=True)
    request_id = fields.String(allow_none=True)
    source = fields.String(allow_none=True)
    env_version = fields.Integer(allow_none=True)
    operation = fields.String(allow_none=True)
    playbook = fields.String(allow_none=True)
    prev_hash = fields.String(allow_none=True)
    hash = fields.String()


class AuditPageSchema(Schema):
    entries = fields.List(fields.Nested(AuditEntrySchema))
    next_cursor = fields.String(allow_none=True)


class ProblemFieldSchema(Schema):
    field = fields.String()
    location = fields.String()
    message = fields.String()


class ProblemSchema(Schema):
    """RFC 9457 problem details, as every error is returned (``application/problem+json``)."""

    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    errors = fields.List(fields.Nested(ProblemFieldSchema))
    request_id = fields.String()


INSTANCE_ID = r"^[A-Za-z0-9._:-]{1,128}$"
#: Most evaluations of one flag one heartbeat may report (a billion in 30 s is beyond any instance).
MAX_COUNT = 10**9
#: Largest version a heartbeat may claim: 2^53 - 1, exact as a JSON number everywhere.
MAX_VERSION = 2**53 - 1


class HeartbeatSchema(Schema):
    """What an SDK instance reports: who it is, what it applied, what it evaluated."""

    app = fields.String(required=True, validate=validate.Length(1, 128))
    host = fields.String(load_default="", validate=validate.Length(max=255))
    pid = JsonInteger(load_default=None, allow_none=True)
    sdk = fields.String(load_default="", validate=validate.Length(max=64))
    mode = fields.String(load_default="", validate=validate.Length(max=16))
    applied_version = JsonInteger(required=True, validate=validate.Range(min=0, max=MAX_VERSION))
    source = fields.String(load_default="", validate=validate.Length(max=16))
    stale = StrictBool(load_default=False)
    last_error = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=1000))
    counts = fields.Dict(
        keys=fields.String(validate=FullMatch(FLAG_KEY)),
        values=JsonInteger(validate=validate.Range(min=0, max=MAX_COUNT)),
        load_default=dict,
        validate=validate.Length(max=10_000),
    )


class ClientInstanceSchema(HeartbeatSchema):
    """An SDK instance as the propagation view shows it: its last heartbeat, and where it stands."""

    class Meta:
        exclude = ("counts",)

    instance = fields.String()
    address = fields.String()
    seen_at = fields.String()
    age_seconds = fields.Float()
    live = fields.Boolean()
    lag = fields.Integer()


class PropagationSummarySchema(Schema):
    live = fields.Integer()
    applied_current = fields.Integer()
    lagging = fields.Integer()
    silent = fields.Integer()


class OfrepConsumerSchema(Schema):
    """An OFREP consumer: a token and an app name (``X-Flagsvc-App``, else the token's name)."""

    consumer = fields.String(metadata={"description": "ofrep:<token name>:<app>"})
    app = fields.String()
    token = fields.String()
    address = fields.String()
    seen_at = fields.String()
    live = fields.Boolean()
    age_seconds = fields.Float()


class PropagationSchema(Schema):
    env = fields.String()
    version = fields.Integer()
    summary = fields.Nested(PropagationSummarySchema)
    instances = fields.List(fields.Nested(ClientInstanceSchema))
    ofrep = fields.List(
        fields.Nested(OfrepConsumerSchema),
        metadata={"description": "OFREP consumers: they evaluate on the server and hold no version"},
    )


class PlaybookChangeSchema(Schema):
    """One flag's change in a playbook: switch it, or serve another default variant."""

    OPENAPI = {"minProperties": 1}

    enabled = StrictBool()
    default_variant = fields.String(validate=FullMatch(VARIANT_NAME))

    @ma.validates_schema
    def _not_empty(self, data: dict[str, Any], **_: Any) -> None:
        if not data:
            raise ValidationError("a change sets enabled, default_variant or both", "enabled")


class PlaybookDefinitionSchema(Schema):
    description = fields.String(load_default="", validate=validate.Length(max=1024))
    changes = fields.Dict(
        keys=fields.String(validate=FullMatch(FLAG_KEY)),
        values=fields.Nested(PlaybookChangeSchema),
        required=True,
        validate=validate.Length(1, 500),
    )


class PlaybookSchema(PlaybookDefinitionSchema):
    name = fields.String(dump_only=True)
    version = fields.Integer(dump_only=True)
    created_at = fields.String(dump_only=True)
    updated_at = fields.String(dump_only=True)
    updated_by = fields.String(dump_only=True)
    applied = fields.Raw(dump_only=True, metadata={"description": "the current application, or null"})


class PlaybookListSchema(Schema):
    playbooks = fields.List(fields.Nested(PlaybookSchema))


class PlaybookApplySchema(ActionSchema):
    """Body of apply: a reason and the incident are required; ``dry_run`` changes nothing;
    ``for`` makes the application temporary."""

    incident = fields.String(required=True, validate=validate.Length(1, 128))


class PlaybookRevertSchema(ReasonedSchema):
    """Body of revert: why (not blank), and the incident (default: the apply's)."""


class PlaybookOutcomeSchema(Schema):
    operation = fields.String()
    playbook = fields.String()
    dry_run = fields.Boolean()
    env_version = fields.Integer()
    changed = fields.List(fields.Raw())
    unchanged = fields.List(fields.String())
    skipped = fields.List(fields.Raw())
    blast_radius = fields.Raw(
        metadata={"description": "per changed flag: evaluations and instances per app, last 15 min"}
    )


class DefinitionsApplySchema(Schema):
    """Body of a definitions apply: the document, why (not needed for a dry run), and how."""

    definitions = fields.Dict(
        required=True, metadata={"description": "the document: {format, flags, playbooks}"}
    )
    reason = fields.String(load_default="", validate=validate.Length(max=1000))
    incident = fields.String(load_default="", validate=validate.Length(max=128))
    prune = StrictBool(load_default=False, metadata={"description": "archive flags the document omits"})
    dry_run = StrictBool(load_default=False, metadata={"description": "answer the plan, change nothing"})
    base_version = fields.Integer(
        load_default=None,
        validate=validate.Range(min=0),
        metadata={"description": "refuse (409) if the environment is no longer at this version"},
    )

    @ma.validates_schema
    def _reason_unless_dry_run(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("dry_run") and not data.get("reason", "").strip():
            raise ValidationError("a reason is required to apply (not for a dry run)", "reason")


class DefinitionsPlanSchema(Schema):
    """What a definitions apply changed, or with ``dry_run`` would change."""

    env = fields.String()
    dry_run = fields.Boolean()
    prune = fields.Boolean()
    operation = fields.String()
    base_version = fields.Integer()
    env_version = fields.Integer()
    changes = fields.List(
        fields.Raw(),
        metadata={"description": "{op: create|update|archive|delete, type: flag|playbook, name, fields}"},
    )
    kept = fields.List(fields.Raw(), metadata={"description": "left alone, with the reason"})
    unmanaged = fields.List(fields.Raw(), metadata={"description": "in the environment, not in the document"})


WEBHOOK_EVENTS = (
    "*", "flag.create", "flag.update", "flag.delete", "flag.kill", "flag.restore",
    "playbook.create", "playbook.update", "playbook.delete", "playbook.apply", "playbook.revert",
    "alert.decision", "webhook.create", "webhook.update", "webhook.delete", "webhook.rotate-secret",
)  # fmt: skip


class WebhookDefinitionSchema(Schema):
    """A webhook subscription as an admin defines it."""

    url = fields.String(
        required=True, validate=validate.Length(1, 2048), metadata={"description": "https, or loopback"}
    )
    events = fields.List(
        fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)),
        load_default=lambda: ["*"],
        validate=validate.Length(1, 32),
        metadata={"description": "audit actions to send, or * for all"},
    )
    format = fields.String(load_default="standard", validate=validate.OneOf(("standard", "slack")))
    enabled = StrictBool(load_default=True)


class WebhookSchema(WebhookDefinitionSchema):
    name = fields.String(dump_only=True)
    version = fields.Integer(dump_only=True)
    created_at = fields.String(dump_only=True)
    updated_at = fields.String(dump_only=True)
    updated_by = fields.String(dump_only=True)
    secret = fields.String(
        dump_only=True, metadata={"description": "only when created or rotated: shown once"}
    )


class WebhookListSchema(Schema):
    webhooks = fields.List(fields.Nested(WebhookSchema))


class WebhookDeliverySchema(Schema):
    id = fields.String()
    event_id = fields.String()
    action = fields.String()
    status = fields.String(metadata={"description": "delivered, retrying or failed"})
    attempts = fields.Integer()
    http_status = fields.Raw()
    last_error = fields.String()
    latency_ms = fields.Float()
    at = fields.String()


class WebhookDeliveriesSchema(Schema):
    deliveries = fields.List(fields.Nested(WebhookDeliverySchema))
