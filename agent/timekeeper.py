"""The clock's adapter: feeds `agent.clock.ClockKeeper` what the kernel and the API say, and
answers the writer (hold this item?) and sync (may these items go, shifted by how much?).

The pure rules live in `agent.clock`; this module owns the I/O around them: the boot id, the
kernel reading (at start and every `KERNEL_POLL_SECONDS`), the anchors persisted in the store's
meta (only when they change, so a restart within the same boot keeps them), the journal
lines, and the wake-up of sync when the true time becomes known or `clock.max_hold` releases
held items. docs/tracking.md ("Timestamps on devices without a real-time clock") is the
contract for app developers and analysts.

Thread use: `stamp` runs on the store's writer thread, the `observe_*`, `decide` and `count`
calls on sync's workers, `status` on the event loop; one lock guards the keeper and is never
held across I/O or a callback.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from agent import device
from agent.clock import (
    Anchor,
    ClockKeeper,
    Decision,
    KernelClock,
    Releasable,
    Release,
    Stamp,
    anchor_from_date,
    anchor_from_probe,
    boot_monotonic,
    read_kernel_clock,
    shift_payload,
)
from agent.config import ClockConfig
from agent.store import QueuedItem, Store
from agent.sync.transport import Response, TimeSample

log = logging.getLogger("engagement_agent.clock")

#: Where the anchors are kept (the store's meta table).
ANCHORS_META = "clock.anchors"
#: How often the kernel's sync status is read.
KERNEL_POLL_SECONDS = 60.0
#: While items are held, how often to look whether `max_hold` released some (at most this
#: often, and at most a tenth of `max_hold`, but never more than once a second).
RELEASE_CHECK_SECONDS = 60.0
#: An accept time is paired with the monotonic clock read when the writer runs the command;
#: the wall clock's advance in between is subtracted, unless it is not a plausible delay
#: (the wall clock jumped in that window), in which case the writer's moment is used as is.
MAX_ACCEPT_LAG = 60.0


def stamp_of(item: QueuedItem) -> Stamp:
    """How `decide` sees a stored item. A row without boot id or monotonic time (queued
    before schema version 2, or damaged) cannot be placed on any boot's clock: it counts as
    an earlier boot's, exactly as the store's release filter treats it."""
    if item.boot_id is None or item.accepted_mono is None:
        return Stamp("", 0.0, item.created_at)
    return Stamp(item.boot_id, item.accepted_mono, item.created_at)


class Timekeeper:
    def __init__(
        self,
        store: Store,
        settings: ClockConfig,
        *,
        boot_id: str | None = None,
        read_kernel: Callable[[], KernelClock | None] = read_kernel_clock,
    ) -> None:
        self._store = store
        self._read_kernel = read_kernel
        known = boot_id or device.boot_id()
        if known is None:
            # Without a boot id a restart cannot be told from a reboot: items held by an
            # earlier run go out uncorrected after max_hold, as an earlier boot's would.
            known = f"unknown-{uuid.uuid4()}"
            log.warning("cannot read the boot id; held items do not survive a restart's check")
        self._keeper = ClockKeeper(boot_id=known, started_mono=boot_monotonic(), settings=settings)
        self._cond = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self._saved_anchors = "[]"
        self._skew_said = False
        self._waiting: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def boot_id(self) -> str:
        return self._keeper.boot_id

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Anchors from an earlier run of this boot and a first kernel reading (store open)."""
        text = self._store.get_meta(ANCHORS_META)
        with self._cond:
            self._keeper.load_anchors(text)
            self._saved_anchors = text or "[]"
        self.poll_kernel()

    def on_settled(self, listener: Callable[[], None]) -> None:
        """`listener()` runs (on the calling thread, without the lock) whenever held items may
        have become sendable: the true time became known, or `max_hold` passed."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="clock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(2.0)

    def reload(self, settings: ClockConfig) -> None:
        with self._cond:
            self._keeper.settings = settings
            self._waiting = None
            self._cond.notify_all()
        self._wake_listeners()

    def _run(self) -> None:
        """Reads the kernel every minute and looks for items `max_hold` released; sleeps
        otherwise (no idle wake-ups beyond these)."""
        while True:
            interval = KERNEL_POLL_SECONDS
            if self._store.stats().held:
                max_hold = self._keeper.settings.max_hold
                interval = min(interval, RELEASE_CHECK_SECONDS, max(1.0, max_hold / 10))
            with self._cond:
                if self._stopping:
                    return
                self._cond.wait(interval)
                if self._stopping:
                    return
            try:
                self.poll_kernel()
                self._check_released()
            except Exception:  # the clock must never stop the agent
                log.exception("clock: reading the kernel clock or the queue failed")

    # -- the writer ------------------------------------------------------------------------

    def stamp(self, now: float) -> tuple[str, float, bool]:
        """(boot id, monotonic time, held) for items accepted at wall time `now`.

        Called for every command, so the hold decision is read without the lock: it reads a
        few attributes the GIL keeps whole, and a decision a moment stale is the one the
        command would have had a moment earlier. The lock is taken only to wake the release
        check for the first held items."""
        mono = boot_monotonic()
        lag = time.time() - now
        if 0.0 <= lag <= MAX_ACCEPT_LAG:
            mono -= lag
        held = self._keeper.hold_new_items()
        if held and self._waiting is None:
            with self._cond:
                self._cond.notify_all()  # the release check's interval may shorten now
        return self._keeper.boot_id, mono, held

    # -- the truth -------------------------------------------------------------------------

    def poll_kernel(self) -> None:
        kernel = self._read_kernel()
        wall, mono = time.time(), boot_monotonic()
        with self._cond:
            settled = self._keeper.observe_kernel(kernel, wall, mono)
        if settled:
            log.info("the kernel reports a synchronized clock; held items are released")
            self._settled()

    def observe_response(self, response: Response) -> None:
        """Any API answer: its `Date` header, on the monotonic moments of the request. Only
        JSON answers count: the API always sends JSON, a captive portal or proxy page (whose
        clock may be anything) does not."""
        if "json" not in response.headers.get("content-type", "").lower():
            return
        received = boot_monotonic()
        sent = received - max(0.0, response.round_trip)
        anchor = anchor_from_date(self.boot_id, response.headers.get("date"), sent, received)
        self._observe_api(anchor, response.sent_at + response.round_trip / 2, "a Date header")

    def observe_probe(self, sample: TimeSample) -> None:
        """An answer of `GET …/system/time`."""
        received = boot_monotonic()
        sent = received - max(0.0, sample.round_trip)
        anchor = anchor_from_probe(self.boot_id, sample.time, sent, received)
        self._observe_api(anchor, sample.local, "the API's system/time")

    def _observe_api(self, anchor: Anchor | None, wall_at: float, what: str) -> None:
        if anchor is None:
            return
        with self._cond:
            settled = self._keeper.observe_api(anchor, wall_at)
            skew = self._keeper.skew_seconds
            say_skew = skew is not None and not self._skew_said
            self._skew_said = self._skew_said or say_skew
            max_skew = self._keeper.settings.max_skew
        if say_skew:
            log.warning(
                "the clock is synchronized but %.0f s %s the Engagement API's (more than "
                "clock.max_skew = %g s); timestamps are not rewritten: check the NTP servers",
                abs(skew or 0.0),
                "behind" if (skew or 0.0) > 0 else "ahead of",
                max_skew,
            )
        if settled:
            error = anchor.true_time_at(anchor.boot_mono) - wall_at
            log.info(
                "the clock is not synchronized; %s says it is %+.1f s off; items are sent with "
                "corrected timestamps",
                what,
                error,
            )
            self._settled()
        else:
            self._save_anchors()

    def _settled(self) -> None:
        self._save_anchors()
        with self._cond:
            self._waiting = None
        self._wake_listeners()

    def _save_anchors(self) -> None:
        """Persist the anchors when they changed (a restart within the boot keeps them)."""
        with self._cond:
            text = self._keeper.dump_anchors()
            if text == self._saved_anchors:
                return
            self._saved_anchors = text
        try:
            self._store.submit(lambda txn: txn.set_meta(ANCHORS_META, text))
        except Exception as exc:  # a closed or failing store: kept in memory for this run
            log.warning("cannot save the clock's anchors: %s", exc)

    def _check_released(self) -> None:
        """Wake sync when fewer held items wait than at the last look (`max_hold` passed)."""
        if not self._store.stats().held:
            with self._cond:
                self._waiting = None
            return
        waiting = self._store.held_waiting(self.releasable())
        with self._cond:
            # Without an earlier count (a new wait began) a release may already have happened.
            fewer = self._waiting is None or waiting < self._waiting
            self._waiting = waiting
        if fewer:
            self._wake_listeners()

    def _wake_listeners(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("clock: a wake-up listener failed")

    # -- sync ------------------------------------------------------------------------------

    def releasable(self) -> Releasable:
        with self._cond:
            return self._keeper.releasable(boot_monotonic())

    def needs_probe(self, project_id: int) -> bool:
        """Does this project hold items of this boot while its true time is unknown? Then sync
        asks the API's clock (`system/time`) before anything else."""
        with self._cond:
            if self._keeper.truth_known or not self._keeper.settings.hold_unsynced:
                return False
        return self._store.has_held(project_id, self.boot_id)

    @property
    def truth_known(self) -> bool:
        with self._cond:
            return self._keeper.truth_known

    def prepare(self, items: Sequence[QueuedItem]) -> tuple[list[QueuedItem], list[Decision]]:
        """The items to send now, their payloads shifted where their clock was wrong, and the
        decision for each. Items that must still wait are left out (they stay queued)."""
        mono = boot_monotonic()
        out: list[QueuedItem] = []
        decisions: list[Decision] = []
        with self._cond:
            for item in items:
                decision = self._keeper.decide(stamp_of(item), item.held, mono)
                if decision.release is Release.WAIT:
                    continue
                if decision.release is Release.CORRECTED:
                    item = replace(item, payload=shift_payload(item.payload, decision.shift))
                out.append(item)
                decisions.append(decision)
        return out, decisions

    def count(self, decisions: Iterable[Decision]) -> None:
        """Count items the API accepted (`clock.corrected`, `clock.uncorrected`)."""
        with self._cond:
            self._keeper.count(decisions)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """The `clock` object of the status document (docs/protocol.md)."""
        rule = self.releasable()
        held = self._store.held_waiting(rule)
        with self._cond:
            return self._keeper.status(held)
