"""Configuration: TOML file, environment overrides, `*_file` secrets, validation.

`load_config()` either returns a complete, validated `AgentConfig` or raises `ConfigError`
listing every problem as `dotted.key.path: reason`, which `run` and `check-config` print before
exiting with 78 (EX_CONFIG). The full reference of keys is docs/configuration.md; keep the two
in step.

Loading happens in this order, each step keeping track of where a value came from so that a
problem is reported against the key the user actually wrote:

1. the TOML file (or nothing: every key has a default);
2. `ENGAGEMENT_AGENT_<SECTION>__<KEY>` environment overrides;
3. `*_file` secrets read into their key (`authorization_token_file` -> `authorization_token`,
   `mqtt.password_file` -> `mqtt.password`), and TLS file paths resolved;
4. default queue/socket paths filled in for the environment we run in;
5. pydantic validation, with each `[apps.<name>]` table validated on its own so its errors keep
   their path, then checks that need the file system (TLS files).
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
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

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Debian 12's Python 3.11 anyway
    # Only installed on 3.10 (pyproject marker); mypy checks this branch for its 3.10 target.
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/engagement-agent/agent.toml")
SYSTEM_STATE_DIR = Path("/var/lib/engagement-agent")
SYSTEM_RUNTIME_DIR = Path("/run/engagement-agent")
ENV_PREFIX = "ENGAGEMENT_AGENT_"
EX_CONFIG = 78

#: `*_file` keys whose file content replaces the key without the suffix (secrets).
SECRET_FILE_KEYS = frozenset({"authorization_token_file", "password_file"})
#: `mqtt.*_file` keys that stay paths (the TLS library reads them) but must exist when `tls`.
TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")
#: Keys of `[apps]` that are settings, not app names.
APPS_RESERVED_KEYS = frozenset({"allow_unknown", "defaults", "max_apps"})
#: `[projects.<name>]`: the same shape as app names, so env overrides can reach every one.
PROJECT_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
#: The name `[project]` goes by wherever a project is expected.
DEFAULT_PROJECT_NAME = "default"
MAX_PROPERTY_DEPTH = 10

Problem = tuple[str, str]
KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration is unusable; `problems` are `(dotted key, reason)` pairs.

    `str()` is the complete listing that `check-config` and `run` print: a header line naming
    the source, then one indented `key: reason` line per problem.
    """

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{key}: {reason}" for key, reason in problems]
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  " + "\n  ".join(lines))


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
#: `_error_path` drops them so problems name the key the user wrote.
_PROJECT_TABLE_TAG = "project table"
_PROJECT_NAME_TAG = "project name"

#: Wherever a project is expected: a table, or the name of a configured project (checked
#: against `[projects.<name>]` and `default` by `_check_project_names`).
ProjectRef = Annotated[
    Union[  # noqa: UP007 - Tag needs the members annotated one by one
        Annotated[ProjectConfig, Tag(_PROJECT_TABLE_TAG)],
        Annotated[str, Field(min_length=1), Tag(_PROJECT_NAME_TAG)],
    ],
    Discriminator(lambda v: _PROJECT_NAME_TAG if isinstance(v, str) else _PROJECT_TABLE_TAG),
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
    (docs/tracking.md, "Timestamps on devices without a real-time clock")."""

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


# -- loading ---------------------------------------------------------------------------------


class _Load:
    """Book-keeping of one `load_config()` call: where values came from, what went wrong."""

    def __init__(self, environ: Mapping[str, str], config_dir: Path | None) -> None:
        self.environ = environ
        self.config_dir = config_dir
        self.problems: list[Problem] = []
        #: key path set by the environment -> (variable name, raw text)
        self.from_env: dict[KeyPath, tuple[str, str]] = {}
        #: key path of a secret read from a file -> the `*_file` key the user wrote
        self.renamed: dict[KeyPath, str] = {}
        #: key paths whose `*_file` could not be read (already reported; "missing" is noise)
        self.unreadable: set[KeyPath] = set()

    @property
    def credentials_dir(self) -> str:
        return self.environ.get("CREDENTIALS_DIRECTORY", "").split(":")[0]

    def dotted(self, path: KeyPath) -> str:
        if path in self.renamed:
            path = (*path[:-1], self.renamed[path])
        text = ""
        for part in path:
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += f".{part}" if text else part
        return text or "(config)"

    def origin(self, path: KeyPath) -> str:
        """ " (from ENGAGEMENT_AGENT_...)" when `path` or a table above it came from the env."""
        for length in range(len(path), 0, -1):
            found = self.from_env.get(path[:length])
            if found:
                return f" (from {found[0]})"
        below = sorted(name for key, (name, _) in self.from_env.items() if key[: len(path)] == path)
        return f" (from {', '.join(below)})" if below else ""

    def problem(self, path: KeyPath, reason: str) -> None:
        self.problems.append((self.dotted(path), reason + self.origin(path)))


def _parse_env_value(raw: str) -> Any:
    """Env values are TOML values when they parse as one, else plain strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _table_key(tables: Any, part: str, kind: str, name: str, load: _Load) -> str:
    """Map an env path segment to an app or project name: env names cannot hold '-' or '.',
    so `KIOSK_UI` means the configured app (or project) whose name reads `kiosk_ui` once '-'
    and '.' become '_'."""
    if part in APPS_RESERVED_KEYS or not isinstance(tables, dict):
        return part
    if part in tables:
        return part
    matches = [key for key in tables if key.replace("-", "_").replace(".", "_") == part]
    if len(matches) > 1:
        load.problems.append(
            (name, f"matches more than one {kind} ({', '.join(sorted(matches))}); rename one")
        )
    return matches[0] if len(matches) == 1 else part


def _apply_env(data: dict[str, Any], load: _Load) -> None:
    overrides = []
    for name, raw in load.environ.items():
        if not name.startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            load.problems.append((name, "empty key segment (use __ only between keys)"))
            continue
        overrides.append((len(parts), name, parts, raw))
    for _, name, parts, raw in sorted(overrides):
        if parts[0] in ("apps", "projects") and len(parts) > 1:
            kind = "app" if parts[0] == "apps" else "project"
            parts[1] = _table_key(data.get(parts[0]), parts[1], kind, name, load)
        path: list[str | int] = []
        target: Any = data
        for part in parts[:-1]:
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                index = int(part)
                path.append(index)
                target = target[index]
                continue
            if not isinstance(target, dict):
                break
            nxt = target.get(part)
            if not isinstance(nxt, (dict, list)):
                nxt = target[part] = {}
            path.append(part)
            target = nxt
        if not isinstance(target, dict):
            load.problems.append((name, f"{'.'.join(map(str, path))} is not a table"))
            continue
        target[parts[-1]] = _parse_env_value(raw)
        key_path: KeyPath = (*path, parts[-1])
        load.from_env[key_path] = (name, raw)


def _file_path(value: str, load: _Load) -> Path | str:
    """Where a `*_file` value points. `%d` is systemd's credentials directory; a relative path
    is looked up there too when the unit uses `LoadCredential=`, else next to the config file.
    Returns the problem text instead when it cannot be resolved."""
    creds = load.credentials_dir
    if "%d" in value:
        if not creds:
            return "uses %d but $CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)"
        value = value.replace("%d", creds)
    path = Path(value).expanduser()
    if not path.is_absolute():
        base = Path(creds) if creds else (load.config_dir or Path.cwd())
        path = base / path
    return path


def _is_secret_file_key(key: str, path: KeyPath) -> bool:
    """Whether `key` at `path` is a secret file: `password_file` in `[mqtt]`,
    `authorization_token_file` in a project table (top level, named, mapping entry, app's own)."""
    if key == "password_file":
        return path == ("mqtt",)
    if key != "authorization_token_file":
        return False
    if len(path) == 2 and path[0] == "projects":
        return True
    if path[:1] == ("apps",) and len(path) >= 3:
        path = path[2:]
    return path == ("project",) or (
        len(path) == 3 and path[0] == "mapping" and isinstance(path[2], int)
    )


def _resolve_files(data: Any, path: KeyPath, load: _Load) -> Any:
    """Replace secret `*_file` entries by their key holding the file's text (one trailing
    newline stripped) and make TLS paths absolute. Unknown `*_file` keys stay as they are, so
    validation reports them as unknown under the name the user wrote."""
    if isinstance(data, list):
        return [_resolve_files(item, (*path, i), load) for i, item in enumerate(data)]
    if not isinstance(data, dict):
        return data
    result: dict[str, Any] = {}
    for key, value in data.items():
        here = (*path, key)
        if key in SECRET_FILE_KEYS and _is_secret_file_key(key, path):
            target = key.removesuffix("_file")
            if not isinstance(value, str):
                load.problem(here, "must be a file path (a string)")
                continue
            if target in data:
                load.problem(here, f"give either {target} or {key}, not both")
                continue
            file_path = _file_path(value, load)
            if isinstance(file_path, str):
                load.problem(here, file_path)
                load.unreadable.add((*path, target))
                continue
            try:
                text = file_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                load.problem(here, f"cannot read {file_path}: {reason}")
                load.unreadable.add((*path, target))
                continue
            result[target] = text.removesuffix("\n")
            target_path: KeyPath = (*path, target)
            load.renamed[target_path] = key
            if here in load.from_env:
                load.from_env[target_path] = load.from_env[here]
        elif path == ("mqtt",) and key in TLS_FILE_KEYS and isinstance(value, str):
            file_path = _file_path(value, load)
            if isinstance(file_path, str):
                load.problem(here, file_path)
                continue
            result[key] = str(file_path)
        else:
            result[key] = _resolve_files(value, here, load)
    return result


def default_state_paths(
    environ: Mapping[str, str] | None = None, *, system: bool | None = None
) -> tuple[Path, Path]:
    """Queue and socket paths for a config that does not name them.

    Under systemd: `$STATE_DIRECTORY` / `$RUNTIME_DIRECTORY`. For the system install (root, or
    `system=True` because the config is the packaged one, so the CLI of an ordinary user finds
    the system agent's socket): the FHS paths of the packaged unit. As anyone else: XDG
    directories, so a first try without root just works (the daemon creates them).
    """
    env = os.environ if environ is None else environ
    if system is None:
        system = os.geteuid() == 0
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not state:
        if system:
            state = str(SYSTEM_STATE_DIR)
        else:
            home = env.get("HOME") or str(Path.home())
            base = env.get("XDG_STATE_HOME") or str(Path(home) / ".local" / "state")
            state = str(Path(base) / "engagement-agent")
    if not runtime:
        if system:
            runtime = str(SYSTEM_RUNTIME_DIR)
        elif env.get("XDG_RUNTIME_DIR"):
            runtime = str(Path(env["XDG_RUNTIME_DIR"]) / "engagement-agent")
        else:
            runtime = state
    return Path(state) / "queue.db", Path(runtime) / "agent.sock"


def default_config_path() -> Path | None:
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _fill_paths(data: dict[str, Any], load: _Load, system: bool) -> None:
    """Default `queue.path`/`socket.path`; relative ones live in the state/runtime directory."""
    queue_path, socket_path = default_state_paths(load.environ, system=system)
    for section, default in (("queue", queue_path), ("socket", socket_path)):
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        value = table.setdefault("path", str(default))
        if isinstance(value, str) and value and not Path(value).is_absolute():
            table["path"] = str(default.parent / value)


def _reason(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "model_type" and _PROJECT_TABLE_TAG in err["loc"]:
        return "must be a project table or the name of a configured project"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a table"
    if kind == "literal_error" and err["loc"] and err["loc"][-1] == "[key]":
        return "unknown event type; expected one of " + ", ".join(EVENT_TYPES)
    if kind == "string_pattern_mismatch" and err["loc"][:1] == ("projects",):
        return "invalid project name: it must match [a-z0-9][a-z0-9._-]{0,63}"
    return str(err["msg"]).removeprefix("Value error, ")


def _error_path(loc: tuple[int | str, ...]) -> KeyPath:
    return tuple(
        part
        for part in loc
        if part not in ("[key]", _PROJECT_TABLE_TAG, _PROJECT_NAME_TAG)
        and not str(part).startswith("function")
    )


def _set_path(data: Any, path: KeyPath, value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def _validate(data: dict[str, Any], load: _Load) -> AgentConfig | None:
    """Validate; an env value that parsed as a TOML number/bool but lands on a string key (a
    numeric password, device id "042") is retried once as the raw text."""
    for attempt in (1, 2):
        try:
            return AgentConfig.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
        retry = False
        if attempt == 1:
            for err in errors:
                path = _error_path(err["loc"])
                env = load.from_env.get(path)
                if (
                    env is not None
                    and path not in load.renamed
                    and not isinstance(_parse_env_value(env[1]), str)
                ):
                    _set_path(data, path, env[1])
                    retry = True
        if not retry:
            for err in errors:
                path = _error_path(err["loc"])
                if path not in load.unreadable:
                    load.problem(path, _reason(err))
            return None
    return None  # pragma: no cover - the loop always returns


def _check_tls_files(data: dict[str, Any], load: _Load) -> None:
    """TLS files must exist when TLS is on; checked on the raw data so that these problems are
    listed together with validation problems instead of after the user fixed those."""
    mqtt = data.get("mqtt")
    if not isinstance(mqtt, dict) or mqtt.get("tls") is not True or mqtt.get("enabled") is False:
        return
    for key in TLS_FILE_KEYS:
        value = mqtt.get(key)
        if not isinstance(value, str):
            continue
        if not Path(value).is_file():
            load.problem(("mqtt", key), f"{value} does not exist (needed because mqtt.tls)")
        elif not os.access(value, os.R_OK):
            load.problem(("mqtt", key), f"{value} is not readable by this user")


def _project_refs(data: dict[str, Any]) -> list[tuple[KeyPath, Any]]:
    """Every place in the raw config where a project is expected, with its value: mapping
    entries, apps' `project`, `mapping` and `projects`."""
    refs: list[tuple[KeyPath, Any]] = []

    def mapping_refs(mapping: Any, path: KeyPath) -> None:
        if isinstance(mapping, dict):
            for event_type, entries in mapping.items():
                if isinstance(entries, list):
                    refs.extend(((*path, event_type, i), e) for i, e in enumerate(entries))

    mapping_refs(data.get("mapping"), ("mapping",))
    apps = data.get("apps")
    for app, table in apps.items() if isinstance(apps, dict) else ():
        if not isinstance(table, dict):
            continue
        if "project" in table:
            refs.append((("apps", app, "project"), table["project"]))
        mapping_refs(table.get("mapping"), ("apps", app, "mapping"))
        names = table.get("projects")
        if isinstance(names, list):
            refs.extend((("apps", app, "projects", i), name) for i, name in enumerate(names))
    return refs


def _check_project_names(data: dict[str, Any], load: _Load) -> None:
    """A project name must name a configured project; checked on the raw data (like the TLS
    files) so these problems are listed with every other one."""
    projects = data.get("projects")
    names = set(projects) if isinstance(projects, dict) else set()
    if "project" in data:
        if DEFAULT_PROJECT_NAME in names:
            load.problem(
                ("projects", DEFAULT_PROJECT_NAME),
                "[project] already is the project named 'default'; give only one of them",
            )
        names.add(DEFAULT_PROJECT_NAME)
    known = ", ".join(sorted(names)) or "none; add a [projects.<name>] table"
    for path, value in _project_refs(data):
        if isinstance(value, str) and value and value not in names:
            load.problem(path, f"unknown project {value!r} (configured: {known})")


def _check_conflicting_projects(config: AgentConfig, load: _Load) -> None:
    """A project (token and URL) must have one authorization token: credentials are looked up
    by project when sending, and two different ones would leave it to chance which is used."""
    tables: list[tuple[KeyPath, ProjectConfig]] = []
    if config.project is not None:
        tables.append((("project",), config.project))
    tables.extend((("projects", name), table) for name, table in config.projects.items())

    def add(path: KeyPath, ref: ProjectConfig | str | None) -> None:
        if isinstance(ref, ProjectConfig):
            tables.append((path, ref))

    for event_type, entries in config.mapping.items():
        for i, entry in enumerate(entries):
            add(("mapping", event_type, i), entry)
    for app, app_config in {"defaults": config.apps.defaults, **config.apps.named()}.items():
        add(("apps", app, "project"), app_config.project)
        for event_type, entries in (app_config.mapping or {}).items():
            for i, entry in enumerate(entries):
                add(("apps", app, "mapping", event_type, i), entry)
    first: dict[ProjectKey, tuple[KeyPath, str]] = {}
    for path, table in tables:
        project = table.to_project()
        seen = first.setdefault(project.key, (path, project.authorization_token))
        if seen[1] != project.authorization_token:
            load.problem(
                path,
                f"same project_token and base_url as {load.dotted(seen[0])} "
                "but a different authorization_token",
            )


def _check_socket_input(config: AgentConfig, load: _Load) -> None:
    """Every socket connection may hold a partial line; together they stay within what keeps
    hostile clients under 64 MB (docs/security.md)."""
    held = config.socket.max_connections * config.limits.max_command_bytes
    if held > MAX_SOCKET_INPUT_BYTES:
        load.problem(
            ("limits", "max_command_bytes"),
            f"socket.max_connections × limits.max_command_bytes is {held} bytes; at most "
            f"{MAX_SOCKET_INPUT_BYTES} (16 MiB) are allowed, lower one of them",
        )


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, merge and validate the configuration; raises `ConfigError` with every problem.

    `path` None means built-in defaults (plus the environment). `environ` defaults to
    `os.environ` and is the only environment consulted (overrides, `$CREDENTIALS_DIRECTORY`,
    `$STATE_DIRECTORY`, XDG variables), which keeps tests hermetic.
    """
    env = os.environ if environ is None else environ
    source = str(path) if path else "built-in defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([("(file)", f"{path} does not exist")], source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([("(file)", f"cannot read {path}: {exc}")], source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([("(file)", f"not valid TOML: {exc}")], source) from None
    load = _Load(env, Path(path).absolute().parent if path is not None else None)
    _apply_env(data, load)
    data = _resolve_files(data, (), load)
    system = os.geteuid() == 0 or (
        path is not None and Path(path).absolute().parent == DEFAULT_CONFIG_PATH.parent
    )
    _fill_paths(data, load, system)
    _check_tls_files(data, load)
    _check_project_names(data, load)
    config = _validate(data, load)
    if config is not None:
        _check_conflicting_projects(config, load)
        _check_socket_input(config, load)
    if load.problems or config is None:
        raise ConfigError(load.problems, source)
    return config
