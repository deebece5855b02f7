"""A project's sync schedule (agent/sync/schedule.py): every transition, no threads, no
sockets, no clock — times and random numbers are passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sync.schedule import (
    HINT_WINDOW,
    NEXT_STATE,
    SEVERITY,
    Kind,
    Outcome,
    Schedule,
    Settings,
    State,
    Wait,
)

SETTINGS = Settings(max_backoff=300.0, probe_interval=15.0)
MANUAL = Settings(max_backoff=300.0, probe_interval=15.0, automatic=False)
FAILURES = [Kind.API_TROUBLE, Kind.UNREACHABLE, Kind.REFUSED, Kind.STORE_FAILED, Kind.UNCONFIGURED]


def test_every_state_has_a_severity_and_every_outcome_a_next_state() -> None:
    assert set(SEVERITY) == set(State)
    assert set(NEXT_STATE) == set(Kind)
    assert [s.value for s in State] == ["ok", "idle", "backoff", "paused", "unconfigured"]


def test_new_items_make_an_idle_project_ok_and_draining_makes_it_idle_again() -> None:
    schedule = Schedule(pending=False)
    assert schedule.state is State.IDLE
    schedule.record(Outcome(Kind.QUEUED), 0.0, SETTINGS, 0.5)
    assert schedule.state is State.OK
    schedule.record(Outcome(Kind.DRAINED), 1.0, SETTINGS, 0.5)
    assert schedule.state is State.IDLE and not schedule.waiting


def test_api_trouble_backs_off_with_full_jitter_doubling_up_to_the_cap() -> None:
    schedule = Schedule()
    ceilings = []
    for attempt in range(12):
        change = schedule.record(Outcome(Kind.API_TROUBLE, "HTTP 503"), 100.0, SETTINGS, 0.999)
        assert change.delay is not None
        ceilings.append(change.delay)
        assert schedule.retry_at == pytest.approx(100.0 + change.delay)
        assert schedule.state is State.BACKOFF and schedule.wait is Wait.BACKOFF
        assert change.news is (attempt == 0)
    assert ceilings[0] == pytest.approx(0.999)
    assert ceilings[3] == pytest.approx(8 * 0.999)
    assert max(ceilings) <= SETTINGS.max_backoff


def test_retry_after_is_a_floor_even_above_the_cap() -> None:
    schedule = Schedule()
    change = schedule.record(Outcome(Kind.API_TROUBLE, "HTTP 429", 600.0), 0.0, SETTINGS, 0.1)
    assert change.delay == 600.0 and schedule.retry_at == 600.0


def test_unreachable_waits_on_the_probe_schedule_not_the_backoff() -> None:
    schedule = Schedule()
    for _ in range(20):  # however long the network is down, the probe interval does not grow
        change = schedule.record(Outcome(Kind.UNREACHABLE, "cannot connect"), 0.0, SETTINGS, 0.0)
        assert change.delay == 7.5
    change = schedule.record(Outcome(Kind.UNREACHABLE, "cannot connect"), 0.0, SETTINGS, 0.999)
    assert change.delay == pytest.approx(22.5, rel=1e-3)
    assert schedule.state is State.BACKOFF and schedule.wait is Wait.PROBE
    assert schedule.failures == 0  # the API's backoff exponent is untouched


def test_refused_credentials_pause_at_the_cap_and_a_reload_ends_the_pause() -> None:
    schedule = Schedule()
    change = schedule.record(Outcome(Kind.REFUSED, "paused: HTTP 401"), 10.0, SETTINGS, 0.5)
    assert schedule.state is State.PAUSED and schedule.retry_at == 310.0 and change.news
    again = schedule.record(Outcome(Kind.REFUSED, "paused: HTTP 401"), 310.0, SETTINGS, 0.5)
    assert not again.news  # the journal says it once
    assert schedule.reload() and schedule.retry_at is None
    resumed = schedule.record(Outcome(Kind.DELIVERED), 311.0, SETTINGS, 0.5)
    assert resumed.resumed and resumed.state is State.OK and not schedule.waiting


def test_unconfigured_is_held_without_a_timer_until_a_reload() -> None:
    schedule = Schedule()
    change = schedule.record(Outcome(Kind.UNCONFIGURED, "project not configured"), 0, SETTINGS, 0)
    assert change.news and change.delay is None
    assert schedule.state is State.UNCONFIGURED and schedule.retry_at is None
    assert schedule.waiting and not schedule.due(1e9)
    schedule.record(Outcome(Kind.QUEUED), 1.0, SETTINGS, 0.5)  # more items: still held
    assert schedule.state is State.UNCONFIGURED
    assert not schedule.record(
        Outcome(Kind.UNCONFIGURED, "project not configured"), 2, SETTINGS, 0
    ).news
    assert schedule.reload()


def test_a_reload_does_not_cut_a_backoff_short() -> None:
    schedule = Schedule()
    schedule.record(Outcome(Kind.API_TROUBLE, "HTTP 500"), 0.0, SETTINGS, 0.9)
    at = schedule.retry_at
    assert not schedule.reload() and schedule.retry_at == at


def test_a_reload_ends_a_probe_wait() -> None:
    schedule = Schedule()
    schedule.record(Outcome(Kind.UNREACHABLE, "proxy refused"), 0.0, SETTINGS, 0.9)
    assert schedule.reload()


def test_the_network_hint_hurries_probes_only() -> None:
    probing = Schedule()
    probing.record(Outcome(Kind.UNREACHABLE, "cannot connect"), 0.0, SETTINGS, 0.9)
    assert probing.network_hint(5.0, 0.5)
    assert probing.retry_at == 5.0 + HINT_WINDOW * 0.5
    assert not probing.network_hint(5.1, 0.9)  # never postpones
    backing_off = Schedule()
    backing_off.record(Outcome(Kind.API_TROUBLE, "HTTP 503"), 0.0, SETTINGS, 0.9)
    assert not backing_off.network_hint(0.1, 0.0)
    assert not Schedule().network_hint(0.0, 0.0)


def test_success_after_failures_reports_the_recovery_and_clears_the_wait() -> None:
    schedule = Schedule()
    schedule.record(Outcome(Kind.API_TROUBLE, "HTTP 503"), 0.0, SETTINGS, 0.5)
    schedule.record(Outcome(Kind.UNREACHABLE, "cannot connect"), 1.0, SETTINGS, 0.5)
    assert schedule.due(100.0) and not schedule.due(1.0)
    change = schedule.record(Outcome(Kind.DELIVERED), 100.0, SETTINGS, 0.5)
    assert change.recovered == 2 and not change.resumed
    assert schedule.state is State.OK and schedule.retry_at is None
    assert schedule.last_error == "cannot connect"  # kept for diagnosis; the state says it is over
    schedule.succeeded(1_700_000_000.0)
    assert schedule.last_success == 1_700_000_000.0


def test_store_failures_back_off_until_a_commit_works_again() -> None:
    schedule = Schedule()
    schedule.record(Outcome(Kind.DELIVERED), 0.0, SETTINGS, 0.5)
    change = schedule.record(Outcome(Kind.STORE_FAILED, "disk full"), 0.0, SETTINGS, 0.5)
    assert schedule.state is State.BACKOFF and change.delay == 0.5
    # The API answering does not end it: only a recorded answer does.
    schedule.record(Outcome(Kind.DELIVERED), 1.0, SETTINGS, 0.5)
    assert schedule.state is State.BACKOFF
    assert schedule.store_recovered() == 1
    assert schedule.state is State.OK and not schedule.waiting
    assert schedule.store_recovered() == 0


def test_a_store_failure_never_shortens_a_later_retry_after() -> None:
    schedule = Schedule()
    schedule.record(Outcome(Kind.API_TROUBLE, "HTTP 429", 120.0), 0.0, SETTINGS, 0.0)
    schedule.record(Outcome(Kind.STORE_FAILED, "disk full"), 0.0, SETTINGS, 0.0)
    assert schedule.retry_at == 120.0


@pytest.mark.parametrize("kind", FAILURES)
def test_manual_mode_never_schedules_a_timer(kind: Kind) -> None:
    schedule = Schedule()
    schedule.record(Outcome(kind, "x"), 0.0, MANUAL, 0.5)
    assert schedule.retry_at is None and schedule.state is NEXT_STATE[kind]


@given(st.lists(st.tuples(st.sampled_from(list(Kind)), st.floats(0, 0.999999)), max_size=40))
def test_any_sequence_of_outcomes_keeps_the_schedule_consistent(
    events: list[tuple[Kind, float]],
) -> None:
    schedule = Schedule()
    now = 0.0
    for kind, uniform in events:
        now += 1.0
        schedule.record(Outcome(kind, kind.value), now, SETTINGS, uniform)
        if kind is not Kind.QUEUED:
            expected = NEXT_STATE[kind]
            if kind is Kind.DELIVERED and schedule.store_failures:
                expected = State.BACKOFF
            assert schedule.state is expected
        assert schedule.waiting == (schedule.wait is not Wait.NONE)
        if schedule.state in (State.OK, State.IDLE):
            assert not schedule.waiting
        if schedule.retry_at is not None and schedule.wait is not Wait.BACKOFF:
            assert schedule.retry_at <= now + max(SETTINGS.max_backoff, 1.5 * 15.0)
