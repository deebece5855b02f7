"""The clock's adapter on a real store: the store's release filter says exactly what
`decide` says, anchors survive a restart within the boot (not a reboot), a synchronized
clock's skew is reported once, and the wake-up comes when the true time becomes known."""

from __future__ import annotations

import email.utils
import itertools
import logging
import time

import pytest

from agent.clock import (
    STA_UNSYNC,
    Anchor,
    ClockKeeper,
    KernelClock,
    Release,
    boot_monotonic,
)
from agent.config import ClockConfig
from agent.store import Store
from agent.sync.transport import Response, TimeSample
from agent.timekeeper import ANCHORS_META, Timekeeper, stamp_of
from tests.fixtures.daemon import wait_for
from tests.unit.test_store_helpers import P1, item

SETTINGS = ClockConfig(hold_unsynced=True, max_hold=600.0, min_correction=5.0)
SYNCED = KernelClock(state=0, status=0, maxerror_us=1000)
UNSYNCED = KernelClock(state=5, status=STA_UNSYNC, maxerror_us=16_000_000)


def test_the_stores_release_filter_matches_decide(store: Store) -> None:
    """Every combination of boot, accept moment and held flag, under every kind of rule:
    a held item is read for upload exactly when `decide` lets it go, and `held_waiting`
    counts exactly those it keeps."""
    boots = ("current", "old", None)
    monos = (10.0, 500.0, None)
    combos = itertools.product(boots, monos, (False, True))
    for n, (boot, mono, held) in enumerate(combos):
        store.submit(
            lambda t, b=boot, m=mono, h=held, k=n: t.enqueue(
                [item(k)], 1000.0 + k, boot_id=b, mono=m, held=h
            )
        ).result()
    project = store.project_for(P1).id
    items = store.list_items(limit=100)
    anchor_sets: list[dict[str, Anchor]] = [
        {},
        {"current": Anchor("current", 5000.0, 0.0, 0.1, "api")},
        {"old": Anchor("old", 9000.0, 0.0, 0.1, "ntp")},
    ]
    for anchors, mono_now, started in itertools.product(
        anchor_sets, (100.0, 1000.0, 5000.0), (50.0, 4000.0)
    ):
        keeper = ClockKeeper("current", started, SETTINGS, anchors=dict(anchors))
        rule = keeper.releasable(mono_now)
        read = {i.id for i in store.read_batch(project, 100, release=rule)}
        going = {
            i.id
            for i in items
            if keeper.decide(stamp_of(i), i.held, mono_now).release is not Release.WAIT
        }
        assert read == going, (anchors, mono_now, started)
        assert store.held_waiting(rule) == len(items) - len(going)


def test_holding_off_releases_everything(store: Store) -> None:
    store.submit(lambda t: t.enqueue([item(0)], 1.0, boot_id="b", mono=1.0, held=True)).result()
    keeper = ClockKeeper("b", 0.0, ClockConfig(hold_unsynced=False))
    rule = keeper.releasable(2.0)
    assert len(store.read_batch(store.project_for(P1).id, 10, release=rule)) == 1
    assert store.held_waiting(rule) == 0


def _date(when: float) -> str:
    return email.utils.formatdate(when, usegmt=True)


def test_anchors_survive_a_restart_within_the_boot_but_not_a_reboot(store: Store) -> None:
    first = Timekeeper(store, SETTINGS, boot_id="boot-1", read_kernel=lambda: UNSYNCED)
    first.load()
    woken: list[bool] = []
    first.on_settled(lambda: woken.append(True))
    assert not first.truth_known
    first.observe_probe(TimeSample(time.time() + 3 * 86400, 0.01, time.time(), None))
    assert first.truth_known and woken == [True]
    assert first.status()["source"] == "api"
    wait_for(lambda: store.get_meta(ANCHORS_META) is not None, 20, "the anchors saved")
    again = Timekeeper(store, SETTINGS, boot_id="boot-1", read_kernel=lambda: UNSYNCED)
    again.load()
    assert again.truth_known
    rebooted = Timekeeper(store, SETTINGS, boot_id="boot-2", read_kernel=lambda: UNSYNCED)
    rebooted.load()
    assert not rebooted.truth_known
    assert rebooted.status()["source"] == "none"


def test_a_synchronized_clocks_skew_is_shown_and_said_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = Timekeeper(store, SETTINGS, boot_id="boot-1", read_kernel=lambda: SYNCED)
    keeper.load()
    assert keeper.status()["synchronized"] is True and keeper.status()["source"] == "ntp"
    caplog.set_level(logging.WARNING, "engagement_agent.clock")
    for _ in range(3):
        now = time.time()
        keeper.observe_response(
            Response(
                200,
                b"{}",
                {"date": _date(now + 600), "content-type": "application/json"},
                0.01,
                now,
            )
        )
    status = keeper.status()
    assert status["skew"] == pytest.approx(600, abs=2)
    assert status["source"] == "ntp"  # the kernel is trusted; nothing is rewritten
    said = [r for r in caplog.records if "clock.max_skew" in r.getMessage()]
    assert len(said) == 1


def test_items_accepted_are_held_only_while_the_truth_is_unknown(store: Store) -> None:
    keeper = Timekeeper(store, SETTINGS, boot_id="boot-1", read_kernel=lambda: UNSYNCED)
    keeper.load()
    now = time.time()
    boot, mono, held = keeper.stamp(now)
    assert (boot, held) == ("boot-1", True)
    assert abs(mono - boot_monotonic()) < 1.0
    keeper.observe_response(
        Response(200, b"{}", {"date": _date(now), "content-type": "application/json"}, 0.01, now)
    )
    assert keeper.stamp(time.time())[2] is False


def test_a_date_from_a_page_that_is_not_the_api_is_ignored(store: Store) -> None:
    """A captive portal or a proxy's error page answers HTML with its own clock."""
    keeper = Timekeeper(store, SETTINGS, boot_id="boot-1", read_kernel=lambda: UNSYNCED)
    keeper.load()
    now = time.time()
    html = {"date": _date(now + 86400), "content-type": "text/html"}
    keeper.observe_response(Response(200, b"<html>", html, 0.01, now))
    assert not keeper.truth_known
