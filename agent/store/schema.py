"""Schema, connection settings and migrations.

The schema version lives in `PRAGMA user_version` and, redundantly, in `meta.schema_version`:
either one being newer than `SCHEMA_VERSION` means a newer agent wrote this file, and we must
not touch it (a downgrade would otherwise corrupt its data silently).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Literal

from agent.store.model import SCHEMA_VERSION, StoreError

log = logging.getLogger("engagement_agent.store")

#: Keys of `meta` that the store owns; `Txn.set_meta` refuses them so counters stay exact.
META_SCHEMA_VERSION = "store.schema_version"
COUNTER_KEYS = {
    "items": "store.items",
    "bytes": "store.bytes",
    "dead_items": "store.dead_letters",
    "dead_bytes": "store.dead_letter_bytes",
    "dropped": "store.dropped",
    "rejected": "store.rejected",
    "dead_dropped": "store.dead_letters_dropped",
}
RESERVED_META_PREFIX = "store."

#: SQLite truncates the WAL back to this size after a checkpoint, so one burst does not leave
#: a large -wal file behind for good.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
BUSY_TIMEOUT_MS = 5000
WAL_AUTOCHECKPOINT_PAGES = 256

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
            # Only effective before the first table exists; lets a purge give space back
            # with `incremental_vacuum` instead of a VACUUM that needs twice the space.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
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
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
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
    # Imported here, not at module level: sqlite-utils pulls in numpy when it is installed
    # (~10 MiB of RSS), and the agent only needs it when a migration runs.
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    tables = set(db.table_names())
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
        log.info("migrated %d queued items from the pre-release layout", db["outbox"].count)
    if "state" in tables:
        conn.execute("INSERT OR REPLACE INTO app_states (app, state) SELECT app, json FROM state")
        conn.execute("DROP TABLE state")


#: MIGRATIONS[v] brings a version-v database to v+1, inside the caller's transaction.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_0_to_1,)
assert len(MIGRATIONS) == SCHEMA_VERSION


def migrate(conn: sqlite3.Connection, path: str) -> bool:
    """Bring the schema to SCHEMA_VERSION in one transaction; True when anything changed.

    One transaction for all steps: a crash or a full disk half-way leaves the old version,
    which the next start migrates again.
    """
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
    return True


def load_counters(conn: sqlite3.Connection) -> dict[str, int]:
    """Counters from meta; anything missing (fresh file, after a migration) is counted once."""
    stored = dict(
        conn.execute(
            f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(COUNTER_KEYS))})",
            tuple(COUNTER_KEYS.values()),
        ).fetchall()
    )
    values: dict[str, int] = {}
    for name, key in COUNTER_KEYS.items():
        if key in stored:
            values[name] = int(stored[key])
    if "items" not in values or "bytes" not in values:
        items, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
        values["items"], values["bytes"] = int(items), int(size)
    if "dead_items" not in values or "dead_bytes" not in values:
        items, size = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters"
        ).fetchone()
        values["dead_items"], values["dead_bytes"] = int(items), int(size)
    for name in ("dropped", "rejected", "dead_dropped"):
        values.setdefault(name, 0)
    return values
