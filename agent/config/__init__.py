"""The agent's configuration: `load_config()` turns the TOML file and the environment into an
`AgentConfig`, or raises `ConfigError` listing every problem.

Two jobs, two modules: `model` holds the sections as pydantic models (keys, defaults, checks on
values alone), `load` finds the values (file, `ENGAGEMENT_AGENT_*`, `*_file` secrets, default
paths) and reports problems against the keys the user wrote.

`DEFAULT_CONFIG_PATH` is deliberately not re-exported: `load` looks it up in its own module, so
code and tests that need the system config's path (or replace it) use `agent.config.load`.
"""

from __future__ import annotations

from agent.config.load import (
    EX_CONFIG,
    ConfigError,
    default_config_path,
    default_state_paths,
    load_config,
)
from agent.config.model import (
    MAX_SOCKET_CONNECTIONS,
    MAX_SOCKET_INPUT_BYTES,
    AgentConfig,
    AppConfig,
    AppsConfig,
    ClockConfig,
    LimitsConfig,
    MetricsConfig,
    MqttConfig,
    ProjectConfig,
    QueueConfig,
    SocketConfig,
    SyncConfig,
    socket_input_problem,
)

__all__ = [
    "EX_CONFIG",
    "MAX_SOCKET_CONNECTIONS",
    "MAX_SOCKET_INPUT_BYTES",
    "AgentConfig",
    "AppConfig",
    "AppsConfig",
    "ClockConfig",
    "ConfigError",
    "LimitsConfig",
    "MetricsConfig",
    "MqttConfig",
    "ProjectConfig",
    "QueueConfig",
    "SocketConfig",
    "SyncConfig",
    "default_config_path",
    "default_state_paths",
    "load_config",
    "socket_input_problem",
]
