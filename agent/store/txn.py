"""What an operation can do inside the writer's transaction, and the exact counters it keeps.

Counters (items, bytes, dropped, ...) live in memory so `stats()` and the cap check never scan
the table. The queue totals are never stored: the store counts them from the tables when it
opens, so no crash can leave them disagreeing with the data, and a command does not dirty a
counter page (docs/architecture.md, "Storage writes").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pydantic_core

from agent.errors import QueueFull
from agent.store.model import ProjectRow
from agent.store.schema import ID_RESERVED_KEYS, MAX_KIND_CHARS, RESERVED_META_PREFIX
from agent.tracker.model import AppState, OutboundItem, Project

if TYPE_CHECKING:
    from agent.config import QueueConfig

#: Ids per `IN (...)` list: far below SQLite's variable limit, large enough to be cheap.
_CHUNK = 500
#: Longest dead-letter reason kept; reasons come from API responses we do not control.
_MAX_REASON = 2000
#: Longest app name and boot id kept on an item (both are far shorter in practice).
_MAX_LABEL = 256
#: Ids reserved ahead whenever the id floor is written: deletes then write the floor once per
#: this many new ids at most, instead of once per upload batch.
ID_BLOCK = 4096

ProjectKey = tuple[str, str]
#: An outbox row as inserted: id, project_id, held, size, created_at, accepted_mono, boot_id,
#: app, kind, payload.
Row = tuple[int, int, int, int, float, float | None, str | None, str | None, str | None, bytes]

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
    """Exact totals; copied before every op so a rolled-back op can restore them cheaply.

    `sendable` maps a project id to (its queued items that are not held, a lower bound of
    their ids): readers skip projects with nothing to send without touching the file, and
    start scanning at the bound instead of at the head of the whole outbox (there is no
    per-project index; see docs/architecture.md). Values are tuples, so a copy of the dict is
    a full copy.
    """

    __slots__ = (
        "bytes",
        "dead_bytes",
        "dead_dropped",
        "dead_items",
        "dead_reserved",
        "dropped",
        "head_created_at",
        "held",
        "items",
        "outbox_reserved",
        "rejected",
        "sendable",
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
        held: int = 0,
        sendable: dict[int, tuple[int, int]] | None = None,
        outbox_reserved: int = 0,
        dead_reserved: int = 0,
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
        self.held = held
        self.sendable: dict[int, tuple[int, int]] = sendable if sendable is not None else {}
        #: The persisted id floors (`schema.ID_RESERVED_KEYS`) as committed.
        self.outbox_reserved = outbox_reserved
        self.dead_reserved = dead_reserved

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
            self.held,
            dict(self.sendable),
            self.outbox_reserved,
            self.dead_reserved,
        )

    def history(self) -> tuple[int, int, int]:
        return (self.dropped, self.rejected, self.dead_dropped)

    def add_sendable(self, project_id: int, count: int, first_id: int) -> None:
        n, bound = self.sendable.get(project_id, (0, first_id))
        self.sendable[project_id] = (n + count, min(bound, first_id))

    def unsendable(self, project_id: int) -> None:
        """One of the project's sendable items was deleted or held."""
        n, bound = self.sendable[project_id]
        if n > 1:
            self.sendable[project_id] = (n - 1, bound)
        else:
            del self.sendable[project_id]

    def removed(self, rows: Iterable[tuple[int, int, int]]) -> tuple[int, int]:
        """Account for deleted outbox rows given as (project_id, held, size); returns
        (items, bytes) removed."""
        count = size_sum = 0
        for project_id, held, size in rows:
            count += 1
            size_sum += size
            if held:
                self.held -= 1
            else:
                self.unsendable(project_id)
        self.items -= count
        self.bytes -= size_sum
        return count, size_sum


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
        #: Next ids to hand out (never reused: see `schema.ID_RESERVED_KEYS`).
        self.next_id = 1
        self.next_dead_id = 1
        #: Whether the batch in progress deleted rows (then the id floor may need saving).
        self.deleted: set[str] = set()
        #: A purge asked for the file to shrink after the commit.
        self.vacuum_wanted = False
        #: Writes of the batch's finished ops not yet sent to SQLite (see `Txn`).
        self.rows: list[Row] = []
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
        self.deleted.clear()
        self.vacuum_wanted = False

    def id_floors(self) -> list[tuple[str, str]]:
        """The id floors to write with the batch in progress (and now counted as written).

        Needed only after deletes, and only once the ids handed out have passed the floor:
        otherwise the table's own maximum is already a floor. Each write reserves `ID_BLOCK`
        ids ahead, so a steady drain writes it once per that many items, not per batch.
        """
        floors = []
        counters = self.counters
        if "outbox" in self.deleted and self.next_id - 1 > counters.outbox_reserved:
            counters.outbox_reserved = self.next_id - 1 + ID_BLOCK
            floors.append((ID_RESERVED_KEYS["outbox"], str(counters.outbox_reserved)))
        if "dead_letters" in self.deleted and self.next_dead_id - 1 > counters.dead_reserved:
            counters.dead_reserved = self.next_dead_id - 1 + ID_BLOCK
            floors.append((ID_RESERVED_KEYS["dead_letters"], str(counters.dead_reserved)))
        self.deleted.clear()
        return floors

    def publish_projects(self) -> None:
        if self.staged_projects:
            self.projects = {**self.projects, **self.staged_projects}
            self.staged_projects = {}


_INSERT_ROW = (
    "INSERT INTO outbox "
    "(id, project_id, held, size, created_at, accepted_mono, boot_id, app, kind, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
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
    rows: list[Row],
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
        self.commit_hooks: list[Callable[[], object]] = []
        self.rollback_hooks: list[Callable[[], object]] = []
        self.new_projects: dict[ProjectKey, ProjectRow] = {}
        self.enqueued_projects: set[int] = set()
        self.rows: list[Row] = []
        self.states: dict[str, str] = {}
        self.meta: dict[str, str] = {}
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
        the queue and are not uploaded until `set_held(ids, False)`.

        Raises `QueueFull` when the items alone exceed `max_bytes`, or when the cap is reached
        under the `reject` policy; under `drop_oldest` the oldest rows (of any project) go.
        """
        self._check()
        if not items:
            return
        encoded = []
        total = 0
        encode = self._state.encode
        for item in items:
            payload = encode(item.payload)
            encoded.append((self.project_for(item.project).id, _kind(item.payload), payload))
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
        app = None if app is None else app[:_MAX_LABEL]
        boot_id = None if boot_id is None else boot_id[:_MAX_LABEL]
        flag = int(held)
        state = self._state
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
            self._sql().executemany(_INSERT_ROW, new_rows)
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

    def set_held(self, ids: Iterable[int], held: bool) -> int:
        """Hold queued items back from upload, or release them; returns how many changed.

        Held items stay queued (and count toward `max_bytes`); the uploader's reads skip them
        (`Store.read_batch`). Ids already gone or already in that state are ignored.
        """
        self._check()
        counters = self._state.counters
        changed = 0
        for chunk in _chunks(ids):
            rows = (
                self._sql()
                .execute(
                    f"UPDATE outbox SET held = ? WHERE id IN ({_marks(len(chunk))}) "
                    "AND held != ? RETURNING id, project_id",
                    (int(held), *chunk, int(held)),
                )
                .fetchall()
            )
            for row_id, project_id in rows:
                if held:
                    counters.held += 1
                    counters.unsendable(project_id)
                else:
                    counters.held -= 1
                    counters.add_sendable(project_id, 1, row_id)
                    self.enqueued_projects.add(project_id)
            changed += len(rows)
        return changed

    def rewrite(self, items: Iterable[tuple[int, Mapping[str, Any], float]]) -> int:
        """Replace queued items' payloads and accept times, given as (id, payload, created_at)
        (a clock correction shifts both); returns how many were found. The byte counter
        follows the new sizes exactly; a payload that grew by a few bytes is not a reason to
        evict anything, so the queue may exceed `max_bytes` by that much until the next
        command makes room."""
        self._check()
        counters = self._state.counters
        encode = self._state.encode
        found = 0
        for item_id, payload, created_at in items:
            data = encode(payload)
            row = (
                self._sql()
                .execute("SELECT size FROM outbox WHERE id = ?", (int(item_id),))
                .fetchone()
            )
            if row is None:
                continue
            self._sql().execute(
                "UPDATE outbox SET payload = ?, size = ?, created_at = ? WHERE id = ?",
                (data, len(data), float(created_at), int(item_id)),
            )
            counters.bytes += len(data) - int(row[0])
            found += 1
        if found:
            self._state.head_dirty = True
        return found

    # -- projects, state, meta -----------------------------------------------------------------
    def project_for(self, project: Project) -> ProjectRow:
        """The row for (base_url, project_token), created if new. The authorization token is
        not stored: the uploader takes credentials from the current config."""
        self._check()
        key = project_key(project)
        state = self._state
        row = (
            self.new_projects.get(key) or state.staged_projects.get(key) or state.projects.get(key)
        )
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
