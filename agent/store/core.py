"""The Store: one SQLite file, one writer thread with group commit, a reader per thread.

Every write goes through `submit(op)`. The writer takes every op waiting, runs them in one
transaction (each in its own SAVEPOINT) and commits once, so durability costs one fsync per
batch rather than per command. Futures resolve only after the commit, which is what lets the
socket reply and the MQTT PUBACK mean "on disk".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agent.config import QueueConfig
from agent.errors import AgentError, Unavailable
from agent.store import files, schema
from agent.store.model import (
    ProjectRow,
    StoreError,
    StoreLocked,
)
from agent.store.reads import StoreReads
from agent.store.txn import Txn
from agent.store.writer_state import UPSERT_META, Counters, WriterState
from agent.tracker.model import Project

T = TypeVar("T")

log = logging.getLogger("engagement_agent.store")

#: Most ops per transaction: bounds the time one commit holds results back and the memory
#: a burst can pin, while still amortising the fsync over hundreds of commands.
MAX_BATCH = 1000
#: Result codes after which the transaction cannot go on (the disk or the file is the
#: problem, not the op): BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN,
#: PROTOCOL, NOTADB.
_FATAL_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})
_SQLITE_FULL = 13
#: Seconds between "queue full, dropping oldest" warnings.
_EVICTION_LOG_PERIOD = 60.0
#: The history counters (dropped, rejected) are written at most this often, and at close:
#: under a long outage with a full queue every command drops one, and writing the counter with
#: each would dirty a page per command. A crash loses at most this long of their increments.
HISTORY_SAVE_PERIOD = 60.0


class _BatchFailed(Exception):
    def __init__(self, cause: sqlite3.Error) -> None:
        super().__init__(str(cause))
        self.cause = cause


#: A group op's result slot before the op has a result.
_UNSET: Any = object()


class _Group:
    """Ops submitted together with `submit_group`: one callback once all of them are settled."""

    __slots__ = ("on_done", "remaining", "results")

    def __init__(self, n: int, on_done: Callable[[list[Any]], object]) -> None:
        self.on_done = on_done
        self.remaining = n
        self.results: list[Any] = [_UNSET] * n


class _Op:
    """One op, `fn(*args, txn)`: settled through its own future (`submit`) or its group's slot
    (`submit_group`)."""

    __slots__ = ("args", "fn", "future", "group", "index")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        future: concurrent.futures.Future[Any] | None,
        group: _Group | None = None,
        index: int = 0,
    ) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.group = group
        self.index = index

    def settle(self, value: Any, finished: list[_Group], *, failed: bool = False) -> None:
        """Record the op's result (its value, or with `failed` the exception it failed with).
        A group whose last op this was goes to `finished`; the caller runs its callback."""
        future = self.future
        if future is not None:
            if failed:
                future.set_exception(value)
            else:
                future.set_result(value)
            return
        group = self.group
        assert group is not None
        if group.results[self.index] is not _UNSET:
            return
        group.results[self.index] = value
        group.remaining -= 1
        if group.remaining == 0:
            finished.append(group)

    def settled(self) -> bool:
        if self.future is not None:
            return self.future.done()
        assert self.group is not None
        return self.group.results[self.index] is not _UNSET


def _call_groups(groups: list[_Group]) -> None:
    for group in groups:
        try:
            group.on_done(group.results)
        except Exception:
            log.exception("a group's on_done callback failed")


def _errorcode(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    return code & 0xFF if isinstance(code, int) else None


def _is_fatal(exc: sqlite3.Error) -> bool:
    code = _errorcode(exc)
    if code is not None:
        return code in _FATAL_CODES
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _is_disk_full(exc: sqlite3.Error) -> bool:
    code = _errorcode(exc)
    return code == _SQLITE_FULL if code is not None else "full" in str(exc).lower()


def _run_hooks(hooks: list[Callable[[], object]] | None, what: str) -> None:
    """Run an op's hooks (None: it registered none, as most ops)."""
    if not hooks:
        return
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("an %s hook failed", what)


class Store(StoreReads):
    """The durable queue. No I/O until `open()`; `close()` drains what was submitted.

    `max_page_count` caps the file in pages on the writer connection (a test hook for
    "disk full"; SQLite then fails writes with SQLITE_FULL exactly as on a full disk).
    """

    def __init__(self, config: QueueConfig, *, max_page_count: int | None = None) -> None:
        self.config = config
        self.recovered: list[dict[str, Any]] = []  # {"file", "at", "reason"}
        self.on_enqueued: Callable[[set[int]], None] | None = None  # project ids, after commit
        self.max_page_count = max_page_count
        self._path = str(config.path)
        self._cond = threading.Condition()
        self._pending: deque[_Op] = deque()
        self._accepting = False
        self._stopping = False
        self._busy = False
        self._writer_waiting = False
        self._progress_at = 0.0
        self._commits = 0
        self._thread: threading.Thread | None = None
        self._writer: WriterState | None = None
        self._lock: files.LockedFile | None = None
        self._published = Counters()
        self._current_txn: Txn | None = None
        self._saved_history: tuple[int, int, int] = (0, 0, 0)
        self._history_writing: tuple[int, int, int] | None = None
        self._history_saved_at = 0.0
        self._reopen_writer = False
        self._failing: str | None = None
        self._last_eviction_log = -_EVICTION_LOG_PERIOD
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._generation = 0
        self._is_open = False

    # -- lifecycle --------------------------------------------------------------------------------
    def open(self) -> None:
        """Lock, check, recover or migrate, load counters, start the writer.

        Raises StoreLocked (another process has the file), StoreError (newer schema, or the
        file cannot be read or created). A corrupt file is not an error: it is moved aside,
        recorded in `self.recovered`, and an empty queue is served.
        """
        if self._is_open:
            raise StoreError(f"queue database {self._path} is already open")
        path = self._path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            locked, existed = files.lock(path)
        except StoreLocked:
            raise
        except OSError as exc:
            raise StoreError(f"cannot open queue database {path}: {exc}") from exc
        try:
            locked, conn = self._check_and_connect(path, locked, existed)
        except BaseException:
            locked.release()
            raise
        self._lock = locked
        try:
            self._start(conn)
        except BaseException:
            conn.close()
            locked.release()
            self._lock = None
            raise

    def _check_and_connect(
        self, path: str, locked: files.LockedFile, existed: bool
    ) -> tuple[files.LockedFile, sqlite3.Connection]:
        reason = files.precheck(locked, existed)
        if reason is None:
            files.note_partial_wal(path)
            reason = self._inspect(path)
        if reason is not None:
            locked = self._move_aside(path, locked, reason)
        try:
            return locked, self._connect_and_migrate(path)
        except sqlite3.DatabaseError as exc:
            if not files.is_corruption(exc) or reason is not None:
                raise StoreError(f"cannot open queue database {path}: {exc}") from exc
            damage = str(exc)
        # quick_check passed but the migration met damage; one more try on a fresh file.
        locked = self._move_aside(path, locked, f"corrupt during migration: {damage}")
        try:
            return locked, self._connect_and_migrate(path)
        except sqlite3.Error as exc2:
            raise StoreError(f"cannot create queue database {path}: {exc2}") from exc2

    def _inspect(self, path: str) -> str | None:
        """Refuse a newer schema, then quick_check; on a plain connection, before any pragma
        writes, so a refused file is left exactly as it was."""
        try:
            check = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                check.execute(f"PRAGMA busy_timeout = {schema.BUSY_TIMEOUT_MS}")
                schema.refuse_newer(path, schema.stored_version(check))
                return files.quick_check(check)
            finally:
                check.close()
        except sqlite3.DatabaseError as exc:
            if files.is_corruption(exc):
                return str(exc)
            raise StoreError(f"cannot read queue database {path}: {exc}") from exc

    def _move_aside(self, path: str, locked: files.LockedFile, reason: str) -> files.LockedFile:
        try:
            target = files.move_aside(path)
            fresh, _ = files.lock(path)
        except StoreLocked:
            raise
        except OSError as exc:
            raise StoreError(
                f"queue database {path} is corrupt ({reason}) and could not be moved aside: {exc}"
            ) from exc
        locked.release()
        self.recovered.append({"file": target, "at": time.time(), "reason": reason})
        log.error(
            "queue database %s was unusable (%s); moved it to %s and started an empty queue",
            path,
            reason,
            target,
        )
        return fresh

    def _connect_and_migrate(self, path: str) -> sqlite3.Connection:
        conn = self._connect_writer()
        try:
            if schema.migrate(conn, path) and schema.compact(conn, path):
                conn.close()  # a fresh connection derives its settings from the new layout
                conn = self._connect_writer()
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        return schema.connect(
            self._path,
            durability=self.config.durability,
            role="writer",
            max_page_count=self.max_page_count,
        )

    def _start(self, conn: sqlite3.Connection) -> None:
        try:
            loaded = schema.Loaded(conn)
            projects = conn.execute("SELECT id, base_url, project_token FROM projects").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read queue database {self._path}: {exc}") from exc
        counters = Counters(
            items=loaded.items,
            bytes=loaded.bytes,
            held=loaded.held,
            sendable=loaded.sendable,
            dead_items=loaded.dead_items,
            dead_bytes=loaded.dead_bytes,
            dropped=loaded.history["dropped"],
            rejected=loaded.history["rejected"],
            dead_dropped=loaded.history["dead_dropped"],
            head_created_at=loaded.head_created_at,
        )
        counters.outbox_reserved = loaded.ids["outbox"][1]
        counters.dead_reserved = loaded.ids["dead_letters"][1]
        state = WriterState(conn, self.config, counters)
        state.next_id = max(loaded.ids["outbox"]) + 1
        state.next_dead_id = max(loaded.ids["dead_letters"]) + 1
        state.projects = {(row[1], row[2]): ProjectRow(*row) for row in projects}
        self._saved_history = counters.history()
        self._history_saved_at = time.monotonic()
        self._commits = 0
        self._writer = state
        self._published = counters.copy()
        self._generation += 1
        self._is_open = True
        self._stopping = False
        self._accepting = True
        self._progress_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()
        log.info(
            "queue database %s open: %d items, %d bytes, %d dead letters",
            self._path,
            counters.items,
            counters.bytes,
            counters.dead_items,
        )

    def close(self) -> None:
        """Finish every op already submitted, then stop the writer and release the file."""
        with self._cond:
            if not self._is_open:
                return
            if threading.current_thread() is self._thread:
                raise RuntimeError("Store.close() called from the writer thread")
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._thread = None
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            with contextlib.suppress(sqlite3.Error):
                reader.close()
        if self._writer is not None:
            try:
                self._save_history(self._writer)
            except sqlite3.Error as exc:
                log.warning("saving the queue's counters at close: %s", exc)
            try:
                self._writer.conn.close()  # the last connection checkpoints and removes the WAL
            except sqlite3.Error as exc:
                log.warning("closing the queue database: %s", exc)
            self._writer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._generation += 1
        self._is_open = False

    # -- writing ----------------------------------------------------------------------------------
    def submit(self, op: Callable[[Txn], T]) -> concurrent.futures.Future[T]:
        """Run `op(txn)` on the writer thread; the future resolves after the commit.

        Never blocks on I/O. After close (or before open) the future fails with Unavailable.
        Do not wait on the future from the writer thread itself (hooks run there).
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if not self._accepting:
                future.set_exception(Unavailable("the queue database is closed"))
                return future
            if not self._pending and not self._busy:
                self._progress_at = time.monotonic()  # the stall clock starts with the work
            self._pending.append(_Op(op, (), future))
            if self._writer_waiting:
                self._cond.notify()
        return future

    def submit_group(
        self,
        fn: Callable[..., Any],
        calls: Sequence[tuple[Any, ...]],
        on_done: Callable[[list[Any]], object],
    ) -> None:
        """Run `fn(*args, txn)` for each `args` of `calls` as its own op, exactly as `submit`
        would, in order; then call `on_done(results)` once.

        `results[i]` is call i's return value, or the exception it failed with (its own
        AgentError, or Unavailable when its transaction was lost). `on_done` runs on the
        writer thread after the transaction holding the group's last op committed (or
        failed); it must not block. This saves a Future, with its lock and condition, and a
        closure per op: the socket submits each chunk of pipelined commands as one group.
        After close (or before open) `on_done` runs at once, on the calling thread, with
        Unavailable for all.
        """
        if not calls:
            return
        group = _Group(len(calls), on_done)
        ops = [_Op(fn, args, None, group, i) for i, args in enumerate(calls)]
        with self._cond:
            if self._accepting:
                if not self._pending and not self._busy:
                    self._progress_at = time.monotonic()
                self._pending.extend(ops)
                if self._writer_waiting:
                    self._cond.notify()
                return
        closed = Unavailable("the queue database is closed")
        on_done([closed] * len(calls))

    def writer_healthy(self, max_stall: float) -> bool:
        """False when work is waiting and the writer has not finished a batch for `max_stall`
        seconds (a hung fsync, a dead thread): the daemon then stops petting the watchdog."""
        with self._cond:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return False
            if not self._pending and not self._busy:
                return True
            return time.monotonic() - self._progress_at <= max_stall

    @property
    def pending_ops(self) -> int:
        """Ops submitted and not yet taken by the writer."""
        with self._cond:
            return len(self._pending)

    @property
    def commit_count(self) -> int:
        """Transactions committed since open (how well group commit batches)."""
        return self._commits

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._writer_waiting = True
                    self._cond.wait()
                    self._writer_waiting = False
                if not self._pending:
                    return
                n = min(len(self._pending), MAX_BATCH)
                batch = [self._pending.popleft() for _ in range(n)]
                self._busy = True
                self._progress_at = time.monotonic()
            try:
                self._run_batch(batch)
            except BaseException:  # pragma: no cover - a bug; never leave futures hanging
                log.exception("the queue writer failed")
                finished: list[_Group] = []
                for op in batch:
                    if not op.settled():
                        op.settle(
                            Unavailable("internal error in the queue writer"), finished, failed=True
                        )
                _call_groups(finished)
            finally:
                with self._cond:
                    self._busy = False
                    self._progress_at = time.monotonic()

    def _run_batch(self, batch: list[_Op]) -> None:
        state = self._writer
        assert state is not None
        start = state.counters.copy()
        evicted_before = state.evicted_since_log
        started: list[Txn] = []
        done: list[tuple[_Op, Txn, Any]] = []
        failed: list[tuple[_Op, Txn, BaseException]] = []
        try:
            if self._reopen_writer:
                self._reconnect(state)
            conn = state.conn
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if op.future is not None and not op.future.set_running_or_notify_cancel():
                    continue
                txn = Txn(state)
                started.append(txn)
                outcome = self._run_op(conn, state, op, txn)
                if isinstance(outcome, BaseException):
                    failed.append((op, txn, outcome))
                else:
                    done.append((op, txn, outcome[0]))
            self._finish(conn, state)
            conn.execute("COMMIT")
        except (sqlite3.Error, _BatchFailed) as exc:
            cause = exc.cause if isinstance(exc, _BatchFailed) else exc
            self._batch_failed(state, start, evicted_before, cause, batch, started)
            return
        self._commits += 1
        if self._history_writing is not None:
            self._saved_history, self._history_writing = self._history_writing, None
            self._history_saved_at = time.monotonic()
        state.publish_projects()
        self._published = state.counters.copy()
        if self._failing is not None:
            log.warning("queue database writes succeed again")
            self._failing = None
        self._log_evictions(state)
        if state.vacuum_wanted:
            state.vacuum_wanted = False
            self._vacuum(state)
        enqueued: set[int] = set()
        finished: list[_Group] = []
        for op, txn, error in failed:
            _run_hooks(txn.rollback_hooks, "after_rollback")
            op.settle(error, finished, failed=True)
        for _, txn, _ in done:
            _run_hooks(txn.commit_hooks, "after_commit")
            if txn.enqueued_projects:
                enqueued |= txn.enqueued_projects
        callback = self.on_enqueued
        if enqueued and callback is not None:
            try:
                callback(enqueued)
            except Exception:
                log.exception("the on_enqueued callback failed")
        for op, _, value in done:
            op.settle(value, finished)
        _call_groups(finished)

    def _run_op(
        self, conn: sqlite3.Connection, state: WriterState, op: _Op, txn: Txn
    ) -> tuple[Any] | BaseException:
        """Run one op: a tuple with its result, or the exception it raised once its writes
        (buffered or behind its savepoint) and counter changes are undone. Raises
        _BatchFailed when the transaction itself is lost."""
        before = state.counters.snapshot()
        self._current_txn = txn
        try:
            value = op.fn(*op.args, txn)
        except Exception as exc:
            txn.closed = True
            if isinstance(exc, sqlite3.Error) and (_is_fatal(exc) or not conn.in_transaction):
                raise _BatchFailed(exc) from exc
            if isinstance(exc, AgentError):
                exc = exc.as_answer()  # kept in the batch's lists: no frames with it
            else:
                log.error("a queue operation failed: %s: %s", type(exc).__name__, exc)
            if txn.savepoint:
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error as rollback_error:
                    raise _BatchFailed(rollback_error) from exc
            counters = state.counters
            rejected = counters.rejected  # a refusal is counted even when undone
            counters.restore(before)
            counters.rejected = rejected
            return exc
        finally:
            self._current_txn = None
        txn.closed = True
        if txn.savepoint:
            if not conn.in_transaction:
                raise _BatchFailed(sqlite3.OperationalError("an operation ended the transaction"))
            conn.execute("RELEASE op")
        if txn.rows:
            state.rows.extend(txn.rows)
        if txn.states:
            state.states.update(txn.states)
        if txn.meta:
            state.meta.update(txn.meta)
        if txn.new_projects:
            state.staged_projects.update(txn.new_projects)
        return (value,)

    def _finish(self, conn: sqlite3.Connection, state: WriterState) -> None:
        """Buffered rows, the queue head, and what must be stored with them: the id floors
        after deletes, and the history counters when they are due (`HISTORY_SAVE_PERIOD`).
        Queue totals are not stored (counted at open): a command dirties no counter page."""
        state.flush()
        counters = state.counters
        if state.head_dirty:
            head = conn.execute("SELECT created_at FROM outbox ORDER BY id LIMIT 1").fetchone()
            counters.head_created_at = head[0] if head else None
            state.head_dirty = False
        rows = state.id_floors()
        history = counters.history()
        due = time.monotonic() - self._history_saved_at >= HISTORY_SAVE_PERIOD
        if history != self._saved_history and (due or rows):
            rows.extend(zip(schema.HISTORY_KEYS.values(), map(str, history), strict=True))
            self._history_writing = history
        if rows:
            conn.executemany(UPSERT_META, rows)

    def _save_history(self, state: WriterState) -> None:
        """At close: the history counters, if they changed since they were last written."""
        history = state.counters.history()
        if history == self._saved_history:
            return
        state.conn.execute("BEGIN IMMEDIATE")
        try:
            rows = zip(schema.HISTORY_KEYS.values(), map(str, history), strict=True)
            state.conn.executemany(UPSERT_META, rows)
            state.conn.execute("COMMIT")
        except BaseException:
            if state.conn.in_transaction:
                state.conn.execute("ROLLBACK")
            raise
        self._saved_history = history

    def _batch_failed(
        self,
        state: WriterState,
        start: Counters,
        evicted_before: int,
        cause: sqlite3.Error,
        batch: list[_Op],
        started: list[Txn],
    ) -> None:
        try:
            if state.conn.in_transaction:
                state.conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._reopen_writer = True
        state.counters = start
        state.staged_projects = {}
        state.discard()
        self._history_writing = None
        state.head_dirty = False
        state.evicted_since_log = evicted_before
        if not _is_disk_full(cause):
            self._reopen_writer = True  # after an I/O error the connection may be unusable
        else:
            # Move what the WAL holds into the main file and truncate the WAL while we can:
            # the space it frees is what the next deletes need.
            with contextlib.suppress(sqlite3.Error):
                state.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        message = f"disk full: {cause}" if _is_disk_full(cause) else f"storage error: {cause}"
        if self._failing != message:
            log.error("queue database write failed, %d operations refused: %s", len(batch), message)
            self._failing = message
        error = Unavailable(message)
        for txn in started:
            txn.closed = True
            _run_hooks(txn.rollback_hooks, "after_rollback")
        finished: list[_Group] = []
        for op in batch:
            # Ops after the failing one were never started; they fail the same way.
            future = op.future
            if future is None or future.running() or future.set_running_or_notify_cancel():
                op.settle(error, finished, failed=True)
        _call_groups(finished)

    def _vacuum(self, state: WriterState) -> None:
        """After a purge: rebuild the file when most of it is free pages, so it shrinks (the
        file has no auto_vacuum: that would write a pointer-map page with most commands).
        Best effort: on a full disk the free pages stay and are reused."""
        conn = state.conn
        try:
            (free,) = conn.execute("PRAGMA freelist_count").fetchone()
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            if free * 2 < pages:
                return
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("queue database %s: could not shrink the file: %s", self._path, exc)

    def _reconnect(self, state: WriterState) -> None:
        with contextlib.suppress(sqlite3.Error):
            state.conn.close()
        state.conn = self._connect_writer()
        self._reopen_writer = False

    def _log_evictions(self, state: WriterState) -> None:
        if not state.evicted_since_log:
            return
        now = time.monotonic()
        if now - self._last_eviction_log >= _EVICTION_LOG_PERIOD:
            log.warning(
                "queue full (queue.max_bytes = %d): dropped the %d oldest items to make room",
                self.config.max_bytes,
                state.evicted_since_log,
            )
            state.evicted_since_log = 0
            self._last_eviction_log = now

    # -- projects ---------------------------------------------------------------------------------
    def project_for(self, project: Project) -> ProjectRow:
        """The project's row, created if new; from memory when nothing changes.

        From another thread this waits for the writer; on the writer thread it must be called
        from inside an op (it then joins that op's transaction).
        """
        state = self._writer
        if state is not None:
            row = state.projects.get(project.key)
            if row is not None:
                return row
        if self._thread is not None and threading.current_thread() is self._thread:
            if self._current_txn is None:
                raise RuntimeError("project_for on the writer thread outside an op: use Txn")
            return self._current_txn.project_for(project)
        return self.submit(lambda txn: txn.project_for(project)).result()

    # -- connections -----------------------------------------------------------------------------
    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (created on first use; closed by close())."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and getattr(local, "generation", None) == self._generation:
            return conn
        if not self._is_open:
            raise StoreError("the queue database is not open")
        try:
            conn = schema.connect(self._path, durability=self.config.durability, role="reader")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read queue database {self._path}: {exc}") from exc
        with self._readers_lock:
            self._readers.append(conn)
        local.conn = conn
        local.generation = self._generation
        return conn
