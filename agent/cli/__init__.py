"""`engagement-agent`: the daemon's command line (docs/cli.md).

`main` is the console script. Verbs other than `run` talk to the agent over its socket, and
import neither the daemon nor the MQTT/HTTP stacks, so they start quickly.
"""

from __future__ import annotations

from agent.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
