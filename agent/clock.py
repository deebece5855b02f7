"""Is the device's clock right, and by how much to shift the timestamps it produced.

Kiosks without a real-time clock boot in 1970 or at the last saved time and jump when NTP
syncs, hours later or never. Every item the agent accepts records the wall time, the boot id
and the boot's monotonic clock (CLOCK_BOOTTIME, which keeps counting through suspend). Once the
true time is known at any moment of a boot (the kernel reports synchronization, or the
Engagement API tells its time), the true time of every other moment of that boot follows from
the monotonic clock, so each item's error is known exactly:

    true accept time = anchor's true time + (monotonic at accept − anchor's monotonic)
    shift            = true accept time − wall time recorded at accept

The shift applies to every timestamp of the item (accept times and app-given ones alike, since
both came from the same wrong clock). An error under `clock.min_correction` shifts nothing, so
a right clock is never touched. Items of a boot that ended before its time was known cannot be
corrected; they go out unchanged after `clock.max_hold`.

Everything below the kernel reader is pure: no clock calls, no I/O. The adapters (sync, the
writer, the daemon) feed it readings and ask it what to do. docs/tracking.md explains the
guarantees to app developers and analysts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from agent.wire import parse_http_date

if TYPE_CHECKING:
    # The rules read the `[clock]` section as loaded (never build one), so its keys and defaults
    # have one home and this pure module needs no pydantic at run time.
    from agent.config import ClockConfig

#: adjtimex(2): return value meaning the clock is not synchronized.
TIME_ERROR = 5
#: adjtimex(2) status bit: the clock is not synchronized.
STA_UNSYNC = 0x0040
#: systemd (timedatectl's "System clock synchronized") also wants maxerror under 16 s.
MAX_SYNCED_ERROR_US = 16_000_000
#: How many boots' anchors are remembered; older boots' items are long gone in practice.
MAX_ANCHORS = 8
#: A `Date` header has whole seconds: the true time lies within this of its middle.
DATE_HEADER_UNCERTAINTY = 0.5
#: Tests of the hold rule set this to "1" so that the kernel's clock reads as not synchronized
#: on a machine whose clock is (tests/integration/test_clock.py); never set on a device. Not
#: `ENGAGEMENT_AGENT_…`: that prefix is the config's (docs/configuration.md).
UNSYNCHRONIZED_CLOCK_ENV = "ENGAGEMENT_TEST_CLOCK_UNSYNCHRONIZED"

Source = Literal["ntp", "api", "none"]


def boot_monotonic() -> float:
    """Seconds since boot, counting suspend: the clock items' accept moments are recorded on."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class KernelClock:
    """What adjtimex(2) says of the system clock."""

    state: int
    status: int
    maxerror_us: int

    @property
    def synchronized(self) -> bool:
        """The rule of current systemd: no TIME_ERROR, no STA_UNSYNC, maxerror under 16 s."""
        return (
            self.state != TIME_ERROR
            and not self.status & STA_UNSYNC
            and self.maxerror_us < MAX_SYNCED_ERROR_US
        )


class _Timex(ctypes.Structure):
    """`struct timex` from <sys/timex.h>: the fields we read, then room for the rest.

    The leading fields are `int modes` then `long` fields on every Linux ABI, so the offsets of
    `maxerror` and `status` follow from the platform's `long` size; the tail is padding large
    enough for the kernel's full structure (it writes all of it).
    """

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


def read_kernel_clock() -> KernelClock | None:
    """The kernel's view of the clock, or None where adjtimex cannot be called.

    A read-only call (modes = 0) needs no privilege and works under the unit's
    `SystemCallFilter=@system-service` (adjtimex with modes 0 is in `@clock`'s complement:
    reading is allowed, setting is not).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        timex = _Timex()
        state = int(libc.adjtimex(ctypes.byref(timex)))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    if os.environ.get(UNSYNCHRONIZED_CLOCK_ENV) == "1":
        status = int(timex.status) | STA_UNSYNC
        return KernelClock(state=TIME_ERROR, status=status, maxerror_us=int(timex.maxerror))
    return KernelClock(state=state, status=int(timex.status), maxerror_us=int(timex.maxerror))


@dataclass(frozen=True)
class Anchor:
    """The true time at one moment of one boot's monotonic clock."""

    boot_id: str
    true_time: float
    boot_mono: float
    uncertainty: float
    source: Literal["ntp", "api"]

    def true_time_at(self, boot_mono: float) -> float:
        """The true time at another moment of the same boot."""
        return self.true_time + (boot_mono - self.boot_mono)


def anchor_from_kernel(
    boot_id: str, wall_now: float, mono_now: float, kernel: KernelClock
) -> Anchor:
    """While the kernel is synchronized its wall clock is the true time (within maxerror)."""
    return Anchor(
        boot_id=boot_id,
        true_time=wall_now,
        boot_mono=mono_now,
        uncertainty=max(0, kernel.maxerror_us) / 1e6,
        source="ntp",
    )


def anchor_from_probe(
    boot_id: str, server_time: float, sent_mono: float, received_mono: float
) -> Anchor | None:
    """`GET …/system/time`: the server's time stands at the middle of the round trip, give or
    take half of it. None for an answer that is not a usable time."""
    if not _plausible(server_time) or received_mono < sent_mono:
        return None
    half = (received_mono - sent_mono) / 2
    return Anchor(
        boot_id=boot_id,
        true_time=server_time,
        boot_mono=sent_mono + half,
        uncertainty=half,
        source="api",
    )


def anchor_from_date(
    boot_id: str, date_header: str | None, sent_mono: float, received_mono: float
) -> Anchor | None:
    """Any API response's `Date` header (whole seconds, RFC 9110): coarser than the probe."""
    when = parse_http_date(date_header)
    if when is None:
        return None
    anchor = anchor_from_probe(boot_id, when + DATE_HEADER_UNCERTAINTY, sent_mono, received_mono)
    if anchor is None:
        return None
    return replace(anchor, uncertainty=anchor.uncertainty + DATE_HEADER_UNCERTAINTY)


def _plausible(value: float) -> bool:
    """A time the API could really answer: finite, after 2001 and before 2100."""
    return math.isfinite(value) and 1e9 < value < 4102444800


def better_anchor(current: Anchor | None, new: Anchor) -> Anchor:
    """Keep the more precise of two anchors of the same boot. A new one must be at least twice
    as precise to replace the current: anchors are persisted when they change, and readings
    arrive with every API answer and kernel poll, each a little different."""
    if current is None or current.boot_id != new.boot_id:
        return new
    return new if new.uncertainty < current.uncertainty / 2 else current


@dataclass(frozen=True)
class Stamp:
    """When and on which clock an item was accepted."""

    boot_id: str
    accepted_mono: float
    accepted_wall: float


class Release(enum.Enum):
    """What to do with a queued item when sync wants to send it."""

    #: Hold it: its clock may be wrong and the true time is not known yet.
    WAIT = "wait"
    #: Send it with its timestamps shifted by `Decision.shift`.
    CORRECTED = "corrected"
    #: Send it as it is: its clock was right (or the error is under `min_correction`).
    UNCHANGED = "unchanged"
    #: Send it as it is, although its clock may be wrong: `max_hold` passed without the truth.
    UNCORRECTED = "uncorrected"


@dataclass(frozen=True)
class Decision:
    release: Release
    shift: float = 0.0


def should_hold(kernel_synchronized: bool, anchor_known: bool, settings: ClockConfig) -> bool:
    """Is an item accepted now held until the true time is known?"""
    return settings.hold_unsynced and not kernel_synchronized and not anchor_known


def decide(
    stamp: Stamp,
    held: bool,
    *,
    anchors: Mapping[str, Anchor],
    current_boot: str,
    mono_now: float,
    started_mono: float,
    settings: ClockConfig,
) -> Decision:
    """The fate of one queued item now.

    An item of a boot whose true time is known is corrected (or sent unchanged if its error is
    under `min_correction`), held or not: a clock the kernel called synchronized yields a zero
    shift anyway. A held item without that knowledge waits, for at most `max_hold` — counted from
    its acceptance in this boot, or from the agent's start for an item of an earlier boot (the
    monotonic clocks of two boots cannot be compared). With `hold_unsynced` off nothing is
    held or corrected: items go out with the device's time.
    """
    if not settings.hold_unsynced:
        return Decision(Release.UNCHANGED)
    anchor = anchors.get(stamp.boot_id)
    if anchor is not None:
        shift = anchor.true_time_at(stamp.accepted_mono) - stamp.accepted_wall
        if abs(shift) < settings.min_correction:
            return Decision(Release.UNCHANGED)
        return Decision(Release.CORRECTED, shift)
    if not held:
        return Decision(Release.UNCHANGED)
    since = stamp.accepted_mono if stamp.boot_id == current_boot else started_mono
    if mono_now - since >= settings.max_hold:
        return Decision(Release.UNCORRECTED)
    return Decision(Release.WAIT)


@dataclass(frozen=True)
class Releasable:
    """Which held items may be read for upload now: the release conditions of `decide` as a
    filter the store applies when it reads (so releasing rewrites no row). A held item is
    released when its boot's true time is known, or `max_hold` passed."""

    #: Holding is off: every item is sendable.
    everything: bool
    #: Boots whose true time is known: all their items.
    boots: tuple[str, ...]
    current_boot: str
    #: Items of the current boot accepted at or before this monotonic time.
    current_until: float
    #: Items of every other boot (or of no known boot): `max_hold` passed since the start.
    earlier_boots: bool

    @property
    def only_unheld(self) -> bool:
        """Nothing held can be released now: a read may skip held items without looking."""
        return (
            not self.everything
            and not self.boots
            and self.current_until < 0
            and not self.earlier_boots
        )


def skew(anchor: Anchor, wall_at: float) -> float:
    """How far a synchronized wall clock is from the API's time (positive: the device is behind)."""
    return anchor.true_time_at(anchor.boot_mono) - wall_at


#: Payload fields holding a timestamp, per command name of the batch API.
_TIME_FIELDS = ("timestamp", "update_timestamp")


def shift_payload(payload: bytes, shift: float) -> bytes:
    """The stored wire command with its timestamps moved by `shift` seconds.

    Only the top-level times of the command's `data` move; durations are differences and stay.
    A payload that is not the expected shape is returned unchanged (the store wrote it, but the
    database file is an input like any other).
    """
    if shift == 0.0:
        return payload
    try:
        command: Any = json.loads(payload)
    except ValueError:
        return payload
    data = command.get("data") if isinstance(command, dict) else None
    if not isinstance(data, dict):
        return payload
    moved = False
    for key in _TIME_FIELDS:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            data[key] = value + shift
            moved = True
    if not moved:
        return payload
    return json.dumps(command, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class ClockKeeper:
    """The clock's state in this run: anchors per boot and the counters status shows.

    Mutable but free of I/O: the adapters call `observe_*` with what they read and `decide`
    for each item; they serialise calls (one lock in the adapter), since sync workers and the
    writer share it.
    """

    boot_id: str
    started_mono: float
    settings: ClockConfig
    kernel_synchronized: bool = False
    anchors: dict[str, Anchor] = field(default_factory=dict)
    corrected: int = 0
    uncorrected: int = 0
    skew_seconds: float | None = None

    @property
    def truth_known(self) -> bool:
        """Is the true time known for items accepted now?"""
        return self.boot_id in self.anchors

    @property
    def source(self) -> Source:
        if self.kernel_synchronized:
            return "ntp"
        anchor = self.anchors.get(self.boot_id)
        return "api" if anchor is not None and anchor.source == "api" else "none"

    def hold_new_items(self) -> bool:
        return should_hold(self.kernel_synchronized, self.truth_known, self.settings)

    def observe_kernel(self, kernel: KernelClock | None, wall_now: float, mono_now: float) -> bool:
        """A kernel reading. True when it settled the true time for this boot just now."""
        self.kernel_synchronized = kernel is not None and kernel.synchronized
        if kernel is None or not self.kernel_synchronized:
            return False
        known = self.truth_known
        self._remember(anchor_from_kernel(self.boot_id, wall_now, mono_now, kernel))
        return not known

    def observe_api(self, anchor: Anchor | None, wall_at: float) -> bool:
        """An API time (probe or `Date`). True when it settled the true time just now.

        With the kernel synchronized the API's time only checks it: a disagreement beyond
        `max_skew` is reported, and nothing is rewritten (the kernel is trusted).
        """
        if anchor is None or anchor.boot_id != self.boot_id:
            return False
        if self.kernel_synchronized:
            difference = skew(anchor, wall_at)
            self.skew_seconds = difference if abs(difference) > self.settings.max_skew else None
            return False
        known = self.truth_known
        self._remember(anchor)
        return not known

    def _remember(self, anchor: Anchor) -> None:
        anchors = self.anchors
        anchors[anchor.boot_id] = better_anchor(anchors.get(anchor.boot_id), anchor)
        while len(anchors) > MAX_ANCHORS:
            oldest = next(boot for boot in anchors if boot != self.boot_id)
            del anchors[oldest]

    def decide(self, stamp: Stamp, held: bool, mono_now: float) -> Decision:
        return decide(
            stamp,
            held,
            anchors=self.anchors,
            current_boot=self.boot_id,
            mono_now=mono_now,
            started_mono=self.started_mono,
            settings=self.settings,
        )

    def releasable(self, mono_now: float) -> Releasable:
        """The filter matching `decide` at `mono_now` for reads of the queue."""
        settings = self.settings
        return Releasable(
            everything=not settings.hold_unsynced,
            boots=tuple(self.anchors),
            current_boot=self.boot_id,
            current_until=mono_now - settings.max_hold,
            earlier_boots=mono_now - self.started_mono >= settings.max_hold,
        )

    def count(self, decisions: Iterable[Decision]) -> None:
        """Count what was sent (call once the API accepted the items)."""
        for decision in decisions:
            if decision.release is Release.CORRECTED:
                self.corrected += 1
            elif decision.release is Release.UNCORRECTED:
                self.uncorrected += 1

    def status(self, held: int) -> dict[str, Any]:
        """The `clock` object of the status document."""
        return {
            "synchronized": self.kernel_synchronized,
            "source": self.source,
            "corrected": self.corrected,
            "uncorrected": self.uncorrected,
            "held": held,
            "skew": self.skew_seconds,
        }

    def dump_anchors(self) -> str:
        """The anchors as JSON, persisted so a restart within the same boot keeps them."""
        return json.dumps(
            [
                [a.boot_id, a.true_time, a.boot_mono, a.uncertainty, a.source]
                for a in self.anchors.values()
            ]
        )

    def load_anchors(self, text: str | None) -> None:
        """Anchors persisted by an earlier run; anything malformed is ignored (an input)."""
        if not text:
            return
        try:
            rows = json.loads(text)
        except ValueError:
            return
        if not isinstance(rows, list):
            return
        for row in rows[-MAX_ANCHORS:]:
            anchor = _anchor_from_row(row)
            if anchor is not None:
                self._remember(anchor)


def _anchor_from_row(row: object) -> Anchor | None:
    if not isinstance(row, list) or len(row) != 5:
        return None
    boot_id, true_time, boot_mono, uncertainty, source = row
    if (
        not isinstance(boot_id, str)
        or source not in ("ntp", "api")
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in (true_time, boot_mono, uncertainty)
        )
    ):
        return None
    return Anchor(boot_id, float(true_time), float(boot_mono), float(uncertainty), source)
