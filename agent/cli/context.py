"""What every verb needs: exit codes, the one-line error type, and the resolved global options.

The config is loaded lazily: `--socket` alone must work without reading (or being allowed to
read) the agent's config, and pydantic is only imported when a config is actually needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.client import Client, Reply, default_socket_path

if TYPE_CHECKING:
    from agent.config import AgentConfig

PROG = "engagement-agent"

EX_OK = 0
EX_REJECTED = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CONFIG = 78  # == agent.config.EX_CONFIG, not imported so that --socket needs no pydantic


class CliError(Exception):
    """Ends the command: `main` prints `engagement-agent: <message>` (one line) and exits."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def config_error(exc: Exception, source: str) -> CliError:
    """A `ConfigError` as one line; `check-config` is where every problem is listed in full."""
    problems = getattr(exc, "problems", [])
    summary = "; ".join(f"{key}: {reason}" for key, reason in problems) or str(exc)
    return CliError(
        f"invalid configuration in {source}: {summary} (see: {PROG} check-config)", EX_CONFIG
    )


@dataclass(frozen=True)
class Options:
    """The global options after argparse, wherever on the command line they were given."""

    socket: Path | None
    config: Path | None
    json: bool
    timeout: float | None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> Options:
        return cls(
            socket=getattr(ns, "socket", None),
            config=getattr(ns, "config", None),
            json=bool(getattr(ns, "json", False)),
            timeout=getattr(ns, "timeout", None),
        )

    def config_path(self) -> Path | None:
        """`--config`, else the system config if it exists, else None (built-in defaults)."""
        from agent.config import default_config_path

        return self.config if self.config is not None else default_config_path()

    def load_config(self) -> AgentConfig:
        from agent.config import ConfigError, load_config

        path = self.config_path()
        try:
            return load_config(path)
        except ConfigError as exc:
            raise config_error(exc, str(path) if path else "built-in defaults") from None

    def socket_path(self) -> Path:
        """`--socket`, else found as `agent.client.Client` finds it (without reading the
        config when the system one exists but this user may not read it)."""
        if self.socket is not None:
            return self.socket
        from agent.config import ConfigError

        try:
            return default_socket_path(self.config)
        except ConfigError as exc:
            source = self.config_path()
            raise config_error(exc, str(source) if source else "built-in defaults") from None

    def client(self, default_timeout: float) -> Client:
        """A client for the agent; `--timeout` wins over the verb's own default."""
        timeout = self.timeout if self.timeout is not None else default_timeout
        return Client(self.socket_path(), timeout=timeout)


def exit_code(reply: Reply) -> int:
    """0, or 1 for a rejection — except `unavailable` (shutting down, disk full), which is
    69 like an agent that is not there: a script should retry it later, not drop it."""
    if reply.ok:
        return EX_OK
    return EX_UNAVAILABLE if reply.error.get("code") == "unavailable" else EX_REJECTED


def error_line(error: Mapping[str, Any]) -> str:
    code = error.get("code", "error")
    message = error.get("message", "")
    return f"rejected ({code}): {message}" if message else f"rejected ({code})"


def positive_float(text: str) -> float:
    """An argparse type: a number > 0 (its ValueError becomes a usage error, exit 64)."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def write_line(text: str) -> None:
    sys.stdout.write(text + "\n")


def write_json(document: Any) -> None:
    import json

    write_line(json.dumps(document, separators=(",", ":"), ensure_ascii=False))
