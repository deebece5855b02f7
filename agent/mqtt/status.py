"""When the retained status message is republished (pure; docs/mqtt.md, "Status").

On connect it is always published; after that when it changed, at most every
`min_interval` seconds (10 s), and at least every `max_interval` seconds (5 minutes) as a
heartbeat. "Changed" ignores what moves with the clock alone — `uptime`, `as_of` and
`queue.oldest_age` — or an agent with a backlog would republish every 10 s forever; other
floats (times such as `next_attempt`) are compared to the second.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

STATUS_MIN_INTERVAL = 10.0
STATUS_MAX_INTERVAL = 300.0
OFFLINE_PAYLOAD = b'{"online":false}'
#: Top-level status fields that move with the clock alone.
_CLOCK_FIELDS = frozenset(("uptime", "as_of"))


def change_key(status: Mapping[str, Any]) -> str:
    """What must differ for the status to count as changed."""
    relevant = {k: v for k, v in status.items() if k not in _CLOCK_FIELDS}
    queue = relevant.get("queue")
    if isinstance(queue, Mapping):
        relevant["queue"] = {k: v for k, v in queue.items() if k != "oldest_age"}
    return json.dumps(_coarse(relevant), sort_keys=True, default=str)


def _coarse(value: Any) -> Any:
    if isinstance(value, float):
        return round(value)
    if isinstance(value, Mapping):
        return {k: _coarse(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_coarse(v) for v in value]
    return value


class StatusPolicy:
    """The retained status's publishing state; times are the caller's monotonic seconds."""

    def __init__(
        self, min_interval: float = STATUS_MIN_INTERVAL, max_interval: float = STATUS_MAX_INTERVAL
    ) -> None:
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._key: str | None = None
        self._published_at = -1e18

    def hint_delay(self, now: float) -> float:
        """Seconds until a change hinted at `now` may be published (0: at once)."""
        return max(0.0, self._published_at + self.min_interval - now)

    def payload(self, status: Mapping[str, Any], now: float, *, force: bool) -> bytes | None:
        """The message to publish now (`status` marked online), or None when nothing changed
        and nothing forces it (a connect, a heartbeat). Publishing is assumed to follow."""
        document = {**status, "online": True}
        key = change_key(document)
        if not force and key == self._key:
            return None
        self._key = key
        self._published_at = now
        return json.dumps(document, separators=(",", ":"), default=str).encode()

    def heartbeat_delay(self, now: float) -> float:
        """Seconds until the next heartbeat is due."""
        return max(0.0, self._published_at + self.max_interval - now)


__all__ = [
    "OFFLINE_PAYLOAD",
    "STATUS_MAX_INTERVAL",
    "STATUS_MIN_INTERVAL",
    "StatusPolicy",
    "change_key",
]
