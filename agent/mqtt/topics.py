"""The agent's MQTT topics: building them and reading the app out of a command topic (pure).

The layout is documented in docs/mqtt.md ("Topics"):

    <prefix>/<device_id>/<app>/command   commands for this device (and <prefix>/all/... for all)
    <prefix>/<device_id>/<app>/reply     replies that have a request_id, and query results
    <prefix>/<device_id>/<app>/error     every refused command
    <prefix>/<device_id>/status          retained status; the last will says offline
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import AgentConfig

BROADCAST = "all"


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    @classmethod
    def of(cls, config: AgentConfig) -> Topics:
        return cls(config.mqtt.topic_prefix, config.device_id)

    @property
    def command_filters(self) -> tuple[str, str]:
        """What the agent subscribes to: its own command topics and the broadcast ones."""
        return (f"{self.prefix}/{self.device_id}/+/command", f"{self.prefix}/{BROADCAST}/+/command")

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device_id}/status"

    def error(self, app: str) -> str:
        return f"{self.prefix}/{self.device_id}/{app}/error"

    def reply(self, app: str) -> str:
        return f"{self.prefix}/{self.device_id}/{app}/reply"

    def app_of(self, topic: str) -> str | None:
        """The app segment of a topic matching one of `command_filters`, else None.

        The segment is returned as sent (it may be any string a broker lets through, control
        characters included); whether it is a valid app name is the caller's check.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 3 or parts[2] != "command" or parts[0] not in (self.device_id, BROADCAST):
            return None
        return parts[1]

    def stale_filters(self, old: Topics) -> tuple[str, ...]:
        """Filters of `old` that these topics no longer use: a persistent session would keep
        delivering them forever unless they are unsubscribed."""
        return tuple(sorted(set(old.command_filters) - set(self.command_filters)))


def client_id_for(config: AgentConfig) -> str:
    """A fixed client id per device: the broker keeps the persistent session under it."""
    return config.mqtt.client_id or f"engagement-agent-{config.device_id}"


__all__ = ["BROADCAST", "Topics", "client_id_for"]
