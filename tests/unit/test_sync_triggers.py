"""When a project's worker drains (agent/sync/triggers.py): the flush modes of docs/sync.md,
flushes, reloads, stop and the schedule's timers — plain values, no threads, no clock."""

from __future__ import annotations

from agent.config import SyncConfig
from agent.sync.commits import FlushRequest
from agent.sync.schedule import Kind, Outcome, Schedule, Settings
from agent.sync.triggers import Job, Sleep, Triggers, next_step

IMMEDIATE = SyncConfig(flush_mode="immediate")
PERIOD = SyncConfig(flush_mode="period", flush_period=60.0)
MANUAL = SyncConfig(flush_mode="manual")
SETTINGS = Settings(max_backoff=300.0, probe_interval=15.0)


def failed(kind: Kind, now: float = 100.0) -> Schedule:
    schedule = Schedule()
    schedule.record(Outcome(kind, "reason"), now, SETTINGS, 0.5)
    return schedule


def test_immediate_drains_when_items_are_queued_and_may_linger() -> None:
    triggers, schedule = Triggers(wake=True), Schedule()
    assert next_step(triggers, schedule, IMMEDIATE, 0.0) == Job(True, True, [])
    assert next_step(triggers, schedule, IMMEDIATE, 0.0) == Sleep()  # until new items
    triggers.wake = True
    assert next_step(triggers, schedule, IMMEDIATE, 5.0) == Job(True, True, [])


def test_period_drains_every_flush_period_whatever_is_queued() -> None:
    triggers, schedule = Triggers(wake=True), Schedule()
    assert next_step(triggers, schedule, PERIOD, 10.0) == Sleep(60.0)
    assert triggers.period_at == 70.0  # what status shows as the next attempt
    assert next_step(triggers, schedule, PERIOD, 40.0) == Sleep(30.0)
    assert next_step(triggers, schedule, PERIOD, 70.0) == Job(True, False, [])
    assert triggers.period_at == 130.0


def test_manual_never_drains_on_its_own_but_serves_a_flush() -> None:
    triggers, schedule = Triggers(wake=True), Schedule()
    assert next_step(triggers, schedule, MANUAL, 0.0) == Sleep()
    flush = FlushRequest(budget=10)
    triggers.flushes.append(flush)
    assert next_step(triggers, schedule, MANUAL, 0.0) == Job(False, False, [flush])
    assert triggers.flushes == []


def test_a_flush_goes_ahead_while_the_project_backs_off_or_is_paused() -> None:
    for kind in (Kind.API_TROUBLE, Kind.REFUSED, Kind.UNCONFIGURED):
        triggers = Triggers(wake=False, flushes=[FlushRequest(budget=1)])
        step = next_step(triggers, failed(kind), IMMEDIATE, 100.0)
        assert isinstance(step, Job) and not step.automatic and len(step.flushes) == 1


def test_a_backing_off_project_sleeps_until_its_retry_time_new_items_or_not() -> None:
    triggers, schedule = Triggers(wake=True), failed(Kind.API_TROUBLE)
    assert schedule.retry_at is not None
    retry_at = schedule.retry_at
    assert next_step(triggers, schedule, IMMEDIATE, 100.0) == Sleep(retry_at - 100.0)
    assert next_step(triggers, schedule, IMMEDIATE, retry_at) == Job(True, False, [])


def test_a_reload_ends_a_pause_or_a_hold_at_once_but_not_a_backoff() -> None:
    for kind, at_once in [
        (Kind.REFUSED, True),
        (Kind.UNCONFIGURED, True),
        (Kind.UNREACHABLE, True),
        (Kind.API_TROUBLE, False),
    ]:
        triggers = Triggers(wake=False, reloaded=True)
        step = next_step(triggers, failed(kind), IMMEDIATE, 100.0)
        assert (step == Job(True, False, [])) is at_once, kind
        assert not triggers.reloaded


def test_in_manual_mode_nothing_is_retried_on_its_own() -> None:
    for kind in (Kind.API_TROUBLE, Kind.REFUSED):
        schedule = Schedule()
        schedule.record(Outcome(kind, "reason"), 100.0, Settings(automatic=False), 0.5)
        triggers = Triggers(wake=True, reloaded=True)
        assert next_step(triggers, schedule, MANUAL, 1e9) == Sleep()


def test_a_stopping_worker_serves_its_final_flush_then_ends() -> None:
    final = FlushRequest(budget=5, deadline=10.0)
    triggers = Triggers(wake=True, stopping=True, flushes=[final])
    assert next_step(triggers, Schedule(), IMMEDIATE, 0.0) == Job(False, False, [final])
    assert next_step(triggers, Schedule(), IMMEDIATE, 0.0) is None
