"""Configuration (SPEC §7, §11): TOML file, environment overrides, `*_file` secrets, validation.

`load_config()` either returns a complete, validated `AgentConfig` or raises `ConfigError`
listing every problem as `dotted.key.path: reason`, which `run` and `check-config` print before
exiting with 78 (EX_CONFIG).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.commands import EVENT_TYPES, is_valid_app_name
from agent.tracker.model import DEFAULT_BASE_URL, UNCONFIGURED_PROJECT, AppSettings, Project

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Debian 12's Python 3.11 anyway
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/engagement-agent/agent.toml")
ENV_PREFIX = "ENGAGEMENT_AGENT_"
EX_CONFIG = 78


class ConfigError(Exception):
    """The configuration is unusable; `problems` are `(dotted key, reason)` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{key}: {reason}" for key, reason in problems]
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  " + "\n  ".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectConfig(_Section):
    project_token: Annotated[str, Field(min_length=1)]
    authorization_token: Annotated[str, Field(min_length=1)]
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")] = DEFAULT_BASE_URL

    def to_project(self) -> Project:
        return Project(self.project_token, self.authorization_token, self.base_url.rstrip("/"))


MappingConfig = dict[Literal[EVENT_TYPES], list[ProjectConfig]]  # type: ignore[valid-type]


class AppConfig(_Section):
    """Keys allowed in `[apps.defaults]` and, with `project`/`allowed_uids`, in `[apps.<app>]`."""

    application_id: Annotated[str, Field(min_length=1, max_length=256)] = "default-application"
    session_timeout: Annotated[float, Field(ge=1.0)] = 20.0
    automatic_session_tracking: bool = True
    token_track_frequency: Literal["on_token_change", "every_launch", "daily"] = (
        "on_token_change"
    )
    push_token_format: Literal["notification_state", "customer_property"] = "notification_state"
    allow_default_customer_properties: bool = True
    default_properties: dict[str, Any] = {}
    app_version: str | None = None
    project: ProjectConfig | None = None
    mapping: MappingConfig | None = None
    allowed_uids: list[Annotated[int, Field(ge=0)]] | None = None


class AppsConfig(_Section):
    model_config = ConfigDict(extra="allow", frozen=True)

    allow_unknown: bool = True
    defaults: AppConfig = AppConfig()

    @model_validator(mode="after")
    def _check_apps(self) -> AppsConfig:
        extra = self.__pydantic_extra__ or {}
        for name, value in list(extra.items()):
            if not is_valid_app_name(name):
                raise ValueError(f"app name {name!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
            if isinstance(value, Mapping):
                merged = {**self.defaults.model_dump(exclude_unset=True), **value}
                extra[name] = AppConfig.model_validate(merged)
            elif not isinstance(value, AppConfig):
                raise ValueError(f"[apps.{name}] must be a table")
        return self

    def named(self) -> dict[str, AppConfig]:
        return dict(self.__pydantic_extra__ or {})


class QueueConfig(_Section):
    path: Path = Path("/var/lib/engagement-agent/queue.db")
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


class MqttConfig(_Section):
    enabled: bool = True
    host: str = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    protocol: Literal[3, 5] = 5
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: Annotated[str, Field(pattern=r"^[^#+\s]+$")] = "engagement"
    client_id: str = ""
    keepalive: Annotated[int, Field(ge=5, le=65535)] = 60
    #: How long the broker keeps our session (and queues commands) while we are away (MQTT 5).
    session_expiry: Annotated[int, Field(ge=60)] = 7 * 24 * 3600
    #: Unacknowledged messages the broker may push at us at once (MQTT 5 Receive Maximum).
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 1000


class SocketConfig(_Section):
    path: Path = Path("/run/engagement-agent/agent.sock")
    mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = "0660"
    max_connections: Annotated[int, Field(ge=1)] = 256


class LimitsConfig(_Section):
    max_command_bytes: Annotated[int, Field(ge=1024)] = 65536


class AgentConfig(_Section):
    device_id: Annotated[str, Field(pattern=r"^[^#+/\s]+$")] = Field(
        default_factory=lambda: socket.gethostname() or "localhost"
    )
    device_type: str = "kiosk"
    device_uuid: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    project: ProjectConfig | None = None
    mapping: MappingConfig = {}
    apps: AppsConfig = AppsConfig()
    queue: QueueConfig = QueueConfig()
    sync: SyncConfig = SyncConfig()
    mqtt: MqttConfig = MqttConfig()
    socket: SocketConfig = SocketConfig()
    limits: LimitsConfig = LimitsConfig()

    @field_validator("device_uuid")
    @classmethod
    def _uuid_shape(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    def app_config(self, app: str) -> AppConfig | None:
        """The merged config of `app`, or None if it is unknown and unknown apps are refused."""
        named = self.apps.named()
        if app in named:
            return named[app]
        return self.apps.defaults if self.apps.allow_unknown else None

    def app_settings(self, app: str) -> AppSettings | None:
        app_config = self.app_config(app)
        if app_config is None:
            return None
        default_project = self.project.to_project() if self.project else UNCONFIGURED_PROJECT
        project = app_config.project.to_project() if app_config.project else default_project
        mapping_source = app_config.mapping if app_config.mapping is not None else self.mapping
        mapping = {
            event_type: tuple(p.to_project() for p in projects)
            for event_type, projects in mapping_source.items()
        }
        return AppSettings(
            project=project,
            mapping=mapping,
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
        """Every project the config names, for looking up credentials at send time."""
        found: list[Project] = []
        configs = [self.apps.defaults, *self.apps.named().values()]
        if self.project:
            found.append(self.project.to_project())
        for projects in self.mapping.values():
            found.extend(p.to_project() for p in projects)
        for app_config in configs:
            if app_config.project:
                found.append(app_config.project.to_project())
            for projects in (app_config.mapping or {}).values():
                found.extend(p.to_project() for p in projects)
        return found


def _parse_env_value(raw: str) -> Any:
    """Env values are TOML values when they parse as one, else plain strings (SPEC §11)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            continue
        target = data
        for part in path[:-1]:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                nxt = target[part] = {}
            target = nxt
        target[path[-1]] = _parse_env_value(raw)


def _resolve_files(data: Any, path: tuple[str, ...], problems: list[tuple[str, str]]) -> Any:
    """Replace `<key>_file` entries by `<key>` holding the file's text (one newline stripped).

    Paths may use `%d`, expanded to `$CREDENTIALS_DIRECTORY` like systemd's `LoadCredential=`.
    TLS keys (`ca_file`, `cert_file`, `key_file`) are paths by nature and stay as they are.
    """
    if isinstance(data, list):
        return [_resolve_files(item, (*path, str(i)), problems) for i, item in enumerate(data)]
    if not isinstance(data, dict):
        return data
    result: dict[str, Any] = {}
    for key, value in data.items():
        if (
            key.endswith("_file")
            and key not in ("ca_file", "cert_file", "key_file")
            and isinstance(value, str)
        ):
            target = key[: -len("_file")]
            dotted = ".".join((*path, key))
            file_path = value.replace("%d", os.environ.get("CREDENTIALS_DIRECTORY", "%d"))
            try:
                text = Path(file_path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append((dotted, f"cannot read {file_path}: {exc.__class__.__name__}"))
                continue
            if target in data:
                problems.append((dotted, f"give either {target} or {key}, not both"))
                continue
            result[target] = text.removesuffix("\n")
        else:
            result[key] = _resolve_files(value, (*path, key), problems)
    return result


def _problems_from(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in err["loc"] if not str(part).startswith("function-")]
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        problems.append((".".join(loc) or "(config)", reason))
    return problems


def default_config_path() -> Path | None:
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def default_state_paths() -> tuple[Path, Path]:
    """Queue and socket paths for a config that does not name them.

    Under systemd: `$STATE_DIRECTORY` / `$RUNTIME_DIRECTORY`. As root without them: the FHS
    paths of the packaged unit. As anyone else: XDG directories, so a first try just works.
    """
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not state:
        if os.geteuid() == 0:
            state = "/var/lib/engagement-agent"
        else:
            base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
            state = str(Path(base) / "engagement-agent")
    if not runtime:
        if os.geteuid() == 0:
            runtime = "/run/engagement-agent"
        else:
            base = os.environ.get("XDG_RUNTIME_DIR") or state
            runtime = str(Path(base) / "engagement-agent") if base != state else state
    return Path(state) / "queue.db", Path(runtime) / "agent.sock"


def load_config(
    path: Path | None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Read, merge and validate the configuration; raises `ConfigError` with every problem."""
    environ = os.environ if environ is None else environ
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
    _apply_env(data, environ)
    problems: list[tuple[str, str]] = []
    data = _resolve_files(data, (), problems)
    queue_path, socket_path = default_state_paths()
    data.setdefault("queue", {}).setdefault("path", str(queue_path))
    data.setdefault("socket", {}).setdefault("path", str(socket_path))
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from(exc))
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return config
