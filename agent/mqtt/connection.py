"""The broker link's lifecycle: connect, reconnect, protocol fallback, reload, close.

One `Link` per set of settings (replaced wholesale when MQTT's settings change); each link
keeps reconnecting until it is closed. The policies are pure and live elsewhere —
`agent/mqtt/link.py` (backoff, protocol choice, failure wording), `agent/mqtt/topics.py` —
this module applies them with paho (`agent/mqtt/client.py`). Messages and connects are handed
to the adapter (`agent/mqtt/adapter.py`) through the callbacks given to `Connection`.

Reconnects are ours, not paho's: the network thread is allowed to end whenever the connection
does (`reconnect_on_failure=False`), and the loop schedules the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import AgentConfig, MqttConfig
from agent.logs import EscapeMessages
from agent.mqtt.client import PahoClient
from agent.mqtt.link import (
    STABLE_CONNECTION,
    Attempt,
    ProtocolChoice,
    describe_failure,
    reconnect_delay,
)
from agent.mqtt.status import OFFLINE_PAYLOAD
from agent.mqtt.topics import Topics, client_id_for

log = logging.getLogger("engagement_agent.mqtt")
paho_log = logging.getLogger("engagement_agent.mqtt.paho")
paho_log.addFilter(EscapeMessages())  # it logs topics as received

#: Outgoing QoS 1 messages (replies, errors, status) paho keeps while disconnected; beyond this
#: `publish()` refuses instead of growing without bound.
MAX_QUEUED_OUTGOING = 1000
MAX_INFLIGHT_OUTGOING = 100
#: Room for the fixed header, topic and properties of a PUBLISH beyond its payload: the
#: Maximum Packet Size announced on MQTT 5 is `limits.max_command_bytes` plus this.
PACKET_OVERHEAD = 1024


def properties_for(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _link_settings(config: AgentConfig) -> tuple[MqttConfig, str, int]:
    """What a link is made of: a change to any of it means a new connection."""
    return (config.mqtt, config.device_id, config.limits.max_command_bytes)


@dataclass
class Link:
    """One broker connection's settings and state; replaced wholesale on reload."""

    config: MqttConfig
    client_id: str
    topics: Topics
    max_packet_size: int
    protocol: ProtocolChoice
    stale_filters: tuple[str, ...] = ()
    client: PahoClient | None = None
    client_version: int = 0  # the MQTT version `client` was built for
    # Written by the network thread, read by the loop. `conn_id` changes on every connect and
    # disconnect, so a PUBACK is only ever sent for a message id of the current connection.
    conn_id: int = 0
    connected: bool = False
    connected_at: float | None = None
    last_reason: str = ""
    connack: int | None = None  # of the current attempt
    closed_at_connect: bool = False  # of the current attempt
    # Loop-thread state.
    attempts: int = 0
    reconnect_handle: asyncio.TimerHandle | None = None
    closing: bool = False
    down_reported: bool = False
    ever_connected: bool = False


class Connection:
    """Keeps one broker link up. Construct on any thread; call everything else on `loop`.

    - `on_message(link, message)` runs on paho's network thread for every PUBLISH; it must
      not block or raise.
    - `on_connected(link, session_present)` runs on the loop after each CONNACK accepted.
    - `on_lost()` runs on the loop when a connection ended or a link is closing: commands
      waiting for a retry on it are void (the broker redelivers them).
    - `drain()` is awaited before a link is closed: commands being committed still get acked.
    """

    def __init__(
        self,
        config: AgentConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        on_message: Callable[[Link, paho.MQTTMessage], None],
        may_read: Callable[[], bool],
        on_connected: Callable[[Link, bool], None],
        on_lost: Callable[[], None],
        drain: Callable[[], Awaitable[None]],
        reconnect_base: float,
        reconnect_cap: float,
        rng: random.Random,
    ) -> None:
        self._config = config
        self._loop = loop
        self._on_message_cb = on_message
        self._may_read = may_read
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._drain = drain
        self._reconnect_base = reconnect_base
        self._reconnect_cap = reconnect_cap
        self._rng = rng
        self.link: Link | None = None
        self._started = False
        self._stopping = False
        self._relink_task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        link = self.link
        return link is not None and link.connected

    def start(self) -> None:
        """Begin connecting in the background; a broker that is down never raises or blocks."""
        if self._started:
            return
        self._started = True
        self._stopping = False
        if self._config.mqtt.enabled:
            self.link = self._new_link(self._config)
            self._connect(self.link)

    async def stop(self, relink_timeout: float) -> None:
        """Close the link for good (after a reconnect for new settings, if one is running)."""
        self._stopping = True
        relink = self._relink_task
        if relink is not None and not relink.done():
            await asyncio.wait({relink}, timeout=relink_timeout)
        link, self.link = self.link, None
        if link is not None:
            await self._close_link_safely(link)
        self._started = False

    def reload(self, config: AgentConfig) -> None:
        """Take new settings; reconnect (after draining in-flight commands) if MQTT's changed."""
        previous, self._config = self._config, config
        if not self._started or self._stopping:
            return
        if _link_settings(previous) == _link_settings(config) and (
            self.link is not None or not config.mqtt.enabled
        ):
            return
        before = self._relink_task
        self._relink_task = self._loop.create_task(self._relink(before))

    def _new_link(self, config: AgentConfig, stale_filters: tuple[str, ...] = ()) -> Link:
        return Link(
            config.mqtt,
            client_id_for(config),
            Topics.of(config),
            config.limits.max_command_bytes + PACKET_OVERHEAD,
            ProtocolChoice(config.mqtt.protocol),
            stale_filters,
        )

    def _build_client(self, link: Link, version: int) -> PahoClient:
        cfg = link.config
        v5 = version == 5
        client = PahoClient(
            idle_timeout=max(1.0, min(15.0, cfg.keepalive / 4)),
            on_thread_exit=lambda error: self._thread_exited(link, error),
            may_read=self._may_read,
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=link.client_id,
            # v5 takes clean_start per connect (see _connect); 3.1.1 fixes it here.
            clean_session=None if v5 else False,
            userdata=link,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.suppress_exceptions = True
        if paho_log.isEnabledFor(logging.DEBUG):
            # Only when asked for: paho logs every packet, which costs at 10k messages/s, and
            # its connection errors are already reported (once per outage) by this module.
            client.enable_logger(paho_log)
        client.max_inflight_messages_set(MAX_INFLIGHT_OUTGOING)
        client.max_queued_messages_set(MAX_QUEUED_OUTGOING)
        if cfg.username or cfg.password:
            client.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            client.tls_set(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        # Retained, QoS 1, no Will Delay Interval: the status flips at once when we vanish.
        client.will_set(link.topics.status, OFFLINE_PAYLOAD, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self, link: Link) -> None:
        """One connection attempt; the TCP/TLS handshake happens on the network thread."""
        link.reconnect_handle = None
        if self._stopping or link.closing or link is not self.link:
            return
        cfg = link.config
        version = link.protocol.version
        try:
            if link.client is None or link.client_version != version:
                link.client = self._build_client(link, version)
                link.client_version = version
            link.connack = None
            link.closed_at_connect = False
            properties = None
            if version == 5:
                properties = properties_for(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = cfg.session_expiry
                properties.ReceiveMaximum = cfg.receive_maximum
                # The broker drops what we could not accept anyway instead of sending it.
                properties.MaximumPacketSize = link.max_packet_size
            # clean_start=False on every connect: MQTT_CLEAN_START_FIRST_ONLY would wipe the
            # session (and the commands queued in it) each time the agent restarts.
            link.client.connect_async(
                cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=properties
            )
            rc = link.client.loop_start()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"cannot start the network thread: {paho.error_string(rc)}")
        except Exception as exc:
            link.last_reason = f"{exc.__class__.__name__}: {exc}"
            self._schedule_reconnect(link)

    def _thread_exited(self, link: Link, error: BaseException | None) -> None:
        """Network thread: the connection (or the attempt) is over. Hand over to the loop."""
        link.connected = False
        if error is not None:
            link.last_reason = f"{error.__class__.__name__}: {error}"
        attempt = Attempt(
            link.client_version, link.connack, error is None and link.closed_at_connect
        )
        with contextlib.suppress(RuntimeError):  # loop closed: nothing to reconnect for
            self._loop.call_soon_threadsafe(self._connection_ended, link, attempt)

    def _connection_ended(self, link: Link, attempt: Attempt) -> None:
        self._on_lost()  # commands waiting for a retry are void: the broker redelivers
        if self._stopping or link.closing or link is not self.link:
            return
        if attempt.connack != 0:
            link.last_reason = describe_failure(attempt, link.last_reason or "connection closed")
        switched = link.protocol.after(attempt)
        if switched is not None:
            log.warning("%s", switched)
        if link.protocol.version != attempt.version:
            link.attempts = 0  # the other version deserves a prompt first try
        self._schedule_reconnect(link)

    def _schedule_reconnect(self, link: Link) -> None:
        if self._stopping or link.closing or link is not self.link:
            return
        if not link.down_reported:
            link.down_reported = True
            log.warning(
                "MQTT: %s %s:%d: %s; retrying with backoff (next message when it is back)",
                "lost the connection to" if link.ever_connected else "cannot connect to",
                link.config.host,
                link.config.port,
                link.last_reason or "connection closed",
            )
        now = time.monotonic()
        if link.connected_at is not None and now - link.connected_at >= STABLE_CONNECTION:
            link.attempts = 0
        link.connected_at = None
        delay = reconnect_delay(link.attempts, self._reconnect_base, self._reconnect_cap, self._rng)
        link.attempts += 1
        if link.reconnect_handle is not None:
            link.reconnect_handle.cancel()
        link.reconnect_handle = self._loop.call_later(delay, self._connect, link)

    async def _close_link(self, link: Link) -> None:
        link.closing = True
        if link.reconnect_handle is not None:
            link.reconnect_handle.cancel()
            link.reconnect_handle = None
        self._on_lost()
        await self._drain()  # commands being committed right now still get their PUBACK
        client = link.client
        if client is None:
            return
        if link.connected:
            try:
                info = client.publish(link.topics.status, OFFLINE_PAYLOAD, qos=1, retain=True)
                await asyncio.wait_for(asyncio.to_thread(info.wait_for_publish, 2.0), 3.0)
            except Exception as exc:  # best effort: the will covers us if this fails
                log.info("MQTT: could not publish the offline status: %s", exc)
        try:
            client.disconnect()
        except Exception:
            log.debug("MQTT: disconnect failed", exc_info=True)
        try:
            await asyncio.wait_for(asyncio.to_thread(client.loop_stop), 5.0)
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("MQTT: the network thread did not stop within 5 s; leaving it")
        except Exception:  # a paho bug here must not stop the reconnect that follows
            log.exception("MQTT: stopping the network thread failed; leaving it")
        link.connected = False

    async def _close_link_safely(self, link: Link) -> None:
        """`_close_link` for callers that must go on whatever happens (reload, stop): an
        exception escaping it would end the relink task and leave MQTT down for good."""
        try:
            await self._close_link(link)
        except Exception:
            link.closing = True
            link.connected = False
            log.exception("MQTT: closing the connection failed; going on")

    async def _relink(self, before: asyncio.Task[None] | None) -> None:
        if before is not None and not before.done():
            await asyncio.wait({before})
        old, self.link = self.link, None
        stale: tuple[str, ...] = ()
        if old is not None:
            await self._close_link_safely(old)
            same_session = old.client_id == client_id_for(self._config) and (
                old.config.host,
                old.config.port,
            ) == (self._config.mqtt.host, self._config.mqtt.port)
            if same_session:
                stale = Topics.of(self._config).stale_filters(old.topics)
        if self._stopping or not self._config.mqtt.enabled:
            return
        log.info("MQTT: settings changed; reconnecting")
        self.link = self._new_link(self._config, stale)
        self._connect(self.link)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            link: Link = userdata
            link.connack = reason_code.value
            if reason_code.is_failure:
                link.last_reason = f"broker refused the connection: {reason_code}"
                return
            link.conn_id += 1
            link.connected = True
            link.connected_at = time.monotonic()
            filters = link.topics.command_filters
            if link.client_version == 5:
                # noLocal: a response topic pointing at our own command topic cannot loop.
                # Never retained: a retained command would be replayed on every subscribe.
                options = SubscribeOptions(
                    qos=1, noLocal=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
                )
                client.subscribe([(f, options) for f in filters])
            else:
                client.subscribe([(f, 1) for f in filters])
            if link.stale_filters:
                client.unsubscribe(list(link.stale_filters))
            self._loop.call_soon_threadsafe(self._on_connected, link, flags.session_present)
        except Exception:
            log.exception("MQTT: error in on_connect")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            link: Link = userdata
            link.connected = False
            link.conn_id += 1
            if link.connack is None:
                link.closed_at_connect = True
            if not link.closing:
                link.last_reason = f"disconnected: {reason_code}"
        except Exception:
            log.exception("MQTT: error in on_disconnect")

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        try:
            refused = [str(code) for code in reason_codes if code.is_failure]
            if refused:
                link: Link = userdata
                log.error(
                    "MQTT: the broker refused our command subscriptions %s: %s — no commands "
                    "will arrive (check the broker's ACL for %s)",
                    ", ".join(link.topics.command_filters),
                    ", ".join(refused),
                    link.client_id,
                )
        except Exception:
            log.exception("MQTT: error in on_subscribe")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self._on_message_cb(userdata, message)
        except Exception:
            log.exception("MQTT: error while receiving a message (left unacked)")


__all__ = ["PACKET_OVERHEAD", "Connection", "Link", "properties_for"]
