"""What every verb needs: exit codes, the one-line error type, and the resolved global options.

The config is loaded lazily: `--socket` alone must work without reading (or being allowed to
read) the agent's config, and pydantic is only imported when a config is actually needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import AgentConfig

PROG = "engagement-agent"

EX_OK = 0
EX_REJECTED = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CONFIG = 78  # == agent.config.EX_CONFIG, not imported so that --socket needs no pydantic

#: Replies normally come within milliseconds; this only bounds a hung agent.
DEFAULT_TIMEOUT = 30.0
#: `flush --wait` uploads the whole backlog before answering.
FLUSH_WAIT_TIMEOUT = 600.0

#: Where the packaged agent listens (SocketConfig's default), used when the system config exists
#: but the caller may not read it (it holds secrets; app users only share the socket's group).
PACKAGED_SOCKET_PATH = Path("/run/engagement-agent/agent.sock")
SOCKET_PATH_ENV = "ENGAGEMENT_AGENT_SOCKET__PATH"


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
        if self.socket is not None:
            return self.socket
        if self.config is None:
            from agent.config import DEFAULT_CONFIG_PATH

            unreadable = DEFAULT_CONFIG_PATH.exists() and not os.access(
                DEFAULT_CONFIG_PATH, os.R_OK
            )
            if unreadable:
                return Path(os.environ.get(SOCKET_PATH_ENV) or PACKAGED_SOCKET_PATH)
        return self.load_config().socket.path

    def timeout_for(self, default: float) -> float:
        return self.timeout if self.timeout is not None else default


def write_line(text: str) -> None:
    sys.stdout.write(text + "\n")


def write_json(document: Any) -> None:
    import json

    write_line(json.dumps(document, separators=(",", ":"), ensure_ascii=False))
