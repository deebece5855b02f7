"""Configuration loading: every problem with its key path, env overrides, `*_file` secrets,
defaults for a first try and under systemd (docs/configuration.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import (
    EX_CONFIG,
    AgentConfig,
    ConfigError,
    default_state_paths,
    load_config,
)

BASE_ENV = {"HOME": "/home/someone"}


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {**BASE_ENV, **(env or {})})
    found = dict(info.value.problems)
    assert len(found) == len(info.value.problems), "a key is reported twice"
    return found


def test_exit_code_constant() -> None:
    assert EX_CONFIG == 78


def test_defaults_without_file() -> None:
    config = load_config(None, BASE_ENV)
    assert isinstance(config, AgentConfig)
    assert config.sync.batch_size == 50
    assert config.apps.allow_unknown
    assert config.app_settings("anything") is not None
    assert config.device_id


def test_every_problem_listed_with_its_path(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        bogus = 1
        [sync]
        flush_mode = "often"
        batch_size = 51
        max_backoff = 0.5
        [queue]
        max_bytes = 1000
        [limits]
        max_command_bytes = 10
        [apps.defaults]
        session_timeout = 0.5
        [apps.kiosk-ui]
        session_timeout = 0
        colour = "red"
        [apps.Bad_Name]
        [apps.x]
        project = { project_token = "p" }
        [mapping]
        paymnt = []
        """,
    )
    assert set(found) == {
        "bogus",
        "sync.flush_mode",
        "sync.batch_size",
        "sync.max_backoff",
        "queue.max_bytes",
        "limits.max_command_bytes",
        "apps.defaults.session_timeout",
        "apps.kiosk-ui.session_timeout",
        "apps.kiosk-ui.colour",
        "apps.Bad_Name",
        "apps.x.project.authorization_token",
        "mapping.paymnt",
    }
    assert found["bogus"] == "unknown key"
    assert found["apps.kiosk-ui.colour"] == "unknown key"
    assert "invalid app name" in found["apps.Bad_Name"]
    assert "unknown event type" in found["mapping.paymnt"]


def test_str_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "[sync]\nbatch_size = 0\n[apps.kiosk-ui]\nsession_timeout = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, BASE_ENV)
    text = str(info.value)
    assert text.splitlines()[0] == f"invalid configuration in {path}:"
    assert "  sync.batch_size: " in text
    assert "  apps.kiosk-ui.session_timeout: " in text


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", BASE_ENV)
    assert info.value.problems[0][0] == "(file)"
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "a = "), BASE_ENV)


def test_app_tables_merge_over_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [project]
        project_token = "main"
        authorization_token = "k"
        [apps]
        allow_unknown = false
        [apps.defaults]
        session_timeout = 45
        application_id = "fleet"
        [apps.kiosk-ui]
        automatic_session_tracking = false
        allowed_uids = [1001]
        [apps."pos.v2"]
        session_timeout = 5
        """,
    )
    config = load_config(path, BASE_ENV)
    kiosk = config.app_config("kiosk-ui")
    assert kiosk is not None
    assert kiosk.session_timeout == 45
    assert kiosk.application_id == "fleet"
    assert not kiosk.automatic_session_tracking
    assert kiosk.allowed_uids == [1001]
    pos = config.app_settings("pos.v2")
    assert pos is not None and pos.session_timeout == 5 and pos.application_id == "fleet"
    assert pos.project.project_token == "main"
    assert config.app_config("other") is None
    assert set(config.apps.named()) == {"kiosk-ui", "pos.v2"}


def test_minimums_and_values(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        device_id = "all"
        [mqtt]
        topic_prefix = "/engagement/"
        key_file = "/k"
        [socket]
        mode = "0400"
        [apps.defaults]
        default_properties = { when = 1979-05-27, x = nan }
        """,
    )
    assert set(found) == {
        "device_id",
        "mqtt.topic_prefix",
        "mqtt.key_file",
        "socket.mode",
        "apps.defaults.default_properties",
    }


def test_socket_mode_is_octal(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[socket]\nmode = "660"\n'), BASE_ENV)
    assert config.socket.mode == "0660"
    assert config.socket.mode_bits == 0o660
    found = problems(tmp_path, "[socket]\nmode = 0o660\n")
    assert "octal" in found["socket.mode"]
    assert "socket.mode" in problems(tmp_path, '[socket]\nmode = "0999"\n')


def test_socket_limits_defaults_bounds_and_env(tmp_path: Path) -> None:
    socket_config = load_config(None, BASE_ENV).socket
    assert socket_config.idle_timeout == 300.0
    assert socket_config.max_connections_per_uid == 32
    assert socket_config.max_pending_reply_bytes == 1048576
    found = problems(
        tmp_path,
        """
        [socket]
        idle_timeout = 0.5
        max_connections = 5000
        max_connections_per_uid = 0
        max_pending_reply_bytes = 1024
        """,
    )
    assert set(found) == {
        "socket.idle_timeout",
        "socket.max_connections",
        "socket.max_connections_per_uid",
        "socket.max_pending_reply_bytes",
    }
    # One account may not be owed more than 32 MiB of unread replies in all.
    found = problems(tmp_path, "[socket]\nmax_connections_per_uid = 64\n")
    assert "max_connections_per_uid × max_pending_reply_bytes" in found["socket"]
    # Every connection may hold a partial line: 16 MiB of them at most in all.
    found = problems(tmp_path, "[limits]\nmax_command_bytes = 131072\n")
    assert (
        "socket.max_connections (256) × limits.max_command_bytes (131072) is 33554432 bytes"
        in found["limits.max_command_bytes"]
    )
    path = write(
        tmp_path, "[limits]\nmax_command_bytes = 131072\n[socket]\nmax_connections = 128\n"
    )
    assert load_config(path, BASE_ENV).limits.max_command_bytes == 131072
    env = {
        **BASE_ENV,
        "ENGAGEMENT_AGENT_SOCKET__IDLE_TIMEOUT": "30",
        "ENGAGEMENT_AGENT_SOCKET__MAX_CONNECTIONS_PER_UID": "64",
        "ENGAGEMENT_AGENT_SOCKET__MAX_PENDING_REPLY_BYTES": "262144",
    }
    socket_config = load_config(None, env).socket
    assert socket_config.idle_timeout == 30.0
    assert socket_config.max_connections_per_uid == 64
    assert socket_config.max_pending_reply_bytes == 262144


def test_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[sync]\nflush_mode = "period"\n[apps.kiosk-ui]\nsession_timeout = 9\n')
    env = {
        **BASE_ENV,
        "ENGAGEMENT_AGENT_DEVICE_ID": "042",  # TOML int, but a string key: taken as text
        "ENGAGEMENT_AGENT_SYNC__FLUSH_MODE": "manual",
        "ENGAGEMENT_AGENT_SYNC__BATCH_SIZE": "10",
        "ENGAGEMENT_AGENT_APPS__DEFAULTS__SESSION_TIMEOUT": "30.5",
        "ENGAGEMENT_AGENT_APPS__KIOSK_UI__APPLICATION_ID": "kiosk",
        "ENGAGEMENT_AGENT_MQTT__ENABLED": "false",
        "ENGAGEMENT_AGENT_MQTT__PASSWORD": "1234",
        "ENGAGEMENT_AGENT_PROJECT": '{project_token = "p", authorization_token = "a"}',
        "ENGAGEMENT_AGENT_PROJECT__BASE_URL": "https://api.eu1.exponea.com",
        "ENGAGEMENT_AGENT_APPS__DEFAULTS__DEFAULT_PROPERTIES": '{site = "berlin"}',
        "OTHER": "ignored",
    }
    config = load_config(path, env)
    assert config.device_id == "042"
    assert config.sync.flush_mode == "manual"
    assert config.sync.batch_size == 10
    assert config.apps.defaults.session_timeout == 30.5
    kiosk = config.app_config("kiosk-ui")
    assert kiosk is not None and kiosk.application_id == "kiosk" and kiosk.session_timeout == 9
    assert not config.mqtt.enabled
    assert config.mqtt.password == "1234"
    assert config.project is not None
    assert config.project.base_url == "https://api.eu1.exponea.com"
    assert config.apps.defaults.default_properties == {"site": "berlin"}


def test_env_problems_name_the_variable(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "",
        {"ENGAGEMENT_AGENT_SYNC__BATCH_SIZE": "500", "ENGAGEMENT_AGENT_SYNK__X": "1"},
    )
    assert found["sync.batch_size"].endswith("(from ENGAGEMENT_AGENT_SYNC__BATCH_SIZE)")
    assert found["synk"] == "unknown key (from ENGAGEMENT_AGENT_SYNK__X)"


def test_env_app_name_ambiguous(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[apps.a-b]\n[apps."a.b"]\n',
        {"ENGAGEMENT_AGENT_APPS__A_B__SESSION_TIMEOUT": "5"},
    )
    assert "more than one app" in found["ENGAGEMENT_AGENT_APPS__A_B__SESSION_TIMEOUT"]


def test_secret_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n\n")
    (tmp_path / "mqtt-pass").write_text("pw\n")
    (tmp_path / "app-token").write_text("app\n")
    path = write(
        tmp_path,
        f"""
        [project]
        project_token = "p"
        authorization_token_file = "token"
        [[mapping.payment]]
        project_token = "m"
        authorization_token_file = "{tmp_path / "token"}"
        [mqtt]
        password_file = "mqtt-pass"
        [apps.kiosk-ui.project]
        project_token = "k"
        authorization_token_file = "app-token"
        [[apps.kiosk-ui.mapping.banner]]
        project_token = "b"
        authorization_token_file = "app-token"
        """,
    )
    config = load_config(path, BASE_ENV)
    assert config.project is not None
    assert config.project.authorization_token == "s3cret\n"  # exactly one newline stripped
    assert config.mapping["payment"][0].authorization_token == "s3cret\n"
    assert config.mqtt.password == "pw"
    settings = config.app_settings("kiosk-ui")
    assert settings is not None
    assert settings.project.authorization_token == "app"
    assert settings.mapping["banner"][0].authorization_token == "app"


def test_secret_files_from_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api").write_text("from-creds\n")
    (creds / "mqtt").write_text("mq")
    path = write(
        tmp_path,
        """
        [project]
        project_token = "p"
        authorization_token_file = "%d/api"
        [mqtt]
        password_file = "mqtt"
        """,
    )
    config = load_config(path, {**BASE_ENV, "CREDENTIALS_DIRECTORY": str(creds)})
    assert config.project is not None and config.project.authorization_token == "from-creds"
    assert config.mqtt.password == "mq"
    found = problems(tmp_path, path.read_text())
    assert "CREDENTIALS_DIRECTORY" in found["project.authorization_token_file"]


def test_secret_file_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [project]
        project_token = "p"
        authorization_token = "a"
        authorization_token_file = "x"
        [[mapping.install]]
        project_token = "q"
        authorization_token_file = "missing"
        [sync]
        password_file = "x"
        """,
    )
    assert set(found) == {
        "project.authorization_token_file",
        "mapping.install[0].authorization_token_file",
        "sync.password_file",
    }
    assert "not both" in found["project.authorization_token_file"]
    assert "cannot read" in found["mapping.install[0].authorization_token_file"]
    assert found["sync.password_file"] == "unknown key"


def test_tls_files_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    found = problems(
        tmp_path,
        '[mqtt]\ntls = true\nca_file = "ca.pem"\ncert_file = "nope.pem"\n[sync]\nbatch_size = 0',
    )
    assert set(found) == {"mqtt.cert_file", "sync.batch_size"}
    config = load_config(write(tmp_path, '[mqtt]\ntls = true\nca_file = "ca.pem"\n'), BASE_ENV)
    assert config.mqtt.ca_file == tmp_path / "ca.pem"
    # Without TLS the files are not needed.
    load_config(write(tmp_path, '[mqtt]\ncert_file = "nope.pem"\n'), BASE_ENV)


def test_default_paths_first_try_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/1000"}
    config = load_config(None, env)
    assert config.queue.path == tmp_path / ".local/state/engagement-agent/queue.db"
    assert config.socket.path == Path("/run/user/1000/engagement-agent/agent.sock")
    env = {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "st")}
    config = load_config(None, env)
    assert config.queue.path == tmp_path / "st/engagement-agent/queue.db"
    assert config.socket.path == tmp_path / "st/engagement-agent/agent.sock"


def test_default_paths_under_systemd_and_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    env = {"HOME": "/h", "STATE_DIRECTORY": "/var/lib/ea", "RUNTIME_DIRECTORY": "/run/ea"}
    config = load_config(None, env)
    assert config.queue.path == Path("/var/lib/ea/queue.db")
    assert config.socket.path == Path("/run/ea/agent.sock")
    assert default_state_paths({"HOME": "/h"}, system=True) == (
        Path("/var/lib/engagement-agent/queue.db"),
        Path("/run/engagement-agent/agent.sock"),
    )


def test_relative_paths_live_in_state_and_runtime_dirs(tmp_path: Path) -> None:
    env = {**BASE_ENV, "STATE_DIRECTORY": "/var/lib/ea", "RUNTIME_DIRECTORY": "/run/ea"}
    config = load_config(write(tmp_path, '[queue]\npath = "q.db"\n[socket]\npath = "s"\n'), env)
    assert config.queue.path == Path("/var/lib/ea/q.db")
    assert config.socket.path == Path("/run/ea/s")


def test_known_projects(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [project]
            project_token = "a"
            authorization_token = "k"
            [[mapping.payment]]
            project_token = "b"
            authorization_token = "k"
            [apps.kiosk.project]
            project_token = "c"
            authorization_token = "k"
            """,
        ),
        BASE_ENV,
    )
    assert {p.project_token for p in config.known_projects()} == {"a", "b", "c"}


def test_clock_section_defaults_and_limits(tmp_path: Path) -> None:
    clock = load_config(None, BASE_ENV).clock
    assert (clock.hold_unsynced, clock.max_hold, clock.min_correction, clock.max_skew) == (
        True,
        21600.0,
        5.0,
        120.0,
    )
    found = problems(
        tmp_path,
        """
        [clock]
        hold_unsynced = "maybe"
        max_hold = -1
        min_correction = 0
        """,
    )
    assert set(found) == {"clock.hold_unsynced", "clock.max_hold", "clock.min_correction"}
    env = {**BASE_ENV, "ENGAGEMENT_AGENT_CLOCK__HOLD_UNSYNCED": "false"}
    assert not load_config(None, env).clock.hold_unsynced


NAMED = """
[project]
project_token = "main"
authorization_token = "main-key"

[projects.payments]
project_token = "pay"
authorization_token_file = "pay-key"
base_url = "https://api-payments.example.com/"

[projects.eu-shop]
project_token = "eu"
authorization_token = "eu-key"
base_url = "https://api.eu1.exponea.com"

[mapping]
payment = ["payments", "default"]

[apps.kiosk-ui]
project = "eu-shop"
mapping = { banner = ["payments", { project_token = "inline", authorization_token = "i" }] }
projects = ["payments"]

[apps.pos]
"""


def test_named_projects_stand_wherever_a_project_is_expected(tmp_path: Path) -> None:
    (tmp_path / "pay-key").write_text("pay-secret\n")
    config = load_config(write(tmp_path, NAMED), BASE_ENV)
    named = config.named_projects()
    assert set(named) == {"default", "payments", "eu-shop"}
    pay = named["payments"]
    assert (pay.project_token, pay.authorization_token, pay.base_url) == (
        "pay",
        "pay-secret",  # *_file works inside a named project
        "https://api-payments.example.com",
    )
    pos = config.app_settings("pos")
    assert pos is not None
    assert pos.project == named["default"]
    assert pos.mapping["payment"] == (pay, named["default"])
    kiosk = config.app_settings("kiosk-ui")
    assert kiosk is not None
    assert kiosk.project == named["eu-shop"]
    assert [p.project_token for p in kiosk.mapping["banner"]] == ["pay", "inline"]
    tokens = {p.project_token for p in config.known_projects()}
    assert tokens == {"main", "pay", "eu", "inline"}


def test_catalog_of_configured_projects_and_apps_projects(tmp_path: Path) -> None:
    (tmp_path / "pay-key").write_text("pay-secret")
    config = load_config(write(tmp_path, NAMED), BASE_ENV)
    pos = config.app_settings("pos")
    kiosk = config.app_settings("kiosk-ui")
    assert pos is not None and kiosk is not None
    # Every project the config names anywhere is configured, an app's inline one included.
    configured = {key[1] for key in pos.catalog.configured}
    assert configured == {"main", "pay", "eu", "inline"}
    assert pos.catalog.allowed is None  # default: every configured project
    assert kiosk.catalog.allowed == {config.named_projects()["payments"].key}
    assert set(kiosk.catalog.named) == {"default", "payments", "eu-shop"}


def test_projects_default_is_the_project(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[projects.default]\nproject_token = "d"\nauthorization_token = "k"\n'
            '[mapping]\ninstall = ["default"]\n',
        ),
        BASE_ENV,
    )
    assert config.project is not None and config.project.project_token == "d"
    settings = config.app_settings("x")
    assert settings is not None and settings.project.project_token == "d"


def test_project_name_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [project]
        project_token = "main"
        authorization_token = "k"
        [projects.default]
        project_token = "other"
        authorization_token = "k"
        [projects.Bad_Name]
        project_token = "b"
        authorization_token = "k"
        [projects.ok]
        project_token = "ok"
        [mapping]
        payment = ["paymnts", 5]
        [apps.kiosk]
        project = "nope"
        projects = ["default", "missing"]
        mapping = { install = ["gone"] }
        """,
    )
    assert set(found) == {
        "projects.default",
        "projects.Bad_Name",
        "projects.ok.authorization_token",
        "mapping.payment[0]",
        "mapping.payment[1]",
        "apps.kiosk.project",
        "apps.kiosk.projects[1]",
        "apps.kiosk.mapping.install[0]",
    }
    assert "only one" in found["projects.default"]
    assert "invalid project name" in found["projects.Bad_Name"]
    assert found["mapping.payment[0]"].startswith("unknown project 'paymnts' (configured: ")
    assert "project table or the name" in found["mapping.payment[1]"]


def test_unknown_project_name_without_any_project(tmp_path: Path) -> None:
    found = problems(tmp_path, '[mapping]\ninstall = ["default"]\n')
    assert found == {
        "mapping.install[0]": "unknown project 'default' (configured: none; "
        "add a [projects.<name>] table)"
    }


def test_one_project_has_one_authorization_token(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [project]
        project_token = "main"
        authorization_token = "k1"
        [projects.again]
        project_token = "main"
        authorization_token = "k2"
        base_url = "https://api.exponea.com/"
        [projects.same]
        project_token = "main"
        authorization_token = "k1"
        [projects.elsewhere]
        project_token = "main"
        authorization_token = "k3"
        base_url = "https://other.example.com"
        """,
    )
    assert found == {
        "projects.again": "same project_token and base_url as project "
        "but a different authorization_token"
    }


def test_named_project_env_override(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, NAMED.replace('authorization_token_file = "pay-key"', "")),
        {
            **BASE_ENV,
            "ENGAGEMENT_AGENT_PROJECTS__EU_SHOP__AUTHORIZATION_TOKEN": "from-env",
            "ENGAGEMENT_AGENT_PROJECTS__PAYMENTS__AUTHORIZATION_TOKEN": "pay-env",
        },
    )
    named = config.named_projects()
    assert named["eu-shop"].authorization_token == "from-env"
    assert named["payments"].authorization_token == "pay-env"


def test_max_apps(tmp_path: Path) -> None:
    assert load_config(None, BASE_ENV).apps.max_apps == 64
    config = load_config(write(tmp_path, "[apps]\nmax_apps = 3\n[apps.kiosk]\n"), BASE_ENV)
    assert config.apps.max_apps == 3
    assert set(config.apps.named()) == {"kiosk"}  # a reserved name, not an app
    assert set(problems(tmp_path, "[apps]\nmax_apps = 0\n")) == {"apps.max_apps"}
    found = problems(tmp_path, "[apps.max_apps]\nsession_timeout = 5\n")
    assert set(found) == {"apps.max_apps"}
