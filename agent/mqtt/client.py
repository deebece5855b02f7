"""paho's client with its network thread's body replaced and acks sent in groups (see
`PahoClient`). Both use private paho API; paho is pinned to 2.x in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

log = logging.getLogger("engagement_agent.mqtt")

_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id: success


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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._idle_timeout = idle_timeout
        self._on_thread_exit = on_thread_exit

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
        wake = self._sockpairW
        if mids and wake is not None:
            with contextlib.suppress(BlockingIOError):
                wake.send(b"0")

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
