"""The command protocol (docs/protocol.md): pydantic models and the one parser every transport uses.

A valid command is read in one pass: pydantic validates the raw bytes, then one walk over the
free-form `properties` checks what the schema cannot say (finite numbers, nesting depth); see
`parse_valid_command`. Anything that fails there is parsed again in two steps so that the error
codes come out as docs/protocol.md wants them: strict JSON first (`invalid_json`: not UTF-8,
not JSON, NaN/Infinity, numbers that overflow), then the schema on the parsed object
(`invalid_command`: not an object, unknown command or field, wrong type, too deep). Error
details carry field paths and reasons, never the values a client sent (they may hold personal
data).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union, cast, get_args

import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from agent.errors import InvalidCommand, InvalidJson

#: Timestamps above this (2100-01-01) are almost certainly milliseconds.
MAX_TIMESTAMP = 4102444800.0
#: The `properties` object is level 1; values may nest to this level.
MAX_PROPERTIES_DEPTH = 10
APP_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_APP_NAME_RE = re.compile(APP_NAME_PATTERN)
RESERVED_APP_NAMES = frozenset({"defaults"})

JsonObject = dict[str, Any]

_isfinite = math.isfinite


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    app: Annotated[str, Field(pattern=APP_NAME_PATTERN)] | None = None
    request_id: Annotated[str, Field(max_length=128)] | None = None

    @field_validator("app")
    @classmethod
    def _not_reserved(cls, value: str | None) -> str | None:
        if value in RESERVED_APP_NAMES:
            raise ValueError(f"the app name {value!r} is reserved")
        return value


def _check_timestamp(value: float | None) -> float | None:
    if value is None:
        return None
    if value <= 0:
        raise ValueError("timestamp must be > 0 (Unix seconds)")
    if value > MAX_TIMESTAMP:
        raise ValueError(
            "timestamp is after the year 2100; it looks like milliseconds, send Unix seconds"
        )
    return float(value)


class _Timestamped(_Command):
    timestamp: float | None = None

    _validate_timestamp = field_validator("timestamp")(_check_timestamp)


class TrackEvent(_Timestamped):
    command: Literal["track_event"]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    properties: JsonObject = Field(default_factory=dict)


class IdentifyCustomer(_Command):
    command: Literal["identify_customer"]
    ids: Annotated[dict[str, str], Field(min_length=1)]
    properties: JsonObject = Field(default_factory=dict)

    @field_validator("ids")
    @classmethod
    def _no_cookie(cls, value: dict[str, str]) -> dict[str, str]:
        if "cookie" in value:
            raise ValueError("'cookie' is managed by the agent and cannot be set")
        if any(not key for key in value):
            raise ValueError("id names must not be empty")
        return value


class ProjectSpec(BaseModel):
    """A project given in a command (anonymize) as an object. It only selects one of the
    configured projects by `project_token` and `base_url`; an `authorization_token` is
    accepted for the SDK's shape but ignored: credentials come from the config alone."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    project_token: Annotated[str, Field(min_length=1, max_length=256)]
    authorization_token: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")] = (
        "https://api.exponea.com"
    )


#: Tags of the two shapes a project reference may take; they appear in pydantic's error
#: locations and are dropped from the field paths a client sees.
_PROJECT_OBJECT_TAG = "project object"
_PROJECT_NAME_TAG = "project name"

#: A configured project's name (`[projects.<name>]`, `default` for `[project]`), or an object.
ProjectRef = Annotated[
    Union[  # noqa: UP007 - Tag needs the members annotated one by one
        Annotated[ProjectSpec, Tag(_PROJECT_OBJECT_TAG)],
        Annotated[str, Field(min_length=1, max_length=64), Tag(_PROJECT_NAME_TAG)],
    ],
    Discriminator(lambda v: _PROJECT_NAME_TAG if isinstance(v, str) else _PROJECT_OBJECT_TAG),
]


EventTypeName = Literal[
    "install",
    "session_start",
    "session_end",
    "track_event",
    "track_customer",
    "payment",
    "push_token",
    "banner",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventTypeName)


class Anonymize(_Command):
    command: Literal["anonymize"]
    project: ProjectRef | None = None
    mapping: dict[EventTypeName, list[ProjectRef]] | None = None


class TrackSessionStart(_Timestamped):
    command: Literal["track_session_start"]


class TrackSessionEnd(_Timestamped):
    command: Literal["track_session_end"]


class AppForeground(_Timestamped):
    command: Literal["app_foreground"]
    app_version: Annotated[str, Field(max_length=128)] | None = None


class AppBackground(_Timestamped):
    command: Literal["app_background"]
    app_version: Annotated[str, Field(max_length=128)] | None = None


class TrackPushToken(_Command):
    command: Literal["track_push_token"]
    token: Annotated[str, Field(min_length=1, max_length=4096)]


class TrackHmsPushToken(_Command):
    command: Literal["track_hms_push_token"]
    token: Annotated[str, Field(min_length=1, max_length=4096)]


class VerifyPushToken(_Command):
    command: Literal["verify_push_token"]


class PaymentItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    value: float
    currency: Annotated[str, Field(min_length=1, max_length=16)]
    payment_system: Annotated[str, Field(max_length=256)]
    product_id: Annotated[str, Field(max_length=256)]
    product_title: Annotated[str, Field(max_length=1024)]
    receipt: Annotated[str, Field(max_length=16384)] | None = None


class TrackPayment(_Timestamped):
    command: Literal["track_payment"]
    item: PaymentItem


class SetDefaultProperties(_Command):
    command: Literal["set_default_properties"]
    properties: JsonObject = Field(default_factory=dict)


class Status(_Command):
    command: Literal["status"]


class Flush(_Command):
    command: Literal["flush"]
    wait: bool = False


class GetCustomer(_Command):
    command: Literal["get_customer"]


class _AdminCommand(_Command):
    """Queue maintenance for the CLI (`engagement-agent queue ...`): socket only, and only from
    root or the agent's own user. Not part of the app protocol, never accepted over MQTT."""


class QueueList(_AdminCommand):
    command: Literal["queue_list"]
    limit: Annotated[int, Field(ge=1, le=10000)] = 100
    after_id: Annotated[int, Field(ge=0)] = 0


class QueueShow(_AdminCommand):
    command: Literal["queue_show"]
    id: Annotated[int, Field(ge=1)]


class QueueDeadLetters(_AdminCommand):
    command: Literal["queue_dead_letters"]
    limit: Annotated[int, Field(ge=1, le=10000)] = 100
    after_id: Annotated[int, Field(ge=0)] = 0


class QueueRetryDead(_AdminCommand):
    command: Literal["queue_retry_dead"]
    ids: list[Annotated[int, Field(ge=1)]] | None = None


class QueuePurge(_AdminCommand):
    command: Literal["queue_purge"]
    dead: bool = False
    #: Only the queued items of this project token (`queue purge --project TOKEN`).
    project_token: Annotated[str, Field(min_length=1, max_length=1024)] | None = None


TRACKING_COMMANDS: tuple[type[_Command], ...] = (
    TrackEvent,
    IdentifyCustomer,
    Anonymize,
    TrackSessionStart,
    TrackSessionEnd,
    AppForeground,
    AppBackground,
    TrackPushToken,
    TrackHmsPushToken,
    VerifyPushToken,
    TrackPayment,
    SetDefaultProperties,
)
QUERY_COMMANDS: tuple[type[_Command], ...] = (Status, Flush, GetCustomer)
ADMIN_COMMANDS: tuple[type[_Command], ...] = (
    QueueList,
    QueueShow,
    QueueDeadLetters,
    QueueRetryDead,
    QueuePurge,
)
# Built from the tuples above so the list of commands exists once; a runtime-built Union is
# not a static type, hence the ignore.
Command = Annotated[  # type: ignore[valid-type]
    Union[TRACKING_COMMANDS + QUERY_COMMANDS + ADMIN_COMMANDS],  # noqa: UP007
    Field(discriminator="command"),
]


def _tag(cls: type[_Command]) -> str:
    tag: str = cls.model_fields["command"].annotation.__args__[0]  # type: ignore[union-attr]
    return tag


#: The app-facing commands, for error messages (admin commands are not advertised).
COMMAND_NAMES = tuple(sorted(_tag(cls) for cls in TRACKING_COMMANDS + QUERY_COMMANDS))

_command_adapter: TypeAdapter[Any] = TypeAdapter(cast(Any, Command))
#: The adapter's compiled validator, called directly on the hot path: `TypeAdapter.validate_json`
#: first sorts out options the agent never passes (~2.5k instructions a command, a tenth of
#: the validation).
_validate_command_json = _command_adapter.validator.validate_json


# Exact types, not isinstance: pydantic's model metaclass is an ABCMeta, whose isinstance is
# slow enough to show in the per-command profile; commands are never subclassed.
_TRACKING_TYPES = frozenset(TRACKING_COMMANDS)
_APP_SCOPED_TYPES = frozenset((*TRACKING_COMMANDS, GetCustomer))
_ADMIN_TYPES = frozenset(ADMIN_COMMANDS)


def is_tracking(command: object) -> bool:
    """Tracking commands change state and queue items; queries never do (docs/protocol.md)."""
    return type(command) in _TRACKING_TYPES


_ALL_TAGS = frozenset(_tag(cls) for cls in TRACKING_COMMANDS + QUERY_COMMANDS + ADMIN_COMMANDS)


def is_app_scoped(command: object) -> bool:
    """Commands that act for one app, so its permissions apply (`status`/`flush` do not)."""
    return type(command) in _APP_SCOPED_TYPES


def is_admin(command: object) -> bool:
    return type(command) in _ADMIN_TYPES


def _field_path(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the discriminator's tag in the location (`track_event.name`); the client
    # only knows its own field names, so the tag is dropped.
    parts = [str(part) for part in loc if part not in (_PROJECT_OBJECT_TAG, _PROJECT_NAME_TAG)]
    if parts and parts[0] in _ALL_TAGS:
        parts = parts[1:]
    return ".".join(parts) or "(command)"


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return "unknown command; expected one of: " + ", ".join(COMMAND_NAMES)
    if kind == "union_tag_not_found":
        return "required field 'command' is missing"
    if kind == "model_type" and _PROJECT_OBJECT_TAG in error["loc"]:
        return "expected a configured project's name or a project object"
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


def _schema_error(exc: ValidationError) -> InvalidCommand:
    details = [
        {"field": _field_path(err["loc"]), "reason": _reason(err)}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    summary = "; ".join(f"{d['field']}: {d['reason']}" for d in details[:3])
    if len(details) > 3:
        summary += f"; and {len(details) - 3} more"
    return InvalidCommand(f"invalid command: {summary}", details)


def _check_values(value: Any, depth: int, path: str) -> None:
    """Reject non-finite numbers (1e999 parses to inf) and nesting beyond the allowed depth.

    `depth` counts object/list levels from the command root, so the `properties` object is at
    depth 1, the "level 1" of docs/protocol.md.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidJson(f"{path}: number overflows to infinity; send a finite number")
        return
    if isinstance(value, dict):
        if depth > MAX_PROPERTIES_DEPTH:
            raise _too_deep(path)
        for key, item in value.items():
            _check_values(item, depth + 1, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        if depth > MAX_PROPERTIES_DEPTH:
            raise _too_deep(path)
        for index, item in enumerate(value):
            _check_values(item, depth + 1, f"{path}.{index}")


def _too_deep(path: str) -> InvalidCommand:
    return InvalidCommand(
        f"invalid command: {path}: nested deeper than {MAX_PROPERTIES_DEPTH} levels",
        [{"field": path, "reason": f"nested deeper than {MAX_PROPERTIES_DEPTH} levels"}],
    )


def parse_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no overflowing numbers. Raises `InvalidJson`."""
    try:
        return pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as exc:
        text = str(exc)
        if "recursion limit" in text:
            raise InvalidCommand(
                f"invalid command: nested deeper than {MAX_PROPERTIES_DEPTH} levels",
                [{"field": "(command)", "reason": "nested too deep"}],
            ) from None
        raise InvalidJson(f"invalid JSON: {text}") from None


#: Commands with a free-form `properties` object: the only JSON the schema does not type.
_FREE_FORM_TYPES = frozenset((TrackEvent, IdentifyCustomer, SetDefaultProperties))


def parse_valid_command(data: bytes) -> Any | None:
    """The command in `data` if it is valid, else None (then `parse_json` and
    `validate_command` give the exact error).

    The fast path for the common case, one pass instead of three (parse, check, validate):
    pydantic reads the bytes straight into the model. Typed float fields refuse NaN/Infinity
    themselves (`allow_inf_nan=False`); `properties` holds any JSON, so it alone is walked for
    non-finite numbers and depth, without building the field paths only an error needs.
    """
    try:
        command = _validate_command_json(data, strict=True)
    except ValidationError:
        return None
    if type(command) in _FREE_FORM_TYPES and not _plain(command.properties.values(), 1):
        return None
    return command


def _plain(values: Iterable[Any], depth: int) -> bool:
    """True if no value below is a non-finite number or a container nested deeper than
    MAX_PROPERTIES_DEPTH (`depth` is the level of the container holding `values`, counted as
    in `_check_values`)."""
    for item in values:
        kind = type(item)
        if kind is float:
            if not _isfinite(item):
                return False
        elif kind is dict or kind is list:
            if depth >= MAX_PROPERTIES_DEPTH:
                return False
            if not _plain(item.values() if kind is dict else item, depth + 1):
                return False
    return True


def validate_command(document: Any) -> Any:
    """Validate a parsed JSON document against the command schema. Raises `AgentError`."""
    if not isinstance(document, dict):
        raise InvalidCommand(
            "invalid command: a command must be a JSON object",
            [{"field": "(command)", "reason": "expected a JSON object"}],
        )
    _check_values(document, 0, "")
    try:
        return _command_adapter.validate_python(document, strict=True)
    except ValidationError as exc:
        raise _schema_error(exc) from None


def request_id_of(document: Any) -> str | None:
    """Best-effort request id from a document that failed validation, so the error can echo it."""
    if isinstance(document, dict):
        value = document.get("request_id")
        if isinstance(value, str) and len(value) <= 128:
            return value
    return None


def is_valid_app_name(name: str) -> bool:
    return bool(_APP_NAME_RE.match(name)) and name not in RESERVED_APP_NAMES
