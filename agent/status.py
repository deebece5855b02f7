"""The status document (socket `status`, CLI `status`, the retained MQTT status topic) and the
one-line summary systemd shows; pure: the daemon gathers the parts, this module shapes them.

The fields are documented in docs/protocol.md ("status"); the MQTT side decides when to
republish it (`agent/mqtt/status.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.store import QueueStats
from agent.tracker.model import AppState


@dataclass(frozen=True)
class ConfigState:
    """Where the running config came from and how reloads went."""

    path: str | None
    generation: int
    loaded_at: float
    reload_error: str | None


def build_status(
    *,
    version: str,
    device_id: str,
    uptime: float,
    as_of: float,
    queue: QueueStats,
    recovered: Sequence[Mapping[str, Any]],
    sync: Mapping[str, Any],
    clock: Mapping[str, Any],
    mqtt: Mapping[str, Any],
    config: ConfigState,
    apps: Mapping[str, AppState],
    commands: Mapping[str, Mapping[str, int]],
) -> dict[str, Any]:
    return {
        "online": True,
        "version": version,
        "device_id": device_id,
        "uptime": round(uptime, 3),
        # The device's wall-clock time when this document was made: `queue.oldest_age` and
        # `uptime` are as of then, which tells a reader of the retained copy how old they are.
        "as_of": round(as_of, 3),
        "queue": {
            "items": queue.items,
            "bytes": queue.bytes,
            "max_bytes": queue.max_bytes,
            "dropped": queue.dropped,
            "rejected": queue.rejected,
            "dead_letters": queue.dead_letters,
            "oldest_age": queue.oldest_age,
            "recovered": [dict(entry) for entry in recovered],
        },
        "sync": dict(sync),
        "clock": dict(clock),
        "mqtt": dict(mqtt),
        "commands": {transport: dict(counts) for transport, counts in commands.items()},
        "config": {
            "path": config.path,
            "generation": config.generation,
            "loaded_at": config.loaded_at,
            "reload_error": config.reload_error,
        },
        "apps": {
            app: {
                # No customer ids: the status is retained on the broker for anyone who may
                # subscribe; `get_customer` is each app's way to read its own.
                "session": state.session,
                "push_token_tracked_at": state.push_token_tracked_at,
            }
            for app, state in sorted(apps.items())
        },
    }


def status_line(status: Mapping[str, Any]) -> str:
    """`systemctl status` shows this (sd_notify STATUS=): queue, sync states, MQTT link."""
    queue = status["queue"]
    states = [project["state"] for project in status["sync"].get("projects", [])]
    sync = ",".join(sorted(set(states))) or "idle"
    mqtt = "up" if status["mqtt"].get("connected") else "down"
    return f"queue {queue['items']} items / {queue['bytes']} bytes; sync {sync}; mqtt {mqtt}"


__all__ = ["ConfigState", "build_status", "status_line"]
