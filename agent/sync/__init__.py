"""The uploader: drains the store's outbox to the Engagement Tracking API (docs/sync.md).

`Syncer` is the daemon's only handle on sync. It keeps one worker thread per project row
(base URL + project token, `agent.sync.worker`), each with its own connection, so a hung or
misconfigured endpoint never delays another project. Each worker's state and retry times are
a pure state machine (`agent.sync.schedule`), and so are when it drains
(`agent.sync.triggers`) and what the API's answers do to a batch (`agent.sync.batch`); a
drain (`agent.sync.drain`) moves items from the store to the API and the answers back
(`agent.sync.commits`); HTTP, deadlines and proxies are behind a small `Transport` seam
(`agent.sync.transport`). docs/architecture.md, "Inside a project's sync", draws the parts.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.store import ProjectRow, Store
from agent.sync.commits import MAX_ACKS_IN_FLIGHT, FlushRequest
from agent.sync.drain import Shared
from agent.sync.schedule import SEVERITY, State
from agent.sync.transport import USER_AGENT, Deadlines, HttpTransport, Transport
from agent.sync.worker import Worker

if TYPE_CHECKING:  # the timekeeper imports this package's transport
    from agent.timekeeper import Timekeeper

log = logging.getLogger("engagement_agent.sync")


class Syncer:
    """Uploads every project's queued items.

    Construction does no I/O. `start()` spawns workers for project rows with queued items;
    rows that appear later get one on `notify()`. All public methods are thread-safe.
    `transport` builds each worker's HTTP transport (default: `HttpTransport` with the
    configured proxy); tests pass a fake to exercise the upload pipeline without sockets.
    `clock` holds and corrects items stamped by an unsynchronized clock (docs/tracking.md);
    without it items go out as stored.
    """

    def __init__(
        self,
        store: Store,
        config: AgentConfig,
        *,
        rng: random.Random | None = None,
        transport: Callable[[], Transport] | None = None,
        clock: Timekeeper | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._deadlines = Deadlines()
        self._shared = Shared(
            store, config, self._uniform, transport or self._http_transport, clock
        )
        self._store = store
        self._lock = threading.Condition()
        self._workers: dict[int, Worker] = {}
        self._unknown: set[int] = set()
        self._rescan = False
        self._clock_rescan = False
        self._reload_rows = False
        self._started = False
        self._stopping = False
        self._supervisor: threading.Thread | None = None

    def _uniform(self) -> float:
        with self._rng_lock:
            return self._rng.random()

    def _http_transport(self) -> Transport:
        return HttpTransport(
            self._deadlines, proxy=self._shared.config.sync.proxy, environ=dict(os.environ)
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._spawn_for(self._rows_with_items(), wake=True)
        self._supervisor = threading.Thread(
            target=self._supervise, name="sync-supervisor", daemon=True
        )
        self._supervisor.start()

    def stop(self, timeout: float) -> None:
        """A last flush bounded by `timeout` seconds in total, then the threads end; requests
        still in flight at the deadline are aborted (their items stay queued)."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            if self._stopping or not self._started:
                self._stopping = True
                return
        try:  # rows whose first items were committed moments ago may not have a worker yet
            self._spawn_for(self._rows_with_items(), wake=False)
        except Exception:
            log.exception("sync: cannot look up project rows for the last flush")
        with self._lock:
            self._stopping = True
            workers = list(self._workers.values())
            self._lock.notify_all()
        try:
            budget = self._store.stats().items
        except Exception:
            budget = 0
        finals = []
        for worker in workers:
            final = FlushRequest(budget=budget, deadline=deadline)
            finals.append(final)
            worker.begin_stop(final)
        for final in finals:
            final.done.wait(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            worker.abort()
        for worker in workers:
            worker.thread.join(max(0.5, deadline - time.monotonic()))
        if self._supervisor is not None:
            self._supervisor.join(1.0)
        self._deadlines.close()

    def reload(self, config: AgentConfig) -> None:
        """Use new credentials, URLs, proxy and sync settings; projects that wait for the
        config (paused, unconfigured, unreachable) try again at once."""
        with self._lock:
            self._shared.config = config
            self._reload_rows = True
            workers = list(self._workers.values())
            self._lock.notify_all()
        for worker in workers:
            if isinstance(worker.transport, HttpTransport):
                worker.transport.configure(config.sync.proxy, dict(os.environ))
            worker.on_reload(None)

    # -- triggers --------------------------------------------------------------------------

    def notify(self, project_ids: set[int]) -> None:
        """Items were committed for these project rows. Runs on the store's writer thread:
        it only sets flags; unknown rows are resolved by the supervisor thread."""
        with self._lock:
            if self._stopping:
                return
            workers = []
            for project_id in project_ids:
                worker = self._workers.get(project_id)
                if worker is None:
                    self._unknown.add(project_id)
                else:
                    workers.append(worker)
            if self._unknown:
                self._lock.notify_all()
        for worker in workers:
            worker.notify()

    def network_hint(self) -> None:
        """The network seems to be back (the daemon calls this when the MQTT link connects):
        projects that could not reach the API try again within a second instead of waiting
        for their next probe. Projects backing off from an API in trouble are not hurried."""
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.network_hint()

    def clock_changed(self) -> None:
        """Held items may have become sendable (the true time is known, or `clock.max_hold`
        passed): every project looks again, and rows with such items get a worker."""
        with self._lock:
            if self._stopping or not self._started:
                return
            self._clock_rescan = True
            workers = list(self._workers.values())
            self._lock.notify_all()
        for worker in workers:
            worker.notify()

    def flush(self, wait: bool) -> dict[str, int]:
        """One attempt per project to send what is queued now (docs/protocol.md). With
        `wait`, blocks until every project emptied its share or hit an error; `flushed`
        counts accepted items."""
        remaining = self._store.stats().items
        with self._lock:
            if self._stopping or not self._started:
                return {"flushed": 0, "remaining": remaining}
            if not wait:
                self._rescan = True
                self._lock.notify_all()
        if wait:
            self._spawn_for(self._rows_with_items(), wake=False)
        with self._lock:
            workers = list(self._workers.values())
        requests = []
        for worker in workers:
            request = FlushRequest(budget=remaining)
            requests.append(request)
            worker.request_flush(request)
        if not wait:
            return {"flushed": 0, "remaining": remaining}
        for request in requests:
            request.done.wait()
        return {
            "flushed": sum(r.flushed for r in requests),
            "remaining": self._store.stats().items,
        }

    def status(self) -> dict[str, Any]:
        """Per project: its state and history (docs/protocol.md). Configured projects without
        queued items yet are listed as idle so an operator sees every destination."""
        with self._lock:
            workers = sorted(self._workers.values(), key=lambda w: w.row.id)
            config = self._shared.config
        projects = [worker.status() for worker in workers]
        seen = {(p["base_url"].rstrip("/"), p["project_token"]) for p in projects}
        for project in config.known_projects():
            if project.key in seen:
                continue
            seen.add(project.key)
            projects.append(
                {
                    "project_token": project.project_token,
                    "base_url": project.base_url,
                    "state": State.IDLE.value,
                    "last_success": None,
                    "last_error": None,
                    "next_attempt": None,
                    "sent": 0,
                }
            )
        return {"projects": projects}

    # -- internals -------------------------------------------------------------------------

    def _rows_with_items(self) -> list[ProjectRow]:
        """Rows without a worker that have items to send, or held items whose project must
        ask the API's clock first."""
        with self._lock:
            known = set(self._workers)
        clock = self._shared.clock
        release = clock.releasable() if clock is not None else None
        return [
            row
            for row in self._store.projects()
            if row.id not in known
            and (
                self._store.read_batch(row.id, 1, release=release)
                or (clock is not None and clock.needs_probe(row.id))
            )
        ]

    def _spawn_for(self, rows: list[ProjectRow], *, wake: bool) -> list[Worker]:
        spawned = []
        for row in rows:
            with self._lock:
                if self._stopping or row.id in self._workers:
                    continue
                worker = Worker(self._shared, row, wake=wake)
                self._workers[row.id] = worker
            worker.thread.start()
            spawned.append(worker)
        return spawned

    def _supervise(self) -> None:
        """Turns notifications for rows without a worker into workers, off the writer thread.
        Sleeps until there is such work: an idle agent does not wake it."""
        while True:
            with self._lock:
                while not (
                    self._stopping
                    or self._unknown
                    or self._rescan
                    or self._reload_rows
                    or self._clock_rescan
                ):
                    self._lock.wait()
                if self._stopping:
                    return
                unknown, self._unknown = self._unknown, set()
                rescan, self._rescan = self._rescan, False
                clock_rescan, self._clock_rescan = self._clock_rescan, False
                reload_rows, self._reload_rows = self._reload_rows, False
            try:
                rows = {row.id: row for row in self._store.projects()}
                if reload_rows:
                    with self._lock:
                        workers = dict(self._workers)
                    for row_id, worker in workers.items():
                        if row_id in rows:
                            worker.on_reload(rows[row_id])
                new = [rows[i] for i in sorted(unknown) if i in rows]
                self._spawn_for(new, wake=True)
                if clock_rescan:
                    self._spawn_for(self._rows_with_items(), wake=True)
                if rescan:  # a flush(wait=False) found rows without a worker: flush them too
                    budget = self._store.stats().items
                    for worker in self._spawn_for(self._rows_with_items(), wake=False):
                        worker.request_flush(FlushRequest(budget=budget))
            except Exception:
                log.exception("sync: cannot look up project rows; will retry on next notify")
                with self._lock:
                    self._unknown |= unknown
                    self._clock_rescan = self._clock_rescan or clock_rescan


__all__ = ["MAX_ACKS_IN_FLIGHT", "SEVERITY", "USER_AGENT", "State", "Syncer"]
