"""The pure tracking core: the SDK's logic per app, with no I/O (see `core` and `model`).

The daemon calls `handle()` for every tracking command (and `get_customer`), `expire_session()`
when a session timer fires, and `pending_timer()` after a restart to re-arm timers.
"""

from __future__ import annotations

from agent.tracker.core import expire_session, handle, pending_timer
from agent.tracker.model import (
    UNCONFIGURED_PROJECT,
    AppSettings,
    AppState,
    Context,
    DeviceInfo,
    OutboundItem,
    Outcome,
    Project,
    ProjectCatalog,
    ProjectSwitch,
)
from agent.tracker.routing import config_fingerprint

__all__ = [
    "UNCONFIGURED_PROJECT",
    "AppSettings",
    "AppState",
    "Context",
    "DeviceInfo",
    "OutboundItem",
    "Outcome",
    "Project",
    "ProjectCatalog",
    "ProjectSwitch",
    "config_fingerprint",
    "expire_session",
    "handle",
    "pending_timer",
]
