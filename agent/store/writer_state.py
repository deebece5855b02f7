"""What the writer thread owns: the exact counters, the committed project rows, and the
writes of finished ops buffered until the batch's end.

Counters (items, bytes, dropped, ...) live in memory so `stats()` and the cap check never scan
the table. The queue totals are never stored: the store counts them from the tables when it
opens, so no crash can leave them disagreeing with the data, and a command does not dirty a
counter page (docs/architecture.md, "Storage writes").
"""

from __future__ import annotations

import inspect
import json
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from agent.store.model import ProjectRow
from agent.store.schema import ID_RESERVED_KEYS

if TYPE_CHECKING:
    from agent.config import QueueConfig

#: Ids reserved ahead whenever the id floor is written: deletes then write the floor once per
#: this many new ids at most, instead of once per upload batch.
ID_BLOCK = 4096

ProjectKey = tuple[str, str]
#: An outbox row as inserted: id, project_id, held, size, created_at, accepted_mono, boot_id,
#: app, kind, payload. A new item's payload is a `bytearray`: sqlite3 binds a bytearray
#: directly, while `bytes` first goes through its adapter lookup (two failed attribute lookups,
#: one of which formats an exception), a few percent of a command's CPU.
Row = tuple[
    int, int, int, int, float, float | None, str | None, str | None, str | None, bytes | bytearray
]

_json_encode = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, check_circular=False, allow_nan=False
).encode


def _encode_payload(payload: Any) -> bytes:
    """Compact UTF-8 JSON of an item's payload.

    orjson writes the JSON-native values a payload holds in a third of pydantic-core's
    instructions and a sixth of `json`'s (docs/benchmarks.md, "Instructions per command"),
    with the same bytes: no spaces, UTF-8 unescaped, shortest float spelling (`1e-7`).
    Payloads hold no non-finite floats: commands with one are refused (docs/protocol.md) and
    the tracker computes only finite times, so orjson's spelling of them (`null`) never
    applies. What orjson cannot encode (an integer beyond 64 bits, a key that is not a
    string) goes to `json`, which writes what is JSON and refuses the rest.
    """
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        return _json_encode(payload).encode()


class Counters:
    """Exact totals; a snapshot is taken before every op so a refused op can restore them.

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

    def snapshot(self) -> tuple[Any, ...]:
        """The values in the constructor's order, for `restore`. Taken before every op (a
        refused op puts them back), so a tuple rather than a new `Counters`: a fifth of the
        cost."""
        return (
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

    def restore(self, values: tuple[Any, ...]) -> None:
        """Put back a `snapshot` (only a refused op does: no need to be fast)."""
        for name, value in zip(_COUNTER_FIELDS, values, strict=True):
            setattr(self, name, value)

    def copy(self) -> Counters:
        return Counters(*self.snapshot())

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


#: The counters in the constructor's order, which `Counters.snapshot` follows.
_COUNTER_FIELDS = tuple(inspect.signature(Counters.__init__).parameters)[1:]


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


INSERT_ROW = (
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
        conn.executemany(INSERT_ROW, rows)
    if states:
        conn.executemany(_UPSERT_STATE, states.items())
    if meta:
        conn.executemany(UPSERT_META, meta.items())
