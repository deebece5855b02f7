"""A project's sync worker: the thread, its triggers and its waits (docs/sync.md).

One thread per project row. Other threads reach it only through its trigger methods (new
items, flushes, reload, a network hint, stop, abort) and `status()`; the thread sleeps until
one of them, or the project's schedule, says there is work (`agent.sync.triggers` decides),
then runs a `Drain` (`agent.sync.drain`). The worker owns the project's `Schedule` (the pure
state machine in `agent.sync.schedule`), feeds it what each drain came to, and tells the
`Journal`.

Every wait is a `Condition` wait with a timeout on `time.monotonic()`: an idle worker sleeps
until notified, a failing one until its retry time. The lock is never held across I/O, so
`notify()` from the store's writer thread never blocks on HTTP.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from agent.config import AgentConfig
from agent.store import ProjectRow
from agent.sync.commits import FlushRequest
from agent.sync.drain import Drain, Shared, Stopped
from agent.sync.journal import Journal, label
from agent.sync.schedule import Kind, Outcome, Schedule, Settings
from agent.sync.triggers import Job, Sleep, Triggers, next_step


def _settings_of(config: AgentConfig) -> Settings:
    """The schedule's view of the `[sync]` section."""
    sync = config.sync
    return Settings(sync.max_backoff, sync.probe_interval, sync.flush_mode != "manual")


class Worker:
    """Uploads one project row's items. All mutable fields are guarded by `cond`; the lock is
    never held across I/O. Implements `agent.sync.drain.Owner` for its drains."""

    def __init__(self, shared: Shared, row: ProjectRow, *, wake: bool = True) -> None:
        """`wake`: items are (or may be) queued; false for a worker started for a flush."""
        self.shared = shared
        self.row = row
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"sync-{row.id}", daemon=True)
        self.triggers = Triggers(wake=wake)
        self.next_request_at = 0.0  # monotonic: the pacing's next request slot
        self.schedule = Schedule()
        self.sent = 0
        self.journal = Journal(label(row.base_url, row.project_token))
        self.transport = shared.new_transport()
        self._drain = Drain(shared, self, self.transport, self.journal)

    # -- called from other threads ---------------------------------------------------------

    def notify(self) -> None:
        with self.cond:
            self.triggers.wake = True
            self.schedule.record(Outcome(Kind.QUEUED), time.monotonic(), self._settings(), 0.0)
            self.cond.notify_all()

    def request_flush(self, request: FlushRequest) -> None:
        with self.cond:
            if not self.thread.is_alive() and self.thread.ident is not None:
                request.done.set()
                return
            self.triggers.flushes.append(request)
            self.cond.notify_all()

    def on_reload(self, row: ProjectRow | None) -> None:
        with self.cond:
            if row is not None:
                self.row = row
            self.triggers.reloaded = True
            self.cond.notify_all()

    def network_hint(self) -> None:
        with self.cond:
            if self.schedule.network_hint(time.monotonic(), self.shared.uniform()):
                self.cond.notify_all()

    def begin_stop(self, final: FlushRequest) -> None:
        with self.cond:
            self.triggers.stopping = True
            self.triggers.flushes.append(final)
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.triggers.aborted = True
            self.triggers.stopping = True
            self.cond.notify_all()
        self.transport.abort()

    def status(self) -> dict[str, Any]:
        with self.cond:
            schedule = self.schedule
            next_at = schedule.retry_at
            if next_at is None and not schedule.waiting:
                next_at = self.triggers.period_at
            return {
                "project_token": self.row.project_token,
                "base_url": self.row.base_url,
                "state": schedule.state.value,
                "last_success": schedule.last_success,
                "last_error": schedule.last_error,
                "next_attempt": (
                    None if next_at is None else time.time() + max(0.0, next_at - time.monotonic())
                ),
                "sent": self.sent,
            }

    # -- the thread ------------------------------------------------------------------------

    def _settings(self) -> Settings:
        return _settings_of(self.shared.config)

    def _run(self) -> None:
        try:
            while True:
                job = self._wait_for_work()
                if job is None:
                    return
                try:
                    self._drain.run(job)
                except Stopped:
                    return
                except Exception:  # a bug must not silently end uploading for this project
                    self.journal.unexpected()
                    self.record(Outcome(Kind.API_TROUBLE, "internal error"))
                finally:
                    for request in job.flushes:
                        request.done.set()
        finally:
            with self.cond:
                leftover, self.triggers.flushes = self.triggers.flushes, []
            for request in leftover:
                request.done.set()
            self.transport.close()

    def _wait_for_work(self) -> Job | None:
        """Sleep until there is something to do, or return None to exit."""
        with self.cond:
            while True:
                step = next_step(
                    self.triggers, self.schedule, self.shared.config.sync, time.monotonic()
                )
                if not isinstance(step, Sleep):
                    return step
                self.cond.wait(step.timeout)

    # -- the drain's view (`agent.sync.drain.Owner`) ---------------------------------------

    def checkpoint(self) -> tuple[bool, list[FlushRequest]]:
        with self.cond:
            if self.triggers.aborted:
                raise Stopped
            arrived, self.triggers.flushes = self.triggers.flushes, []
            return self.triggers.stopping, arrived

    def await_items(self, until: float) -> bool:
        triggers = self.triggers
        with self.cond:
            triggers.wake = False
            woken = self.cond.wait_for(
                lambda: triggers.wake or triggers.stopping or bool(triggers.flushes),
                until - time.monotonic(),
            )
            return woken and not triggers.stopping and not triggers.flushes

    def pace(self, deadline: float | None) -> None:
        """At most `max_requests_per_second` request starts per second for this project."""
        rate = self.shared.config.sync.max_requests_per_second
        with self.cond:
            if rate > 0:
                while True:
                    if self.triggers.aborted:
                        raise Stopped
                    now = time.monotonic()
                    wait = self.next_request_at - now
                    if wait <= 0:
                        break
                    if deadline is not None and now + wait >= deadline:
                        raise Stopped
                    self.cond.wait(wait)
                self.next_request_at = max(now, self.next_request_at) + 1.0 / rate
            elif self.triggers.aborted:
                raise Stopped

    def stop_if_aborted(self) -> None:
        with self.cond:
            if self.triggers.aborted:
                raise Stopped

    def record(self, outcome: Outcome) -> None:
        settings = self._settings()
        with self.cond:
            change = self.schedule.record(
                outcome, time.monotonic(), settings, self.shared.uniform()
            )
            attempts = self.schedule.failures + self.schedule.unreachable
        self.journal.failed(outcome, change, attempts, settings.max_backoff)

    def delivered(self) -> None:
        settings = self._settings()
        with self.cond:
            change = self.schedule.record(Outcome(Kind.DELIVERED), time.monotonic(), settings, 0.0)
            self.schedule.succeeded(time.time())
        self.journal.delivered(change)

    def drained(self) -> None:
        with self.cond:
            self.schedule.record(Outcome(Kind.DRAINED), time.monotonic(), self._settings(), 0.0)

    def store_failed(self, error: BaseException) -> None:
        """Back off (full jitter, as for a failed request) so the items are not resent in a
        tight loop."""
        reason = f"cannot record the API's answer: {error}"
        with self.cond:
            change = self.schedule.record(
                Outcome(Kind.STORE_FAILED, reason),
                time.monotonic(),
                self._settings(),
                self.shared.uniform(),
            )
            attempts = self.schedule.store_failures
        self.journal.store_failed(reason, change.delay or 0.0, attempts)

    def recorded(self, accepted: int) -> None:
        with self.cond:
            attempts = self.schedule.store_recovered() if self.schedule.store_failures else 0
            self.sent += accepted
        if attempts:
            self.journal.store_recovered(attempts)


__all__ = ["Worker"]
