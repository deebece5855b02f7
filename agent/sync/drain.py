"""One drain of one project: store → API → store, oldest first (docs/sync.md).

A drain reads the project's queued items, lets the clock correct (or hold back) what it
stamped, sends them in batches through the `Transport`, walks each batch's `BatchRound`
(bisection, acks, dead letters) and hands the answers to the store (`Commits`). When to
drain, and every wait, belong to the worker that runs it (`agent.sync.worker`), seen here
through the small `Owner` protocol.

Promises kept here:
- Nothing queued is dropped by a network, server or credentials problem: a batch stays in the
  store until the API has answered it per command.
- Credentials come from the current config at send time, looked up by (project token, base
  URL); a project the config no longer names is held, not sent and not dropped (`resolve`).
- If the store cannot record an answer (disk full), the drain stops and the owner backs off:
  sending the same items again at once would only duplicate them at the API.
- Held items are corrected by the clock at send time, and only those the API accepted are
  counted as corrected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent import wire
from agent.config import AgentConfig
from agent.store import ProjectRow, QueuedItem, Store
from agent.sync.batch import BatchRound
from agent.sync.commits import MAX_ACKS_IN_FLIGHT, Commits, FlushRequest
from agent.sync.journal import Journal
from agent.sync.schedule import Kind, Outcome
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
from agent.sync.triggers import Job
from agent.tracker.model import Project

if TYPE_CHECKING:  # the timekeeper imports this package's transport
    from agent.clock import Decision
    from agent.timekeeper import Timekeeper

#: `last_error` of items queued before any `[project]` was configured.
NO_PROJECT = "no project configured"


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


class Stopped(Exception):
    """The worker was aborted (stop deadline) in the middle of a drain."""


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


class Owner(Protocol):
    """What a drain asks of the worker that runs it. Every call but `row` (fixed for the
    worker's life) takes the worker's lock (the waits on its condition, releasing it while they
    wait); the drain holds no lock itself."""

    @property
    def row(self) -> ProjectRow: ...

    def checkpoint(self) -> tuple[bool, list[FlushRequest]]:
        """Raises `Stopped` once aborted; else whether the worker is stopping, and the flush
        requests that arrived since the last call (the drain serves them too)."""
        ...

    def await_items(self, until: float) -> bool:
        """Wait until new items are queued or monotonic `until`; False when the wait ended
        for another reason (the deadline, a flush, a stop)."""
        ...

    def pace(self, deadline: float | None) -> None:
        """Wait for the next request slot (`sync.max_requests_per_second`); raises `Stopped`
        when aborted, or when the slot comes only after the monotonic `deadline`."""
        ...

    def stop_if_aborted(self) -> None:
        """Raises `Stopped` once aborted (a failed request may just have been aborted)."""
        ...

    def record(self, outcome: Outcome) -> None:
        """A failing outcome: the schedule backs off, pauses or holds the project."""
        ...

    def delivered(self) -> None:
        """The API judged a request on its merits."""
        ...

    def drained(self) -> None:
        """Nothing (more) to send now."""
        ...

    def store_failed(self, error: BaseException) -> None:
        """The store could not record the API's answers."""
        ...

    def recorded(self, accepted: int) -> None:
        """A commit of answers succeeded; `accepted` items are now sent."""
        ...


class Drain:
    """Drains one project for its worker's thread; holds no state between drains."""

    def __init__(
        self, shared: Shared, owner: Owner, transport: Transport, journal: Journal
    ) -> None:
        self._shared = shared
        self._owner = owner
        self._transport = transport
        self._journal = journal

    def run(self, job: Job) -> None:
        """Oldest first until the queue is empty, an error, or (for flush-only drains) every
        flush's budget is spent. New flush requests join on the way."""
        automatic = job.automatic
        active = list(job.flushes)
        adopted: list[FlushRequest] = []
        row = self._owner.row
        config = self._shared.config
        target = resolve(config, row)
        if target is None:
            reason = NO_PROJECT if row.project_token == "" else "project not configured"
            self._owner.record(Outcome(Kind.UNCONFIGURED, reason))
            return
        sync = config.sync
        clock = self._shared.clock
        if clock is not None and clock.needs_probe(row.id):
            failure = self._probe(target)
            if failure is not None:
                self._owner.record(failure)
                return
        url = target.base_url + wire.batch_path(target.project_token)
        headers = wire.request_headers(target.authorization_token, USER_AGENT, body=True)
        linger = sync.linger if job.fresh and sync.flush_mode == "immediate" else 0.0
        commits = Commits(self._shared.store, self._owner.recorded)
        after_id = 0
        try:
            while True:
                stopping, arrived = self._owner.checkpoint()
                if stopping:
                    automatic = False  # from now on only the final flush's share
                    linger = 0.0
                active.extend(arrived)
                adopted.extend(arrived)
                if not automatic and not active:
                    break
                items = self._read(sync.batch_size, after_id)
                if items and len(items) < sync.batch_size and linger > 0 and not active:
                    items = self._linger(sync.batch_size, after_id, linger)
                decisions: list[Decision] = []
                read_up_to = items[-1].id if items else after_id
                if items and clock is not None:
                    items, decisions = clock.prepare(items)
                    if not items:  # all must still wait: nothing more to send in this drain
                        self._owner.drained()
                        break
                if not items:
                    if after_id == 0:
                        self._owner.drained()
                        break
                    # Reading past the last id sent keeps the pipeline full, but ids may be
                    # reused once the table drained: settle the commits and look again from 0.
                    commits.settle(0)
                    if commits.failure is not None:
                        break
                    after_id = 0
                    continue
                batch = self._send(url, headers, items, active)
                if clock is not None and batch.acks:
                    acked = set(batch.acks)
                    clock.count(d for i, d in zip(items, decisions, strict=True) if i.id in acked)
                if batch.acks or batch.dead:
                    active = commits.submit(batch.acks, batch.dead, active, time.time())
                    commits.settle(MAX_ACKS_IN_FLIGHT)
                if batch.failure is not None:
                    commits.settle(0)
                    self._owner.record(batch.failure)
                    break
                if commits.failure is not None:
                    break
                after_id = read_up_to
            # Commits still pending may fail too; their items must not count as sent.
            commits.settle(0)
            if commits.failure is not None:
                self._owner.store_failed(commits.failure)
        finally:
            try:
                commits.settle(0)  # only after an exception; it is handled upstream
            finally:
                for request in adopted:
                    request.done.set()

    def _linger(self, limit: int, after_id: int, linger: float) -> list[QueuedItem]:
        """Let a partial batch wait up to `linger` seconds for more items (`sync.linger`):
        at kiosk rates this turns one request per event into one per second. Ends early when
        the batch is full, a flush is asked for, or the agent stops."""
        until = time.monotonic() + linger
        while self._owner.await_items(until):
            items = self._read(limit, after_id)
            if len(items) >= limit:
                return items
        return self._read(limit, after_id)

    def _read(self, limit: int, after_id: int) -> list[QueuedItem]:
        """The next items to send: not held, or released by the clock (docs/tracking.md)."""
        clock = self._shared.clock
        release = clock.releasable() if clock is not None else None
        return self._shared.store.read_batch(self._owner.row.id, limit, after_id, release)

    def _probe(self, target: Project) -> Outcome | None:
        """Ask the API's clock before sending held items (docs/sync.md, "The time probe").
        The project's own `system/time` first; if its credentials are refused, another
        configured project's; any answer's `Date` header settles it too. None once the true
        time is known; else the outcome to retry by (the network probe schedule when the API
        cannot be reached)."""
        clock = self._shared.clock
        assert clock is not None
        config = self._shared.config
        others = [p for p in config.known_projects() if p.key != target.key]
        failure: Outcome | None = None
        for project in [target, *others]:
            self._owner.pace(None)
            try:
                sample = fetch_time(
                    self._transport, project, config.sync.timeout, clock.observe_response
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
                self._owner.stop_if_aborted()
                return Outcome(Kind.API_TROUBLE, exc.reason)
            clock.observe_probe(sample)
            return None
        return failure

    def _send(
        self,
        url: str,
        headers: Mapping[str, str],
        items: list[QueuedItem],
        flushes: list[FlushRequest],
    ) -> BatchRound:
        """Send one batch, bisecting it on a whole-batch refusal, and tell the schedule and
        the journal what the answers said."""
        batch = BatchRound(items)
        while (chunk := batch.next_chunk()) is not None:
            verdict = self._post(url, headers, chunk, flushes)
            if isinstance(verdict, Outcome):
                batch.fail(verdict)
                break
            answered = batch.answer(verdict)
            if answered.reached:
                self._owner.delivered()
            if answered.refused:
                self._journal.dead_lettered(answered.refused, answered.reason)
            if answered.split:
                self._journal.splitting(answered.split, answered.reason)
        return batch

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
        self._owner.pace(deadline)
        timeout = self._shared.config.sync.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise Stopped
        body = wire.batch_body([item.payload for item in items])
        try:
            response = self._transport.send(Request("POST", url, headers, body, timeout))
            if self._shared.clock is not None:
                self._shared.clock.observe_response(response)
        except Aborted:
            raise Stopped from None
        except Unreachable as exc:
            return Outcome(Kind.UNREACHABLE, exc.reason)
        except TransportError as exc:
            self._owner.stop_if_aborted()
            return Outcome(Kind.API_TROUBLE, exc.reason)
        return wire.classify(
            response.status,
            response.body,
            len(items),
            retry_after=response.headers.get("retry-after"),
            now=time.time(),
        )


__all__ = ["NO_PROJECT", "Drain", "Owner", "Shared", "Stopped", "resolve"]
