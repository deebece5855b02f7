"""What an operation can do inside the writer's transaction.

Each op gets a `Txn`: it queues, acknowledges, dead-letters and purges items, saves app states
and meta, and keeps the writer's counters (`agent/store/writer_state.py`) exact as it goes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from agent.errors import QueueFull
from agent.store.model import ProjectRow
from agent.store.schema import MAX_KIND_CHARS, RESERVED_META_PREFIX
from agent.store.writer_state import (
    INSERT_ROW,
    ProjectKey,
    Row,
    WriterState,
    write_buffers,
)
from agent.tracker.model import AppState, OutboundItem, Project

#: Ids per `IN (...)` list: far below SQLite's variable limit, large enough to be cheap.
_CHUNK = 500
#: Longest dead-letter reason kept; reasons come from API responses we do not control.
_MAX_REASON = 2000
#: Longest app name and boot id kept on an item (both are far shorter in practice).
_MAX_LABEL = 256


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


def _kind(payload: Any) -> str | None:
    """What an item is, for `queue list`: its event type, or `customer` for a customer
    update; None when the payload says neither."""
    # `type(...) is dict` first: isinstance with an ABC costs more than the rest, per item.
    if type(payload) is not dict and not isinstance(payload, Mapping):
        return None
    if payload.get("name") == "customers":
        return "customer"
    data = payload.get("data")
    if type(data) is not dict and not isinstance(data, Mapping):
        return None
    event_type = data.get("event_type")
    return event_type[:MAX_KIND_CHARS] if isinstance(event_type, str) else None


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
        # A Txn is made per op, i.e. per command: what most ops never use (hooks, app states,
        # meta, new projects) is made when first needed.
        self.commit_hooks: list[Callable[[], object]] | None = None
        self.rollback_hooks: list[Callable[[], object]] | None = None
        self.new_projects: dict[ProjectKey, ProjectRow] | None = None
        self.enqueued_projects: set[int] = set()
        self.rows: list[Row] = []
        self.states: dict[str, str] | None = None
        self.meta: dict[str, str] | None = None
        #: Whether this op's SAVEPOINT is open (it ran SQL directly).
        self.savepoint = False
        self.closed = False

    # -- outbox ---------------------------------------------------------------------------------
    def enqueue(
        self,
        items: Sequence[OutboundItem],
        now: float,
        *,
        app: str | None = None,
        boot_id: str | None = None,
        mono: float | None = None,
        held: bool = False,
    ) -> None:
        """Queue one row per item (items are already one per project copy).

        `app`, `boot_id` and `mono` (monotonic seconds at accept) are recorded with every row;
        the kind (event type, or `customer`) is read from the payload. `held` rows wait in
        the queue until the clock's rule releases them (`Store.read_batch`, `release=`).

        Raises `QueueFull` when the items alone exceed `max_bytes`, or when the cap is reached
        under the `reject` policy; under `drop_oldest` the oldest rows (of any project) go.
        """
        if self.closed:  # `_check()`'s own condition, tested first: enqueue runs per command
            self._check()
        if not items:
            return
        state = self._state
        encoded = []
        total = 0
        encode = state.encode
        for item in items:
            payload = bytearray(encode(item.payload))  # see `Row`
            encoded.append((self.project_for(item.project).id, _kind(item.payload), payload))
            total += len(payload)
        counters = state.counters
        cap = state.config.max_bytes
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
        app = None if app is None else app[:_MAX_LABEL]
        boot_id = None if boot_id is None else boot_id[:_MAX_LABEL]
        flag = int(held)
        for project_id, kind, payload in encoded:
            row_id = state.next_id
            state.next_id += 1
            self.rows.append(
                (row_id, project_id, flag, len(payload), now, mono, boot_id, app, kind, payload)
            )
            if held:
                counters.held += 1
            else:
                counters.add_sendable(project_id, 1, row_id)
            # Held rows wake the uploader too: it probes the API's clock to release them.
            self.enqueued_projects.add(project_id)
        if counters.items == 0:
            state.head_dirty = True
        counters.items += len(encoded)
        counters.bytes += total

    def _delete_outbox(self, where: str, params: Sequence[Any]) -> tuple[int, int]:
        """Delete outbox rows and account for them; returns (items, bytes) removed."""
        rows = (
            self._sql()
            .execute(
                f"DELETE FROM outbox WHERE {where} RETURNING project_id, held, size",
                params,
            )
            .fetchall()
        )
        if rows:
            self._state.deleted.add("outbox")
            self._state.head_dirty = True
        return self._state.counters.removed(rows)

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
            goal = freed
            for row_id, size in rows:
                goal += size
                last = row_id
                if goal >= need:
                    break
            count, size_sum = self._delete_outbox("id <= ?", (last,))
            freed += size_sum
            evicted += count
        counters.dropped += evicted
        self._state.evicted_since_log += evicted

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered rows; ids already gone (evicted, purged, acked twice) are fine."""
        self._check()
        deleted = 0
        for chunk in _chunks(ids):
            deleted += self._delete_outbox(f"id IN ({_marks(len(chunk))})", chunk)[0]
        return deleted

    def dead_letter(self, entries: Iterable[tuple[int, str]], now: float) -> int:
        """Move rows the API refused for good to `dead_letters`, keeping its own byte cap."""
        self._check()
        reasons = {int(item_id): str(reason)[:_MAX_REASON] for item_id, reason in entries}
        counters = self._state.counters
        state = self._state
        moved = 0
        for chunk in _chunks(reasons):
            rows = (
                self._sql()
                .execute(
                    f"DELETE FROM outbox WHERE id IN ({_marks(len(chunk))}) "
                    "RETURNING id, project_id, held, size, created_at, accepted_mono, boot_id, "
                    "app, kind, payload",
                    chunk,
                )
                .fetchall()
            )
            if not rows:
                continue
            rows.sort()
            dead_rows = []
            for rid, pid, _, size, created, mono, boot, app, kind, body in rows:
                dead_rows.append(
                    (
                        state.next_dead_id,
                        pid,
                        size,
                        created,
                        now,
                        reasons[rid],
                        mono,
                        boot,
                        app,
                        kind,
                        body,
                    )
                )
                state.next_dead_id += 1
            self._sql().executemany(
                "INSERT INTO dead_letters (id, project_id, size, created_at, failed_at, reason, "
                "accepted_mono, boot_id, app, kind, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                dead_rows,
            )
            state.deleted.add("outbox")
            count, size_sum = counters.removed((row[1], row[2], row[3]) for row in rows)
            moved += count
            counters.dead_items += count
            counters.dead_bytes += size_sum
        if moved:
            state.head_dirty = True
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
            self._state.deleted.add("dead_letters")
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
        if counters.items == 0:
            self._state.head_dirty = True
        state = self._state
        for chunk in chunks:
            if chunk is not None:
                where = f"id IN ({_marks(len(chunk))})"
            params = chunk or ()
            rows = (
                self._sql()
                .execute(
                    "DELETE FROM dead_letters WHERE "
                    f"{where} RETURNING id, project_id, size, created_at, accepted_mono, "
                    "boot_id, app, kind, payload",
                    params,
                )
                .fetchall()
            )
            rows.sort()
            new_rows: list[Row] = []
            for _, pid, size, created, mono, boot, app, kind, body in rows:
                new_rows.append((state.next_id, pid, 0, size, created, mono, boot, app, kind, body))
                counters.add_sendable(pid, 1, state.next_id)
                self.enqueued_projects.add(pid)
                state.next_id += 1
            self._sql().executemany(INSERT_ROW, new_rows)
            state.deleted.add("dead_letters")
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
        self._state.deleted.add(table)
        if dead:
            counters.dead_items = counters.dead_bytes = 0
        else:
            counters.items = counters.bytes = counters.held = 0
            counters.sendable = {}
            self._state.head_dirty = True
        # Give the freed pages back to the filesystem once committed: a purge is when an
        # operator wants it (and what stays is small). See `Store._vacuum`.
        self._state.vacuum_wanted = True
        return int(count)

    def purge_project(self, project_token: str) -> int:
        """Delete the queued items of every project with this token (any base URL), e.g. of a
        project removed from the config; returns how many went. Dead letters stay."""
        self._check()
        return self._delete_outbox(
            "project_id IN (SELECT id FROM projects WHERE project_token = ?)", (project_token,)
        )[0]

    # -- projects, state, meta -----------------------------------------------------------------
    def project_for(self, project: Project) -> ProjectRow:
        """The row for (base_url, project_token), created if new. The authorization token is
        not stored: the uploader takes credentials from the current config."""
        self._check()
        key = project.key
        state = self._state
        # Committed projects first: most items need no more, and a project's row never
        # changes once it exists.
        new_projects = self.new_projects
        row = state.projects.get(key) or state.staged_projects.get(key)
        if row is None and new_projects is not None:
            row = new_projects.get(key)
        if row is None:
            found = (
                self._sql()
                .execute("SELECT id FROM projects WHERE base_url = ? AND project_token = ?", key)
                .fetchone()
            )
            if found is None:
                (new_id,) = (
                    self._sql()
                    .execute(
                        "INSERT INTO projects (base_url, project_token) VALUES (?, ?) RETURNING id",
                        key,
                    )
                    .fetchone()
                )
                row = ProjectRow(new_id, key[0], key[1])
            else:
                row = ProjectRow(found[0], key[0], key[1])
            if new_projects is None:
                self.new_projects = new_projects = {}
            new_projects[key] = row
        return row

    def save_app_state(self, app: str, state: AppState) -> None:
        self._check()
        if self.states is None:
            self.states = {}
        self.states[app] = state.model_dump_json()

    def set_meta(self, key: str, value: str) -> None:
        self._check()
        if key.startswith(RESERVED_META_PREFIX):
            raise ValueError(
                f"meta keys starting with {RESERVED_META_PREFIX!r} belong to the store"
            )
        if self.meta is None:
            self.meta = {}
        self.meta[key] = value

    # -- hooks ------------------------------------------------------------------------------------
    def after_commit(self, fn: Callable[[], object]) -> None:
        self._check()
        if self.commit_hooks is None:
            self.commit_hooks = []
        self.commit_hooks.append(fn)

    def after_rollback(self, fn: Callable[[], object]) -> None:
        self._check()
        if self.rollback_hooks is None:
            self.rollback_hooks = []
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
            write_buffers(conn, self.rows, self.states or {}, self.meta or {})
            self.rows = []
            self.states = None
            self.meta = None
        return conn

    def _check(self) -> None:
        if self.closed:
            raise RuntimeError("this Txn belongs to an operation that has finished")
