"""Flow control for received commands (pure bookkeeping; thread-safe, no I/O).

paho's network thread puts messages here and the event loop takes everything that arrived
since its last pass, in one wake-up. QoS 1 is never dropped: the broker bounds it (Receive
Maximum on MQTT 5, its in-flight limit on 3.1.1, as the agent acks only after the commit).
QoS 0 has no flow control at all, so past `max_count` commands or `max_bytes` payload bytes
held (received and not finished), QoS 0 commands are dropped — within their at-most-once
contract — instead of growing memory without limit.

A broker that sends more QoS 1 messages than it was allowed (Mosquitto 2.0 does, resuming a
session with a backlog: thousands at once) is held back by TCP instead: the network thread
asks `wait_for_room` before each read and stops reading while the inbox holds too many.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

#: Payload bytes held beyond which QoS 0 commands are dropped (`limits.max_command_bytes` if
#: that is larger, so one command always fits). The count bound is `mqtt.receive_maximum`.
MAX_PENDING_BYTES = 16 * 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class PendingCommands:
    """Commands received and not finished (waiting for the loop, being committed or waiting
    for a retry), the high-water marks since start, and QoS 0 commands dropped so far."""

    count: int
    bytes: int
    peak_count: int
    peak_bytes: int
    qos0_dropped: int


@dataclass(frozen=True)
class Admission:
    admitted: bool
    #: The loop must be woken (the first message since its last pass).
    wake: bool = False
    #: For the drop's log line: what was held when it was dropped.
    held_count: int = 0
    held_bytes: int = 0


#: The two answers for an admitted message, allocated once (this is per message).
ADMITTED = Admission(True)
WAKE = Admission(True, wake=True)


class Inbox(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._readers_waiting = 0  # network threads in `wait_for_room` (two while links swap)
        self._items: list[T] = []
        self._scheduled = False
        self._count = 0
        self._bytes = 0
        self._peak_count = 0
        self._peak_bytes = 0
        self._qos0_dropped = 0

    def put(self, item: T, size: int, qos: int, max_count: int, max_bytes: int) -> Admission:
        with self._lock:
            count, held = self._count, self._bytes
            if qos == 0 and (count >= max_count or held + size > max_bytes):
                self._qos0_dropped += 1
                return Admission(False, held_count=count, held_bytes=held)
            self._count = count + 1
            self._bytes = held + size
            self._peak_count = max(self._peak_count, self._count)
            self._peak_bytes = max(self._peak_bytes, self._bytes)
            self._items.append(item)
            if self._scheduled:
                return ADMITTED
            self._scheduled = True
            return WAKE

    def take(self) -> list[T]:
        """Everything put since the last `take()`; the next `put()` wakes the loop again."""
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
            return items

    def wake_failed(self) -> None:
        """The loop could not be woken (it is closed): let a later `put()` try again."""
        with self._lock:
            self._scheduled = False

    def release(self, sizes: Sequence[int]) -> None:
        """Commands taken earlier are finished (acked, refused, or left to the broker)."""
        with self._lock:
            self._count -= len(sizes)
            self._bytes -= sum(sizes)
            if self._readers_waiting:
                self._room.notify_all()

    def wait_for_room(self, limit: int, timeout: float) -> bool:
        """Network thread, before it reads from the broker: whether fewer than `limit`
        commands are held, waiting up to `timeout` seconds for `release` to make it so."""
        with self._lock:
            if self._count < limit:
                return True
            self._readers_waiting += 1
            try:
                return self._room.wait_for(lambda: self._count < limit, timeout)
            finally:
                self._readers_waiting -= 1

    def snapshot(self) -> PendingCommands:
        with self._lock:
            return PendingCommands(
                self._count, self._bytes, self._peak_count, self._peak_bytes, self._qos0_dropped
            )


__all__ = ["ADMITTED", "MAX_PENDING_BYTES", "WAKE", "Admission", "Inbox", "PendingCommands"]
