"""The drain: one thread per project row sends its queued items, oldest first (docs/sync.md).

A worker owns its project's `Schedule` (the state machine in `agent.sync.schedule`), one
`Transport` and the pipeline that turns answers into store commits. Decisions about responses
live in `agent.wire` (pure); when to try again lives in the schedule; this module owns the
thread, the waits and the store round trips.

Promises kept here, and where:
- Nothing queued is dropped by a network, server or credentials problem: the batch stays in
  the store until the API has answered it per command (`Worker._cycle`).
- Deletions and dead letters go through `Store.submit`, so they join the writer's group commit;
  up to `MAX_ACKS_IN_FLIGHT` of them overlap the next HTTP request. If the store cannot record
  an answer (disk full), the drain stops and backs off: sending the same items again at once
  would only duplicate them at the API (`Worker._store_failed`).
- Credentials come from the current config at send time, looked up by (project token, base
  URL); a project the config no longer names is held, not sent and not dropped.
- Every wait is a `Condition` wait with a timeout on `time.monotonic()`; an idle worker sleeps
  until notified, a failing one until its retry time.
- Tokens and payloads never reach the logs: projects are named by host and a token prefix.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from urllib3.util import parse_url

from agent import wire
from agent.config import AgentConfig
from agent.logs import RateLimitedLog
from agent.store import ProjectRow, QueuedItem, Store, Txn
from agent.sync.schedule import Kind, Outcome, Schedule, Settings, State
from agent.sync.transport import (
    USER_AGENT,
    Aborted,
    BadAnswer,
    Request,
    Transport,
    TransportError,
    Unreachable,
    fetch_time,
)
from agent.tracker.model import Project

if TYPE_CHECKING:  # the timekeeper imports this package's transport
    from agent.clock import Decision
    from agent.timekeeper import Timekeeper

log = logging.getLogger("engagement_agent.sync")

#: Store commits (acks/dead letters) that may be pending while the next batch is on the wire.
#: Overlapping the fsync with the HTTP exchange is what makes the drain rate independent of
#: the disk's sync latency; the writer folds concurrent ones into one group commit.
MAX_ACKS_IN_FLIGHT = 4
#: Repeated failures are logged at most this often (the first one always is).
LOG_INTERVAL = 60.0
#: `last_error` of items queued before any `[project]` was configured.
NO_PROJECT = "no project configured"


def label(base_url: str, token: str) -> str:
    """How logs name a project: enough for an operator to tell which, never the whole token."""
    host = parse_url(base_url).host or base_url
    return f"{host} project {token[:4]}…" if token else f"{host} (unconfigured project)"


def settings_of(config: AgentConfig) -> Settings:
    sync = config.sync
    return Settings(sync.max_backoff, sync.probe_interval, sync.flush_mode != "manual")


@dataclass
class Shared:
    """What every worker reads from the `Syncer`: the store, the current config (replaced on
    reload), the random source for jitter, the transport factory (the test seam) and the
    clock (None: items go out as stored, nothing is held)."""

    store: Store
    config: AgentConfig
    uniform: Callable[[], float]
    new_transport: Callable[[], Transport]
    clock: Timekeeper | None = None


@dataclass
class FlushRequest:
    """One `flush()` (or the final flush of `stop()`) as seen by one worker.

    `budget` bounds the work to "what was queued at that moment" even while ingest continues;
    `deadline` (monotonic) bounds the final flush.
    """

    budget: int
    deadline: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    flushed: int = 0
    processed: int = 0


@dataclass(frozen=True)
class _Job:
    """Why a drain runs: `automatic` (not only flushes), `fresh` (woken by new items: a
    partial batch may linger), and the flush requests it serves."""

    automatic: bool
    fresh: bool
    flushes: list[FlushRequest]


@dataclass
class _Exchange:
    """What one batch (with any splitting) came to."""

    acks: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    failure: Outcome | None = None
    accepted: int = 0


class Stopped(Exception):
    """The worker was aborted (stop deadline) in the middle of a cycle."""


def _first(a: BaseException | None, b: BaseException | None) -> BaseException | None:
    return a if a is not None else b


def _commit_op(acks: list[int], dead: list[tuple[int, str]], now: float) -> Callable[[Txn], int]:
    def op(txn: Txn) -> int:
        done = txn.ack(acks) if acks else 0
        if dead:
            done += txn.dead_letter(dead, now)
        return done

    return op


def resolve(config: AgentConfig, row: ProjectRow) -> Project | None:
    """The project to send `row`'s items to, with credentials from the current config; None
    when the config does not name it (items wait). Token "" is the default project before
    one was configured: `[project]`, once there is one."""
    if row.project_token == "":
        return config.project.to_project() if config.project else None
    key = (row.base_url.rstrip("/"), row.project_token)
    for project in config.known_projects():
        if project.key == key:
            return project
    return None


class Worker:
    """Uploads one project row's items. All mutable fields are guarded by `cond`; the lock is
    never held across I/O, so `notify()` from the store's writer thread never blocks on HTTP."""

    def __init__(self, shared: Shared, row: ProjectRow) -> None:
        self.shared = shared
        self.row = row
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"sync-{row.id}", daemon=True)
        # Triggers.
        self.wake = True  # started because items are (or may be) queued
        self.reloaded = False
        self.stopping = False
        self.aborted = False
        self.flushes: list[FlushRequest] = []
        # Timing (monotonic).
        self.period_at: float | None = None
        self.next_request_at = 0.0
        self.schedule = Schedule()
        self.sent = 0
        self.failure_log = RateLimitedLog(log, LOG_INTERVAL)
        self.store_log = RateLimitedLog(log, LOG_INTERVAL)
        self.transport = shared.new_transport()

    # -- called from other threads ---------------------------------------------------------

    def notify(self) -> None:
        with self.cond:
            self.wake = True
            self.schedule.record(Outcome(Kind.QUEUED), time.monotonic(), self._settings(), 0.0)
            self.cond.notify_all()

    def request_flush(self, request: FlushRequest) -> None:
        with self.cond:
            if not self.thread.is_alive() and self.thread.ident is not None:
                request.done.set()
                return
            self.flushes.append(request)
            self.cond.notify_all()

    def on_reload(self, row: ProjectRow | None) -> None:
        with self.cond:
            if row is not None:
                self.row = row
            self.reloaded = True
            self.cond.notify_all()

    def network_hint(self) -> None:
        with self.cond:
            if self.schedule.network_hint(time.monotonic(), self.shared.uniform()):
                self.cond.notify_all()

    def begin_stop(self, final: FlushRequest) -> None:
        with self.cond:
            self.stopping = True
            self.flushes.append(final)
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.stopping = True
            self.cond.notify_all()
        self.transport.abort()

    def status(self) -> dict[str, Any]:
        with self.cond:
            schedule = self.schedule
            next_at = schedule.retry_at
            if next_at is None and not schedule.waiting:
                next_at = self.period_at
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

    @property
    def label(self) -> str:
        return label(self.row.base_url, self.row.project_token)

    def _settings(self) -> Settings:
        return settings_of(self.shared.config)

    def _run(self) -> None:
        try:
            while True:
                job = self._wait_for_work()
                if job is None:
                    return
                try:
                    self._cycle(job)
                except Stopped:
                    return
                except Exception:  # a bug must not silently end uploading for this project
                    log.exception("sync for %s failed unexpectedly; retrying later", self.label)
                    self._record(Outcome(Kind.API_TROUBLE, "internal error"))
                finally:
                    for request in job.flushes:
                        request.done.set()
        finally:
            with self.cond:
                leftover, self.flushes = self.flushes, []
            for request in leftover:
                request.done.set()
            self.transport.close()

    def _wait_for_work(self) -> _Job | None:
        """Sleep until there is something to do, or return None to exit. Flushes go ahead
        even while the schedule waits: an operator asked for them."""
        with self.cond:
            while True:
                if self.flushes:
                    flushes, self.flushes = self.flushes, []
                    return _Job(False, False, flushes)
                if self.stopping:
                    return None
                config = self.shared.config.sync
                manual = config.flush_mode == "manual"
                now = time.monotonic()
                schedule = self.schedule
                if schedule.waiting:
                    if self.reloaded:
                        self.reloaded = False
                        if schedule.reload() and not manual:
                            return _Job(True, False, [])
                    if manual or schedule.retry_at is None:
                        self.cond.wait()
                    elif schedule.due(now):
                        return _Job(True, False, [])
                    else:
                        self.cond.wait(schedule.retry_at - now)
                    continue
                self.reloaded = False
                if config.flush_mode == "immediate":
                    self.period_at = None
                    if self.wake:
                        self.wake = False
                        return _Job(True, True, [])
                    self.cond.wait()
                elif config.flush_mode == "period":
                    if self.period_at is None:
                        self.period_at = now + config.flush_period
                    if now >= self.period_at:
                        self.period_at = now + config.flush_period
                        self.wake = False
                        return _Job(True, False, [])
                    self.cond.wait(self.period_at - now)
                else:
                    self.period_at = None
                    self.cond.wait()

    def _record(self, outcome: Outcome) -> None:
        """Feed the schedule one failing outcome and tell the journal: a new state or reason
        at once, repeats at most once per `LOG_INTERVAL` with a count."""
        settings = self._settings()
        with self.cond:
            change = self.schedule.record(
                outcome, time.monotonic(), settings, self.shared.uniform()
            )
            failures = self.schedule.failures + self.schedule.unreachable
        kind = outcome.kind
        if kind is Kind.UNCONFIGURED:
            if change.news:
                log.warning(
                    "sync for %s: the project is not in the config (%s); its items are kept "
                    "and sent once the config names it again",
                    self.label,
                    outcome.reason,
                )
            return
        if kind is Kind.REFUSED:
            if change.news:
                log.warning(
                    "sync for %s paused: %s; its items are kept, retrying every %g s and after "
                    "a config reload",
                    self.label,
                    outcome.reason,
                    settings.max_backoff,
                )
            return
        what = "cannot reach the API" if kind is Kind.UNREACHABLE else "failed"
        when = "" if change.delay is None else f"; retrying in {change.delay:.1f} s"
        key = ("failure", kind)
        if change.news:
            self.failure_log.limiter.clear(key)
        self.failure_log.warning(
            key,
            "sync for %s %s (%s, %d attempt(s) in a row)%s",
            self.label,
            what,
            outcome.reason,
            failures,
            when,
        )

    def _on_success(self) -> None:
        settings = self._settings()
        with self.cond:
            change = self.schedule.record(Outcome(Kind.DELIVERED), time.monotonic(), settings, 0.0)
            self.schedule.succeeded(time.time())
        for kind in (Kind.API_TROUBLE, Kind.UNREACHABLE):
            self.failure_log.limiter.clear(("failure", kind))
        if change.resumed:
            log.info("sync for %s resumed: the API accepts the credentials", self.label)
        elif change.recovered:
            log.info(
                "sync for %s recovered after %d failed attempt(s)", self.label, change.recovered
            )

    def _cycle(self, job: _Job) -> None:
        """One drain: oldest first until the queue is empty, an error, or (for flush-only
        cycles) every flush's budget is spent. New flush requests join on the way."""
        automatic = job.automatic
        active = list(job.flushes)
        adopted: list[FlushRequest] = []
        config = self.shared.config
        target = resolve(config, self.row)
        if target is None:
            reason = NO_PROJECT if self.row.project_token == "" else "project not configured"
            self._record(Outcome(Kind.UNCONFIGURED, reason))
            return
        sync = config.sync
        clock = self.shared.clock
        if clock is not None and clock.needs_probe(self.row.id):
            failure = self._probe(target)
            if failure is not None:
                self._record(failure)
                return
        url = target.base_url + wire.batch_path(target.project_token)
        headers = wire.request_headers(target.authorization_token, USER_AGENT, body=True)
        linger = sync.linger if job.fresh and sync.flush_mode == "immediate" else 0.0
        store = self.shared.store
        in_flight: collections.deque[tuple[Future[int], int, list[FlushRequest]]] = (
            collections.deque()
        )
        after_id = 0
        store_error: BaseException | None = None
        try:
            while True:
                with self.cond:
                    if self.aborted:
                        raise Stopped
                    if self.stopping:
                        automatic = False  # from now on only the final flush's share
                        linger = 0.0
                    if self.flushes:
                        active.extend(self.flushes)
                        adopted.extend(self.flushes)
                        self.flushes = []
                if not automatic and not active:
                    break
                items = self._read(sync.batch_size, after_id)
                if items and len(items) < sync.batch_size and linger > 0 and not active:
                    items = self._linger(items, sync.batch_size, after_id, linger)
                decisions: list[Decision] = []
                read_up_to = items[-1].id if items else after_id
                if items and clock is not None:
                    items, decisions = clock.prepare(items)
                    if not items:  # all must still wait: nothing more to send in this cycle
                        with self.cond:
                            self.schedule.record(
                                Outcome(Kind.DRAINED), time.monotonic(), self._settings(), 0.0
                            )
                        break
                if not items:
                    if after_id == 0:
                        with self.cond:
                            self.schedule.record(
                                Outcome(Kind.DRAINED), time.monotonic(), self._settings(), 0.0
                            )
                        break
                    # Reading past the last id sent keeps the pipeline full, but ids may be
                    # reused once the table drained: settle the commits and look again from 0.
                    store_error = self._settle(in_flight, 0)
                    if store_error is not None:
                        break
                    after_id = 0
                    continue
                exchange = self._exchange(url, headers, items, active)
                if clock is not None and exchange.acks:
                    acked = set(exchange.acks)
                    clock.count(d for i, d in zip(items, decisions, strict=True) if i.id in acked)
                if exchange.acks or exchange.dead:
                    future = store.submit(_commit_op(exchange.acks, exchange.dead, time.time()))
                    processed = len(exchange.acks) + len(exchange.dead)
                    in_flight.append((future, exchange.accepted, list(active)))
                    for request in active:
                        request.processed += processed
                    active = [r for r in active if r.processed < r.budget]
                    store_error = self._settle(in_flight, MAX_ACKS_IN_FLIGHT)
                if exchange.failure is not None:
                    store_error = _first(store_error, self._settle(in_flight, 0))
                    self._record(exchange.failure)
                    break
                if store_error is not None:
                    break
                after_id = read_up_to
            # Commits still pending may fail too; their items must not count as sent.
            store_error = _first(store_error, self._settle(in_flight, 0))
            if store_error is not None:
                self._store_failed(store_error)
        finally:
            try:
                self._settle(in_flight, 0)  # only after an exception; it is handled upstream
            finally:
                for request in adopted:
                    request.done.set()

    def _linger(
        self, items: list[QueuedItem], limit: int, after_id: int, linger: float
    ) -> list[QueuedItem]:
        """Let a partial batch wait up to `linger` seconds for more items (`sync.linger`):
        at kiosk rates this turns one request per event into one per second. Ends early when
        the batch is full, a flush is asked for, or the agent stops."""
        until = time.monotonic() + linger
        while True:
            with self.cond:
                self.wake = False
                woken = self.cond.wait_for(
                    lambda: self.wake or self.stopping or bool(self.flushes),
                    until - time.monotonic(),
                )
                if not woken or self.stopping or self.flushes:
                    break
            items = self._read(limit, after_id)
            if len(items) >= limit:
                return items
        return self._read(limit, after_id)

    def _read(self, limit: int, after_id: int) -> list[QueuedItem]:
        """The next items to send: not held, or released by the clock (docs/tracking.md)."""
        clock = self.shared.clock
        release = clock.releasable() if clock is not None else None
        return self.shared.store.read_batch(self.row.id, limit, after_id, release)

    def _probe(self, target: Project) -> Outcome | None:
        """Ask the API's clock before sending held items (docs/sync.md, "The time probe").
        The project's own `system/time` first; if its credentials are refused, another
        configured project's; any answer's `Date` header settles it too. None once the true
        time is known; else the outcome to retry by (the network probe schedule when the API
        cannot be reached)."""
        clock = self.shared.clock
        assert clock is not None
        config = self.shared.config
        others = [p for p in config.known_projects() if p.key != target.key]
        failure: Outcome | None = None
        for project in [target, *others]:
            self._pace(None)
            try:
                sample = fetch_time(
                    self.transport, project, config.sync.timeout, clock.observe_response
                )
            except Aborted:
                raise Stopped from None
            except Unreachable as exc:
                return Outcome(Kind.UNREACHABLE, exc.reason)
            except BadAnswer as exc:
                if failure is None:
                    kind = Kind.REFUSED if exc.status in (401, 403) else Kind.API_TROUBLE
                    failure = Outcome(kind, exc.reason)
                if clock.truth_known:  # the refusal's Date header settled it
                    return None
                continue
            except TransportError as exc:
                with self.cond:
                    if self.aborted:
                        raise Stopped from None
                return Outcome(Kind.API_TROUBLE, exc.reason)
            clock.observe_probe(sample)
            return None
        return failure

    def _settle(
        self,
        in_flight: collections.deque[tuple[Future[int], int, list[FlushRequest]]],
        keep: int,
    ) -> BaseException | None:
        """Wait for store commits until at most `keep` are pending; count what they made
        final. Returns the first commit failure (disk full, a closed store), if any: those
        items stay queued, and the caller must stop and back off instead of reading them
        again at once, which would resend them at the pacing limit for as long as the
        condition lasts."""
        failure: BaseException | None = None
        while len(in_flight) > keep:
            future, accepted, requests = in_flight.popleft()
            try:
                future.result()
            except Exception as exc:
                failure = _first(failure, exc)
                accepted = 0
            else:
                self._store_recovered()
            with self.cond:
                self.sent += accepted
            for request in requests:
                request.flushed += accepted
                if request.processed >= request.budget:
                    request.done.set()
        return failure

    def _store_failed(self, error: BaseException) -> None:
        """The API answered but the store could not record it: back off (full jitter, as for
        a failed request) so the items are not resent in a tight loop."""
        reason = f"cannot record the API's answer: {error}"
        with self.cond:
            change = self.schedule.record(
                Outcome(Kind.STORE_FAILED, reason),
                time.monotonic(),
                self._settings(),
                self.shared.uniform(),
            )
            attempts = self.schedule.store_failures
        self.store_log.error(
            "store",
            "sync for %s: %s; the items stay queued and are sent again in %.1f s "
            "(%d attempt(s) in a row)",
            self.label,
            reason,
            change.delay or 0.0,
            attempts,
        )

    def _store_recovered(self) -> None:
        with self.cond:
            if not self.schedule.store_failures:
                return
            attempts = self.schedule.store_recovered()
        self.store_log.resolved(
            "store",
            "sync for %s: the API's answers are recorded again after %d failed attempt(s)",
            self.label,
            attempts,
        )

    def _exchange(
        self,
        url: str,
        headers: Mapping[str, str],
        items: list[QueuedItem],
        flushes: list[FlushRequest],
    ) -> _Exchange:
        """Send one batch; on a whole-batch refusal bisect it to find the refused item(s)."""
        out = _Exchange()
        stack = [items]
        split_logged = False
        while stack:
            chunk = stack.pop()
            verdict = self._post(url, headers, chunk, flushes)
            if isinstance(verdict, Outcome):
                out.failure = verdict
                return out
            if verdict.action is wire.Action.OK:
                self._on_success()
                refused = 0
                for item, result in zip(chunk, verdict.results, strict=True):
                    if result.success:
                        out.acks.append(item.id)
                        out.accepted += 1
                    else:
                        out.dead.append((item.id, result.error))
                        refused += 1
                if refused:
                    self._log_dead(refused, out.dead[-1][1])
            elif verdict.action is wire.Action.SPLIT:
                self._on_success()  # the endpoint and credentials work
                if len(chunk) == 1:
                    out.dead.append((chunk[0].id, verdict.reason))
                    self._log_dead(1, verdict.reason)
                else:
                    if not split_logged:
                        log.warning(
                            "sync for %s: the API refused a batch of %d (%s); splitting it to "
                            "find the refused item(s)",
                            self.label,
                            len(chunk),
                            verdict.reason,
                        )
                        split_logged = True
                    middle = len(chunk) // 2
                    stack.append(chunk[middle:])
                    stack.append(chunk[:middle])
            elif verdict.action is wire.Action.PAUSE:
                out.failure = Outcome(Kind.REFUSED, f"paused: {verdict.reason}")
                return out
            else:
                out.failure = Outcome(Kind.API_TROUBLE, verdict.reason, verdict.retry_after)
                return out
        return out

    def _log_dead(self, count: int, reason: str) -> None:
        log.warning(
            "sync for %s: the API refused %d item(s); moved to dead letters (%s)",
            self.label,
            count,
            reason[:200],
        )

    def _pace(self, deadline: float | None) -> None:
        """At most `max_requests_per_second` request starts per second for this project."""
        rate = self.shared.config.sync.max_requests_per_second
        with self.cond:
            if rate > 0:
                while True:
                    if self.aborted:
                        raise Stopped
                    now = time.monotonic()
                    wait = self.next_request_at - now
                    if wait <= 0:
                        break
                    if deadline is not None and now + wait >= deadline:
                        raise Stopped
                    self.cond.wait(wait)
                self.next_request_at = max(now, self.next_request_at) + 1.0 / rate
            elif self.aborted:
                raise Stopped

    def _post(
        self,
        url: str,
        headers: Mapping[str, str],
        items: list[QueuedItem],
        flushes: list[FlushRequest],
    ) -> wire.Verdict | Outcome:
        """One request: the API's verdict, or the failing `Outcome` when no answer came."""
        deadlines = [r.deadline for r in flushes if r.deadline is not None]
        deadline = min(deadlines) if deadlines else None
        self._pace(deadline)
        timeout = self.shared.config.sync.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise Stopped
        body = wire.batch_body([item.payload for item in items])
        try:
            response = self.transport.send(Request("POST", url, headers, body, timeout))
            if self.shared.clock is not None:
                self.shared.clock.observe_response(response)
        except Aborted:
            raise Stopped from None
        except Unreachable as exc:
            return Outcome(Kind.UNREACHABLE, exc.reason)
        except TransportError as exc:
            with self.cond:
                if self.aborted:
                    raise Stopped from None
            return Outcome(Kind.API_TROUBLE, exc.reason)
        return wire.classify(
            response.status,
            response.body,
            len(items),
            retry_after=response.headers.get("retry-after"),
            now=time.time(),
        )


__all__ = [
    "LOG_INTERVAL",
    "MAX_ACKS_IN_FLIGHT",
    "NO_PROJECT",
    "FlushRequest",
    "Shared",
    "State",
    "Stopped",
    "Worker",
    "label",
    "resolve",
    "settings_of",
]
