"""paho's client with its network thread's body replaced (see `PahoClient`).

`_thread_main` is private paho API; paho is pinned to 2.x in pyproject.toml.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

log = logging.getLogger("engagement_agent.mqtt")


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


__all__ = ["PahoClient"]
