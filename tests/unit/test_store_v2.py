"""Schema version 2: no credentials at rest, what items record, listing, purge by project,
held items, ids that never go back, and totals counted from the tables at start-up."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

from agent.clock import Releasable
from agent.store import SCHEMA_VERSION, QueueEntry, Store
from agent.store.schema import PAGE_SIZE
from agent.tracker.model import OutboundItem, Project
from tests.unit.test_store_helpers import (
    P1,
    P2,
    assert_counters_match_file,
    assert_no_secrets,
    config,
    enqueue,
    file_totals,
    item,
)

SECRETS = [b"v1-secret-one", b"v1-secret-two", b"switch-secret", b"map-secret", b"gone-secret"]

#: The version 1 layout and content, written the way a version 1 agent left it when killed:
#: in WAL mode, the last transactions still in the -wal file, a deleted project's token in
#: the free space of a page.
_V1_WRITER = textwrap.dedent(
    """
    import json, os, sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript('''
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE projects (id INTEGER PRIMARY KEY, base_url TEXT NOT NULL,
        project_token TEXT NOT NULL, authorization_token TEXT NOT NULL DEFAULT '',
        UNIQUE (base_url, project_token));
    CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL,
        size INTEGER NOT NULL, created_at REAL NOT NULL, payload BLOB NOT NULL);
    CREATE INDEX outbox_by_project ON outbox (project_id);
    CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id INTEGER NOT NULL, size INTEGER NOT NULL, created_at REAL NOT NULL,
        failed_at REAL NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL);
    CREATE TABLE app_states (app TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
    PRAGMA user_version = 1;
    ''')
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    state = json.loads(sys.argv[2])
    conn.execute("BEGIN")
    conn.execute("INSERT INTO projects VALUES (1, 'https://api.example.com', 'token-one',"
                 " 'v1-secret-one')")
    conn.execute("INSERT INTO projects VALUES (2, 'https://api.example.com', 'token-two',"
                 " 'v1-secret-two')")
    conn.execute("INSERT INTO projects VALUES (3, 'https://x.example.com', 'gone',"
                 " 'gone-secret')")
    conn.execute("COMMIT")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM projects WHERE id = 3")
    payloads = [
        {"name": "customers/events", "data": {"event_type": "purchase", "n": 0}},
        {"name": "customers", "data": {"properties": {"n": 1}}},
        {"name": "customers/events", "data": {"event_type": "session_start", "n": 2}},
    ]
    for n in range(40):
        body = json.dumps(payloads[n % 3]).encode() if n != 7 else b"not json"
        conn.execute("INSERT INTO outbox (project_id, size, created_at, payload)"
                     " VALUES (?, ?, ?, ?)", (1 + n % 2, len(body), 100.0 + n, body))
    conn.execute("DELETE FROM outbox WHERE id > 35")  # the AUTOINCREMENT mark stays at 40
    conn.execute("DELETE FROM outbox WHERE id <= 3")
    body = json.dumps(payloads[0]).encode()
    conn.execute("INSERT INTO dead_letters (project_id, size, created_at, failed_at, reason,"
                 " payload) VALUES (2, ?, 50.0, 60.0, 'refused', ?)", (len(body), body))
    conn.execute("INSERT INTO app_states VALUES ('kiosk', ?)", (json.dumps(state),))
    for key, value in [("store.schema_version", "1"), ("store.items", "999"),
                       ("store.bytes", "1"), ("store.dropped", "7"), ("store.rejected", "2"),
                       ("device_uuid", "u-1")]:
        conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
    conn.execute("COMMIT")
    os._exit(0)  # killed: no checkpoint, the last transaction stays in the WAL
    """
)

_SWITCHED_STATE = {
    "cookie": "c-1",
    "ids": {"registered": "r"},
    "project_switch": {
        "project_token": "token-two",
        "authorization_token": "switch-secret",
        "base_url": "https://api.example.com",
        "mapping": {
            "payment": [
                {
                    "project_token": "token-one",
                    "authorization_token": "map-secret",
                    "base_url": "https://api.example.com",
                }
            ]
        },
        "config_fingerprint": "f",
    },
}


def make_v1(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", _V1_WRITER, str(path), json.dumps(_SWITCHED_STATE)], check=True
    )


def contents(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_migration_from_v1_removes_every_credential_and_keeps_everything_else(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, max_bytes=10**7)
    path = Path(cfg.path)
    make_v1(path)
    before = contents(path.parent)
    assert all(secret in before for secret in SECRETS), "the v1 file must hold the secrets"
    assert Path(f"{path}-wal").exists()

    s = Store(cfg)
    s.open()
    try:
        assert_no_secrets(path.parent, SECRETS)  # while open: the file, the WAL, the -shm
        items = s.list_items(limit=100)
        assert [i.id for i in items] == list(range(4, 36))
        assert [(i.app, i.kind) for i in items[:5]] == [
            (None, "purchase"),  # id 4: n = 3
            (None, "customer"),
            (None, "session_start"),
            (None, "purchase"),
            (None, None),  # id 8: the payload that is not JSON
        ]
        assert all(i.boot_id is None and i.accepted_mono is None and not i.held for i in items)
        assert items[0].created_at == 103.0
        (dead,) = s.dead_letter_entries()
        assert (dead.project_token, dead.kind, dead.reason) == ("token-two", "purchase", "refused")
        assert [p.project_token for p in s.projects()] == ["token-one", "token-two"]
        state = s.load_app_states()["kiosk"]
        assert state.cookie == "c-1" and state.ids == {"registered": "r"}
        switch = state.project_switch
        assert switch is not None and switch.project_token == "token-two"
        assert switch.mapping["payment"][0].project_token == "token-one"
        assert (
            "authorization_token"
            not in s.reader().execute("SELECT state FROM app_states").fetchone()[0]
        )
        stats = s.stats()
        assert (stats.items, stats.dead_letters, stats.dropped, stats.rejected) == (32, 1, 7, 2)
        assert_counters_match_file(s)
        assert s.get_meta("device_uuid") == "u-1"
        enqueue(s, item(1))
        assert s.list_items(limit=100)[-1].id > 40, "an id the v1 agent handed out came back"
    finally:
        s.close()
    assert_no_secrets(path.parent, SECRETS)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # Rebuilt into the flash-friendly layout (docs/architecture.md, "Storage writes").
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "outbox_by_project" not in names
        assert not {"projects_v1", "outbox_v1", "dead_letters_v1"} & names
        sql = "".join(row[0] or "" for row in conn.execute("SELECT sql FROM sqlite_master"))
        assert "AUTOINCREMENT" not in sql and "authorization_token" not in sql
    finally:
        conn.close()


def track(store: Store, *items: OutboundItem, app: str = "kiosk", held: bool = False) -> None:
    store.submit(
        lambda t: t.enqueue(list(items), 1000.0, app=app, boot_id="boot-1", mono=5.5, held=held)
    ).result()


def test_items_record_app_kind_boot_and_monotonic_time(store: Store) -> None:
    event = {"name": "customers/events", "data": {"event_type": "purchase"}}
    customer = {"name": "customers", "data": {"properties": {}}}
    track(store, OutboundItem(P1, "payment", event), OutboundItem(P2, "identify", customer))
    first, second = store.list_items()
    assert (first.app, first.kind, first.boot_id, first.accepted_mono) == (
        "kiosk",
        "purchase",
        "boot-1",
        5.5,
    )
    assert (second.kind, second.held) == ("customer", False)


def test_queue_entries_name_the_project_by_token(store: Store) -> None:
    track(store, item(0, P1), item(1, P2, size=200), app="kiosk")
    enqueue(store, item(2, P1))  # no app recorded
    entries = store.queue_entries()
    assert entries == [
        QueueEntry(entries[0].id, "token-one", P1.base_url, "kiosk", None, 1000.0, 100, False),
        QueueEntry(entries[1].id, "token-two", P2.base_url, "kiosk", None, 1000.0, 200, False),
        QueueEntry(entries[2].id, "token-one", P1.base_url, None, None, 1000.0, 100, False),
    ]
    assert store.queue_entries(limit=1, after_id=entries[0].id) == entries[1:2]
    store.submit(lambda t: t.dead_letter([(entries[1].id, "bad event")], 2000.0)).result()
    (dead,) = store.dead_letter_entries()
    assert (dead.project_token, dead.app, dead.size, dead.failed_at, dead.reason) == (
        "token-two",
        "kiosk",
        200,
        2000.0,
        "bad event",
    )


def test_purge_project_removes_only_that_tokens_items(store: Store) -> None:
    other_url = Project("token-one", "k", "https://eu.example.com")
    enqueue(store, item(0, P1), item(1, P2, size=300), item(2, other_url), item(3, P2))
    ids = [i.id for i in store.list_items()]
    store.submit(lambda t: t.dead_letter([(ids[3], "x")], 1.0)).result()
    assert store.submit(lambda t: t.purge_project("token-one")).result() == 2
    assert [e.project_token for e in store.queue_entries()] == ["token-two"]
    stats = store.stats()
    assert (stats.items, stats.bytes, stats.dead_letters) == (1, 300, 1)
    assert_counters_match_file(store)
    assert store.submit(lambda t: t.purge_project("unknown")).result() == 0
    p1 = store.project_for(P1).id
    assert store.read_batch(p1, 10) == []


def test_held_items_wait_and_are_counted(store: Store) -> None:
    track(store, item(0), item(1), held=True)
    track(store, item(2))
    p1 = store.project_for(P1).id
    held_ids = [i.id for i in store.list_items() if i.held]
    assert len(held_ids) == 2
    assert [i.id for i in store.read_batch(p1, 10)] == [store.list_items()[2].id]
    assert (store.stats().items, store.stats().held) == (3, 2)
    store.submit(lambda t: t.ack(held_ids[:1])).result()
    assert (store.stats().items, store.stats().held) == (2, 1)
    assert_counters_match_file(store)


def test_read_batch_skips_a_stuck_projects_backlog(store: Store) -> None:
    enqueue(store, *[item(n, P1) for n in range(200)])
    enqueue(store, item(0, P2))
    p1, p2 = store.project_for(P1).id, store.project_for(P2).id
    (only,) = store.read_batch(p2, 50)
    assert only.project_id == p2
    store.submit(lambda t: t.ack([only.id])).result()
    assert store.read_batch(p2, 50) == []
    assert len(store.read_batch(p1, 500)) == 200


def test_ids_never_go_back_after_a_drain_to_empty_and_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    s = Store(cfg)
    s.open()
    enqueue(s, *[item(n) for n in range(5)])
    last = s.list_items()[-1].id
    s.submit(lambda t: t.ack([i.id for i in s.list_items()])).result()
    s.submit(lambda t: t.dead_letter([], 1.0)).result()
    s.close()
    for _ in range(2):
        s = Store(cfg)
        s.open()
        enqueue(s, item(9))
        (only,) = s.list_items()
        assert only.id > last
        last = only.id
        s.submit(lambda t: t.purge()).result()
        s.close()


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from agent.store import Store
    from tests.unit.test_store_helpers import config, item, enqueue
    s = Store(config(Path(sys.argv[1]), max_bytes=65536, on_full="drop_oldest"))
    s.open()
    for n in range(150):
        enqueue(s, item(n, size=1000))
        if n % 7 == 6:
            ids = [i.id for i in s.list_items(limit=3)]
            s.submit(lambda t: t.ack(ids[:2])).result()
            s.submit(lambda t: t.dead_letter([(ids[2], "r")], 1.0)).result()
    last = s.list_items(limit=1000)[-1].id
    s.submit(lambda t: t.ack([i.id for i in s.list_items(limit=1000)])).result()
    print(last, s.stats().dropped, s.stats().dead_letters, flush=True)
    sys.stdin.readline()
    """
)


def test_totals_after_kill_9_are_counted_from_the_tables(tmp_path: Path) -> None:
    """No totals are stored: after a kill -9 they are exactly what the tables hold, and the
    next id is above every id handed out before the kill."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    last, dropped, dead = (int(v) for v in proc.stdout.readline().split())
    assert dropped > 0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    cfg = config(tmp_path, max_bytes=65536)
    s = Store(cfg)
    s.open()
    try:
        stats = s.stats()
        assert (stats.items, stats.bytes, stats.dead_letters, stats.dead_letter_bytes) == (
            file_totals(cfg.path)
        )
        assert (stats.items, stats.dead_letters) == (0, dead)
        enqueue(s, item(0))
        assert s.list_items()[0].id > last
    finally:
        s.close()


def test_held_and_sendable_are_counted_again_at_open(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    s = Store(cfg)
    s.open()
    track(s, item(0, P1), item(1, P2), held=True)
    track(s, item(2, P2))
    enqueue(s, *[item(n, P1) for n in range(3, 6)])
    expected = (replace(s.stats(), oldest_age=None), [(i.id, i.held) for i in s.list_items()])
    s.close()
    s = Store(cfg)
    s.open()
    try:
        stats = replace(s.stats(), oldest_age=None)
        assert (stats, [(i.id, i.held) for i in s.list_items()]) == expected
        assert s.stats().held == 2
        p1, p2 = s.project_for(P1).id, s.project_for(P2).id
        assert len(s.read_batch(p1, 10)) == 3 and len(s.read_batch(p2, 10)) == 1
        held = [i.id for i in s.list_items() if i.held]
        boot_1 = Releasable(False, ("boot-1",), "boot-2", -1.0, earlier_boots=False)
        assert len(s.read_batch(p1, 10, release=boot_1)) == 4
        assert len(s.read_batch(p2, 10, release=boot_1)) == 2
        assert s.read_batch(p1, 10, release=boot_1)[0].id == held[0]
    finally:
        s.close()


def meta_rows(store: Store) -> list[tuple[str, str]]:
    return store.reader().execute("SELECT key, value FROM meta ORDER BY key").fetchall()


def test_commands_and_drains_leave_meta_alone(store: Store) -> None:
    """Flash: a command dirties no counter page, and a drain writes the id floor once per
    block of ids, not once per upload batch (docs/architecture.md, "Storage writes")."""
    enqueue(store, item(0))
    (first,) = store.list_items()
    store.submit(lambda t: t.ack([first.id])).result()
    after_first_drain = meta_rows(store)
    assert int(dict(after_first_drain)["store.outbox_id_reserved"]) > first.id + 1000
    for n in range(1, 30):
        enqueue(store, item(n))
        assert meta_rows(store) == after_first_drain
        store.submit(lambda t: t.ack([i.id for i in store.list_items()])).result()
        assert meta_rows(store) == after_first_drain
