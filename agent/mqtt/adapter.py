"""MQTT transport: commands in over a persistent QoS 1 session, PUBACK only after commit.

The four things MQTT needs to lose nothing are all here: a fixed client id, a persistent session
(v5 `clean_start=False` with a Session Expiry Interval on *every* connect; 3.1.1
`clean_session=False`), subscribing at QoS 1 in `on_connect`, and `manual_ack=True` with the
PUBACK sent only once the dispatcher says the command is committed (or permanently refused —
then it will never become valid, so it is acked and reported on the error topic).

Threads: paho's network thread only parses packets and puts messages into the `Inbox`; the
event loop is woken once per burst and hands everything that arrived since its last pass to
`agent.dispatch` as one group (one writer transaction, one hand-off back). It never blocks
and never lets an exception escape (that would kill it). Everything stateful — replies,
status, reconnects — runs on the loop. `ack()` and `publish()` are called from the loop
thread: in threaded mode both only append to paho's outgoing deque and wake the network
thread through its socketpair, which is paho's supported way of publishing from another thread.

Reconnects are ours, not paho's (`agent/mqtt/link.py` has the policy): the network thread is
allowed to end whenever the connection does (`reconnect_on_failure=False`), and the loop
schedules the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.commands import is_valid_app_name, parse_json, request_id_of
from agent.config import AgentConfig, MqttConfig
from agent.dispatch import Accepted, Dispatcher, Origin, Reply
from agent.errors import PERMANENT_CODES, AgentError, InvalidCommand
from agent.logs import EscapeMessages, RateLimitedLog, escape
from agent.mqtt.client import PahoClient
from agent.mqtt.inbox import MAX_PENDING_BYTES, WAKE, Inbox, PendingCommands
from agent.mqtt.link import (
    STABLE_CONNECTION,
    Attempt,
    ProtocolChoice,
    describe_failure,
    reconnect_delay,
)
from agent.mqtt.status import (
    OFFLINE_PAYLOAD,
    STATUS_MAX_INTERVAL,
    STATUS_MIN_INTERVAL,
    StatusPolicy,
)
from agent.mqtt.topics import Topics, client_id_for

log = logging.getLogger("engagement_agent.mqtt")
paho_log = logging.getLogger("engagement_agent.mqtt.paho")
paho_log.addFilter(EscapeMessages())  # it logs topics as received

#: Replies to these go to the reply topic even without a request_id (docs/mqtt.md).
QUERY_COMMANDS = frozenset({"status", "flush", "get_customer"})
#: Outgoing QoS 1 messages (replies, errors, status) paho keeps while disconnected; beyond this
#: `publish()` refuses instead of growing without bound.
MAX_QUEUED_OUTGOING = 1000
MAX_INFLIGHT_OUTGOING = 100
#: Room for the fixed header, topic and properties of a PUBLISH beyond its payload: the
#: Maximum Packet Size announced on MQTT 5 is `limits.max_command_bytes` plus this.
PACKET_OVERHEAD = 1024


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _link_settings(config: AgentConfig) -> tuple[MqttConfig, str, int]:
    return (config.mqtt, config.device_id, config.limits.max_command_bytes)


@dataclass
class _Link:
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


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is slow, and this is per message
class _Inbound:
    link: _Link
    conn_id: int
    mid: int
    qos: int
    app: str
    payload: bytes
    retained: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None

    @property
    def origin(self) -> Origin:
        return Origin("mqtt", topic_app=self.app)


@dataclass
class _StatusTimers:
    deferred: asyncio.TimerHandle | None = None
    heartbeat: asyncio.TimerHandle | None = None


class MqttAdapter:
    """The MQTT side of the daemon. Construct on any thread; call everything else on `loop`.

    `status_changed()` alone may be called from any thread. The keyword-only timings exist for
    tests and benchmarks; the defaults are the documented ones (reconnect 1 s doubling to
    120 s with full jitter, unavailable-retry 1 s doubling to 30 s, status at most every 10 s
    and at least every 5 minutes).
    """

    def __init__(
        self,
        config: AgentConfig,
        dispatcher: Dispatcher,
        loop: asyncio.AbstractEventLoop,
        status: Callable[[], Mapping[str, Any]],
        *,
        reconnect_base: float = 1.0,
        reconnect_cap: float = 120.0,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        drain_timeout: float = 5.0,
        status_min_interval: float = STATUS_MIN_INTERVAL,
        status_max_interval: float = STATUS_MAX_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._pending_limits = self._limits_of(config)
        self._dispatcher = dispatcher
        self._loop = loop
        self._status = status
        self._reconnect_base = reconnect_base
        self._reconnect_cap = reconnect_cap
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._drain_timeout = drain_timeout
        self._rng = rng or random.Random()
        self._log = RateLimitedLog(log)
        self._link: _Link | None = None
        self._started = False
        self._stopping = False
        self._relink_task: asyncio.Task[None] | None = None
        # Query tasks, retry tasks and groups being committed: a closing link waits for them.
        self._work: set[asyncio.Future[Any]] = set()
        self._retrying: set[asyncio.Task[None]] = set()
        self._inbox: Inbox[_Inbound] = Inbox()
        self._status_policy = StatusPolicy(status_min_interval, status_max_interval)
        self._status_timers = _StatusTimers()
        self._status_hint_pending = False

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.connected

    def status(self) -> dict[str, Any]:
        """The `mqtt` section of the status document (docs/protocol.md)."""
        link = self._link
        connected = link is not None and link.connected
        return {
            "connected": connected,
            "protocol": link.client_version if connected and link is not None else None,
        }

    @property
    def pending_commands(self) -> PendingCommands:
        """How many commands (and payload bytes) the adapter holds right now; thread-safe."""
        return self._inbox.snapshot()

    @property
    def pending_limits(self) -> tuple[int, int]:
        """The (count, bytes) beyond which QoS 0 commands are dropped."""
        return self._pending_limits

    @staticmethod
    def _limits_of(config: AgentConfig) -> tuple[int, int]:
        return (
            config.mqtt.receive_maximum,
            max(MAX_PENDING_BYTES, config.limits.max_command_bytes),
        )

    def start(self) -> None:
        """Begin connecting in the background; a broker that is down never raises or blocks."""
        if self._started:
            return
        self._started = True
        self._stopping = False
        if self._config.mqtt.enabled:
            self._link = self._new_link(self._config)
            self._connect(self._link)

    async def stop(self) -> None:
        """Finish in-flight commands (bounded), publish offline, disconnect, end the thread.

        Only commands that were committed are acked: anything still pending, waiting for a
        retry or arriving from now on stays unacked and the broker redelivers it.
        """
        self._stopping = True
        self._cancel_status_timers()
        relink = self._relink_task
        if relink is not None and not relink.done():
            await asyncio.wait({relink}, timeout=self._drain_timeout + 10.0)
        link, self._link = self._link, None
        self._release(self._inbox.take())
        if link is not None:
            await self._close_link_safely(link)
        self._started = False

    def reload(self, config: AgentConfig) -> None:
        """Take new settings; reconnect (after draining in-flight commands) if MQTT's changed."""
        previous, self._config = self._config, config
        self._pending_limits = self._limits_of(config)
        if not self._started or self._stopping:
            return
        if _link_settings(previous) == _link_settings(config) and (
            self._link is not None or not config.mqtt.enabled
        ):
            return
        before = self._relink_task
        self._relink_task = self._loop.create_task(self._relink(before))

    def status_changed(self) -> None:
        """Hint that status may have changed; cheap, thread-safe, coalesced."""
        if self._status_hint_pending:
            return
        self._status_hint_pending = True
        try:
            self._loop.call_soon_threadsafe(self._on_status_hint)
        except RuntimeError:  # loop closed: the daemon is gone
            self._status_hint_pending = False

    # ------------------------------------------------------------------ connection lifecycle

    def _new_link(self, config: AgentConfig, stale_filters: tuple[str, ...] = ()) -> _Link:
        return _Link(
            config.mqtt,
            client_id_for(config),
            Topics.of(config),
            config.limits.max_command_bytes + PACKET_OVERHEAD,
            ProtocolChoice(config.mqtt.protocol),
            stale_filters,
        )

    def _build_client(self, link: _Link, version: int) -> PahoClient:
        cfg = link.config
        v5 = version == 5
        client = PahoClient(
            idle_timeout=max(1.0, min(15.0, cfg.keepalive / 4)),
            on_thread_exit=lambda error: self._thread_exited(link, error),
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

    def _connect(self, link: _Link) -> None:
        """One connection attempt; the TCP/TLS handshake happens on the network thread."""
        link.reconnect_handle = None
        if self._stopping or link.closing or link is not self._link:
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
                properties = _properties(PacketTypes.CONNECT)
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

    def _thread_exited(self, link: _Link, error: BaseException | None) -> None:
        """Network thread: the connection (or the attempt) is over. Hand over to the loop."""
        link.connected = False
        if error is not None:
            link.last_reason = f"{error.__class__.__name__}: {error}"
        attempt = Attempt(
            link.client_version, link.connack, error is None and link.closed_at_connect
        )
        with contextlib.suppress(RuntimeError):  # loop closed: nothing to reconnect for
            self._loop.call_soon_threadsafe(self._connection_ended, link, attempt)

    def _connection_ended(self, link: _Link, attempt: Attempt) -> None:
        for task in list(self._retrying):
            task.cancel()  # their copies are void: the broker redelivers on reconnect
        if self._stopping or link.closing or link is not self._link:
            return
        if attempt.connack != 0:
            link.last_reason = describe_failure(attempt, link.last_reason or "connection closed")
        switched = link.protocol.after(attempt)
        if switched is not None:
            log.warning("%s", switched)
        if link.protocol.version != attempt.version:
            link.attempts = 0  # the other version deserves a prompt first try
        self._schedule_reconnect(link)

    def _schedule_reconnect(self, link: _Link) -> None:
        if self._stopping or link.closing or link is not self._link:
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

    async def _close_link(self, link: _Link) -> None:
        link.closing = True
        if link.reconnect_handle is not None:
            link.reconnect_handle.cancel()
            link.reconnect_handle = None
        for task in list(self._retrying):
            task.cancel()
        pending = {work for work in self._work if not work.done()}
        if pending:
            # Commands being committed right now still get their PUBACK.
            await asyncio.wait(pending, timeout=self._drain_timeout)
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

    async def _close_link_safely(self, link: _Link) -> None:
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
        old, self._link = self._link, None
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
        self._link = self._new_link(self._config, stale)
        self._connect(self._link)

    # ------------------------------------------------------------------ paho callbacks
    # All run on the network thread. None may raise (that kills the thread) or block.

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            link: _Link = userdata
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
            self._loop.call_soon_threadsafe(self._connected, link, flags.session_present)
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
            link: _Link = userdata
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
                link: _Link = userdata
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
            self._receive(userdata, message)
        except Exception:
            log.exception("MQTT: error while receiving a message (left unacked)")

    def _receive(self, link: _Link, message: paho.MQTTMessage) -> None:
        """Network thread: as little as possible: find the app, put the message in the inbox."""
        if self._stopping or link.closing:
            return  # unacked: the broker gives it to the next connection
        conn_id = link.conn_id
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._ack_raw(link, conn_id, message)
            self._log.warning("bad-topic", "MQTT: dropped a message whose topic is not valid UTF-8")
            return
        app = link.topics.app_of(topic)
        if app is None:
            # Only a stale subscription in our session can bring these; acking stops them.
            self._ack_raw(link, conn_id, message)
            self._log.warning(
                "foreign-topic",
                "MQTT: dropped a message on %s, which is not one of our command topics",
                escape(topic),
            )
            return
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload = bytes(message.payload)
        inbound = _Inbound(
            link,
            conn_id,
            message.mid,
            message.qos,
            app,
            payload,
            bool(message.retain),
            response_topic if isinstance(response_topic, str) and response_topic else None,
            bytes(correlation) if correlation is not None else None,
        )
        max_count, max_bytes = self._pending_limits
        admission = self._inbox.put(inbound, len(payload), message.qos, max_count, max_bytes)
        if not admission.admitted:
            self._log.warning(
                "qos0-dropped",
                "MQTT: dropped a QoS 0 command for app %s: %d commands (%d bytes) are already "
                "waiting (limits %d commands, %d bytes); %d QoS 0 commands dropped since start. "
                "Publish at QoS 1 to get flow control instead",
                escape(app),
                admission.held_count,
                admission.held_bytes,
                max_count,
                max_bytes,
                self._inbox.snapshot().qos0_dropped,
            )
            return
        if admission is WAKE:
            try:
                self._loop.call_soon_threadsafe(self._drain_inbox)
            except RuntimeError:
                self._inbox.wake_failed()

    def _ack_raw(self, link: _Link, conn_id: int, message: paho.MQTTMessage) -> None:
        if link.client is not None and link.connected and conn_id == link.conn_id:
            link.client.ack(message.mid, message.qos)

    # ------------------------------------------------------------------ command handling (loop)

    def _drain_inbox(self) -> None:
        """Everything that arrived since the last pass: one group for the writer."""
        batch = self._inbox.take()
        group: list[Accepted] = []
        members: list[_Inbound] = []
        for index, inbound in enumerate(batch):
            if self._stopping or inbound.link.closing:
                self._release(batch[index:])
                break  # unacked: redelivered to the next connection
            prepared = self._prepare(inbound)
            if isinstance(prepared, Reply):
                self._settle(inbound, prepared)
            elif prepared.grouped:
                group.append(prepared)
                members.append(inbound)
            else:
                self._track(self._loop.create_task(self._query(inbound, prepared)))
        if group:
            committed: asyncio.Future[None] = self._loop.create_future()
            self._track(committed)

            def done(replies: list[Reply]) -> None:
                committed.set_result(None)
                self._settle_group(members, replies)

            self._dispatcher.submit(group, done)

    def _prepare(self, inbound: _Inbound) -> Reply | Accepted:
        """The topic's checks, then the dispatcher's."""
        if not is_valid_app_name(inbound.app):
            return self._refuse(
                inbound,
                InvalidCommand(
                    f"invalid command: the topic's app {inbound.app!r} must match "
                    "[a-z0-9][a-z0-9._-]{0,63} and not be 'defaults'",
                    [{"field": "app", "reason": "invalid app name in the topic"}],
                ),
            )
        if inbound.retained:
            return self._refuse(
                inbound,
                InvalidCommand(
                    "invalid command: retained commands are ignored (they would be replayed on "
                    "every subscribe); clear it with: mosquitto_pub -r -n -t "
                    f"'{inbound.link.topics.prefix}/{inbound.link.topics.device_id}/"
                    f"{inbound.app}/command'",
                    [{"field": "(command)", "reason": "retained"}],
                ),
            )
        response_topic = inbound.response_topic
        if response_topic is not None and not inbound.link.topics.response_allowed(
            inbound.app, response_topic
        ):
            inbound.response_topic = inbound.correlation_data = None  # never published to
            prefix = f"{inbound.link.topics.prefix}/{inbound.link.topics.device_id}"
            return self._refuse(
                inbound,
                InvalidCommand(
                    f"invalid command: the response topic must be under "
                    f"{prefix}/{inbound.app}/response/ (without wildcards), not "
                    f"{response_topic[:200]!r}",
                    [{"field": "(response topic)", "reason": "not one of the app's own topics"}],
                ),
            )
        return self._dispatcher.prepare(inbound.payload, inbound.origin)

    def _refuse(self, inbound: _Inbound, error: AgentError) -> Reply:
        request_id = None
        if len(inbound.payload) <= self._config.limits.max_command_bytes:
            with contextlib.suppress(AgentError):
                request_id = request_id_of(parse_json(inbound.payload))
        return self._dispatcher.refuse(error, inbound.origin, request_id)

    def _track(self, work: asyncio.Future[Any]) -> None:
        self._work.add(work)
        work.add_done_callback(self._work.discard)

    async def _query(self, inbound: _Inbound, command: Accepted) -> None:
        self._settle(inbound, await self._dispatcher.query(command))

    def _settle_group(self, inbounds: list[_Inbound], replies: list[Reply]) -> None:
        """`_settle` for a committed group, with one wake-up of the network thread for the
        PUBACKs of all the quiet successes (no reply to publish), in the order received."""
        acks: list[int] = []
        quiet: list[_Inbound] = []
        for inbound, reply in zip(inbounds, replies, strict=True):
            if (
                reply.error is None
                and inbound.qos == 1
                and inbound.response_topic is None
                and reply.request_id is None
                and reply.command not in QUERY_COMMANDS
            ):
                quiet.append(inbound)
                link = inbound.link
                if link.connected and inbound.conn_id == link.conn_id:
                    acks.append(inbound.mid)
                continue
            self._ack_many(inbounds[0].link, acks)  # earlier PUBACKs go first
            acks = []
            self._settle(inbound, reply)
        self._ack_many(inbounds[0].link, acks)
        self._release(quiet)

    @staticmethod
    def _ack_many(link: _Link, mids: list[int]) -> None:
        client = link.client
        if mids and client is not None:
            client.ack_many(mids)

    def _settle(self, inbound: _Inbound, reply: Reply) -> None:
        """A reply is known: ack and report it, or (`unavailable`, `internal`) retry."""
        error = reply.error
        if error is None or error.code in PERMANENT_CODES:
            self._finish(inbound, reply)
            self._release([inbound])
            return
        self._track(self._loop.create_task(self._retry(inbound, error)))

    async def _retry(self, inbound: _Inbound, error: AgentError) -> None:
        """`unavailable` / `internal`: never acked. Retry while this connection lasts; once it
        is gone our copy is void and the broker redelivers (with DUP) on reconnect."""
        delay = self._retry_base
        try:
            while self._may_retry(inbound):
                self._log.warning(
                    f"retry-{error.code.value}",
                    "MQTT: command for app %s not accepted (%s: %s); retrying it while connected",
                    escape(inbound.app),
                    error.code.value,
                    error.message,
                )
                # Only the wait may be cancelled (the connection ended): a commit in progress
                # must finish and be acked, or the redelivered copy would be committed twice.
                task = asyncio.current_task()
                assert task is not None
                self._retrying.add(task)
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._retrying.discard(task)
                if not self._may_retry(inbound):
                    return
                reply = await self._run_one(inbound)
                if reply.error is None or reply.error.code in PERMANENT_CODES:
                    self._finish(inbound, reply)
                    return
                error = reply.error
                delay = min(delay * 2.0, self._retry_cap)
        finally:
            self._release([inbound])

    async def _run_one(self, inbound: _Inbound) -> Reply:
        prepared = self._prepare(inbound)
        if isinstance(prepared, Reply):
            return prepared
        if not prepared.grouped:
            return await self._dispatcher.query(prepared)
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._dispatcher.submit([prepared], lambda replies: future.set_result(replies[0]))
        return await future

    def _release(self, done: list[_Inbound]) -> None:
        self._inbox.release([len(inbound.payload) for inbound in done])

    def _may_retry(self, inbound: _Inbound) -> bool:
        link = inbound.link
        return (
            not self._stopping
            and not link.closing
            and link is self._link
            and link.connected
            and (inbound.qos == 0 or inbound.conn_id == link.conn_id)
        )

    def _ack(self, inbound: _Inbound) -> bool:
        """PUBACK on the connection the message came in on; False if that connection is gone."""
        link = inbound.link
        client = link.client
        if client is None or not link.connected:
            return False
        if inbound.qos == 0:
            return True
        if inbound.conn_id != link.conn_id:
            return False
        return client.ack(inbound.mid, inbound.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _finish(self, inbound: _Inbound, reply: Reply) -> None:
        """Ack, then report. Without the ack there is no reply: the redelivered copy gets one."""
        if not self._ack(inbound):
            return
        link = inbound.link
        to_reply_topic = inbound.response_topic is None and (
            reply.command in QUERY_COMMANDS or reply.request_id is not None
        )
        if reply.ok and inbound.response_topic is None and not to_reply_topic:
            return  # the common case: nothing to say, so nothing to encode
        body = reply.encode()
        if not reply.ok:
            self._publish(link, link.topics.error(inbound.app), body)
        if inbound.response_topic is not None:
            properties = None
            if inbound.correlation_data is not None:
                properties = _properties(PacketTypes.PUBLISH)
                properties.CorrelationData = inbound.correlation_data
            self._publish(link, inbound.response_topic, body, properties=properties)
        elif to_reply_topic:
            self._publish(link, link.topics.reply(inbound.app), body)

    def _publish(
        self,
        link: _Link,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo | None:
        client = link.client
        if client is None:
            return None
        try:
            info = client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except (ValueError, TypeError) as exc:  # e.g. a response topic with wildcards
            self._log.warning(
                "publish-invalid", "MQTT: cannot publish to %s: %s", escape(topic), exc
            )
            return None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._log.warning(
                "publish-failed",
                "MQTT: publish to %s failed: %s",
                escape(topic),
                paho.error_string(info.rc),
            )
        return info

    # ------------------------------------------------------------------ status (loop)

    def _connected(self, link: _Link, session_present: bool) -> None:
        if link is not self._link or link.closing or not link.connected:
            return
        cfg = link.config
        if link.down_reported or not link.ever_connected:
            log.info(
                "MQTT: connected to %s:%d as %s (MQTT %s, %s)",
                cfg.host,
                cfg.port,
                link.client_id,
                "5" if link.client_version == 5 else "3.1.1",
                "session resumed" if session_present else "new session",
            )
        if link.ever_connected and not session_present:
            log.warning(
                "MQTT: the broker had no session for %s (expired or lost): commands published "
                "while we were disconnected are gone",
                link.client_id,
            )
        link.down_reported = False
        link.ever_connected = True
        self._publish_status(force=True)

    def _on_status_hint(self) -> None:
        self._status_hint_pending = False
        timers = self._status_timers
        if not self.connected or timers.deferred is not None:
            return
        wait = self._status_policy.hint_delay(self._loop.time())
        if wait > 0:
            timers.deferred = self._loop.call_later(wait, self._deferred_status)
        else:
            self._publish_status(force=False)

    def _deferred_status(self) -> None:
        self._status_timers.deferred = None
        self._publish_status(force=False)

    def _heartbeat(self) -> None:
        self._status_timers.heartbeat = None
        self._publish_status(force=True)

    def _publish_status(self, *, force: bool) -> None:
        link = self._link
        if link is None or not link.connected or self._stopping:
            return
        try:
            status = self._status()
        except Exception:
            log.exception("MQTT: the status callback failed")
            return
        now = self._loop.time()
        payload = self._status_policy.payload(status, now, force=force)
        if payload is not None:
            self._publish(link, link.topics.status, payload, retain=True)
        timers = self._status_timers
        if timers.heartbeat is not None:
            timers.heartbeat.cancel()
        timers.heartbeat = self._loop.call_later(
            self._status_policy.heartbeat_delay(now), self._heartbeat
        )

    def _cancel_status_timers(self) -> None:
        timers = self._status_timers
        for handle in (timers.deferred, timers.heartbeat):
            if handle is not None:
                handle.cancel()
        timers.deferred = timers.heartbeat = None


__all__ = ["MAX_PENDING_BYTES", "QUERY_COMMANDS", "MqttAdapter"]
