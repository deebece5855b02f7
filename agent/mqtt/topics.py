"""The agent's MQTT topics: building them and reading the app out of a command topic (pure).

The layout is documented in docs/mqtt.md ("Topics"):

    <prefix>/<device_id>/<app>/command   commands for this device (and <prefix>/all/... for all)
    <prefix>/<device_id>/<app>/reply     replies that have a request_id, and query results
    <prefix>/<device_id>/<app>/error     every refused command
    <prefix>/<device_id>/<app>/response/...  MQTT 5 response topics the agent honours
    <prefix>/<device_id>/status          retained status; the last will says offline
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import AgentConfig

BROADCAST = "all"
#: MQTT's wildcard characters: a topic to publish to may not contain them.
WILDCARDS = frozenset("+#")


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

    def response_prefix(self, app: str) -> str:
        """Where `app`'s MQTT 5 response topics must be: the one subtree of this device that
        the shipped broker ACL lets only that app's account read."""
        return f"{self.prefix}/{self.device_id}/{app}/response/"

    def honours_response_topic(self, app: str, requested: str) -> bool:
        """Whether a command on `app`'s command topic (this device's or the broadcast one)
        may have its replies published to the response topic `requested`.

        The agent's account must be allowed to write every app's replies, so the broker
        cannot stop app A from naming `<prefix>/<device>/pos/reply` (or pos's response
        topics) as its response topic and forging replies that pos reads. Only a topic under
        the commanding app's own `response/` subtree on this device is honoured — one more
        level at least, no wildcards; anything else is the caller's to ignore (docs/mqtt.md,
        "Replies").
        """
        head = self.response_prefix(app)
        return (
            len(requested) > len(head)
            and requested.startswith(head)
            and WILDCARDS.isdisjoint(requested)
        )

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


__all__ = ["BROADCAST", "WILDCARDS", "Topics", "client_id_for"]
