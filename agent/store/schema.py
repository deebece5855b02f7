"""Schema, connection settings and migrations.

The schema version lives in `PRAGMA user_version` and, redundantly, in `meta.schema_version`:
either one being newer than `SCHEMA_VERSION` means a newer agent wrote this file, and we must
not touch it (a downgrade would otherwise corrupt its data silently).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from typing import Any, Literal

from agent.store.model import SCHEMA_VERSION, StoreError

log = logging.getLogger("engagement_agent.store")

#: Keys of `meta` that the store owns; `Txn.set_meta` refuses them so counters stay exact.
META_SCHEMA_VERSION = "store.schema_version"
#: History counters: they count things that left no row behind, so they cannot be derived from
#: the tables. Written lazily (see `Store`), unlike the queue totals, which are counted from
#: the tables at start-up and never stored.
HISTORY_KEYS = {
    "dropped": "store.dropped",
    "rejected": "store.rejected",
    "dead_dropped": "store.dead_letters_dropped",
}
#: Ids are never reused (an uploader or an operator may remember one), but the tables have no
#: AUTOINCREMENT: the writer hands ids out from memory and these keys hold a floor above every
#: id ever handed out, written only when deletes could otherwise let the maximum fall back.
ID_RESERVED_KEYS = {
    "outbox": "store.outbox_id_reserved",
    "dead_letters": "store.dead_letter_id_reserved",
}
#: Totals schema version 1 kept in meta; version 2 counts them at start-up instead.
_V1_TOTAL_KEYS = (
    "store.items",
    "store.bytes",
    "store.dead_letters",
    "store.dead_letter_bytes",
)
RESERVED_META_PREFIX = "store."

#: SQLite truncates the WAL back to this size after a checkpoint, so one burst does not leave
#: a large -wal file behind for good.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
BUSY_TIMEOUT_MS = 5000
WAL_CHECKPOINT_BYTES = 1024 * 1024
#: Pages of new files. Small pages make a commit's WAL frames small: a command dirties one
#: outbox leaf (two or three pages when the leaf fills), and each is a frame of the page size.
#: docs/architecture.md, "Storage writes", has the measurements behind this value.
PAGE_SIZE = 1024
#: An older file is rebuilt with PAGE_SIZE and no auto_vacuum after its migration only when
#: it is at most this large (a VACUUM needs the file's size twice over, and time at start-up)
#: and the disk has `_COMPACT_SPACE_FACTOR` times its size free; otherwise it keeps its layout.
COMPACT_MAX_BYTES = 32 * 1024 * 1024
_COMPACT_SPACE_FACTOR = 3

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    base_url TEXT NOT NULL,
    project_token TEXT NOT NULL,
    authorization_token TEXT NOT NULL DEFAULT '',
    UNIQUE (base_url, project_token)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_project ON outbox (project_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS app_states (
    app TEXT PRIMARY KEY,
    state TEXT NOT NULL
) WITHOUT ROWID;
"""


#: Version 2: no credentials (`projects` is (base_url, project_token) only), items say which app
#: queued them, what they are (`kind`), when by the monotonic clock and in which boot, and
#: whether they are held back; no AUTOINCREMENT and no index, so a command dirties one
#: outbox page (docs/architecture.md, "Storage writes"). `payload` is the last column: reading
#: the others never touches a large payload's overflow pages.
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    base_url TEXT NOT NULL,
    project_token TEXT NOT NULL,
    UNIQUE (base_url, project_token)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    accepted_mono REAL,
    boot_id TEXT,
    app TEXT,
    kind TEXT,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    reason TEXT NOT NULL,
    accepted_mono REAL,
    boot_id TEXT,
    app TEXT,
    kind TEXT,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS app_states (
    app TEXT PRIMARY KEY,
    state TEXT NOT NULL
) WITHOUT ROWID;
"""

#: Longest `kind` kept (an event type; the tracker limits them far below this).
MAX_KIND_CHARS = 256
#: The item's kind from its stored payload, in SQL (for rows queued before version 2).
_KIND_SQL = f"""CASE WHEN json_valid(CAST(payload AS TEXT)) THEN
    CASE WHEN json_extract(CAST(payload AS TEXT), '$.name') = 'customers' THEN 'customer'
         WHEN json_type(CAST(payload AS TEXT), '$.data.event_type') = 'text'
         THEN substr(json_extract(CAST(payload AS TEXT), '$.data.event_type'), 1,
                     {MAX_KIND_CHARS})
    END
END"""

#: JSON keys whose values are credentials: schema version 1 kept them in app states.
SECRET_KEYS = frozenset({"authorization_token", "password"})


def _without_secrets(value: Any) -> tuple[Any, bool]:
    """`value` without any `SECRET_KEYS` entry, at any depth; and whether one was removed."""
    if isinstance(value, dict):
        changed = False
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key in SECRET_KEYS:
                changed = True
                continue
            out[key], sub = _without_secrets(item)
            changed = changed or sub
        return out, changed
    if isinstance(value, list):
        items = [_without_secrets(item) for item in value]
        return [item for item, _ in items], any(sub for _, sub in items)
    return value, False


def _state_without_secrets(text: str) -> str:
    """An app state's JSON without credentials (the same text when it holds none)."""
    try:
        data = json.loads(text)
    except ValueError:
        return text  # invalid: ignored when loaded, and nothing in it can be parsed out
    clean, changed = _without_secrets(data)
    return json.dumps(clean, separators=(",", ":"), ensure_ascii=False) if changed else text


def connect(
    path: str,
    *,
    durability: Literal["full", "normal"],
    role: Literal["writer", "reader"],
    max_page_count: int | None = None,
) -> sqlite3.Connection:
    """A connection with every pragma set explicitly: distribution builds differ in defaults.

    `isolation_level=None` because the writer issues BEGIN/SAVEPOINT/COMMIT itself, and readers
    must not hold an implicit read transaction open (it would stop checkpoints and grow the WAL).
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if role == "writer":
            # Both only take effect before the first table exists (a new file); `compact`
            # converts an older file. Why these values: docs/architecture.md, "Storage writes".
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum = NONE")
            # Zero deleted content only where the page is written anyway: Debian's SQLite
            # defaults to ON, which writes every page a drain frees.
            conn.execute("PRAGMA secure_delete = FAST")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            log.warning("queue database %s: journal_mode is %s, not wal", path, mode)
        sync = "FULL" if durability == "full" else "NORMAL"
        conn.execute(f"PRAGMA synchronous = {sync}")
        if role == "writer":
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            # Checkpoint every ~1 MiB of WAL (default 4 MiB): the data moves into the main file
            # early, so on a nearly full disk the WAL never holds the whole queue — a state
            # from which neither deletes (they need new WAL frames) nor a checkpoint (it needs
            # the main file to grow) could recover.
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            pages = max(1, WAL_CHECKPOINT_BYTES // int(page_size))
            conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
            # Savepoint sub-journals stay in memory: one per op, a page or two each.
            conn.execute("PRAGMA temp_store = MEMORY")
            if max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
        else:
            conn.execute("PRAGMA query_only = 1")
    except BaseException:
        conn.close()
        raise
    return conn


def stored_version(conn: sqlite3.Connection) -> int:
    """The newest version the file claims, from user_version and meta (reads only)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta:
        row = conn.execute(
            "SELECT value FROM meta WHERE key = ?", (META_SCHEMA_VERSION,)
        ).fetchone()
        if row is not None:
            with contextlib.suppress(ValueError):
                version = max(version, int(row[0]))
    return version


def refuse_newer(path: str, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"queue database {path} has schema version {version}, newer than this agent's "
            f"{SCHEMA_VERSION}: it was written by a newer engagement-agent. Upgrade the agent, "
            "or move the file away to start with an empty queue; it was left untouched"
        )


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """Create the v1 schema; carry over the pre-release layout if this file has it.

    Version 0 is either an empty file or the pre-release layout: `queue(id, base_url,
    project_token, authorization_token, body TEXT, created_at)` with the project inline, and
    `state(app, json)`. Queued rows keep their ids so anything that remembered an id still
    finds it, and new ids continue after them.
    """
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    # Statement by statement: executescript() would COMMIT the caller's transaction.
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)
    if "queue" in tables:
        conn.execute(
            "INSERT OR IGNORE INTO projects (base_url, project_token, authorization_token) "
            "SELECT rtrim(base_url, '/'), project_token, max(authorization_token) FROM queue "
            "GROUP BY rtrim(base_url, '/'), project_token"
        )
        conn.execute(
            "INSERT INTO outbox (id, project_id, size, created_at, payload) "
            "SELECT q.id, p.id, length(CAST(q.body AS BLOB)), q.created_at, CAST(q.body AS BLOB) "
            "FROM queue q JOIN projects p "
            "ON p.base_url = rtrim(q.base_url, '/') AND p.project_token = q.project_token "
            "ORDER BY q.id"
        )
        conn.execute("DROP TABLE queue")
        (count,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
        log.info("migrated %d queued items from the pre-release layout", count)
    if "state" in tables:
        conn.execute("INSERT OR REPLACE INTO app_states (app, state) SELECT app, json FROM state")
        conn.execute("DROP TABLE state")


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Drop the stored credentials; give items app/kind/boot/held columns; no AUTOINCREMENT.

    Tables are rebuilt (renamed, recreated, copied, dropped): SQLite cannot drop a column or
    AUTOINCREMENT in place. `migrate` runs this with `secure_delete` on, so the pages the old
    tables free are zeroed rather than left holding the tokens. Ids are kept; the
    AUTOINCREMENT high-water marks become the id floors, so no id is ever handed out twice.
    Items queued before version 2 have no app (shown as `-`); their kind is read from the
    payload.
    """
    reserved = {}
    has_sequence = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'"
    ).fetchone()
    for table in ID_RESERVED_KEYS:
        seq = None
        if has_sequence:
            row = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)
            ).fetchone()
            seq = row[0] if row else None
        (high,) = conn.execute(f"SELECT max(id) FROM {table}").fetchone()
        reserved[table] = max(int(seq or 0), int(high or 0))
    for table in ("projects", "outbox", "dead_letters"):
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
    conn.execute("DROP INDEX IF EXISTS outbox_by_project")
    for statement in SCHEMA_V2.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(
        "INSERT INTO projects (id, base_url, project_token) "
        "SELECT id, base_url, project_token FROM projects_v1 ORDER BY id"
    )
    conn.execute(
        "INSERT INTO outbox (id, project_id, held, size, created_at, kind, payload) "
        f"SELECT id, project_id, 0, size, created_at, {_KIND_SQL}, payload FROM outbox_v1 "
        "ORDER BY id"
    )
    conn.execute(
        "INSERT INTO dead_letters "
        "(id, project_id, size, created_at, failed_at, reason, kind, payload) "
        f"SELECT id, project_id, size, created_at, failed_at, reason, {_KIND_SQL}, payload "
        "FROM dead_letters_v1 ORDER BY id"
    )
    for table in ("projects", "outbox", "dead_letters"):
        conn.execute(f"DROP TABLE {table}_v1")
    for app, text in conn.execute("SELECT app, state FROM app_states").fetchall():
        clean = _state_without_secrets(text)
        if clean != text:
            conn.execute("UPDATE app_states SET state = ? WHERE app = ?", (clean, app))
    conn.executemany("DELETE FROM meta WHERE key = ?", [(key,) for key in _V1_TOTAL_KEYS])
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [(ID_RESERVED_KEYS[table], str(value)) for table, value in reserved.items()],
    )


#: MIGRATIONS[v] brings a version-v database to v+1, inside the caller's transaction.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_0_to_1, _migrate_1_to_2)
assert len(MIGRATIONS) == SCHEMA_VERSION


def migrate(conn: sqlite3.Connection, path: str) -> bool:
    """Bring the schema to SCHEMA_VERSION in one transaction; True when anything changed.

    One transaction for all steps: a crash or a full disk half-way leaves the old version,
    which the next start migrates again. `secure_delete` is on while it runs, and the WAL is
    checkpointed and truncated afterwards, so what a migration removes (credentials) is
    overwritten in the file rather than left in free pages or old WAL frames.
    """
    conn.execute("PRAGMA secure_delete = ON")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = stored_version(conn)
            refuse_newer(path, version)
            if version == SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                return False
            for step in range(version, SCHEMA_VERSION):
                log.info("queue database %s: migrating schema %d -> %d", path, step, step + 1)
                MIGRATIONS[step](conn)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (META_SCHEMA_VERSION, str(SCHEMA_VERSION)),
            )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Into the main file, and the WAL (which may hold pre-migration frames) emptied.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.execute("PRAGMA secure_delete = FAST")
    return True


def compact(conn: sqlite3.Connection, path: str) -> bool:
    """Rebuild a file written with another page size or with auto_vacuum (schema version 1
    used 4096 and INCREMENTAL) into the current layout; True when it did.

    Best effort, once after a migration: VACUUM needs about twice the file's size and runs
    before the agent is ready, so a large file or a nearly full disk keeps the old layout
    (which works; it only writes more per command), and a failure is logged, not fatal.
    """
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    (auto_vacuum,) = conn.execute("PRAGMA auto_vacuum").fetchone()
    if int(page_size) == PAGE_SIZE and int(auto_vacuum) == 0:
        return False
    try:
        size = os.path.getsize(path)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError as exc:
        log.warning("queue database %s: keeps its page layout (%s)", path, exc)
        return False
    if size > COMPACT_MAX_BYTES or free < _COMPACT_SPACE_FACTOR * size:
        log.info(
            "queue database %s keeps its %d-byte pages: %d bytes is too large to rebuild at "
            "start-up or the disk has only %d bytes free",
            path,
            page_size,
            size,
            free,
        )
        return False
    try:
        conn.execute("PRAGMA journal_mode = DELETE")  # the page size cannot change in WAL mode
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("VACUUM")
        log.info("queue database %s rebuilt with %d-byte pages", path, PAGE_SIZE)
        return True
    except sqlite3.Error as exc:
        log.warning("queue database %s keeps its page layout: %s", path, exc)
        return False
    finally:
        conn.execute("PRAGMA journal_mode = WAL")


class Loaded:
    """What the writer needs from the file at start-up, counted from the tables themselves
    (so nothing a crash interrupted can make it wrong), plus the lazily saved history."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        items, size, held = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0), count(CASE WHEN held != 0 THEN 1 END) "
            "FROM outbox"
        ).fetchone()
        self.items, self.bytes, self.held = int(items), int(size), int(held)
        #: project_id -> (items not held, smallest id among them)
        self.sendable: dict[int, tuple[int, int]] = {}
        # Conditional aggregates, not GROUP BY: a GROUP BY sorts the whole outbox (~40 MiB of
        # RSS for 1,000,000 items); this is one scan per 100 projects with constant memory.
        project_ids = [int(pid) for (pid,) in conn.execute("SELECT id FROM projects")]
        for start in range(0, len(project_ids) if self.items - self.held else 0, 100):
            chunk = project_ids[start : start + 100]
            columns = ", ".join(
                f"count(CASE WHEN project_id = {pid} AND held = 0 THEN 1 END), "
                f"min(CASE WHEN project_id = {pid} AND held = 0 THEN id END)"
                for pid in chunk
            )
            row = conn.execute(f"SELECT {columns} FROM outbox").fetchone()
            for n, pid in enumerate(chunk):
                count, first = row[2 * n], row[2 * n + 1]
                if count:
                    self.sendable[pid] = (int(count), int(first))
        dead_items, dead_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters"
        ).fetchone()
        self.dead_items, self.dead_bytes = int(dead_items), int(dead_bytes)
        head = conn.execute("SELECT created_at FROM outbox ORDER BY id LIMIT 1").fetchone()
        self.head_created_at: float | None = head[0] if head else None
        stored = dict(
            conn.execute(
                "SELECT key, value FROM meta WHERE key IN "
                f"({','.join('?' * (len(HISTORY_KEYS) + len(ID_RESERVED_KEYS)))})",
                (*HISTORY_KEYS.values(), *ID_RESERVED_KEYS.values()),
            ).fetchall()
        )
        self.history = {name: _int(stored.get(key)) for name, key in HISTORY_KEYS.items()}
        #: table -> (highest id in it, persisted floor)
        self.ids: dict[str, tuple[int, int]] = {}
        for table, key in ID_RESERVED_KEYS.items():
            (high,) = conn.execute(f"SELECT max(id) FROM {table}").fetchone()
            self.ids[table] = (int(high or 0), _int(stored.get(key)))


def _int(value: object) -> int:
    """A stored integer; anything else (a hand-edited or damaged value) counts as 0."""
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0
