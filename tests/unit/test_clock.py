"""The clock's pure rules: synchronization, anchors, holding and correcting items.

The property test plays a device whose wall clock is wrong by a different amount in each boot,
jumps to the truth when NTP syncs, restarts the agent within a boot and reboots, and checks
that every item goes out either at its true time (within the anchor's uncertainty and
`min_correction`) or, only after `max_hold`, counted as uncorrected.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import (
    MAX_SYNCED_ERROR_US,
    STA_UNSYNC,
    TIME_ERROR,
    UNSYNCHRONIZED_CLOCK_ENV,
    Anchor,
    ClockKeeper,
    Decision,
    KernelClock,
    Release,
    Stamp,
    anchor_from_date,
    anchor_from_probe,
    decide,
    read_kernel_clock,
    shift_payload,
)
from agent.config import ClockConfig

BOOT = "boot-a"
SETTINGS = ClockConfig(hold_unsynced=True, max_hold=3600.0, min_correction=5.0, max_skew=120.0)
SYNCED = KernelClock(state=0, status=0, maxerror_us=100_000)
UNSYNCED = KernelClock(state=TIME_ERROR, status=STA_UNSYNC, maxerror_us=MAX_SYNCED_ERROR_US)
TRUE_NOW = 1_767_225_600.0  # 2026-01-01


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        (SYNCED, True),
        (UNSYNCED, False),
        (KernelClock(state=TIME_ERROR, status=0, maxerror_us=0), False),
        (KernelClock(state=0, status=STA_UNSYNC, maxerror_us=0), False),
        (KernelClock(state=0, status=0, maxerror_us=MAX_SYNCED_ERROR_US), False),
        (KernelClock(state=1, status=0x2001, maxerror_us=15_999_999), True),
    ],
)
def test_synchronized_follows_systemds_rule(kernel: KernelClock, expected: bool) -> None:
    assert kernel.synchronized is expected


def test_the_kernel_can_be_read_on_linux() -> None:
    kernel = read_kernel_clock()
    assert kernel is not None
    assert kernel.state >= 0


def test_tests_can_have_the_kernel_clock_read_as_unsynchronized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What tests/integration/test_clock.py relies on to run on a synchronized machine too."""
    monkeypatch.setenv(UNSYNCHRONIZED_CLOCK_ENV, "1")
    kernel = read_kernel_clock()
    assert kernel is not None
    assert not kernel.synchronized


def test_probe_anchor_sits_in_the_middle_of_the_round_trip() -> None:
    anchor = anchor_from_probe(BOOT, TRUE_NOW, sent_mono=100.0, received_mono=100.4)
    assert anchor is not None
    assert anchor.boot_mono == pytest.approx(100.2)
    assert anchor.uncertainty == pytest.approx(0.2)
    assert anchor.true_time_at(110.2) == pytest.approx(TRUE_NOW + 10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, 1e12, 5e9])
def test_probe_rejects_times_the_api_cannot_mean(bad: float) -> None:
    assert anchor_from_probe(BOOT, bad, 1.0, 2.0) is None


def test_probe_rejects_a_round_trip_that_ends_before_it_starts() -> None:
    assert anchor_from_probe(BOOT, TRUE_NOW, 2.0, 1.0) is None


def test_date_header_anchor_is_coarser() -> None:
    anchor = anchor_from_date(BOOT, "Thu, 01 Jan 2026 00:00:00 GMT", 50.0, 50.2)
    assert anchor is not None
    assert anchor.true_time == pytest.approx(TRUE_NOW + 0.5)
    assert anchor.uncertainty == pytest.approx(0.6)


@pytest.mark.parametrize(
    "header", ["", "yesterday", "Mon, 99 Foo 2026 25:61:61 GMT", "Thu, 01 Jan 1970 00:00:00 GMT"]
)
def test_garbled_date_headers_are_ignored(header: str) -> None:
    assert anchor_from_date(BOOT, header, 1.0, 2.0) is None


def test_a_date_without_zone_is_gmt_as_http_says() -> None:
    anchor = anchor_from_date(BOOT, "Thu, 01 Jan 2026 00:00:00", 1.0, 1.0)
    assert anchor is not None and anchor.true_time == 1767225600.5


def _anchor(true_time: float, mono: float, boot: str = BOOT) -> Anchor:
    return Anchor(boot, true_time, mono, 0.1, "api")


def _decide_anchored(stamp: Stamp) -> Decision:
    """A held item of this boot, whose true time is known (TRUE_NOW at monotonic 400)."""
    return decide(
        stamp,
        True,
        anchors={BOOT: _anchor(TRUE_NOW, 400.0)},
        current_boot=BOOT,
        mono_now=500.0,
        started_mono=0.0,
        settings=SETTINGS,
    )


def test_item_of_an_anchored_boot_is_shifted_to_its_true_time() -> None:
    stamp = Stamp(BOOT, accepted_mono=100.0, accepted_wall=86400.0)  # 1970-01-02
    decision = _decide_anchored(stamp)
    assert decision.release is Release.CORRECTED
    assert stamp.accepted_wall + decision.shift == pytest.approx(TRUE_NOW - 300.0)


def test_a_small_error_moves_nothing() -> None:
    stamp = Stamp(BOOT, accepted_mono=100.0, accepted_wall=TRUE_NOW - 300.0 + 4.0)
    assert _decide_anchored(stamp) == Decision(Release.UNCHANGED)


def test_held_item_waits_until_max_hold_then_goes_uncorrected() -> None:
    stamp = Stamp(BOOT, accepted_mono=100.0, accepted_wall=86400.0)
    common = dict(anchors={}, current_boot=BOOT, started_mono=0.0, settings=SETTINGS)
    assert decide(stamp, True, mono_now=3699.0, **common).release is Release.WAIT  # type: ignore[arg-type]
    assert decide(stamp, True, mono_now=3700.0, **common).release is Release.UNCORRECTED  # type: ignore[arg-type]


def test_an_earlier_boots_item_waits_from_the_agents_start() -> None:
    stamp = Stamp("old-boot", accepted_mono=90_000.0, accepted_wall=86400.0)
    common = dict(anchors={}, current_boot=BOOT, started_mono=10.0, settings=SETTINGS)
    assert decide(stamp, True, mono_now=3609.0, **common).release is Release.WAIT  # type: ignore[arg-type]
    assert decide(stamp, True, mono_now=3610.0, **common).release is Release.UNCORRECTED  # type: ignore[arg-type]


def test_items_not_held_go_at_once_and_holding_can_be_turned_off() -> None:
    stamp = Stamp(BOOT, accepted_mono=100.0, accepted_wall=86400.0)
    off = ClockConfig(hold_unsynced=False)
    kw = dict(anchors={}, current_boot=BOOT, mono_now=101.0, started_mono=0.0)
    assert decide(stamp, False, settings=SETTINGS, **kw).release is Release.UNCHANGED  # type: ignore[arg-type]
    assert decide(stamp, True, settings=off, **kw).release is Release.UNCHANGED  # type: ignore[arg-type]


def test_keeper_holds_until_the_api_settles_then_reports_api() -> None:
    keeper = ClockKeeper(boot_id=BOOT, started_mono=0.0, settings=SETTINGS)
    keeper.observe_kernel(UNSYNCED, wall_now=86400.0, mono_now=1.0)
    assert keeper.hold_new_items()
    assert keeper.status(held=3)["source"] == "none"
    settled = keeper.observe_api(anchor_from_probe(BOOT, TRUE_NOW, 10.0, 10.2), wall_at=86409.0)
    assert settled
    assert not keeper.hold_new_items()
    status = keeper.status(held=0)
    assert status["source"] == "api"
    assert status["synchronized"] is False


def test_keeper_with_synchronized_kernel_only_reports_skew() -> None:
    keeper = ClockKeeper(boot_id=BOOT, started_mono=0.0, settings=SETTINGS)
    assert keeper.observe_kernel(SYNCED, wall_now=TRUE_NOW, mono_now=5.0)
    assert keeper.source == "ntp"
    far = anchor_from_probe(BOOT, TRUE_NOW + 500.0, 5.0, 5.0)
    assert not keeper.observe_api(far, wall_at=TRUE_NOW)
    assert keeper.status(held=0)["skew"] == pytest.approx(500.0)
    near = anchor_from_probe(BOOT, TRUE_NOW + 10.0, 5.0, 5.0)
    keeper.observe_api(near, wall_at=TRUE_NOW)
    assert keeper.status(held=0)["skew"] is None


def test_keeper_counts_what_was_sent() -> None:
    keeper = ClockKeeper(boot_id=BOOT, started_mono=0.0, settings=SETTINGS)
    keeper.count(
        [
            Decision(Release.CORRECTED, 3.0),
            Decision(Release.UNCORRECTED),
            Decision(Release.UNCHANGED),
        ]
    )
    assert (keeper.corrected, keeper.uncorrected) == (1, 1)


def test_anchors_survive_a_restart_and_garbage_is_ignored() -> None:
    keeper = ClockKeeper(boot_id=BOOT, started_mono=0.0, settings=SETTINGS)
    keeper.observe_api(anchor_from_probe(BOOT, TRUE_NOW, 1.0, 1.0), wall_at=2.0)
    again = ClockKeeper(boot_id=BOOT, started_mono=50.0, settings=SETTINGS)
    again.load_anchors(keeper.dump_anchors())
    assert again.truth_known
    garbage_texts = (
        "",
        "{",
        "[1,2]",
        '[["b", "x", 1, 1, "api"]]',
        '[["b", 1, 1, 1, "gps"]]',
        "null",
    )
    for garbage in garbage_texts:
        fresh = ClockKeeper(boot_id=BOOT, started_mono=0.0, settings=SETTINGS)
        fresh.load_anchors(garbage)
        assert not fresh.truth_known


def test_anchors_are_bounded() -> None:
    keeper = ClockKeeper(boot_id="boot-99", started_mono=0.0, settings=SETTINGS)
    rows = [[f"boot-{n}", TRUE_NOW, 1.0, 0.1, "api"] for n in range(100)]
    keeper.load_anchors(json.dumps(rows))
    assert keeper.anchors is not None
    assert len(keeper.anchors) <= 8


def test_shift_payload_moves_event_and_customer_times_only() -> None:
    event = b'{"name":"customers/events","data":{"timestamp":100.5,"properties":{"duration":3}}}'
    moved = json.loads(shift_payload(event, 1000.0))
    assert moved["data"]["timestamp"] == 1100.5
    assert moved["data"]["properties"] == {"duration": 3}
    customer = b'{"name":"customers","data":{"update_timestamp":7,"properties":{"k":"\xc3\xa9"}}}'
    moved = json.loads(shift_payload(customer, -2.0))
    assert moved["data"]["update_timestamp"] == 5
    assert moved["data"]["properties"] == {"k": "é"}


@pytest.mark.parametrize(
    "payload", [b"not json", b"[]", b'{"name":"x"}', b'{"data":{"timestamp":true}}', b'{"data":5}']
)
def test_shift_payload_leaves_odd_payloads_alone(payload: bytes) -> None:
    assert shift_payload(payload, 10.0) == payload


# --- property test --------------------------------------------------------------------------


@dataclass
class Device:
    """A device whose wall clock is `true + error` until NTP syncs it; boots start at mono 0."""

    true_time: float
    error: float
    boot: int = 0
    mono: float = 0.0
    synced: bool = False

    @property
    def wall(self) -> float:
        return self.true_time + (0.0 if self.synced else self.error)


@dataclass
class Item:
    stamp: Stamp
    held: bool
    true_accept: float
    sent: Decision | None = None


@dataclass
class Run:
    device: Device
    keeper: ClockKeeper
    items: list[Item] = field(default_factory=list)


steps = st.lists(
    st.one_of(
        st.tuples(st.just("accept")),
        st.tuples(st.just("wait"), st.floats(0.5, 2000.0)),
        st.tuples(st.just("ntp_sync")),
        st.tuples(st.just("api_probe"), st.floats(0.0, 0.8)),
        st.tuples(st.just("date_header"), st.floats(0.0, 0.8)),
        st.tuples(st.just("restart")),
        st.tuples(st.just("reboot"), st.floats(-1e9, 1e9)),
        st.tuples(st.just("send")),
    ),
    max_size=60,
)


def _new_keeper(device: Device, anchors: str | None = None) -> ClockKeeper:
    keeper = ClockKeeper(boot_id=f"boot-{device.boot}", started_mono=device.mono, settings=SETTINGS)
    keeper.load_anchors(anchors)
    keeper.observe_kernel(SYNCED if device.synced else UNSYNCED, device.wall, device.mono)
    return keeper


def _send(run: Run) -> None:
    for item in run.items:
        if item.sent is not None:
            continue
        decision = run.keeper.decide(item.stamp, item.held, run.device.mono)
        if decision.release is not Release.WAIT:
            item.sent = decision


@settings(max_examples=300, deadline=None)
@given(error=st.floats(-2e9, 1e9), script=steps)
def test_every_item_goes_out_at_its_true_time_or_counted_after_max_hold(
    error: float, script: list[tuple[object, ...]]
) -> None:
    device = Device(true_time=TRUE_NOW, error=error)
    run = Run(device=device, keeper=_new_keeper(device))
    for step in script:
        kind = step[0]
        if kind == "accept":
            run.items.append(
                Item(
                    Stamp(run.keeper.boot_id, device.mono, device.wall),
                    run.keeper.hold_new_items(),
                    device.true_time,
                )
            )
        elif kind == "wait":
            assert isinstance(step[1], float)
            device.true_time += step[1]
            device.mono += step[1]
        elif kind == "ntp_sync":
            device.synced = True
            run.keeper.observe_kernel(SYNCED, device.wall, device.mono)
        elif kind in ("api_probe", "date_header"):
            assert isinstance(step[1], float)
            rtt = step[1]
            sent = device.mono
            if kind == "api_probe":
                middle = device.true_time + rtt / 2
                anchor = anchor_from_probe(run.keeper.boot_id, middle, sent, sent + rtt)
            else:
                header = email.utils.formatdate(device.true_time + rtt / 2, usegmt=True)
                anchor = anchor_from_date(run.keeper.boot_id, header, sent, sent + rtt)
            device.true_time += rtt
            device.mono += rtt
            run.keeper.observe_api(anchor, device.wall)
        elif kind == "restart":
            run.keeper = _new_keeper(device, run.keeper.dump_anchors())
        elif kind == "reboot":
            assert isinstance(step[1], float)
            device.boot += 1
            device.mono = 0.0
            device.synced = False
            device.error = step[1]
            run.keeper = _new_keeper(device, run.keeper.dump_anchors())
        else:
            _send(run)
    # Let max_hold pass: everything must go out.
    device.true_time += SETTINGS.max_hold + 1.0  # + 1: no float rounding at the edge
    device.mono += SETTINGS.max_hold + 1.0
    _send(run)
    for item in run.items:
        assert item.sent is not None, "an item was held forever"
        anchor = (run.keeper.anchors or {}).get(item.stamp.boot_id)
        sent_at = item.stamp.accepted_wall + item.sent.shift
        if item.sent.release in (Release.CORRECTED, Release.UNCHANGED) and (
            item.held or anchor is not None
        ):
            # The error left is what the anchor could not know, plus what we chose not to fix.
            slack = SETTINGS.min_correction + (anchor.uncertainty if anchor else 0.0) + 1e-3
            assert abs(sent_at - item.true_accept) <= slack + abs(item.true_accept) * 1e-12
        if item.sent.release is Release.UNCORRECTED:
            assert item.held
            assert item.sent.shift == 0.0
