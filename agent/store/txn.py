"""What an operation can do inside the writer's transaction, and the exact counters it keeps.

Counters (items, bytes, dropped, ...) live in memory so `stats()` and the cap check never scan
the table; they are written to `meta` in the same transaction as the rows they describe, so a
crash can never leave them disagreeing with the data.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pydantic_core

from agent.errors import QueueFull
from agent.store.model import ProjectRow
from agent.store.schema import RESERVED_META_PREFIX
from agent.tracker.model import AppState, OutboundItem, Project

if TYPE_CHECKING:
    from agent.config import QueueConfig

#: Ids per `IN (...)` list: far below SQLite's variable limit, large enough to be cheap.
_CHUNK = 500
#: Longest dead-letter reason kept; reasons come from API responses we do not control.
_MAX_REASON = 2000

ProjectKey = tuple[str, str]

_json_encode = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, check_circular=False, allow_nan=False
).encode


def _encode_payload(payload: Any) -> bytes:
    """Compact UTF-8 JSON of an item's payload.

    pydantic-core's encoder is ~4x faster than `json` and writes the same bytes for the
    JSON-native values a payload holds (floats may differ only in exponent spelling, e.g.
    `1e-7` for `1e-07`). It writes non-finite floats as bare `Infinity`/`NaN`, which is not
    JSON: then, or for anything it cannot encode, `json` decides (and refuses such values).
    """
    try:
        data = pydantic_core.to_json(payload)
    except Exception:
        return _json_encode(payload).encode()
    if b"Infinity" in data or b"NaN" in data:
        return _json_encode(payload).encode()
    return data


class Counters:
    """Exact totals; copied before every op so a rolled-back op can restore them cheaply."""

    __slots__ = (
        "bytes",
        "dead_bytes",
        "dead_dropped",
        "dead_items",
        "dropped",
        "head_created_at",
        "items",
        "rejected",
    )

    def __init__(
        self,
        items: int = 0,
        bytes: int = 0,
        dead_items: int = 0,
        dead_bytes: int = 0,
        dropped: int = 0,
        rejected: int = 0,
        dead_dropped: int = 0,
        head_created_at: float | None = None,
    ) -> None:
        self.items = items
        self.bytes = bytes
        self.dead_items = dead_items
        self.dead_bytes = dead_bytes
        self.dropped = dropped
        self.rejected = rejected
        self.dead_dropped = dead_dropped
        #: created_at of the first queued row by id; None when the outbox is empty.
        self.head_created_at = head_created_at

    def copy(self) -> Counters:
        return Counters(
            self.items,
            self.bytes,
            self.dead_items,
            self.dead_bytes,
            self.dropped,
            self.rejected,
            self.dead_dropped,
            self.head_created_at,
        )


class WriterState:
    """Everything the writer thread owns besides its queue of ops; only it touches this."""

    def __init__(self, conn: sqlite3.Connection, config: QueueConfig, counters: Counters) -> None:
        self.conn = conn
        self.config = config
        self.counters = counters
        #: Committed project rows by key. Replaced, never mutated, so other threads can read
        #: it without a lock.
        self.projects: dict[ProjectKey, ProjectRow] = {}
        #: Rows created or changed by committed-so-far ops of the batch in progress.
        self.staged_projects: dict[ProjectKey, ProjectRow] = {}
        self.evicted_since_log = 0
        self.head_dirty = False
        #: Writes of the batch's finished ops not yet sent to SQLite (see `Txn`).
        self.rows: list[tuple[int, int, float, bytes]] = []
        self.states: dict[str, str] = {}
        self.meta: dict[str, str] = {}
        self.encode = _encode_payload

    def flush(self) -> None:
        """Apply the buffered writes of finished ops, in op order."""
        write_buffers(self.conn, self.rows, self.states, self.meta)
        self.rows = []
        self.states = {}
        self.meta = {}

    def discard(self) -> None:
        self.rows = []
        self.states = {}
        self.meta = {}

    def publish_projects(self) -> None:
        if self.staged_projects:
            self.projects = {**self.projects, **self.staged_projects}
            self.staged_projects = {}


_INSERT_ROW = "INSERT INTO outbox (project_id, size, created_at, payload) VALUES (?, ?, ?, ?)"
_UPSERT_STATE = (
    "INSERT INTO app_states (app, state) VALUES (?, ?) "
    "ON CONFLICT (app) DO UPDATE SET state = excluded.state"
)
UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


def write_buffers(
    conn: sqlite3.Connection,
    rows: list[tuple[int, int, float, bytes]],
    states: dict[str, str],
    meta: dict[str, str],
) -> None:
    if rows:
        conn.executemany(_INSERT_ROW, rows)
    if states:
        conn.executemany(_UPSERT_STATE, states.items())
    if meta:
        conn.executemany(UPSERT_META, meta.items())


def project_key(project: Project) -> ProjectKey:
    return (project.base_url.rstrip("/"), project.project_token)


def _chunks(ids: Iterable[int]) -> Iterator[list[int]]:
    batch: list[int] = []
    for item_id in ids:
        batch.append(int(item_id))
        if len(batch) == _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _marks(n: int) -> str:
    return ",".join("?" * n)


class Txn:
    """Handle given to operations running on the writer thread inside a transaction.

    Valid only while the op runs. New rows, app states and meta are buffered and written
    together at the end of the batch (one `executemany` instead of a savepoint, an insert and
    a release per op: that is most of the writer's cost). The first statement an op runs
    directly (ack, dead-lettering, eviction, `connection`, ...) first writes what earlier ops
    buffered, then opens the op's own SAVEPOINT. Either way the op is all-or-nothing:
    everything it does is undone if it raises, and
    `after_commit` hooks run (on the writer thread, in op order) only once the transaction is
    durable; `after_rollback` hooks run when the op's writes were undone, either because the op
    raised or because the whole transaction failed.
    """

    __slots__ = (
        "_conn",
        "_state",
        "closed",
        "commit_hooks",
        "enqueued_projects",
        "meta",
        "new_projects",
        "rollback_hooks",
        "rows",
        "savepoint",
        "states",
    )

    def __init__(self, state: WriterState) -> None:
        self._state = state
        self._conn = state.conn
        self.commit_hooks: list[Callable[[], object]] = []
        self.rollback_hooks: list[Callable[[], object]] = []
        self.new_projects: dict[ProjectKey, ProjectRow] = {}
        self.enqueued_projects: set[int] = set()
        self.rows: list[tuple[int, int, float, bytes]] = []
        self.states: dict[str, str] = {}
        self.meta: dict[str, str] = {}
        #: Whether this op's SAVEPOINT is open (it ran SQL directly).
        self.savepoint = False
        self.closed = False

    # -- outbox ---------------------------------------------------------------------------------
    def enqueue(self, items: Sequence[OutboundItem], now: float) -> None:
        """Queue one row per item (items are already one per project copy).

        Raises `QueueFull` when the items alone exceed `max_bytes`, or when the cap is reached
        under the `reject` policy; under `drop_oldest` the oldest rows (of any project) go.
        """
        self._check()
        if not items:
            return
        rows = []
        total = 0
        encode = self._state.encode
        for item in items:
            payload = encode(item.payload)
            project_id = self.project_for(item.project).id
            rows.append((project_id, len(payload), now, payload))
            total += len(payload)
        counters = self._state.counters
        cap = self._state.config.max_bytes
        if total > cap:
            counters.rejected += 1
            raise QueueFull(
                f"the command's items ({total} bytes) exceed the whole queue capacity "
                f"(queue.max_bytes = {cap})"
            )
        excess = counters.bytes + total - cap
        if excess > 0:
            if self._state.config.on_full == "reject":
                counters.rejected += 1
                raise QueueFull(
                    f"the queue is full ({counters.bytes} of {cap} bytes) and queue.on_full "
                    "is reject; the command was not queued"
                )
            self._evict_oldest(excess)
        self.rows.extend(rows)
        if counters.items == 0:
            self._state.head_dirty = True
        counters.items += len(rows)
        counters.bytes += total
        self.enqueued_projects.update(row[0] for row in rows)

    def _evict_oldest(self, need: int) -> None:
        counters = self._state.counters
        freed = 0
        evicted = 0
        while freed < need:
            average = max(1, counters.bytes // max(1, counters.items))
            limit = min(1000, (need - freed) // average + 2)
            rows = (
                self._sql()
                .execute("SELECT id, size FROM outbox ORDER BY id LIMIT ?", (limit,))
                .fetchall()
            )
            if not rows:
                break
            last = rows[-1][0]
            for row_id, size in rows:
                freed += size
                evicted += 1
                last = row_id
                if freed >= need:
                    break
            self._sql().execute("DELETE FROM outbox WHERE id <= ?", (last,))
        counters.items -= evicted
        counters.bytes -= freed
        counters.dropped += evicted
        self._state.evicted_since_log += evicted
        self._state.head_dirty = True

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered rows; ids already gone (evicted, purged, acked twice) are fine."""
        self._check()
        counters = self._state.counters
        deleted = 0
        for chunk in _chunks(ids):
            sizes = (
                self._sql()
                .execute(
                    f"DELETE FROM outbox WHERE id IN ({_marks(len(chunk))}) RETURNING size", chunk
                )
                .fetchall()
            )
            deleted += len(sizes)
            counters.bytes -= sum(size for (size,) in sizes)
        counters.items -= deleted
        if deleted:
            self._state.head_dirty = True
        return deleted

    def dead_letter(self, entries: Iterable[tuple[int, str]], now: float) -> int:
        """Move rows the API refused for good to `dead_letters`, keeping its own byte cap."""
        self._check()
        reasons = {int(item_id): str(reason)[:_MAX_REASON] for item_id, reason in entries}
        counters = self._state.counters
        moved = 0
        for chunk in _chunks(reasons):
            rows = (
                self._sql()
                .execute(
                    f"DELETE FROM outbox WHERE id IN ({_marks(len(chunk))}) "
                    "RETURNING id, project_id, size, created_at, payload",
                    chunk,
                )
                .fetchall()
            )
            rows.sort()
            self._sql().executemany(
                "INSERT INTO dead_letters "
                "(project_id, size, created_at, failed_at, reason, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (pid, size, created, now, reasons[rid], body)
                    for rid, pid, size, created, body in rows
                ],
            )
            moved += len(rows)
            size_sum = sum(row[2] for row in rows)
            counters.items -= len(rows)
            counters.bytes -= size_sum
            counters.dead_items += len(rows)
            counters.dead_bytes += size_sum
        if moved:
            self._state.head_dirty = True
            self._trim_dead_letters()
        return moved

    def _trim_dead_letters(self) -> None:
        counters = self._state.counters
        cap = self._state.config.max_dead_letter_bytes
        while counters.dead_bytes > cap:
            need = counters.dead_bytes - cap
            rows = (
                self._sql()
                .execute("SELECT id, size FROM dead_letters ORDER BY id LIMIT ?", (_CHUNK,))
                .fetchall()
            )
            if not rows:
                break
            freed = 0
            count = 0
            last = rows[-1][0]
            for row_id, size in rows:
                freed += size
                count += 1
                last = row_id
                if freed >= need:
                    break
            self._sql().execute("DELETE FROM dead_letters WHERE id <= ?", (last,))
            counters.dead_items -= count
            counters.dead_bytes -= freed
            counters.dead_dropped += count

    def retry_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Put dead letters (all, or the given ids) back at the end of the outbox.

        They get new ids, so an uploader that remembers the last id it read still sees them;
        `created_at` stays, so their age is honest. The cap applies as for new items.
        """
        self._check()
        chunks: list[list[int] | None] = (
            [None] if ids is None else list(_chunks(sorted({int(i) for i in ids})))
        )
        where = "1"
        count = 0
        total = 0
        for chunk in chunks:
            if chunk is not None:
                where = f"id IN ({_marks(len(chunk))})"
            n, size = (
                self._sql()
                .execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM dead_letters WHERE {where}",
                    chunk or (),
                )
                .fetchone()
            )
            count += n
            total += size
        if count == 0:
            return 0
        counters = self._state.counters
        cap = self._state.config.max_bytes
        if total > cap:
            raise QueueFull(
                f"the dead letters to retry ({total} bytes) exceed queue.max_bytes ({cap})"
            )
        excess = counters.bytes + total - cap
        if excess > 0:
            if self._state.config.on_full == "reject":
                raise QueueFull(
                    f"the queue has no room for {total} bytes of dead letters "
                    f"({counters.bytes} of {cap} bytes used) and queue.on_full is reject"
                )
            self._evict_oldest(excess)
        for chunk in chunks:
            if chunk is not None:
                where = f"id IN ({_marks(len(chunk))})"
            params = chunk or ()
            projects = (
                self._sql()
                .execute(f"SELECT DISTINCT project_id FROM dead_letters WHERE {where}", params)
                .fetchall()
            )
            self.enqueued_projects.update(pid for (pid,) in projects)
            self._sql().execute(
                "INSERT INTO outbox (project_id, size, created_at, payload) "
                f"SELECT project_id, size, created_at, payload FROM dead_letters WHERE {where} "
                "ORDER BY id",
                params,
            )
            self._sql().execute(f"DELETE FROM dead_letters WHERE {where}", params)
        if counters.items == 0:
            self._state.head_dirty = True
        counters.items += count
        counters.bytes += total
        counters.dead_items -= count
        counters.dead_bytes -= total
        return count

    def purge(self, dead: bool = False) -> int:
        """Delete every queued item (or every dead letter); returns how many went."""
        self._check()
        counters = self._state.counters
        table = "dead_letters" if dead else "outbox"
        (count,) = self._sql().execute(f"SELECT count(*) FROM {table}").fetchone()
        self._sql().execute(f"DELETE FROM {table}")
        if dead:
            counters.dead_items = counters.dead_bytes = 0
        else:
            counters.items = counters.bytes = 0
            self._state.head_dirty = True
        # Give the freed pages back to the filesystem: a purge is when an operator wants it.
        # Python's sqlite3 steps a row-less statement once, and each step of
        # incremental_vacuum frees one page, hence the loop (inside this transaction).
        (free,) = self._sql().execute("PRAGMA freelist_count").fetchone()
        for _ in range(int(free)):
            self._sql().execute("PRAGMA incremental_vacuum")
        return int(count)

    # -- projects, state, meta -----------------------------------------------------------------
    def project_for(self, project: Project) -> ProjectRow:
        """The row for (base_url, project_token), created if new; a different non-empty
        authorization token replaces the stored one (a corrected key also delivers the
        backlog)."""
        self._check()
        key = project_key(project)
        state = self._state
        row = (
            self.new_projects.get(key) or state.staged_projects.get(key) or state.projects.get(key)
        )
        if row is None:
            found = (
                self._sql()
                .execute(
                    "SELECT id, authorization_token FROM projects "
                    "WHERE base_url = ? AND project_token = ?",
                    key,
                )
                .fetchone()
            )
            if found is None:
                (new_id,) = (
                    self._sql()
                    .execute(
                        "INSERT INTO projects (base_url, project_token, authorization_token) "
                        "VALUES (?, ?, ?) RETURNING id",
                        (*key, project.authorization_token),
                    )
                    .fetchone()
                )
                row = ProjectRow(new_id, key[0], key[1], project.authorization_token)
            else:
                row = ProjectRow(found[0], key[0], key[1], found[1])
            self.new_projects[key] = row
        token = project.authorization_token
        if token and token != row.authorization_token:
            self._sql().execute(
                "UPDATE projects SET authorization_token = ? WHERE id = ?", (token, row.id)
            )
            row = dataclasses.replace(row, authorization_token=token)
            self.new_projects[key] = row
        return row

    def save_app_state(self, app: str, state: AppState) -> None:
        self._check()
        self.states[app] = state.model_dump_json()

    def set_meta(self, key: str, value: str) -> None:
        self._check()
        if key.startswith(RESERVED_META_PREFIX):
            raise ValueError(
                f"meta keys starting with {RESERVED_META_PREFIX!r} belong to the store"
            )
        self.meta[key] = value

    # -- hooks ------------------------------------------------------------------------------------
    def after_commit(self, fn: Callable[[], object]) -> None:
        self._check()
        self.commit_hooks.append(fn)

    def after_rollback(self, fn: Callable[[], object]) -> None:
        self._check()
        self.rollback_hooks.append(fn)

    @property
    def connection(self) -> sqlite3.Connection:
        """The writer connection, for ops that need SQL the Txn does not offer. Statements run
        inside the op's savepoint; do not COMMIT or ROLLBACK on it."""
        self._check()
        return self._sql()

    def _sql(self) -> sqlite3.Connection:
        """The connection, once earlier ops' buffered writes are applied (outside this op's
        savepoint, so undoing this op cannot undo them) and this op's savepoint is open."""
        conn = self._conn
        if not self.savepoint:
            self._state.flush()
            conn.execute("SAVEPOINT op")
            self.savepoint = True
        if self.rows or self.states or self.meta:
            write_buffers(conn, self.rows, self.states, self.meta)
            self.rows = []
            self.states = {}
            self.meta = {}
        return conn

    def _check(self) -> None:
        if self.closed:
            raise RuntimeError("this Txn belongs to an operation that has finished")
