"""paho's client with its network thread's body replaced, a leaner receive path and acks sent
in groups (see `PahoClient`). All of it uses private paho API; paho is pinned to 2.x in
pyproject.toml, and tests/unit/test_mqtt_client.py checks the decoding against paho's own.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

log = logging.getLogger("engagement_agent.mqtt")

_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id: success
#: Bytes read from the socket at once; paho asks for 1 byte, 1 byte, then the rest per packet.
READ_CHUNK = 65536


#: The `info` of every `_Received` message: never waited on (see there).
_NO_INFO = paho.MQTTMessageInfo(0)


class _Received(paho.MQTTMessage):
    """A received QoS 0/1 message, built without paho's per-message `MQTTMessageInfo` (a
    `Condition` and an `RLock` each, ~2 µs): `info` tracks the sending of an outgoing
    message; nothing reads it for a received QoS 0/1 one (paho keeps only QoS 2 messages)."""

    __slots__ = ()

    def __init__(self, mid: int, topic: bytes, payload: bytes, header: int) -> None:
        self.timestamp = time.monotonic()  # paho's clock for it
        self.state = paho.mqtt_ms_invalid
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = (header & 0x06) >> 1
        self.dup = bool(header & 0x08)
        self.retain = bool(header & 0x01)
        self.info = _NO_INFO
        self.properties = None


class PahoClient(paho.Client):
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

    Per message, paho's parser costs more than the agent's own checks; four things trim it
    (together ~20 → ~4 µs per command on the network thread): reads are buffered (paho does
    three `recv()` calls per packet), a QoS 0/1 PUBLISH of MQTT 3.1.1, or of MQTT 5 without
    properties, is decoded without paho's `Properties` object, logging or `MQTTMessageInfo`,
    and messages go straight to `on_message`.

    `ack_many()` queues the PUBACKs of a whole committed group and wakes the network thread
    once: paho's `ack()` writes to its socketpair per message, which was a tenth of the CPU
    of MQTT ingest.

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
        may_read: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._idle_timeout = idle_timeout
        self._on_thread_exit = on_thread_exit
        self._may_read = may_read
        self._read_data = b""  # read from the socket, not yet given to paho's parser
        self._read_pos = 0
        self._recvs_left = 1  # socket reads left in this `loop_read` call

    # -- buffered reads: paho's parser does three recv() calls per packet --------------------
    def _sock_recv(self, bufsize: int) -> bytes:
        data, pos = self._read_data, self._read_pos
        if pos >= len(data):
            if self._recvs_left <= 0:
                # This call's chunk is parsed: paho keeps the partial packet, and its loop
                # writes (acks!) and comes back, instead of reading on while data flows.
                raise BlockingIOError
            self._recvs_left -= 1
            data = super()._sock_recv(READ_CHUNK)  # b"" at EOF, BlockingIOError when dry
            if len(data) <= bufsize:
                self._read_data, self._read_pos = b"", 0
                return data
            pos = 0
        end = pos + bufsize
        if end >= len(data):
            self._read_data, self._read_pos = b"", 0
        else:
            self._read_data, self._read_pos = data, end
        return data[pos:end]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """One socket read (`READ_CHUNK` bytes) parsed to its end: paho's `loop_read` repeated
        until the read buffer is empty, as `select()` cannot see bytes already taken off the
        socket, so none may be left behind when paho waits; and no second read, so a broker
        that never pauses cannot keep paho's loop from writing the acks.

        Nothing is read while `may_read()` says no (it may block a while first): the broker's
        messages then wait in TCP's buffers. The acks queued meanwhile are written here, as
        paho's loop would write them only after this call, and only if they were queued before
        its `select()`. Reading does not wait while the connection is being set up (its
        CONNACK), nor once nothing was read for half the keepalive: paho would close the
        connection for a missing PINGRESP."""
        may_read = self._may_read
        if may_read is not None:
            rc = self._write_queued()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
            if not may_read() and not self._must_read():
                return self._write_queued()
        self._recvs_left = 1
        rc = super().loop_read(max_packets)
        while (
            rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            and self._read_pos < len(self._read_data)
            and self._sock is not None
        ):
            rc = super().loop_read(max_packets)
        return rc

    def _write_queued(self) -> MQTTErrorCode:
        if self._out_packet and self._sock is not None:
            return self.loop_write()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _must_read(self) -> bool:
        """Whether reading cannot wait for room (see `loop_read`)."""
        if not self.is_connected():
            return True
        silent = time.monotonic() - self._last_bytes_received  # paho's clock: time.monotonic
        return self._keepalive > 0 and silent >= self._keepalive / 2

    def _sock_close(self) -> None:
        self._read_data, self._read_pos = b"", 0  # never parse one connection's bytes on another
        super()._sock_close()

    def _handle_publish(self) -> MQTTErrorCode:
        """A QoS 0/1 PUBLISH — MQTT 3.1.1, or MQTT 5 without properties — decoded without
        paho's `Properties` object (~10 µs per message: it builds two 27-entry tables each
        time), its debug-log formatting and its per-message `MQTTMessageInfo` (see
        `_Received`); anything else — QoS 2, MQTT 5 properties (a response topic, a topic
        alias), a malformed packet — goes to paho's own decoder. The message is the one paho
        would deliver, with `properties` None instead of empty."""
        header: int = self._in_packet["command"]
        packet: bytes | bytearray = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if qos == 2:
            return super()._handle_publish()
        topic_end = 2 + int.from_bytes(packet[:2], "big")
        payload_at = topic_end + (2 if qos else 0)
        if self._protocol == paho.MQTTv5:
            if topic_end == 2 or len(packet) <= payload_at or packet[payload_at] != 0:
                return super()._handle_publish()  # properties (or an alias), or malformed
            payload_at += 1  # the empty property length
        elif topic_end == 2 or len(packet) < payload_at:
            return super()._handle_publish()  # malformed: paho says how
        mid = int.from_bytes(packet[topic_end : topic_end + 2], "big") if qos else 0
        message = _Received(mid, bytes(packet[2:topic_end]), bytes(packet[payload_at:]), header)
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        """Straight to `on_message`: paho's version first matches the topic against the
        per-topic callbacks (`message_callback_add`, which the agent never uses) under two
        locks, per message. Exceptions are the callback's to catch (the adapter's does)."""
        on_message = self.on_message
        if on_message is not None:
            on_message(self, self._userdata, message)

    def ack_many(self, mids: Sequence[int]) -> None:
        """PUBACK (success) for QoS 1 messages `mids`, in order; call from any thread.

        Does what paho's `ack()` does for QoS 1 (`_send_command_with_mid` → `_packet_queue`),
        with one socketpair write for all of them. Appending to paho's deque is thread-safe;
        the network thread writes the packets.
        """
        out = self._out_packet
        for mid in mids:
            packet = _PUBACK.pack(paho.PUBACK, 2, mid)
            out.append(
                {
                    "command": paho.PUBACK,
                    "mid": mid,
                    "qos": 1,
                    "pos": 0,
                    "to_process": len(packet),
                    "packet": packet,
                    "info": None,
                }
            )
        if not mids:
            return
        wake = self._sockpairW
        if wake is not None:
            with contextlib.suppress(BlockingIOError):
                wake.send(b"0")
        self._call_socket_register_write()  # as `_packet_queue` does: for an external loop

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


__all__ = ["PahoClient"]
