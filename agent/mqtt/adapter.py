"""MQTT transport: commands in over a persistent QoS 1 session, PUBACK only after commit.

The four things MQTT needs to lose nothing are all here: a fixed client id, a persistent session
(v5 `clean_start=False` with a Session Expiry Interval on *every* connect; 3.1.1
`clean_session=False`), subscribing at QoS 1 in `on_connect`, and `manual_ack=True` with the
PUBACK sent only once `Intake.handle()` says the command is committed (or permanently
rejected — then it will never become valid, so it is acked and reported on the error topic).

Threads: paho's network thread only parses packets and hands messages to the asyncio loop with
`call_soon_threadsafe`; it never blocks and never lets an exception escape (that would kill it).
Everything stateful — intake, replies, status, timers, reconnects — runs on the loop. `ack()` and
`publish()` are called from the loop thread: in threaded mode both only append to paho's
outgoing deque and wake the network thread through its socketpair, which is paho's supported
way of publishing from another thread.

Reconnects are ours, not paho's: paho's backoff has no jitter, so a fleet that lost its broker
would reconnect in lockstep. The network thread is allowed to end whenever the connection does
(`reconnect_on_failure=False`), and the loop schedules the next attempt with exponential backoff
and full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.commands import is_valid_app_name, parse_json, request_id_of
from agent.config import AgentConfig, MqttConfig
from agent.errors import PERMANENT_CODES, AgentError, InvalidCommand
from agent.intake import Intake, Origin, Reply
from agent.logs import RateLimitedLog

log = logging.getLogger("engagement_agent.mqtt")
paho_log = logging.getLogger("engagement_agent.mqtt.paho")

#: Replies to these go to the reply topic even without a request_id (SPEC §11).
QUERY_COMMANDS = frozenset({"status", "flush", "get_customer"})
OFFLINE_PAYLOAD = b'{"online":false}'
STATUS_MIN_INTERVAL = 10.0
STATUS_MAX_INTERVAL = 300.0
#: A connection that lasted this long resets the reconnect backoff; shorter ones (a broker that
#: accepts and then kicks us, e.g. a duplicate client id) keep growing it.
STABLE_CONNECTION = 30.0
#: Outgoing QoS 1 messages (replies, errors, status) paho keeps while disconnected; beyond this
#: `publish()` refuses instead of growing without bound.
MAX_QUEUED_OUTGOING = 1000
MAX_INFLIGHT_OUTGOING = 100
#: Payload bytes of received, unfinished commands beyond which QoS 0 commands are dropped
#: (`limits.max_command_bytes` if that is larger, so one command always fits). The count
#: bound is `mqtt.receive_maximum`. Without it, a QoS 0 flood faster than the backend grew
#: memory without limit: QoS 0 has no flow control at all.
MAX_PENDING_BYTES = 16 * 1024 * 1024


def _change_key(status: Mapping[str, Any]) -> str:
    """What must differ for status to count as changed (SPEC §11): everything but the values
    that move with the clock alone — `uptime` and `queue.oldest_age` — or an agent with a
    backlog would republish its retained status every 10 s forever. Other floats (times such
    as `next_attempt`, derived from the monotonic clock on each call) are compared to the
    second, so clock-reading noise is not a change either. Both are still published."""
    relevant = {k: v for k, v in status.items() if k != "uptime"}
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


class _LogLimiter:
    """One log line per key per interval, with a count of what was suppressed.

    A broker outage or a disk-full condition would otherwise write one line per retry or per
    message; the journal must stay readable.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, key: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        log.log(level, message, *args)


@dataclass(frozen=True)
class _Topics:
    prefix: str
    device_id: str

    @property
    def command_filters(self) -> tuple[str, str]:
        return (f"{self.prefix}/{self.device_id}/+/command", f"{self.prefix}/all/+/command")

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device_id}/status"

    def error(self, app: str) -> str:
        return f"{self.prefix}/{self.device_id}/{app}/error"

    def reply(self, app: str) -> str:
        return f"{self.prefix}/{self.device_id}/{app}/reply"

    def app_of(self, topic: str) -> str | None:
        """The app segment of one of our command topics, or None if the topic is not ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 3 or parts[2] != "command" or parts[0] not in (self.device_id, "all"):
            return None
        return parts[1]


def client_id_for(config: AgentConfig) -> str:
    return config.mqtt.client_id or f"engagement-agent-{config.device_id}"


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _link_settings(config: AgentConfig) -> tuple[MqttConfig, str]:
    return (config.mqtt, config.device_id)


class _PahoClient(paho.Client):
    """paho's client with its `loop_start()` thread body replaced, for two reasons.

    - paho's thread retries the first connection itself with its un-jittered backoff
      (`retry_first_connection=True`); here a failed attempt simply ends the thread and the
      adapter schedules the next one with full jitter.
    - paho's thread wakes every second (`select` timeout 1 s) even when idle; an idle agent
      should wake only a few times a minute. Writes from other threads still wake it at once
      through paho's socketpair, and keepalive pings stay well inside 1.5 x keepalive.

    `on_thread_exit` is called (on the network thread) whenever the thread ends, for whatever
    reason: it is the single place from which reconnects are driven. `_thread_main` is private
    paho API; paho is pinned to 2.x in pyproject.toml.

    Unlike paho's, this thread body never clears `_thread`: paho's `loop_stop()` on another
    thread checks `_thread is None` and then calls `_thread.join()`, so clearing it in between
    made `loop_stop()` raise AttributeError. The ended thread is forgotten by `loop_start()`
    instead, on the loop thread, which is the only caller of both.
    """

    def __init__(
        self,
        *,
        idle_timeout: float,
        on_thread_exit: Callable[[BaseException | None], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._idle_timeout = idle_timeout
        self._on_thread_exit = on_thread_exit

    def _thread_main(self) -> None:
        error: BaseException | None = None
        try:
            self.loop_forever(timeout=self._idle_timeout, retry_first_connection=False)
        except Exception as exc:  # a failed connect raises here; it must not kill silently
            error = exc
        finally:
            try:
                self._on_thread_exit(error)
            except Exception:
                log.exception("MQTT: error in the network thread's exit hook")

    def loop_start(self) -> MQTTErrorCode:
        """Start a network thread, first forgetting the previous one once it has ended.

        Only called after the previous thread reported its end (`on_thread_exit` is its last
        step), so the join waits at most for that thread to return from the hook.
        """
        previous = self._thread
        if previous is not None and previous is not threading.current_thread():
            previous.join(1.0)
            if previous.is_alive():
                return MQTTErrorCode.MQTT_ERR_INVAL  # the caller schedules another attempt
            self._thread = None
        return super().loop_start()


@dataclass
class _Link:
    """One broker connection's settings and state; replaced wholesale on reload."""

    config: MqttConfig
    client_id: str
    topics: _Topics
    stale_filters: tuple[str, ...] = ()
    client: _PahoClient | None = None
    # Written by the network thread, read by the loop. `conn_id` changes on every connect and
    # disconnect, so a PUBACK is only ever sent for a message id of the current connection.
    conn_id: int = 0
    connected: bool = False
    connected_at: float | None = None
    last_reason: str = ""
    # Loop-thread state.
    attempts: int = 0
    reconnect_handle: asyncio.TimerHandle | None = None
    closing: bool = False
    down_reported: bool = False
    ever_connected: bool = False


@dataclass(frozen=True)
class _Inbound:
    link: _Link
    conn_id: int
    mid: int
    qos: int
    app: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class PendingCommands:
    """Commands received over MQTT and not finished yet (queued for the loop, being handled or
    waiting for a retry), with the high-water marks since start and the QoS 0 commands dropped
    because the cap was reached."""

    count: int
    bytes: int
    peak_count: int
    peak_bytes: int
    qos0_dropped: int


@dataclass
class _Status:
    key: str | None = None
    published_at: float = field(default=-1e9)
    deferred: asyncio.TimerHandle | None = None
    heartbeat: asyncio.TimerHandle | None = None


class MqttAdapter:
    """The MQTT side of the daemon. Construct on any thread; call everything else on `loop`.

    `status_changed()` alone may be called from any thread. The keyword-only timings exist for
    tests and benchmarks; the defaults are the SPEC's (reconnect 1 s doubling to 120 s with
    full jitter, unavailable-retry 1 s doubling to 30 s, status at most every 10 s and at
    least every 5 minutes).
    """

    def __init__(
        self,
        config: AgentConfig,
        intake: Intake,
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
        self._intake = intake
        self._loop = loop
        self._status = status
        self._reconnect_base = reconnect_base
        self._reconnect_cap = reconnect_cap
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._drain_timeout = drain_timeout
        self._status_min_interval = status_min_interval
        self._status_max_interval = status_max_interval
        self._rng = rng or random.Random()
        self._limiter = _LogLimiter()
        self._link: _Link | None = None
        self._started = False
        self._stopping = False
        self._relink_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._retrying: set[asyncio.Task[Any]] = set()
        # Messages cross from the network thread in batches: one loop wake-up per burst, not
        # one per message. Bounded by Receive Maximum (v5) / the broker's in-flight limit (3.1.1).
        self._inbox: deque[_Inbound] = deque()
        self._inbox_lock = threading.Lock()
        self._inbox_scheduled = False
        # Every command from `_receive` until its handling ends, guarded by `_inbox_lock`:
        # what the QoS 0 cap is checked against (see `MAX_PENDING_BYTES`).
        self._pending_count = 0
        self._pending_bytes = 0
        self._peak_count = 0
        self._peak_bytes = 0
        self._qos0_dropped = 0
        self._drop_log = RateLimitedLog(log)
        self._status_state = _Status()
        self._status_hint_pending = False

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.connected

    @property
    def pending_commands(self) -> PendingCommands:
        """How many commands (and payload bytes) the adapter holds right now; thread-safe."""
        with self._inbox_lock:
            return PendingCommands(
                self._pending_count,
                self._pending_bytes,
                self._peak_count,
                self._peak_bytes,
                self._qos0_dropped,
            )

    @property
    def pending_limits(self) -> tuple[int, int]:
        """The (count, bytes) beyond which QoS 0 commands are dropped."""
        return (
            self._config.mqtt.receive_maximum,
            max(MAX_PENDING_BYTES, self._config.limits.max_command_bytes),
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

        Only commands that the backend committed are acked: anything still pending, waiting
        for a retry or arriving from now on stays unacked and the broker redelivers it.
        """
        self._stopping = True
        self._cancel_status_timers()
        relink = self._relink_task
        if relink is not None and not relink.done():
            await asyncio.wait({relink}, timeout=self._drain_timeout + 10.0)
        link, self._link = self._link, None
        with self._inbox_lock:
            for inbound in self._inbox:
                self._pending_count -= 1
                self._pending_bytes -= len(inbound.payload)
            self._inbox.clear()
        if link is not None:
            await self._close_link_safely(link)
        self._started = False

    def reload(self, config: AgentConfig) -> None:
        """Take new settings; reconnect (after draining in-flight commands) if MQTT's changed."""
        previous, self._config = self._config, config
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
        topics = _Topics(config.mqtt.topic_prefix, config.device_id)
        return _Link(config.mqtt, client_id_for(config), topics, stale_filters)

    def _build_client(self, link: _Link) -> _PahoClient:
        cfg = link.config
        v5 = cfg.protocol == 5
        client = _PahoClient(
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
        try:
            if link.client is None:
                link.client = self._build_client(link)
            properties = None
            if cfg.protocol == 5:
                properties = _properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = cfg.session_expiry
                properties.ReceiveMaximum = cfg.receive_maximum
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
        with contextlib.suppress(RuntimeError):  # loop closed: nothing to reconnect for
            self._loop.call_soon_threadsafe(self._connection_ended, link)

    def _connection_ended(self, link: _Link) -> None:
        for task in list(self._retrying):
            task.cancel()  # their copies are void: the broker redelivers on reconnect
        if self._stopping or link.closing or link is not self._link:
            return
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
        ceiling = min(self._reconnect_cap, self._reconnect_base * 2.0 ** min(link.attempts, 30))
        link.attempts += 1
        delay = self._rng.uniform(0.0, ceiling)  # full jitter
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
        pending = {task for task in self._tasks if not task.done()}
        if pending:
            # Commands the backend is committing right now still get their PUBACK.
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
            new_topics = _Topics(self._config.mqtt.topic_prefix, self._config.device_id)
            same_session = old.client_id == client_id_for(self._config) and (
                old.config.host,
                old.config.port,
            ) == (self._config.mqtt.host, self._config.mqtt.port)
            if same_session:
                # Our persistent session would keep delivering the old topics forever.
                stale = tuple(set(old.topics.command_filters) - set(new_topics.command_filters))
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
            if reason_code.is_failure:
                link.last_reason = f"broker refused the connection: {reason_code}"
                return
            link.conn_id += 1
            link.connected = True
            link.connected_at = time.monotonic()
            filters = link.topics.command_filters
            if link.config.protocol == 5:
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
        if self._stopping or link.closing:
            return  # unacked: the broker gives it to the next connection
        conn_id = link.conn_id
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._ack_raw(link, conn_id, message)
            self._limiter.log(
                "bad-topic",
                logging.WARNING,
                "MQTT: dropped a message whose topic is not valid UTF-8",
            )
            return
        app = link.topics.app_of(topic)
        if app is None:
            # Only a stale subscription in our session can bring these; acking stops them.
            self._ack_raw(link, conn_id, message)
            self._limiter.log(
                "foreign-topic",
                logging.WARNING,
                "MQTT: dropped a message on %s, which is not one of our command topics",
                topic,
            )
            return
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        inbound = _Inbound(
            link,
            conn_id,
            message.mid,
            message.qos,
            app,
            bytes(message.payload),
            response_topic if isinstance(response_topic, str) and response_topic else None,
            bytes(correlation) if correlation is not None else None,
        )
        if not is_valid_app_name(app):
            self._reject(
                inbound,
                InvalidCommand(
                    f"invalid command: the topic's app {app!r} must match "
                    "[a-z0-9][a-z0-9._-]{0,63} and not be 'defaults'",
                    [{"field": "app", "reason": "invalid app name in the topic"}],
                ),
            )
            return
        if message.retain:
            self._reject(
                inbound,
                InvalidCommand(
                    "invalid command: retained commands are ignored (they would be replayed on "
                    f"every subscribe); clear it with: mosquitto_pub -r -n -t '{topic}'",
                    [{"field": "(command)", "reason": "retained"}],
                ),
            )
            return
        size = len(inbound.payload)
        max_count, max_bytes = self.pending_limits
        with self._inbox_lock:
            count, held = self._pending_count, self._pending_bytes
            # QoS 1 is never dropped here: the broker bounds it (Receive Maximum on MQTT 5,
            # its in-flight limit on 3.1.1, as we ack only after the commit). QoS 0 has no
            # flow control, and dropping it is within its at-most-once contract.
            drop = inbound.qos == 0 and (count >= max_count or held + size > max_bytes)
            if drop:
                self._qos0_dropped += 1
                dropped = self._qos0_dropped
            else:
                self._pending_count = count + 1
                self._pending_bytes = held + size
                self._peak_count = max(self._peak_count, self._pending_count)
                self._peak_bytes = max(self._peak_bytes, self._pending_bytes)
                self._inbox.append(inbound)
                schedule = not self._inbox_scheduled
                self._inbox_scheduled = True
        if drop:
            self._drop_log.warning(
                "qos0-dropped",
                "MQTT: dropped a QoS 0 command for app %s: %d commands (%d bytes) are already "
                "waiting (limits %d commands, %d bytes); %d QoS 0 commands dropped since start. "
                "Publish at QoS 1 to get flow control instead",
                app,
                count,
                held,
                max_count,
                max_bytes,
                dropped,
            )
            return
        if not schedule:
            return
        try:
            self._loop.call_soon_threadsafe(self._drain_inbox)
        except RuntimeError:
            with self._inbox_lock:
                self._inbox_scheduled = False

    def _ack_raw(self, link: _Link, conn_id: int, message: paho.MQTTMessage) -> None:
        if link.client is not None and link.connected and conn_id == link.conn_id:
            link.client.ack(message.mid, message.qos)

    def _reject(self, inbound: _Inbound, error: AgentError) -> None:
        """A message refused before intake: acked (it can never become valid) and reported."""
        request_id = None
        if len(inbound.payload) <= self._config.limits.max_command_bytes:
            with contextlib.suppress(AgentError):
                request_id = request_id_of(parse_json(inbound.payload))
        log.info("rejected command for app %s from mqtt: %s", inbound.app, error.code.value)
        self._finish(inbound, Reply(request_id, inbound.app, None, error=error))

    # ------------------------------------------------------------------ command handling (loop)

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            batch = list(self._inbox)
            self._inbox.clear()
            self._inbox_scheduled = False
        for index, inbound in enumerate(batch):
            if self._stopping or inbound.link.closing:
                self._release(batch[index:])
                return  # unacked: redelivered to the next connection
            task = self._loop.create_task(self._process(inbound))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._task_done, inbound))

    def _release(self, done: list[_Inbound]) -> None:
        with self._inbox_lock:
            self._pending_count -= len(done)
            self._pending_bytes -= sum(len(inbound.payload) for inbound in done)

    def _task_done(self, inbound: _Inbound, task: asyncio.Task[None]) -> None:
        self._release([inbound])
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT: command handling failed (left unacked)", exc_info=task.exception())

    async def _process(self, inbound: _Inbound) -> None:
        origin = Origin("mqtt", topic_app=inbound.app)
        delay = self._retry_base
        while True:
            reply = await self._intake.handle(inbound.payload, origin)
            error = reply.error
            if error is None or error.code in PERMANENT_CODES:
                self._finish(inbound, reply)
                return
            # `unavailable` / `internal`: never acked. Retry while this connection lasts; once
            # it is gone our copy is void and the broker redelivers (with DUP) on reconnect.
            if not self._may_retry(inbound):
                return
            self._limiter.log(
                f"retry-{error.code.value}",
                logging.WARNING,
                "MQTT: command for app %s not accepted (%s: %s); retrying it while connected",
                inbound.app,
                error.code.value,
                error.message,
            )
            task = asyncio.current_task()
            assert task is not None
            self._retrying.add(task)
            try:
                await asyncio.sleep(delay)
            finally:
                self._retrying.discard(task)
            if not self._may_retry(inbound):
                return
            delay = min(delay * 2.0, self._retry_cap)

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
            self._limiter.log(
                "publish-invalid", logging.WARNING, "MQTT: cannot publish to %r: %s", topic, exc
            )
            return None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._limiter.log(
                "publish-failed",
                logging.WARNING,
                "MQTT: publish to %s failed: %s",
                topic,
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
                "5" if cfg.protocol == 5 else "3.1.1",
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
        state = self._status_state
        if not self.connected or state.deferred is not None:
            return
        wait = state.published_at + self._status_min_interval - self._loop.time()
        if wait > 0:
            state.deferred = self._loop.call_later(wait, self._deferred_status)
        else:
            self._publish_status(force=False)

    def _deferred_status(self) -> None:
        self._status_state.deferred = None
        self._publish_status(force=False)

    def _heartbeat(self) -> None:
        self._status_state.heartbeat = None
        self._publish_status(force=True)

    def _publish_status(self, *, force: bool) -> None:
        link = self._link
        if link is None or not link.connected or self._stopping:
            return
        try:
            status = dict(self._status())
        except Exception:
            log.exception("MQTT: the status callback failed")
            return
        status["online"] = True
        state = self._status_state
        key = _change_key(status)
        if force or key != state.key:
            payload = json.dumps(status, separators=(",", ":"), default=str).encode()
            self._publish(link, link.topics.status, payload, retain=True)
            state.key = key
            state.published_at = self._loop.time()
        if state.heartbeat is not None:
            state.heartbeat.cancel()
        state.heartbeat = self._loop.call_later(
            max(0.0, state.published_at + self._status_max_interval - self._loop.time()),
            self._heartbeat,
        )

    def _cancel_status_timers(self) -> None:
        state = self._status_state
        for handle in (state.deferred, state.heartbeat):
            if handle is not None:
                handle.cancel()
        state.deferred = state.heartbeat = None


__all__ = ["QUERY_COMMANDS", "MqttAdapter", "client_id_for"]
