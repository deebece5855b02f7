"""The uploader: drains the store's outbox to the Engagement Tracking API (SPEC §6, §11).

One worker thread per project row (base_url + project_token), each with its own urllib3 pool,
so a hung or misconfigured endpoint never delays another project. Decisions about responses
live in `agent.wire` (pure); this module owns threads, timers and the store round trips.

Promises kept here, and where:
- Nothing queued is dropped by a network, server or credentials problem: the batch stays in
  the store until the API has answered it per command (`_Worker._drain`).
- Deletions and dead letters go through `Store.submit`, so they join the writer's group commit;
  up to `MAX_ACKS_IN_FLIGHT` of them overlap the next HTTP request. If the store cannot record
  an answer (disk full), the drain stops and backs off like a failed request: sending the same
  items again at once would only duplicate them at the API (`_Worker._store_failed`).
- Every wait is an `Event`/`Condition` wait with a timeout on `time.monotonic()`; an idle
  worker sleeps until notified, a failing one until its retry time.
- Tokens and payloads never reach the logs: projects are named by host and a token prefix.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Timeout, parse_url

from agent import __version__, wire
from agent.config import AgentConfig
from agent.logs import RateLimitedLog
from agent.store import ProjectRow, QueuedItem, Store, Txn
from agent.tracker.model import Project

if TYPE_CHECKING:  # Protocols that urllib3 defines for type checkers only
    from urllib3._base_connection import BaseHTTPConnection

log = logging.getLogger("engagement_agent.sync")

USER_AGENT = f"engagement-agent/{__version__}"
#: In immediate mode, how long a worker lets a burst accumulate before reading its first
#: batch: long enough to turn a burst of single commands into one full request, short enough
#: to be invisible to a user.
COALESCE_SECONDS = 0.005
#: Store commits (acks/dead letters) that may be pending while the next batch is on the wire.
#: Overlapping the fsync with the HTTP exchange is what makes the drain rate independent of
#: the disk's sync latency; the writer folds concurrent ones into one group commit.
MAX_ACKS_IN_FLIGHT = 4
#: Repeated transient failures are logged at most this often (the first one always is).
LOG_INTERVAL = 60.0
#: Backoff base (SPEC §6).
BACKOFF_BASE = 1.0


def _label(base_url: str, token: str) -> str:
    """How logs name a project: enough for an operator to tell which, never the whole token."""
    host = parse_url(base_url).host or base_url
    return f"{host} project {token[:4]}…" if token else f"{host} (unconfigured project)"


def _describe_network_error(exc: BaseException, timeout: float) -> str:
    """A short reason without URLs (they contain the project token)."""
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, NewConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = getattr(cause, "strerror", None) or type(cause).__name__
        return f"cannot connect: {detail}"
    if isinstance(exc, SSLError):
        return "TLS error: " + str(exc).split(":")[-1].strip()[:120]
    if isinstance(exc, ProtocolError):
        return "connection lost before the response"
    return f"network error: {type(exc).__name__}"


class _PoolMixin:
    """Remembers the pool's connections so `abort()` can end a request stuck in `recv`.

    urllib3 offers no way to cancel an in-flight request from another thread; shutting the
    socket down makes the blocked read fail at once, which is what `Syncer.stop` needs at its
    deadline.
    """

    live: weakref.WeakSet[BaseHTTPConnection]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.live = weakref.WeakSet()

    def _new_conn(self) -> Any:
        conn = super()._new_conn()  # type: ignore[misc]
        self.live.add(conn)
        return conn

    def abort(self) -> None:
        for conn in list(self.live):
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _HTTPPool(_PoolMixin, urllib3.HTTPConnectionPool):
    pass


class _HTTPSPool(_PoolMixin, urllib3.HTTPSConnectionPool):
    pass


_Pool: TypeAlias = "_HTTPPool | _HTTPSPool"


@dataclass
class _FlushRequest:
    """One `flush()` (or the final flush of `stop()`) as seen by one worker.

    `budget` bounds the work to "what was queued at that moment" even while ingest continues;
    `deadline` (monotonic) bounds the final flush.
    """

    budget: int
    deadline: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    flushed: int = 0
    processed: int = 0


@dataclass
class _Exchange:
    """What one batch (with any splitting) came to."""

    acks: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    failure: wire.Verdict | None = None
    accepted: int = 0


class _Stopped(Exception):
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


class _Worker:
    """Uploads one project row's items. All mutable fields are guarded by `cond`; the lock is
    never held across I/O, so `notify()` from the store's writer thread never blocks on HTTP."""

    def __init__(self, syncer: Syncer, row: ProjectRow) -> None:
        self.syncer = syncer
        self.row = row
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"sync-{row.id}", daemon=True)
        # Triggers.
        self.wake = True  # started because items are (or may be) queued
        self.reloaded = False
        self.stopping = False
        self.aborted = False
        self.flushes: list[_FlushRequest] = []
        # Schedule (monotonic).
        self.retry_at: float | None = None
        self.period_at: float | None = None
        self.next_request_at = 0.0
        # Health, for status and logs.
        self.paused = False
        self.pending = True
        self.failures = 0
        self.last_logged = -LOG_INTERVAL
        # Consecutive drains whose answers the store could not record. Kept apart from
        # `failures` because the API succeeded: `_on_success` must neither reset this backoff
        # nor log a "recovered" line on every attempt.
        self.store_failures = 0
        self.store_log = RateLimitedLog(log, LOG_INTERVAL)
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.sent = 0
        self.pool: _Pool | None = None
        self.pool_key: tuple[str, str, int | None] | None = None

    # -- called from other threads ---------------------------------------------------------

    def notify(self) -> None:
        with self.cond:
            self.wake = True
            self.pending = True
            self.cond.notify_all()

    def request_flush(self, request: _FlushRequest) -> None:
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

    def begin_stop(self, final: _FlushRequest) -> None:
        with self.cond:
            self.stopping = True
            self.flushes.append(final)
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.stopping = True
            pool = self.pool
            self.cond.notify_all()
        if pool is not None:
            pool.abort()

    def status(self) -> dict[str, Any]:
        with self.cond:
            if self.paused:
                state = "paused"
            elif self.retry_at is not None or self.failures or self.store_failures:
                state = "backoff"
            elif self.pending:
                state = "ok"
            else:
                state = "idle"
            next_at = self.retry_at
            if next_at is None and not self.paused:
                next_at = self.period_at
            return {
                "project_token": self.row.project_token,
                "base_url": self.row.base_url,
                "state": state,
                "last_success": self.last_success,
                "last_error": self.last_error,
                "next_attempt": (
                    None if next_at is None else time.time() + max(0.0, next_at - time.monotonic())
                ),
                "sent": self.sent,
            }

    # -- the thread ------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return _label(self.row.base_url, self.row.project_token)

    def _run(self) -> None:
        try:
            while True:
                job = self._wait_for_work()
                if job is None:
                    return
                automatic, flushes = job
                try:
                    self._cycle(automatic, flushes)
                except _Stopped:
                    return
                except Exception:  # a bug must not silently end uploading for this project
                    log.exception("sync for %s failed unexpectedly; retrying later", self.label)
                    with self.cond:
                        self._schedule_retry(wire.Verdict(wire.Action.RETRY, "internal error"))
                finally:
                    for request in flushes:
                        request.done.set()
        finally:
            with self.cond:
                leftover, self.flushes = self.flushes, []
                pool, self.pool = self.pool, None
            for request in leftover:
                request.done.set()
            if pool is not None:
                pool.close()

    def _wait_for_work(self) -> tuple[bool, list[_FlushRequest]] | None:
        """Sleep until there is something to do: `(automatic, flush requests)`, or None to
        exit. Flushes go ahead even during backoff or pause: an operator asked for them."""
        with self.cond:
            while True:
                if self.flushes:
                    flushes, self.flushes = self.flushes, []
                    return False, flushes
                if self.stopping:
                    return None
                config = self.syncer._config.sync
                manual = config.flush_mode == "manual"
                now = time.monotonic()
                if self.paused or self.retry_at is not None:
                    if self.reloaded and not manual:
                        self.reloaded = False
                        return True, []
                    self.reloaded = False
                    if manual or self.retry_at is None:
                        self.cond.wait()
                    elif now >= self.retry_at:
                        return True, []
                    else:
                        self.cond.wait(self.retry_at - now)
                    continue
                self.reloaded = False
                if config.flush_mode == "immediate":
                    self.period_at = None
                    if self.wake:
                        self.wake = False
                        self.cond.wait_for(
                            lambda: self.stopping or bool(self.flushes), COALESCE_SECONDS
                        )
                        return True, []
                    self.cond.wait()
                elif config.flush_mode == "period":
                    if self.period_at is None:
                        self.period_at = now + config.flush_period
                    if now >= self.period_at:
                        self.period_at = now + config.flush_period
                        self.wake = False
                        return True, []
                    self.cond.wait(self.period_at - now)
                else:
                    self.period_at = None
                    self.cond.wait()

    def _resolve_target(self) -> Project | None:
        """Credentials are looked up at send time so a corrected key in the config also
        delivers what was queued under the wrong one (SPEC §5)."""
        config = self.syncer._config
        row = self.row
        if row.project_token == "":
            return config.project.to_project() if config.project else None
        key = (row.base_url.rstrip("/"), row.project_token)
        for project in config.known_projects():
            if project.key == key:
                return project
        return Project(row.project_token, row.authorization_token, row.base_url.rstrip("/"))

    def _pool_for(self, base_url: str) -> tuple[_Pool, str]:
        url = parse_url(base_url)
        scheme = url.scheme or "https"
        key = (scheme, url.host or "", url.port)
        with self.cond:
            if self.pool is not None and self.pool_key == key:
                return self.pool, (url.path or "").rstrip("/")
            old = self.pool
        if old is not None:
            old.close()
        pool_cls = _HTTPSPool if scheme == "https" else _HTTPPool
        pool: _Pool = pool_cls(url.host or "", url.port, maxsize=1, block=False, retries=False)
        with self.cond:
            self.pool, self.pool_key = pool, key
            if self.aborted:
                pool.abort()
        return pool, (url.path or "").rstrip("/")

    def _cycle(self, automatic: bool, flushes: list[_FlushRequest]) -> None:
        """One drain: oldest first until the queue is empty, an error, or (for flush-only
        cycles) every flush's budget is spent. New flush requests join on the way."""
        active = list(flushes)
        adopted: list[_FlushRequest] = []
        target = self._resolve_target()
        if target is None:
            with self.cond:
                self.retry_at = None
                if not self.paused or self.last_error != "no project configured":
                    log.warning(
                        "sync of items queued before any project was configured is waiting "
                        "for [project] in the config"
                    )
                self.paused = True
                self.last_error = "no project configured"
            return
        sync = self.syncer._config.sync
        pool, prefix = self._pool_for(target.base_url)
        path = prefix + wire.batch_path(target.project_token)
        headers = {
            "Authorization": f"Token {target.authorization_token}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        in_flight: collections.deque[tuple[Future[int], int, list[_FlushRequest]]] = (
            collections.deque()
        )
        after_id = 0
        store_error: BaseException | None = None
        try:
            while True:
                with self.cond:
                    if self.aborted:
                        raise _Stopped
                    if self.stopping:
                        automatic = False  # from now on only the final flush's share
                    if self.flushes:
                        active.extend(self.flushes)
                        adopted.extend(self.flushes)
                        self.flushes = []
                if not automatic and not active:
                    break
                items = self.syncer._store.read_batch(self.row.id, sync.batch_size, after_id)
                if not items:
                    if after_id == 0:
                        with self.cond:
                            self.pending = False
                        break
                    # Reading past the last id sent keeps the pipeline full, but ids may be
                    # reused once the table drained: settle the commits and look again from 0.
                    store_error = self._settle(in_flight, 0)
                    if store_error is not None:
                        break
                    after_id = 0
                    continue
                with self.cond:
                    self.pending = True
                exchange = self._exchange(pool, path, headers, items, active)
                if exchange.acks or exchange.dead:
                    future = self.syncer._store.submit(
                        _commit_op(exchange.acks, exchange.dead, time.time())
                    )
                    processed = len(exchange.acks) + len(exchange.dead)
                    in_flight.append((future, exchange.accepted, list(active)))
                    for request in active:
                        request.processed += processed
                    active = [r for r in active if r.processed < r.budget]
                    store_error = self._settle(in_flight, MAX_ACKS_IN_FLIGHT)
                if exchange.failure is not None:
                    store_error = _first(store_error, self._settle(in_flight, 0))
                    with self.cond:
                        self._schedule_retry(exchange.failure)
                    break
                if store_error is not None:
                    break
                after_id = items[-1].id
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

    def _settle(
        self,
        in_flight: collections.deque[tuple[Future[int], int, list[_FlushRequest]]],
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
        a failed request) so the items are not resent in a tight loop. Logged once per
        `LOG_INTERVAL` with a count of repeats; the status says "backoff" until a commit
        succeeds again."""
        sync = self.syncer._config.sync
        reason = f"cannot record the API's answer: {error}"
        with self.cond:
            now = time.monotonic()
            delay = wire.backoff_delay(
                self.store_failures, sync.max_backoff, self.syncer._uniform(), BACKOFF_BASE
            )
            self.store_failures += 1
            self.last_error = reason
            if sync.flush_mode != "manual":
                # An API failure scheduled in the same drain (e.g. Retry-After) may be later.
                self.retry_at = max(self.retry_at or 0.0, now + delay)
            attempts = self.store_failures
        self.store_log.error(
            "store",
            "sync for %s: %s; the items stay queued and are sent again in %.1f s "
            "(%d attempt(s) in a row)",
            self.label,
            reason,
            delay,
            attempts,
        )

    def _store_recovered(self) -> None:
        with self.cond:
            if not self.store_failures:
                return
            attempts, self.store_failures = self.store_failures, 0
        self.store_log.resolved(
            "store",
            "sync for %s: the API's answers are recorded again after %d failed attempt(s)",
            self.label,
            attempts,
        )

    def _exchange(
        self,
        pool: _Pool,
        path: str,
        headers: dict[str, str],
        items: list[QueuedItem],
        flushes: list[_FlushRequest],
    ) -> _Exchange:
        """Send one batch; on a whole-batch refusal bisect it to find the refused item(s)."""
        out = _Exchange()
        stack = [items]
        split_logged = False
        while stack:
            chunk = stack.pop()
            verdict = self._post(pool, path, headers, chunk, flushes)
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
            else:
                out.failure = verdict
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
        rate = self.syncer._config.sync.max_requests_per_second
        with self.cond:
            if rate > 0:
                while True:
                    if self.aborted:
                        raise _Stopped
                    now = time.monotonic()
                    wait = self.next_request_at - now
                    if wait <= 0:
                        break
                    if deadline is not None and now + wait >= deadline:
                        raise _Stopped
                    self.cond.wait(wait)
                self.next_request_at = max(now, self.next_request_at) + 1.0 / rate
            elif self.aborted:
                raise _Stopped

    def _post(
        self,
        pool: _Pool,
        path: str,
        headers: dict[str, str],
        items: list[QueuedItem],
        flushes: list[_FlushRequest],
    ) -> wire.Verdict:
        deadlines = [r.deadline for r in flushes if r.deadline is not None]
        deadline = min(deadlines) if deadlines else None
        self._pace(deadline)
        timeout = self.syncer._config.sync.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise _Stopped
        body = wire.batch_body([item.payload for item in items])
        try:
            response = pool.urlopen(
                "POST",
                path,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                timeout=Timeout(connect=timeout, read=timeout),
                preload_content=True,
                assert_same_host=False,
            )
        except (HTTPError, OSError) as exc:
            with self.cond:
                if self.aborted:
                    raise _Stopped from None
            return wire.Verdict(wire.Action.RETRY, _describe_network_error(exc, timeout))
        return wire.classify(
            response.status,
            response.data,
            len(items),
            retry_after=response.headers.get("Retry-After"),
            now=time.time(),
        )

    def _on_success(self) -> None:
        with self.cond:
            if self.paused:
                log.info("sync for %s resumed: the API accepts the credentials", self.label)
            elif self.failures:
                log.info(
                    "sync for %s recovered after %d failed attempt(s)", self.label, self.failures
                )
            self.paused = False
            self.failures = 0
            self.retry_at = None
            self.last_success = time.time()

    def _schedule_retry(self, verdict: wire.Verdict) -> None:
        """Caller holds `cond`. Transient failures back off with full jitter (Retry-After as a
        floor, even above the cap); a pause retries at the cap interval."""
        sync = self.syncer._config.sync
        now = time.monotonic()
        manual = sync.flush_mode == "manual"
        if verdict.action is wire.Action.PAUSE:
            reason = f"paused: {verdict.reason}"
            if not self.paused or self.last_error != reason:
                log.warning(
                    "sync for %s paused: %s; its items are kept, retrying every %g s and after "
                    "a config reload",
                    self.label,
                    verdict.reason,
                    sync.max_backoff,
                )
            self.paused = True
            self.failures = 0
            self.last_error = reason
            self.retry_at = None if manual else now + sync.max_backoff
            return
        delay = wire.backoff_delay(
            self.failures, sync.max_backoff, self.syncer._uniform(), BACKOFF_BASE
        )
        if verdict.retry_after is not None:
            delay = max(delay, verdict.retry_after)
        self.failures += 1
        self.paused = False
        self.last_error = verdict.reason
        self.retry_at = None if manual else now + delay
        if self.failures == 1 or now - self.last_logged >= LOG_INTERVAL:
            self.last_logged = now
            log.warning(
                "sync for %s failed (%s, %d attempt(s) in a row); retrying in %.1f s",
                self.label,
                verdict.reason,
                self.failures,
                delay,
            )
        else:
            log.debug("sync for %s failed again: %s", self.label, verdict.reason)


class Syncer:
    """Uploads every project's queued items; the daemon's only handle on sync.

    Construction does no I/O. `start()` spawns workers for project rows with queued items;
    rows that appear later get one on `notify()`. All public methods are thread-safe.
    """

    def __init__(
        self, store: Store, config: AgentConfig, *, rng: random.Random | None = None
    ) -> None:
        self._store = store
        self._config = config
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._lock = threading.Condition()
        self._workers: dict[int, _Worker] = {}
        self._unknown: set[int] = set()
        self._rescan = False
        self._reload_rows = False
        self._started = False
        self._stopping = False
        self._supervisor: threading.Thread | None = None

    def _uniform(self) -> float:
        with self._rng_lock:
            return self._rng.random()

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
            final = _FlushRequest(budget=budget, deadline=deadline)
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

    def reload(self, config: AgentConfig) -> None:
        """Use new credentials, URLs and sync settings; paused projects try again at once."""
        with self._lock:
            self._config = config
            self._reload_rows = True
            workers = list(self._workers.values())
            self._lock.notify_all()
        for worker in workers:
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

    def flush(self, wait: bool) -> dict[str, int]:
        """One attempt per project to send what is queued now (SPEC §11). With `wait`, blocks
        until every project emptied its share or hit an error; `flushed` counts accepted
        items."""
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
            request = _FlushRequest(budget=remaining)
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
        """Per project: the SPEC §11 shape. Configured projects without queued items yet are
        listed as idle so an operator sees every destination."""
        with self._lock:
            workers = sorted(self._workers.values(), key=lambda w: w.row.id)
            config = self._config
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
                    "state": "idle",
                    "last_success": None,
                    "last_error": None,
                    "next_attempt": None,
                    "sent": 0,
                }
            )
        return {"projects": projects}

    # -- internals -------------------------------------------------------------------------

    def _rows_with_items(self) -> list[ProjectRow]:
        with self._lock:
            known = set(self._workers)
        return [
            row
            for row in self._store.projects()
            if row.id not in known and self._store.read_batch(row.id, 1)
        ]

    def _spawn_for(self, rows: list[ProjectRow], *, wake: bool) -> list[_Worker]:
        spawned = []
        for row in rows:
            with self._lock:
                if self._stopping or row.id in self._workers:
                    continue
                worker = _Worker(self, row)
                worker.wake = wake
                worker.pending = True
                self._workers[row.id] = worker
            worker.thread.start()
            spawned.append(worker)
        return spawned

    def _supervise(self) -> None:
        """Turns notifications for rows without a worker into workers, off the writer thread.
        Sleeps until there is such work: an idle agent does not wake it."""
        while True:
            with self._lock:
                while not (self._stopping or self._unknown or self._rescan or self._reload_rows):
                    self._lock.wait()
                if self._stopping:
                    return
                unknown, self._unknown = self._unknown, set()
                rescan, self._rescan = self._rescan, False
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
                if rescan:  # a flush(wait=False) found rows without a worker: flush them too
                    budget = self._store.stats().items
                    for worker in self._spawn_for(self._rows_with_items(), wake=False):
                        worker.request_flush(_FlushRequest(budget=budget))
            except Exception:
                log.exception("sync: cannot look up project rows; will retry on next notify")
                with self._lock:
                    self._unknown |= unknown


__all__ = ["USER_AGENT", "Syncer"]
