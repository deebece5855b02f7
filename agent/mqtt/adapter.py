"""MQTT transport: commands in over a persistent QoS 1 session, PUBACK only after commit.

The four things MQTT needs to lose nothing are all here: a fixed client id, a persistent session
(v5 `clean_start=False` with a Session Expiry Interval on *every* connect; 3.1.1
`clean_session=False`), subscribing at QoS 1 in `on_connect`, and `manual_ack=True` with the
PUBACK sent only once the dispatcher says the command is committed (or permanently refused —
then it will never become valid, so it is acked and reported on the error topic).

Threads: paho's network thread only parses packets and puts messages into the `Inbox`; the
event loop is woken once per burst and hands everything that arrived since its last pass to
`agent.dispatch` as one group (one writer transaction where it fits, one hand-off back). It
never blocks and never lets an exception escape (that would kill it). Everything stateful —
replies, status, reconnects — runs on the loop. `ack()` and `publish()` are called from the loop
thread: in threaded mode both only append to paho's outgoing deque and wake the network
thread through its socketpair, which is paho's supported way of publishing from another thread.

The connection's lifecycle (connect, reconnect, protocol fallback, reload) is
`agent/mqtt/connection.py`; this module is what happens to the messages: flow control,
dispatch, acks, replies, and the retained status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.commands import is_valid_app_name, parse_json, request_id_of
from agent.config import AgentConfig
from agent.dispatch import Accepted, Dispatcher, Origin, Reply
from agent.errors import PERMANENT_CODES, AgentError, InvalidCommand
from agent.logs import RateLimitedLog, escape
from agent.mqtt.connection import Connection, Link, properties_for
from agent.mqtt.inbox import MAX_PENDING_BYTES, WAKE, Inbox, PendingCommands
from agent.mqtt.status import STATUS_MAX_INTERVAL, STATUS_MIN_INTERVAL, StatusPolicy

log = logging.getLogger("engagement_agent.mqtt")
paho_log = logging.getLogger("engagement_agent.mqtt.paho")

#: Replies to these go to the reply topic even without a request_id (docs/mqtt.md).
QUERY_COMMANDS = frozenset({"status", "flush", "get_customer"})
#: Valid app names whose `Origin` is kept: the app name check and the `Origin` are then
#: done once per app instead of once per message. Bounded, since topics are client input.
MAX_CACHED_ORIGINS = 256
#: The network thread stops reading from the broker while the inbox holds more than this
#: many times `mqtt.receive_maximum` commands (what a broker keeping to it sends at most:
#: that many QoS 1 in flight and as many QoS 0), until commits release some, or `READ_PAUSE`
#: seconds pass (then paho's loop writes acks and pings, and asks again). It may also pause
#: a broker that keeps to its limit: right after a reconnect, while the old connection's
#: commands are still committing, or on MQTT 3.1.1 with a broker in-flight limit above it.
READ_HOLD_FACTOR = 2
READ_PAUSE = 0.5


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is slow, and this is per message
class _Inbound:
    link: Link
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

    `status_changed()` alone may be called from any thread. `on_connect()` is called on the
    loop after every connection the broker accepted, the first and each reconnect, however
    short the outage was: a link that comes back is the daemon's sign that the network is
    back (sync then probes an unreachable API at once). The keyword-only timings exist for
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
        on_connect: Callable[[], None] | None = None,
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
        self._on_connect = on_connect
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._drain_timeout = drain_timeout
        self._log = RateLimitedLog(log)
        self._connection = Connection(
            config,
            loop,
            on_message=self._receive,
            may_read=self._room_to_read,
            on_connected=self._connected,
            on_lost=self._cancel_retries,
            drain=self._drain_work,
            reconnect_base=reconnect_base,
            reconnect_cap=reconnect_cap,
            rng=rng or random.Random(),
        )
        self._stopping = False
        # Query tasks, retry tasks and groups being committed: a closing link waits for them.
        self._work: set[asyncio.Future[Any]] = set()
        self._retrying: set[asyncio.Task[None]] = set()
        self._inbox: Inbox[_Inbound] = Inbox()
        self._origins: dict[str, Origin] = {}  # loop thread only
        self._status_policy = StatusPolicy(status_min_interval, status_max_interval)
        self._status_timers = _StatusTimers()
        self._status_hint_pending = False

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self._connection.connected

    def status(self) -> dict[str, Any]:
        """The `mqtt` section of the status document (docs/protocol.md)."""
        link = self._connection.link
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
        self._stopping = False
        self._connection.start()

    async def stop(self) -> None:
        """Finish in-flight commands (bounded), publish offline, disconnect, end the thread.

        Only commands that were committed are acked: anything still pending, waiting for a
        retry or arriving from now on stays unacked and the broker redelivers it.
        """
        self._stopping = True
        self._cancel_status_timers()
        self._release(self._inbox.take())
        await self._connection.stop(relink_timeout=self._drain_timeout + 10.0)

    def reload(self, config: AgentConfig) -> None:
        """Take new settings; reconnect (after draining in-flight commands) if MQTT's changed."""
        self._config = config
        self._pending_limits = self._limits_of(config)
        if not self._stopping:
            self._connection.reload(config)

    def status_changed(self) -> None:
        """Hint that status may have changed; cheap, thread-safe, coalesced."""
        if self._status_hint_pending:
            return
        self._status_hint_pending = True
        try:
            self._loop.call_soon_threadsafe(self._on_status_hint)
        except RuntimeError:  # loop closed: the daemon is gone
            self._status_hint_pending = False

    # ------------------------------------------------------------------ receiving (network thread)

    def _room_to_read(self) -> bool:
        """Network thread, before each read: whether the inbox has room for more (see
        `READ_HOLD_FACTOR`). A broker that sends past the Receive Maximum waits in TCP until
        commits make room, so memory stays bounded whatever it does."""
        max_count, _ = self._pending_limits
        return self._inbox.wait_for_room(READ_HOLD_FACTOR * max_count + 1, READ_PAUSE)

    def _receive(self, link: Link, message: paho.MQTTMessage) -> None:
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
        response_topic = None
        correlation = None
        if props is not None:
            response_topic = self._response_topic(link, app, getattr(props, "ResponseTopic", None))
            correlation = getattr(props, "CorrelationData", None)
        payload = bytes(message.payload)
        inbound = _Inbound(
            link,
            conn_id,
            message.mid,
            message.qos,
            app,
            payload,
            bool(message.retain),
            response_topic,
            bytes(correlation) if correlation is not None and response_topic else None,
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

    def _response_topic(self, link: Link, app: str, requested: object) -> str | None:
        """The MQTT 5 response topic to honour, or None (replies go to the usual topics).

        Only the commanding app's own `response/` subtree is honoured: anything else could
        be another app's reply or response topic, which the agent's account may write and
        the broker therefore cannot protect (docs/security.md). The refusal is said in the
        journal, at most once a minute.
        """
        if not isinstance(requested, str) or not requested:
            return None
        if link.topics.honours_response_topic(app, requested):
            return requested
        self._log.warning(
            "foreign-response-topic",
            "MQTT: ignored the response topic %s of a command for app %s: only topics under "
            "%s are honoured; the reply goes to the app's usual topics",
            escape(requested),
            escape(app),
            escape(link.topics.response_prefix(app)),
        )
        return None

    def _ack_raw(self, link: Link, conn_id: int, message: paho.MQTTMessage) -> None:
        if link.client is not None and link.connected and conn_id == link.conn_id:
            link.client.ack(message.mid, message.qos)

    # ------------------------------------------------------------------ command handling (loop)

    def _drain_inbox(self) -> None:
        """Everything that arrived since the last pass: one group for the writer."""
        batch = self._inbox.take()
        group: list[Accepted] = []
        members: list[_Inbound] = []
        for index, inbound in enumerate(batch):
            if self._stopping:
                self._release(batch[index:])
                break  # unacked: redelivered to the next connection
            if inbound.link.closing:  # its connection is being replaced: left unacked, the
                self._release([inbound])  # broker redelivers it on the next one
                continue
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
        origin = self._origins.get(inbound.app)
        if origin is None and is_valid_app_name(inbound.app):
            origin = inbound.origin
            if len(self._origins) < MAX_CACHED_ORIGINS:
                self._origins[inbound.app] = origin
        if origin is None:
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
        return self._dispatcher.prepare(inbound.payload, origin)

    def _refuse(self, inbound: _Inbound, error: AgentError) -> Reply:
        request_id = None
        if len(inbound.payload) <= self._config.limits.max_command_bytes:
            with contextlib.suppress(AgentError):
                request_id = request_id_of(parse_json(inbound.payload))
        return self._dispatcher.refuse(error, inbound.origin, request_id)

    def _cancel_retries(self) -> None:
        for task in list(self._retrying):
            task.cancel()

    async def _drain_work(self) -> None:
        pending = {work for work in self._work if not work.done()}
        if pending:
            await asyncio.wait(pending, timeout=self._drain_timeout)

    def _track(self, work: asyncio.Future[Any]) -> None:
        self._work.add(work)
        work.add_done_callback(self._work.discard)

    async def _query(self, inbound: _Inbound, command: Accepted) -> None:
        self._settle(inbound, await self._dispatcher.query(command))

    def _settle_group(self, inbounds: list[_Inbound], replies: list[Reply]) -> None:
        """`_settle` for a committed group, with one wake-up of the network thread for the
        PUBACKs of all the quiet successes (no reply to publish), in the order received."""
        # One link for all: `_drain_inbox` skips messages of a link being replaced.
        link = inbounds[0].link
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
                if link.connected and inbound.conn_id == link.conn_id:
                    acks.append(inbound.mid)
                continue
            self._ack_many(link, acks)  # earlier PUBACKs go first
            acks = []
            self._settle(inbound, reply)
        self._ack_many(link, acks)
        self._release(quiet)

    @staticmethod
    def _ack_many(link: Link, mids: list[int]) -> None:
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
            and link is self._connection.link
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
                properties = properties_for(PacketTypes.PUBLISH)
                properties.CorrelationData = inbound.correlation_data
            self._publish(link, inbound.response_topic, body, properties=properties)
        elif to_reply_topic:
            self._publish(link, link.topics.reply(inbound.app), body)

    def _publish(
        self,
        link: Link,
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

    def _connected(self, link: Link, session_present: bool) -> None:
        if link is not self._connection.link or link.closing or not link.connected:
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
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:
                log.exception("MQTT: the on-connect callback failed")

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
        link = self._connection.link
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


__all__ = ["MAX_CACHED_ORIGINS", "MAX_PENDING_BYTES", "QUERY_COMMANDS", "MqttAdapter"]
