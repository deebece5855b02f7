"""The configuration's sections as pydantic models: every key, its default and the checks that
need nothing but the values (ranges, shapes, one section's keys against each other).

`AgentConfig` is the whole file; the other models are its sections. Where values come from
(file, environment, `*_file` secrets), checks that need the file system or compare sections,
and how problems are reported are `agent.config.load`'s job. The full reference of keys is
docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import datetime
import math
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.commands import EVENT_TYPES, is_valid_app_name
from agent.tracker.model import (
    DEFAULT_BASE_URL,
    UNCONFIGURED_PROJECT,
    AppSettings,
    Project,
    ProjectCatalog,
    ProjectKey,
)

SYSTEM_STATE_DIR = Path("/var/lib/engagement-agent")
SYSTEM_RUNTIME_DIR = Path("/run/engagement-agent")

#: Keys of `[apps]` that are settings, not app names.
APPS_RESERVED_KEYS = frozenset({"allow_unknown", "defaults", "max_apps"})
#: `[projects.<name>]`: the same shape as app names, so env overrides can reach every one.
PROJECT_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
#: The name `[project]` goes by wherever a project is expected.
DEFAULT_PROJECT_NAME = "default"
MAX_PROPERTY_DEPTH = 10


class _Section(BaseModel):
    # NaN/inf would pass `ge=` checks (inf) or make every comparison false (NaN).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ProjectConfig(_Section):
    project_token: Annotated[str, Field(min_length=1, max_length=256)]
    authorization_token: Annotated[str, Field(min_length=1, max_length=1024)]
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")] = DEFAULT_BASE_URL

    def to_project(self) -> Project:
        return Project(self.project_token, self.authorization_token, self.base_url.rstrip("/"))


#: Tags of the two shapes of a project reference; pydantic puts them in error locations, and
#: loading drops them so problems name the key the user wrote.
PROJECT_TABLE_TAG = "project table"
PROJECT_NAME_TAG = "project name"

#: Wherever a project is expected: a table, or the name of a configured project (checked
#: against `[projects.<name>]` and `default` when the config is loaded).
ProjectRef = Annotated[
    Union[  # noqa: UP007 - Tag needs the members annotated one by one
        Annotated[ProjectConfig, Tag(PROJECT_TABLE_TAG)],
        Annotated[str, Field(min_length=1), Tag(PROJECT_NAME_TAG)],
    ],
    Discriminator(lambda v: PROJECT_NAME_TAG if isinstance(v, str) else PROJECT_TABLE_TAG),
]
MappingConfig = dict[Literal[EVENT_TYPES], list[ProjectRef]]  # type: ignore[valid-type]


def _check_json_value(value: Any, depth: int) -> None:
    """Default properties end up in API payloads: TOML dates and NaN are not JSON."""
    if isinstance(value, dict):
        if depth > MAX_PROPERTY_DEPTH:
            raise ValueError(f"nested deeper than {MAX_PROPERTY_DEPTH} levels")
        for item in value.values():
            _check_json_value(item, depth + 1)
    elif isinstance(value, list):
        if depth > MAX_PROPERTY_DEPTH:
            raise ValueError(f"nested deeper than {MAX_PROPERTY_DEPTH} levels")
        for item in value:
            _check_json_value(item, depth + 1)
    elif isinstance(value, (datetime.date, datetime.time)):
        raise ValueError("TOML dates and times are not JSON values; quote them as strings")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("nan and inf are not JSON values")


class _BadAppName:
    """Stands in for the table of an `[apps.<name>]` whose name is invalid, so that pydantic
    reports the problem at `apps.<name>` together with every other problem."""

    def __init__(self, name: str) -> None:
        self.name = name


class AppConfig(_Section):
    """Keys allowed in `[apps.defaults]` and in `[apps.<app>]` (which overrides the defaults)."""

    application_id: Annotated[str, Field(min_length=1, max_length=256)] = "default-application"
    session_timeout: Annotated[float, Field(ge=1.0)] = 20.0
    automatic_session_tracking: bool = True
    token_track_frequency: Literal["on_token_change", "every_launch", "daily"] = "on_token_change"
    push_token_format: Literal["notification_state", "customer_property"] = "notification_state"
    allow_default_customer_properties: bool = True
    default_properties: dict[str, Any] = {}
    app_version: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    project: ProjectRef | None = None
    mapping: MappingConfig | None = None
    #: Names of the projects this app may choose with anonymize (default: every configured).
    projects: list[Annotated[str, Field(min_length=1)]] | None = None
    allowed_uids: list[Annotated[int, Field(ge=0, le=2**32 - 2)]] | None = None
    #: Whether MQTT commands are accepted for the app; unset means "only if it has no
    #: `allowed_uids`", so the socket's uid check cannot be walked around over MQTT.
    mqtt: bool | None = None

    @property
    def mqtt_allowed(self) -> bool:
        return self.allowed_uids is None if self.mqtt is None else self.mqtt

    @model_validator(mode="before")
    @classmethod
    def _refuse_bad_name(cls, data: Any) -> Any:
        if isinstance(data, _BadAppName):
            raise ValueError(
                f"invalid app name {data.name!r}: it must match [a-z0-9][a-z0-9._-]{{0,63}}"
                + (" and not be 'defaults'" if data.name == "defaults" else "")
            )
        return data

    @field_validator("default_properties")
    @classmethod
    def _json_properties(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_json_value(value, 1)
        return value


class AppsConfig(_Section):
    """`[apps]`: `allow_unknown`, `[apps.defaults]` and one `[apps.<name>]` table per app.

    Each named table is validated on its own (pydantic reports `apps.<name>.<key>`) and then
    laid over the defaults, so `named()` returns complete, merged configs.
    """

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    __pydantic_extra__: dict[str, AppConfig] = Field(init=False)

    allow_unknown: bool = True
    #: Apps with state at most (`default` included); a new one beyond is `unknown_app`.
    max_apps: Annotated[int, Field(ge=1)] = 64
    defaults: AppConfig = AppConfig()

    @model_validator(mode="before")
    @classmethod
    def _mark_bad_names(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        return {
            name: (
                value
                if name in APPS_RESERVED_KEYS or is_valid_app_name(name)
                else _BadAppName(name)
            )
            for name, value in data.items()
        }

    @model_validator(mode="after")
    def _merge_defaults(self) -> AppsConfig:
        extra = self.__pydantic_extra__
        if extra:
            for name, app in list(extra.items()):
                overrides = {key: getattr(app, key) for key in app.model_fields_set}
                extra[name] = self.defaults.model_copy(update=overrides)
        return self

    def named(self) -> dict[str, AppConfig]:
        """The configured apps by name, each already merged over `[apps.defaults]`."""
        return dict(self.__pydantic_extra__ or {})

    def get(self, app: str) -> AppConfig | None:
        """The merged config of a configured app, None if it has no table; reads the table in
        place instead of copying it as `named()` does (the dispatcher asks once per command)."""
        extra = self.__pydantic_extra__
        return extra.get(app) if extra else None


class QueueConfig(_Section):
    path: Path = SYSTEM_STATE_DIR / "queue.db"
    max_bytes: Annotated[int, Field(ge=65536)] = 104857600
    max_dead_letter_bytes: Annotated[int, Field(ge=65536)] = 10485760
    on_full: Literal["drop_oldest", "reject"] = "drop_oldest"
    durability: Literal["full", "normal"] = "full"


class SyncConfig(_Section):
    flush_mode: Literal["immediate", "period", "manual"] = "immediate"
    flush_period: Annotated[float, Field(gt=0)] = 60.0
    batch_size: Annotated[int, Field(ge=1, le=50)] = 50
    max_backoff: Annotated[float, Field(ge=1.0)] = 300.0
    timeout: Annotated[float, Field(gt=0)] = 30.0
    #: Requests per second per project; 0 turns pacing off. The API allows ~100/s per IP.
    max_requests_per_second: Annotated[float, Field(ge=0)] = 20.0
    #: Seconds between attempts (jittered ±50%) while the API cannot be reached at all.
    probe_interval: Annotated[float, Field(ge=0.1, le=3600)] = 15.0
    #: In flush_mode "immediate", how long a batch that is not full waits for more items.
    linger: Annotated[float, Field(ge=0, le=60)] = 1.0
    #: HTTP proxy URL for the API; "" uses HTTPS_PROXY/HTTP_PROXY/NO_PROXY from the environment.
    proxy: Annotated[str, Field(max_length=2048, pattern=r"^(|https?://[^\s/]+/?)$")] = ""


class MqttConfig(_Section):
    enabled: bool = True
    host: Annotated[str, Field(min_length=1)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    #: "auto": MQTT 5 first, 3.1.1 when the broker refuses 5 (docs/mqtt.md); 5 or 3 force one.
    protocol: Literal["auto", 3, 5] = "auto"
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: Annotated[str, Field(pattern=r"^[^#+\s]+$")] = "engagement"
    client_id: Annotated[str, Field(max_length=256)] = ""
    keepalive: Annotated[int, Field(ge=5, le=65535)] = 60
    #: How long the broker keeps our session (and queues commands) while we are away (MQTT 5).
    session_expiry: Annotated[int, Field(ge=60)] = 7 * 24 * 3600
    #: Unacknowledged messages the broker may push at us at once (MQTT 5 Receive Maximum).
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 1000

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if value.startswith("$"):
            raise ValueError("topics starting with '$' are reserved by the broker")
        if value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError("no leading, trailing or doubled '/' (empty topic levels)")
        return value

    @field_validator("key_file")
    @classmethod
    def _key_needs_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("cert_file") is None:
            raise ValueError("key_file is given without cert_file")
        return value


#: Upper bound of `socket.max_connections`; the unit's `LimitNOFILE=` has room for it.
MAX_SOCKET_CONNECTIONS = 1024
#: Cap on `socket.max_connections_per_uid × socket.max_pending_reply_bytes`.
MAX_OWED_REPLY_BYTES_PER_UID = 32 * 1024 * 1024
#: Cap on `socket.max_connections × limits.max_command_bytes`: every connection may hold a
#: partial line, so this is what the partial lines of all clients may cost together.
MAX_SOCKET_INPUT_BYTES = 16 * 1024 * 1024


def socket_input_problem(max_connections: int, max_command_bytes: int) -> str | None:
    """Why `max_connections` connections, each holding a partial line of up to
    `max_command_bytes`, are too many together (docs/security.md), or None. Checked when the
    config is loaded, and on reload against the running socket (its `max_connections` changes
    only with a restart)."""
    held = max_connections * max_command_bytes
    if held <= MAX_SOCKET_INPUT_BYTES:
        return None
    return (
        f"socket.max_connections ({max_connections}) × limits.max_command_bytes "
        f"({max_command_bytes}) is {held} bytes; at most {MAX_SOCKET_INPUT_BYTES} (16 MiB) are "
        "allowed, lower one of them"
    )


class SocketConfig(_Section):
    path: Path = SYSTEM_RUNTIME_DIR / "agent.sock"
    #: Octal permission bits as a string ("0660"); kept a string so TOML and env agree on base.
    mode: str = "0660"
    #: Connections from non-privileged peers; root and the agent's user get a few more
    #: (docs/configuration.md). Each is a file descriptor (the unit's `LimitNOFILE=`).
    max_connections: Annotated[int, Field(ge=1, le=MAX_SOCKET_CONNECTIONS)] = 256
    #: Per peer uid (SO_PEERCRED), so one local account cannot take every slot.
    max_connections_per_uid: Annotated[int, Field(ge=1, le=MAX_SOCKET_CONNECTIONS)] = 32
    #: Seconds a connection may stay open while the agent owes it nothing.
    idle_timeout: Annotated[float, Field(ge=1.0, le=86400.0)] = 300.0
    #: Replies a client may leave unread before the agent stops reading from it.
    max_pending_reply_bytes: Annotated[int, Field(ge=65536, le=16 * 1024 * 1024)] = 1048576

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError('must be a string of octal digits such as "0660"')
        digits = value.removeprefix("0o")
        if not (1 <= len(digits) <= 4 and all(c in "01234567" for c in digits)):
            raise ValueError(f'{value!r} is not an octal mode such as "0660"')
        bits = int(digits, 8)
        if bits > 0o777:
            raise ValueError("only permission bits (at most 0777) are allowed")
        if bits & 0o600 != 0o600:
            raise ValueError("the owner (the agent itself) needs read and write (0600)")
        return f"{bits:04o}"

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)

    @model_validator(mode="after")
    def _owed_bytes_bounded(self) -> SocketConfig:
        # What one local account may make the agent hold in unread replies; with the rest a
        # client may hold (docs/security.md) this keeps a hostile one under 64 MB.
        owed = self.max_connections_per_uid * self.max_pending_reply_bytes
        if owed > MAX_OWED_REPLY_BYTES_PER_UID:
            raise ValueError(
                f"max_connections_per_uid × max_pending_reply_bytes is {owed} bytes; at most "
                f"{MAX_OWED_REPLY_BYTES_PER_UID} (32 MiB) are allowed, lower one of them"
            )
        return self


class LimitsConfig(_Section):
    max_command_bytes: Annotated[int, Field(ge=1024)] = 65536


class MetricsConfig(_Section):
    """Prometheus metrics written for node_exporter's textfile collector (docs/operations.md)."""

    #: Where to write them; None writes nothing. No listening port: node_exporter serves them.
    textfile: Path | None = None
    interval: Annotated[float, Field(ge=1.0, le=3600.0)] = 15.0

    @field_validator("textfile")
    @classmethod
    def _prom_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            if not value.is_absolute():
                raise ValueError("must be an absolute path")
            if value.suffix != ".prom":
                raise ValueError("must end in .prom (node_exporter reads only *.prom files)")
        return value


class ClockConfig(_Section):
    """Holding and correcting items stamped by a clock that is not synchronized
    (docs/tracking.md, "Timestamps on devices without a real-time clock"). The clock's pure
    rules (`agent.clock`) take this section as it is."""

    hold_unsynced: bool = True
    max_hold: Annotated[float, Field(ge=0, le=7 * 24 * 3600.0)] = 6 * 3600.0
    min_correction: Annotated[float, Field(ge=0.5, le=24 * 3600.0)] = 5.0
    max_skew: Annotated[float, Field(ge=1.0)] = 120.0


class AgentConfig(_Section):
    device_id: Annotated[str, Field(pattern=r"^[^#+/\s]+$", max_length=128)] = Field(
        default_factory=lambda: socket.gethostname() or "localhost"
    )
    device_type: Annotated[str, Field(min_length=1, max_length=128)] = "kiosk"
    device_uuid: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    project: ProjectConfig | None = None
    projects: dict[Annotated[str, Field(pattern=PROJECT_NAME_PATTERN)], ProjectConfig] = {}
    mapping: MappingConfig = {}
    apps: AppsConfig = AppsConfig()
    queue: QueueConfig = QueueConfig()
    sync: SyncConfig = SyncConfig()
    mqtt: MqttConfig = MqttConfig()
    socket: SocketConfig = SocketConfig()
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    clock: ClockConfig = ClockConfig()

    @field_validator("device_uuid")
    @classmethod
    def _uuid_shape(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("device_id")
    @classmethod
    def _not_broadcast(cls, value: str) -> str:
        if value == "all":
            raise ValueError("'all' is the MQTT broadcast address, not a device name")
        return value

    @model_validator(mode="after")
    def _default_project(self) -> AgentConfig:
        """`[projects.default]` is another way to write `[project]`."""
        if self.project is None and DEFAULT_PROJECT_NAME in self.projects:
            return self.model_copy(update={"project": self.projects[DEFAULT_PROJECT_NAME]})
        return self

    def named_projects(self) -> dict[str, Project]:
        """`[projects.<name>]` by name, and `[project]` as `default`."""
        named = {DEFAULT_PROJECT_NAME: self.project.to_project()} if self.project else {}
        for name, config in self.projects.items():
            named.setdefault(name, config.to_project())
        return named

    def _resolve(self, ref: ProjectConfig | str, named: Mapping[str, Project]) -> Project:
        # Names were checked against the config when it was loaded.
        return named[ref] if isinstance(ref, str) else ref.to_project()

    def app_config(self, app: str) -> AppConfig | None:
        """The merged config of `app`, or None if it is unknown and unknown apps are refused."""
        app_config = self.apps.get(app)
        if app_config is not None:
            return app_config
        return self.apps.defaults if self.apps.allow_unknown else None

    def app_settings(self, app: str) -> AppSettings | None:
        app_config = self.app_config(app)
        if app_config is None:
            return None
        named = self.named_projects()
        default_project = self.project.to_project() if self.project else UNCONFIGURED_PROJECT
        project = (
            self._resolve(app_config.project, named) if app_config.project else default_project
        )
        mapping_source = app_config.mapping if app_config.mapping is not None else self.mapping
        mapping = {
            event_type: tuple(self._resolve(p, named) for p in projects)
            for event_type, projects in mapping_source.items()
        }
        configured: dict[ProjectKey, Project] = {}
        for known in self.known_projects():
            configured.setdefault(known.key, known)
        allowed = None
        if app_config.projects is not None:
            allowed = frozenset(named[name].key for name in app_config.projects)
        return AppSettings(
            project=project,
            mapping=mapping,
            catalog=ProjectCatalog(named=named, configured=configured, allowed=allowed),
            application_id=app_config.application_id,
            session_timeout=app_config.session_timeout,
            automatic_session_tracking=app_config.automatic_session_tracking,
            token_track_frequency=app_config.token_track_frequency,
            push_token_format=app_config.push_token_format,
            allow_default_customer_properties=app_config.allow_default_customer_properties,
            default_properties=dict(app_config.default_properties),
            app_version=app_config.app_version,
        )

    def known_projects(self) -> list[Project]:
        """Every project the config names anywhere (the "configured projects": the only ones
        apps may choose, and where credentials are looked up at send time)."""
        named = self.named_projects()
        found = list(named.values())
        configs = [self.apps.defaults, *self.apps.named().values()]
        for projects in self.mapping.values():
            found.extend(self._resolve(p, named) for p in projects)
        for app_config in configs:
            if app_config.project:
                found.append(self._resolve(app_config.project, named))
            for projects in (app_config.mapping or {}).values():
                found.extend(self._resolve(p, named) for p in projects)
        return found
