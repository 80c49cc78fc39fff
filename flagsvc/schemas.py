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


class StreamQuerySchema(Schema):
    patches = fields.Boolean(
        load_default=False,
        truthy={"true"},  # as documented: not marshmallow's "1", "yes", "on"...
        falsy={"false"},
        metadata={
            "description": "send a change as a `patch` event (the flags that changed) when the "
            "client holds the version before it; a whole `snapshot` event otherwise"
        },
    )


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
#: Most flags one heartbeat may report counts for.
MAX_COUNTS = 10_000
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
        validate=validate.Length(max=MAX_COUNTS),
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


class PaceSchema(Schema):
    interval_seconds = fields.Float(metadata={"description": "SDK instances report this often"})
    jitter_seconds = fields.Float(metadata={"description": "and report a change within this many seconds"})


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
    pace = fields.Nested(PaceSchema)
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


#: The fields of a playbook that let alerts apply it (flagsvc.alerts), absent unless given, and
#: the value each means when absent: a definition never stores that value, an export omits it.
PLAYBOOK_ALERT_FIELDS = (
    "triggers", "auto", "mode", "revert_on_resolve", "cooldown", "max_auto_applies_per_day", "incident_label"
)  # fmt: skip
PLAYBOOK_ALERT_DEFAULTS: dict[str, Any] = {"auto": False, "mode": "apply", "revert_on_resolve": False}
MAX_COOLDOWN = timedelta(days=7)


def _cooldown(text: str) -> None:
    try:
        duration = parse_duration(text)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if duration > MAX_COOLDOWN:
        raise ValidationError("at most 7 days")


class TriggerSchema(Schema):
    """Alerts that trigger a playbook: those whose labels include every label of ``match``."""

    match = fields.Dict(
        keys=fields.String(validate=FullMatch(r"^.{1,128}$")),
        values=fields.String(validate=validate.Length(max=1024)),
        required=True,
        validate=validate.Length(1, 32),
        metadata={"description": "label -> value: each must equal the alert's label"},
    )


class PlaybookDefinitionSchema(Schema):
    description = fields.String(load_default="", validate=validate.Length(max=1024))
    changes = fields.Dict(
        keys=fields.String(validate=FullMatch(FLAG_KEY)),
        values=fields.Nested(PlaybookChangeSchema),
        required=True,
        validate=validate.Length(1, 500),
    )
    triggers = fields.List(
        fields.Nested(TriggerSchema),
        validate=validate.Length(1, 20),
        metadata={"description": "alerts (Alertmanager) that trigger it: any one trigger matching"},
    )
    auto = StrictBool(metadata={"description": "alerts may apply it (default false: refused, audited)"})
    mode = fields.String(
        validate=validate.OneOf(("apply", "dry_run")),
        metadata={"description": "dry_run: an alert records what it would do, applies nothing"},
    )
    revert_on_resolve = StrictBool(
        metadata={"description": "the alert's resolution reverts an application an alert made"}
    )
    cooldown = fields.String(
        validate=_cooldown,
        metadata={"description": "alerts apply it again no sooner (at most 7d)", "pattern": DURATION_PATTERN},
    )
    max_auto_applies_per_day = JsonInteger(
        validate=validate.Range(1, 1000), metadata={"description": "alert applications per UTC day"}
    )
    incident_label = fields.String(
        validate=validate.Length(1, 128),
        metadata={"description": "the alert label that names the incident (default: alertname-fingerprint)"},
    )

    @ma.validates_schema(skip_on_field_errors=True)
    def _alert_fields_need_triggers(self, data: dict[str, Any], **_: Any) -> None:
        if "triggers" in data:
            return
        for name in PLAYBOOK_ALERT_FIELDS:
            if name in data and data[name] != PLAYBOOK_ALERT_DEFAULTS.get(name, ...):
                raise ValidationError("only a playbook with triggers is applied by alerts", name)

    @ma.post_load
    def _defaults_left_out(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {k: v for k, v in data.items() if PLAYBOOK_ALERT_DEFAULTS.get(k, ...) != v}


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


ALERT_STATUSES = ("firing", "resolved")
#: Most alerts one notification may carry (Alertmanager's ``max_alerts`` keeps under it).
MAX_ALERTS = 1000


class Rfc3339Field(ParsedString[str]):
    """An RFC 3339 time as Alertmanager writes it (``2026-11-26T14:00:00.123456789Z``; Go's zero
    time ``0001-01-01T00:00:00Z`` for no end), kept as written."""

    def parse(self, text: str) -> str:
        try:
            moment = datetime.fromisoformat(text.upper()) if "T" in text.upper() else None
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise ValidationError("an RFC 3339 time such as 2026-11-26T14:00:00Z")
        return text


def _labels(**kwargs: Any) -> fields.Dict:
    return fields.Dict(
        keys=fields.String(), values=fields.String(validate=validate.Length(max=16_384)), **kwargs
    )


class AlertmanagerAlertSchema(Schema):
    """One alert of an Alertmanager notification. Fields a later Alertmanager adds are ignored."""

    class Meta:
        unknown = ma.EXCLUDE

    status = fields.String(required=True, validate=validate.OneOf(ALERT_STATUSES))
    labels = _labels(required=True, validate=validate.Length(1, 256))
    annotations = _labels(load_default=dict, validate=validate.Length(max=256))
    starts_at = Rfc3339Field(data_key="startsAt", required=True, metadata={"format": "date-time"})
    ends_at = Rfc3339Field(data_key="endsAt", load_default="", metadata={"format": "date-time"})
    generator_url = fields.String(
        data_key="generatorURL", load_default="", validate=validate.Length(max=8192)
    )
    fingerprint = fields.String(load_default="", validate=validate.Length(max=128))


class AlertmanagerWebhookSchema(Schema):
    """Body of Alertmanager's webhook (``webhook_configs``, payload version 4). Fields a later
    Alertmanager adds are ignored."""

    class Meta:
        unknown = ma.EXCLUDE

    version = fields.String(required=True, validate=validate.OneOf(("4",)))
    group_key = fields.String(data_key="groupKey", load_default="", validate=validate.Length(max=16_384))
    truncated_alerts = JsonInteger(data_key="truncatedAlerts", load_default=0, validate=validate.Range(min=0))
    status = fields.String(required=True, validate=validate.OneOf(ALERT_STATUSES))
    receiver = fields.String(load_default="", validate=validate.Length(max=1024))
    group_labels = _labels(data_key="groupLabels", load_default=dict, validate=validate.Length(max=256))
    common_labels = _labels(data_key="commonLabels", load_default=dict, validate=validate.Length(max=256))
    common_annotations = _labels(
        data_key="commonAnnotations", load_default=dict, validate=validate.Length(max=256)
    )
    external_url = fields.String(data_key="externalURL", load_default="", validate=validate.Length(max=8192))
    alerts = fields.List(
        fields.Nested(AlertmanagerAlertSchema), required=True, validate=validate.Length(max=MAX_ALERTS)
    )


class AlertDecisionSchema(Schema):
    """What was decided for one alert and one playbook it triggers (audited as ``alert.decision``)."""

    alert = fields.String(metadata={"description": "the alert's alertname"})
    fingerprint = fields.String()
    status = fields.String(metadata={"description": "firing or resolved"})
    playbook = fields.String(allow_none=True, metadata={"description": "null: the alert triggers none"})
    outcome = fields.String(
        metadata={
            "description": "applied, reverted, would_apply, would_revert (dry_run mode), already_applied, "
            "not_applied, not_auto, cooldown, daily_cap, no_revert, applied_by_other, still_firing, "
            "no_match, failed"
        }
    )
    detail = fields.String()
    incident = fields.String()
    operation = fields.String(allow_none=True, metadata={"description": "the apply or revert, if one ran"})
    env_version = fields.Integer(allow_none=True, metadata={"description": "the version it made, if any"})


class AlertReceiptSchema(Schema):
    """The answer to Alertmanager: every decision, per alert."""

    env = fields.String()
    receiver = fields.String()
    alerts = fields.Integer(metadata={"description": "how many alerts the notification carried"})
    decisions = fields.List(fields.Nested(AlertDecisionSchema))


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
