"""Connect and reconnect policy of the broker link (pure; docs/mqtt.md, "Connection").

- Reconnects: exponential backoff with full jitter (`reconnect_delay`, the shared
  `agent/backoff.py`), so a fleet that lost its broker does not come back in lockstep; a
  connection that lasted `STABLE_CONNECTION` resets it, a broker that accepts and then kicks
  us at once keeps growing it.
- `mqtt.protocol = "auto"` (`ProtocolChoice`): MQTT 5 first, MQTT 3.1.1 when the broker
  refuses 5 — a CONNACK "unsupported protocol version", or the connection closed during
  CONNECT before any version worked (RabbitMQ 3.10 does that). `5` and `3` force one.
- `describe_failure`: a connect failure in words that name the likely cause, since brokers'
  own reasons ("Unspecified error") often do not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from agent.backoff import full_jitter

#: A connection that lasted this long resets the reconnect backoff.
STABLE_CONNECTION = 30.0
#: CONNACK reason codes meaning "not this protocol version": MQTT 5's 0x84, and 3.1.1's 1
#: (paho reports the latter as "Unsupported protocol version" too).
UNSUPPORTED_VERSION = frozenset({0x84, 0x01})

ProtocolSetting = Literal["auto", 3, 5]


def reconnect_delay(attempts: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before reconnect attempt number `attempts` (0 for the first retry): uniform
    in [0, min(cap, base * 2**attempts)) (full jitter)."""
    return full_jitter(attempts, base=base, cap=cap, uniform=rng.random())


@dataclass(frozen=True)
class Attempt:
    """How one connection attempt ended, as far as the protocol choice cares."""

    version: int  # 5 or 3 (3.1.1)
    connack: int | None = None  # the CONNACK's reason code; None when none arrived
    closed_at_connect: bool = False  # TCP (and TLS) up, then closed before any CONNACK


class ProtocolChoice:
    """Which MQTT version the next attempt uses; `after()` learns from each attempt."""

    def __init__(self, setting: ProtocolSetting) -> None:
        self.setting: ProtocolSetting = setting
        self.version = 3 if setting == 3 else 5
        self._worked = False  # a version was accepted: closes are then not about the version
        self._announced = False

    def after(self, attempt: Attempt) -> str | None:
        """Record an attempt; returns the journal line when "auto" switches version (said once;
        later switches return None)."""
        if attempt.version != self.version:
            return None
        if attempt.connack == 0:
            self._worked = True
            return None
        if self.setting != "auto":
            return None
        refused = attempt.connack in UNSUPPORTED_VERSION
        if not refused and not (attempt.closed_at_connect and not self._worked):
            return None
        old, self.version = self.version, 3 if self.version == 5 else 5
        if self._announced:
            return None
        self._announced = True
        how = "refused" if refused else "closed the connection at"
        return (
            f"MQTT: the broker {how} an MQTT {_name(old)} CONNECT; trying MQTT "
            f'{_name(self.version)} (mqtt.protocol = "auto"; set 3 or 5 to force one)'
        )


def describe_failure(attempt: Attempt, reason: str) -> str:
    """`reason` (paho's words) with the likely cause when they do not name one."""
    if attempt.connack in UNSUPPORTED_VERSION:
        return f"{reason}: the broker does not speak MQTT {_name(attempt.version)} (mqtt.protocol)"
    if attempt.closed_at_connect:
        hint = (
            "it may not support MQTT 5 (mqtt.protocol = 3), or refuse our client id, user name "
            "or TLS settings"
            if attempt.version == 5
            else "it may refuse our client id, user name or TLS settings; see the broker's log"
        )
        return f"{reason}: the broker closed the connection before answering CONNECT; {hint}"
    return reason


def _name(version: int) -> str:
    return "5" if version == 5 else "3.1.1"


__all__ = [
    "STABLE_CONNECTION",
    "Attempt",
    "ProtocolChoice",
    "ProtocolSetting",
    "describe_failure",
    "reconnect_delay",
]
