"""systemd service notifications (sd_notify protocol) for `Type=notify` (docs/operations.md).

A thin layer over `sdnotify` that adds what the daemon needs from it: it is a silent no-op
without `$NOTIFY_SOCKET` (running by hand, in tests), it never raises into the caller (a lost
notification must not take the agent down; failures are logged at DEBUG), it reconnects once
when systemd was re-executed (`systemctl daemon-reexec` replaces the socket), it sends UTF-8
status text unchanged (sdnotify encodes as Latin-1), and it knows the watchdog interval.

sdnotify handles abstract-namespace socket addresses (`@name`) itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import sdnotify

log = logging.getLogger("engagement_agent.notify")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
    recommends. None when the watchdog is off or meant for another process (`$WATCHDOG_PID`)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd expects in `MONOTONIC_USEC=`."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Send service state to systemd. All methods are cheap no-ops outside systemd.

    The constructor only reads the environment (`$NOTIFY_SOCKET`, `$WATCHDOG_USEC`,
    `$WATCHDOG_PID`; sdnotify reads `os.environ` itself, so there is no `environ` parameter);
    the socket is connected on the first send. Thread-safe.
    """

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET", "")
        self._watchdog = watchdog_interval()
        self._notifier: Any = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete: `READY=1`."""
        self.notify("READY=1", *self._status(status))

    def status(self, text: str) -> None:
        """One-line summary shown by `systemctl status`."""
        self.notify(*self._status(text))

    def watchdog(self) -> None:
        """Keep-alive; send only while the main loop is healthy."""
        self.notify("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> None:
        """A reload started; finish it with `ready()`. `MONOTONIC_USEC` is what systemd ≥ 253
        requires with `RELOADING=1` (older versions ignore it)."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *self._status(status))

    def stopping(self, status: str | None = None) -> None:
        """Shutdown started: `STOPPING=1`."""
        self.notify("STOPPING=1", *self._status(status))

    def watchdog_interval(self) -> float | None:
        """See the module function; read once at construction like the rest of the env."""
        return self._watchdog

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.split()),)  # one line: a newline would end the field

    def notify(self, *fields: str) -> bool:
        """Send `fields` as one datagram; returns whether it was sent. Never raises."""
        if not self._address or not fields:
            return False
        # sdnotify encodes with Latin-1; passing UTF-8 bytes as Latin-1 text sends them as is.
        message = "\n".join(fields).encode("utf-8").decode("latin-1")
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._notifier is None:
                        self._notifier = self._connect()
                    self._notifier.notify(message)
                    return True
                except Exception as exc:  # never let a notification failure escape
                    self._close()
                    if attempt == 2:
                        log.debug("cannot notify systemd at %s: %s", self._address, exc)
        return False

    @staticmethod
    def _connect() -> Any:
        # debug=True: raise instead of swallowing, so notify() can log why.
        notifier = sdnotify.SystemdNotifier(debug=True)
        # The kernel queues only a few unread datagrams; when the reader falls behind, a
        # blocking send would freeze the event loop. A notification is dropped instead.
        notifier.socket.setblocking(False)
        return notifier

    def _close(self) -> None:
        sock = getattr(self._notifier, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._notifier = None
