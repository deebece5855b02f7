"""Values the tracking core consumes and produces. No I/O here and none in the core.

The daemon resolves configuration into `AppSettings` and `DeviceInfo`, keeps one `AppState`
per app (persisted as JSON by the store), and hands every command to the core together with a
`Context` (accept time and a UUID source). The core answers with an `Outcome`: the app's next
state, the items to queue (already fanned out per project), the reply's result, and when to
wake it for a session timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

DEFAULT_BASE_URL = "https://api.exponea.com"

SessionState = Literal["none", "active", "background"]
TokenType = Literal["fcm", "hms"]


@dataclass(frozen=True)
class Project:
    """Where items go. Items are keyed by (base_url, project_token); the authorization token is
    looked up at send time, so a corrected key also delivers what was queued under a wrong one.

    A `project_token` of "" is the default project before one is configured: items wait for it.
    """

    project_token: str
    authorization_token: str
    base_url: str = DEFAULT_BASE_URL
    #: (base URL without a trailing slash, project token): how the queue and the config name
    #: the project. Computed once: every queued item looks it up.
    key: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.base_url.rstrip("/"), self.project_token))


UNCONFIGURED_PROJECT = Project(project_token="", authorization_token="")

ProjectKey = tuple[str, str]


@dataclass(frozen=True)
class ProjectCatalog:
    """The projects the config names, as one app may choose them with `anonymize`.

    Apps may only send where the device's owner configured (docs/tracking.md, "Projects"):
    `named` are `[projects.<name>]` (and `default` for `[project]`), `configured` every
    project the config names anywhere (named, apps' own, mapping entries). `allowed` narrows
    what this app may switch to (`apps.<app>.projects`); None means every configured project.
    The projects the app's config sends to (its project, its mapping's) are always allowed,
    whatever `allowed` says.
    """

    named: Mapping[str, Project] = field(default_factory=dict)
    configured: Mapping[ProjectKey, Project] = field(default_factory=dict)
    allowed: frozenset[ProjectKey] | None = None


@dataclass(frozen=True)
class AppSettings:
    """One app's configuration after `[apps.defaults]` and `[apps.<app>]` are merged."""

    project: Project
    mapping: Mapping[str, tuple[Project, ...]] = field(default_factory=dict)
    catalog: ProjectCatalog = field(default_factory=ProjectCatalog)
    application_id: str = "default-application"
    session_timeout: float = 20.0
    automatic_session_tracking: bool = True
    token_track_frequency: Literal["on_token_change", "every_launch", "daily"] = "on_token_change"
    push_token_format: Literal["notification_state", "customer_property"] = "notification_state"
    allow_default_customer_properties: bool = True
    default_properties: Mapping[str, Any] = field(default_factory=dict)
    app_version: str | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """Device properties added to session, installation and payment events (docs/tracking.md)."""

    device_uuid: str
    os_name: str = "Linux"
    os_version: str = ""
    sdk: str = "engagement-agent"
    sdk_version: str = ""
    device_model: str = ""
    device_type: str = "kiosk"


class Context(NamedTuple):
    """What the core may not fetch itself: the command's accept time and fresh UUID4 strings.

    Context, `OutboundItem` and `Outcome` are made once or more per command: named tuples are
    as immutable as frozen dataclasses and built several times faster (a frozen dataclass
    sets each field through `object.__setattr__`)."""

    now: float
    new_uuid: Callable[[], str]


class OutboundItem(NamedTuple):
    """One batch command for one project: `payload` is `{"name": ..., "data": {...}}`."""

    project: Project
    event_type: str
    payload: Mapping[str, Any]


class SwitchTarget(BaseModel):
    """One project of a `ProjectSwitch`, by key (base URL without a trailing slash)."""

    model_config = ConfigDict(frozen=True)

    project_token: str
    base_url: str = DEFAULT_BASE_URL


class ProjectSwitch(BaseModel):
    """A project/mapping chosen by `anonymize`, valid while the config's own choice is unchanged.

    Projects are named by `project_token` and `base_url` only: the state is persisted, and no
    credential is ever written to disk; they are looked up in the current config. (A field
    `authorization_token` in a state written by an older version is ignored, and dropped the
    next time the state is saved.)
    """

    model_config = ConfigDict(frozen=True)

    project_token: str
    base_url: str = DEFAULT_BASE_URL
    mapping: dict[str, list[SwitchTarget]] = {}
    config_fingerprint: str = ""


class AppState(BaseModel):
    """Everything the SDK would persist for one app; stored as JSON in the database."""

    model_config = ConfigDict(frozen=True)

    cookie: str | None = None
    ids: dict[str, str] = {}
    installed: bool = False
    session: SessionState = "none"
    session_started_at: float | None = None
    background_at: float | None = None
    in_foreground: bool = False
    runtime_default_properties: dict[str, Any] = {}
    push_token: str | None = None
    push_token_type: TokenType | None = None
    push_token_tracked: str | None = None
    push_token_tracked_at: float | None = None
    app_version: str | None = None
    project_switch: ProjectSwitch | None = None
    #: When the app's last tracking command happened (its own timestamp, else its accept time),
    #: kept while the app is in the foreground: where the session of an app that restarted
    #: without `app_background` ended.
    last_command_at: float | None = None


class Outcome(NamedTuple):
    """The core's answer to one command.

    `timer`: seconds from now after which the daemon must call `expire_session` for this app
    with `background_at` = `state.background_at`; None means no timer is wanted (cancel any).
    """

    state: AppState
    items: tuple[OutboundItem, ...] = ()
    result: Mapping[str, Any] | None = None
    timer: float | None = None
