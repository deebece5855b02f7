"""When a project's worker drains: flushes, stop, reload, the flush mode and the schedule's
timers as one decision (docs/sync.md, "Flush modes"). Pure: the worker passes in what other
threads asked of it (`Triggers`), its `Schedule`, the `[sync]` settings and the monotonic
time, and gets back a `Job` to run, a `Sleep`, or None to end.

The rules, in order:
- a flush goes ahead whatever the schedule says: an operator asked for it;
- a stopping worker with no flush left ends;
- while the schedule waits (backoff, probe, pause, held), only its timer or a reload that
  ends the wait starts a drain; never in `manual` mode;
- otherwise `immediate` drains when items were queued (`fresh`: a partial batch may linger),
  `period` every `sync.flush_period` seconds, `manual` never on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import SyncConfig
from agent.sync.commits import FlushRequest
from agent.sync.schedule import Schedule


@dataclass
class Triggers:
    """What other threads asked of a worker; guarded by the worker's lock. `period_at` is the
    next periodic drain (monotonic) in `flush_mode = "period"`."""

    wake: bool = True  # items are (or may be) queued
    reloaded: bool = False
    stopping: bool = False
    aborted: bool = False
    flushes: list[FlushRequest] = field(default_factory=list)
    period_at: float | None = None


@dataclass(frozen=True)
class Job:
    """Why a drain runs: `automatic` (not only flushes), `fresh` (woken by new items: a
    partial batch may linger), and the flush requests it serves."""

    automatic: bool
    fresh: bool
    flushes: list[FlushRequest]


@dataclass(frozen=True)
class Sleep:
    """Nothing to do until notified, or until `timeout` seconds passed (None: no timer)."""

    timeout: float | None = None


def next_step(
    triggers: Triggers, schedule: Schedule, sync: SyncConfig, now: float
) -> Job | Sleep | None:
    """Decide, consuming the triggers it acts on (flushes taken, a reload or a wake-up
    cleared, the period's next time set)."""
    if triggers.flushes:
        flushes, triggers.flushes = triggers.flushes, []
        return Job(False, False, flushes)
    if triggers.stopping:
        return None
    manual = sync.flush_mode == "manual"
    if schedule.waiting:
        if triggers.reloaded:
            triggers.reloaded = False
            if schedule.reload() and not manual:
                return Job(True, False, [])
        if manual or schedule.retry_at is None:
            return Sleep()
        if schedule.due(now):
            return Job(True, False, [])
        return Sleep(schedule.retry_at - now)
    triggers.reloaded = False
    if sync.flush_mode == "immediate":
        triggers.period_at = None
        if triggers.wake:
            triggers.wake = False
            return Job(True, True, [])
        return Sleep()
    if sync.flush_mode == "period":
        if triggers.period_at is None:
            triggers.period_at = now + sync.flush_period
        if now >= triggers.period_at:
            triggers.period_at = now + sync.flush_period
            triggers.wake = False
            return Job(True, False, [])
        return Sleep(triggers.period_at - now)
    triggers.period_at = None
    return Sleep()


__all__ = ["Job", "Sleep", "Triggers", "next_step"]
