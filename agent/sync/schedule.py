"""One project's sync schedule as a pure state machine (docs/sync.md, "States").

Everything that decides a project's state and when it is tried next lives here, and nothing
here does I/O, starts a thread or reads a clock: the worker reports what happened (an
`Outcome`) with the monotonic time and a uniform random number, and reads back the state and
the next wake time. That is what lets tests walk every transition without a socket.

The states, as status shows them (`sync.projects[].state`):

- `ok`: items are queued and being sent;
- `idle`: nothing queued;
- `backoff`: waiting after a failure: either the API is in trouble (5xx, 429, a timeout or a
  reset after the request was sent: full-jitter backoff capped at `sync.max_backoff`), or the
  API cannot be reached at all (refused, unreachable, DNS, connect timeout, a refusing proxy:
  retried on the network probe schedule, `sync.probe_interval` ±50%); also after the store
  could not record the API's answer;
- `paused`: the API refused the project's credentials or URL; retried every `sync.max_backoff`
  and at once after a config reload;
- `unconfigured`: items are queued for a project the current config does not name; they are
  kept, not sent, until it does (a reload tries again).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.backoff import full_jitter, spread

#: Backoff base in seconds (docs/sync.md).
BACKOFF_BASE = 1.0
#: After an MQTT reconnect (a hint that the network is back) a project waiting on the probe
#: schedule is tried within this many seconds, jittered so a fleet that reconnects together
#: does not probe the API in one spike.
HINT_WINDOW = 1.0


class State(str, enum.Enum):
    """A project's sync state; the values are the names status and metrics show."""

    OK = "ok"
    IDLE = "idle"
    BACKOFF = "backoff"
    PAUSED = "paused"
    UNCONFIGURED = "unconfigured"


#: How bad each state is, worst first: what a summary of several projects shows (the fleet
#: view's "worst sync state").
SEVERITY = (State.PAUSED, State.BACKOFF, State.UNCONFIGURED, State.OK, State.IDLE)


class Kind(enum.Enum):
    """What a drain attempt came to."""

    #: The API answered per command (some or all may have been refused individually).
    DELIVERED = "delivered"
    #: Nothing is left to send.
    DRAINED = "drained"
    #: Items were committed for the project.
    QUEUED = "queued"
    #: The API is in trouble: 5xx, 429, or no (complete) answer after the request was sent.
    API_TROUBLE = "api_trouble"
    #: The request never reached the API: refused, unreachable, DNS, connect timeout, proxy.
    UNREACHABLE = "unreachable"
    #: The API refused the credentials or the URL for the whole batch.
    REFUSED = "refused"
    #: The API answered but the store could not record it (disk full, store closed).
    STORE_FAILED = "store_failed"
    #: The current config does not name the project.
    UNCONFIGURED = "unconfigured"


class Wait(enum.Enum):
    """Why a project is not being sent right now, which decides what wakes it early."""

    NONE = "none"
    BACKOFF = "backoff"  # a timer; nothing shortens it (the API asked for patience)
    PROBE = "probe"  # a timer; an MQTT reconnect or a reload shortens it
    PAUSE = "pause"  # a timer at the cap; a reload ends it
    HELD = "held"  # no timer; a reload ends it


#: The transition table: the state each outcome leads to (h11 style; docs/sync.md draws it).
NEXT_STATE: dict[Kind, State] = {
    Kind.DELIVERED: State.OK,
    Kind.DRAINED: State.IDLE,
    Kind.QUEUED: State.OK,
    Kind.API_TROUBLE: State.BACKOFF,
    Kind.UNREACHABLE: State.BACKOFF,
    Kind.REFUSED: State.PAUSED,
    Kind.STORE_FAILED: State.BACKOFF,
    Kind.UNCONFIGURED: State.UNCONFIGURED,
}

#: The wait each failing outcome starts.
NEXT_WAIT: dict[Kind, Wait] = {
    Kind.API_TROUBLE: Wait.BACKOFF,
    Kind.UNREACHABLE: Wait.PROBE,
    Kind.REFUSED: Wait.PAUSE,
    Kind.STORE_FAILED: Wait.BACKOFF,
    Kind.UNCONFIGURED: Wait.HELD,
}

#: Waits a config reload ends at once: the reload may have fixed the credentials, the URL,
#: the proxy or named the project. A backoff is not cut short: the API asked for patience.
ENDED_BY_RELOAD = frozenset({Wait.PAUSE, Wait.PROBE, Wait.HELD})


@dataclass(frozen=True)
class Outcome:
    """One event for the schedule; `reason` is secret-free text for status and the journal;
    `retry_after` is the server's wish in seconds (a floor for the backoff)."""

    kind: Kind
    reason: str = ""
    retry_after: float | None = None


@dataclass(frozen=True)
class Settings:
    """The `[sync]` keys the schedule needs; `automatic` is false in `flush_mode = "manual"`
    (then nothing is retried by a timer: manual means manual)."""

    max_backoff: float = 300.0
    probe_interval: float = 15.0
    automatic: bool = True


@dataclass(frozen=True)
class Change:
    """What `record` did, for the journal: `news` is true when the state or the reason is new
    (log it now; repeats are for a rate-limited log); `recovered` counts the failed attempts a
    success ended (0: there were none); `delay` is the wait started, if any."""

    state: State
    news: bool = False
    recovered: int = 0
    resumed: bool = False
    delay: float | None = None


class Schedule:
    """The state of one project's sync. Not thread-safe: the worker guards it with its lock.

    Times are monotonic seconds (`retry_at`), except `last_success`, which is wall time for
    status.
    """

    def __init__(self, *, pending: bool = True) -> None:
        self.state = State.OK if pending else State.IDLE
        self.wait = Wait.NONE
        self.retry_at: float | None = None
        self.failures = 0  # consecutive API-trouble attempts: the backoff's exponent
        self.unreachable = 0  # consecutive attempts that could not reach the API
        self.store_failures = 0  # consecutive drains whose answers the store could not record
        self.last_error: str | None = None
        self.last_success: float | None = None

    # -- outcomes --------------------------------------------------------------------------

    def record(self, outcome: Outcome, now: float, settings: Settings, uniform: float) -> Change:
        """Apply one outcome at monotonic time `now`; `uniform` in [0, 1) draws the jitter."""
        kind = outcome.kind
        if kind is Kind.QUEUED:
            if self.state is State.IDLE:
                self.state = State.OK
            return Change(self.state)
        if kind is Kind.DELIVERED:
            return self._delivered()
        if kind is Kind.DRAINED:  # nothing left to send: nothing left to wait for
            self.state, self.wait, self.retry_at = State.IDLE, Wait.NONE, None
            return Change(self.state)
        before = (self.state, self.last_error)
        delay = self._delay(outcome, settings, uniform)
        if kind is Kind.STORE_FAILED:
            self.store_failures += 1
            if self.wait is Wait.NONE:
                self.wait = Wait.BACKOFF
            if delay is not None and settings.automatic:
                # An API failure scheduled in the same drain (e.g. Retry-After) may be later.
                self.retry_at = max(self.retry_at or 0.0, now + delay)
        else:
            if kind is Kind.API_TROUBLE:
                self.failures += 1
            elif kind is Kind.UNREACHABLE:
                self.unreachable += 1
            elif kind is Kind.REFUSED:
                self.failures = 0
            self.wait = NEXT_WAIT[kind]
            self.retry_at = now + delay if delay is not None and settings.automatic else None
        self.state = NEXT_STATE[kind]
        self.last_error = outcome.reason
        return Change(self.state, news=(self.state, self.last_error) != before, delay=delay)

    def _delay(self, outcome: Outcome, settings: Settings, uniform: float) -> float | None:
        kind = outcome.kind
        if kind is Kind.API_TROUBLE:
            delay = full_jitter(
                self.failures, base=BACKOFF_BASE, cap=settings.max_backoff, uniform=uniform
            )
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)  # honoured even above the cap
            return delay
        if kind is Kind.UNREACHABLE:
            return spread(settings.probe_interval, uniform=uniform)
        if kind is Kind.REFUSED:
            return settings.max_backoff
        if kind is Kind.STORE_FAILED:
            return full_jitter(
                self.store_failures, base=BACKOFF_BASE, cap=settings.max_backoff, uniform=uniform
            )
        return None  # UNCONFIGURED: held until a reload

    def _delivered(self) -> Change:
        recovered = self.failures + self.unreachable if self.wait is not Wait.PAUSE else 0
        resumed = self.state is State.PAUSED
        self.failures = self.unreachable = 0
        self.wait = Wait.NONE
        self.retry_at = None
        self.state = State.BACKOFF if self.store_failures else State.OK
        return Change(self.state, recovered=recovered, resumed=resumed)

    def store_recovered(self) -> int:
        """The store records answers again; returns how many drains had failed (0: none)."""
        attempts, self.store_failures = self.store_failures, 0
        if attempts and self.wait is Wait.BACKOFF and not self.failures:
            self.wait, self.retry_at = Wait.NONE, None
        if attempts and self.wait is Wait.NONE and self.state is State.BACKOFF:
            self.state = State.OK
        return attempts

    def succeeded(self, wall: float) -> None:
        """The API accepted a request at wall time `wall` (for status)."""
        self.last_success = wall

    # -- triggers --------------------------------------------------------------------------

    def reload(self) -> bool:
        """A config reload happened; returns whether the project should be tried at once."""
        if self.wait in ENDED_BY_RELOAD:
            self.retry_at = None
            return True
        return False

    def network_hint(self, now: float, uniform: float) -> bool:
        """The network seems to be back (the MQTT link reconnected): a project waiting on the
        probe schedule is tried within `HINT_WINDOW`. Returns whether its wake time moved."""
        if self.wait is not Wait.PROBE:
            return False
        at = now + HINT_WINDOW * uniform
        if self.retry_at is not None and self.retry_at <= at:
            return False
        self.retry_at = at
        return True

    # -- reading ---------------------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """Whether automatic sending waits (for `retry_at`, a reload, or forever in manual)."""
        return self.wait is not Wait.NONE

    def due(self, now: float) -> bool:
        """Whether a waiting project's timer has expired."""
        return self.retry_at is not None and now >= self.retry_at


__all__ = [
    "BACKOFF_BASE",
    "ENDED_BY_RELOAD",
    "HINT_WINDOW",
    "NEXT_STATE",
    "NEXT_WAIT",
    "SEVERITY",
    "Change",
    "Kind",
    "Outcome",
    "Schedule",
    "Settings",
    "State",
    "Wait",
]
