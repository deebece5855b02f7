"""The store's file: lock, start-up check and recovery, schema versions, disk full, growth."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import Unavailable
from agent.store import SCHEMA_VERSION, Store, StoreError, StoreLocked, Txn
from agent.tracker.model import AppState, OutboundItem
from tests.fixtures.daemon import wait_for
from tests.unit.test_store_helpers import (
    P1,
    P2,
    assert_counters_match_file,
    config,
    enqueue,
    item,
)


def filled(tmp_path: Path, n: int = 300) -> Path:
    """A closed, healthy database holding `n` items; returns its path."""
    s = Store(config(tmp_path, max_bytes=10**7))
    s.open()
    enqueue(s, *[item(i, size=400) for i in range(n)])
    s.close()
    return Path(s.config.path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- corruption -----------------------------------------------------------------------------------
def corrupt_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"definitely-not-sqlite")


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def truncated(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def short_header(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00\x10")


def trashed_pages(path: Path) -> None:
    # quick_check reports this as rows rather than raising.
    with open(path, "r+b") as f:
        f.seek(4096 * 4)
        f.write(b"\xa5" * 4096 * 4)


@pytest.mark.parametrize(
    "damage",
    [corrupt_header, zero_bytes, garbage, truncated, short_header, trashed_pages],
    ids=lambda f: f.__name__,
)
def test_damaged_database_is_moved_aside_and_a_fresh_one_served(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    path = filled(tmp_path)
    damage(path)
    damaged = path.read_bytes()
    s = Store(config(tmp_path))
    with caplog.at_level(logging.ERROR, logger="engagement_agent.store"):
        s.open()
    try:
        (record,) = s.recovered
        assert set(record) == {"file", "at", "reason"} and record["reason"]
        moved = Path(record["file"])
        assert moved.name.startswith("queue.db.corrupt-") and moved.name.endswith("Z")
        assert moved.read_bytes() == damaged
        assert any(record["file"] in r.getMessage() for r in caplog.records)
        assert s.stats().items == 0
        enqueue(s, item(1))  # and it serves
        assert s.stats().items == 1
    finally:
        s.close()
    again = Store(config(tmp_path))
    again.open()  # the fresh file is healthy: no second recovery
    assert again.recovered == [] and again.stats().items == 1
    again.close()


def crash_copy(tmp_path: Path, store: Store) -> Path:
    """Copy the database and its WAL while the store is open, as a crash would leave them."""
    src = Path(store.config.path)
    dst_dir = tmp_path / "crashed"
    dst_dir.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(str(src) + suffix, dst_dir / ("queue.db" + suffix))
    return dst_dir / "queue.db"


def test_wal_is_moved_aside_with_its_database(tmp_path: Path) -> None:
    s = Store(config(tmp_path))
    s.open()
    enqueue(s, item(1))
    copy = crash_copy(tmp_path, s)
    s.close()
    corrupt_header(copy)
    c = Store(config(tmp_path, path=copy))
    c.open()
    moved = c.recovered[0]["file"]
    c.close()
    assert os.path.exists(moved + "-wal")
    assert not os.path.exists(str(copy) + "-wal.corrupt")


@pytest.mark.parametrize("cut", ["mid_frame", "in_header"])
def test_truncated_wal_keeps_what_was_checkpointed(
    tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A WAL cut short is what a crash leaves: SQLite drops the incomplete tail and the rest is
    a consistent database, so it is served (moving it aside would lose more)."""
    s = Store(config(tmp_path))
    s.open()
    enqueue(s, *[item(n) for n in range(20)])
    checkpoint = sqlite3.connect(str(s.config.path))
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    enqueue(s, *[item(n) for n in range(20, 40)])
    copy = crash_copy(tmp_path, s)
    s.close()
    wal = Path(str(copy) + "-wal")
    os.truncate(wal, wal.stat().st_size - 100 if cut == "mid_frame" else 10)
    c = Store(config(tmp_path, path=copy))
    with caplog.at_level(logging.WARNING, logger="engagement_agent.store"):
        c.open()
    try:
        assert c.recovered == []
        assert "WAL" in caplog.text
        assert c.stats().items == 20  # the second transaction was cut and is gone, whole
        assert_counters_match_file(c)
        enqueue(c, item(99))
    finally:
        c.close()


# -- schema versions ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["user_version", "meta"])
def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path, where: str) -> None:
    path = filled(tmp_path, 10)
    conn = sqlite3.connect(path)
    if where == "user_version":
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'store.schema_version'", (SCHEMA_VERSION + 1,)
        )
        conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    digest = sha(path)
    listing = sorted(os.listdir(path.parent))
    s = Store(config(tmp_path))
    with pytest.raises(StoreError, match="newer") as err:
        s.open()
    assert str(path) in str(err.value)
    assert sha(path) == digest
    assert sorted(os.listdir(path.parent)) == listing
    assert s.recovered == []
    # The lock was released: a (fixed) agent could open it later.
    with pytest.raises(StoreError):
        Store(config(tmp_path)).open()


def make_v0(path: Path, rows: int) -> None:
    """The pre-release (version 0) layout, with a backlog."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE queue (id INTEGER PRIMARY KEY, base_url TEXT, project_token TEXT,
                            authorization_token TEXT, body TEXT, created_at REAL);
        CREATE TABLE state (app TEXT PRIMARY KEY, json TEXT);
        """
    )
    for n in range(rows):
        project = P1 if n % 3 else P2
        conn.execute(
            "INSERT INTO queue VALUES (?, ?, ?, ?, ?, ?)",
            (
                n + 5,
                project.base_url + ("/" if n % 2 else ""),
                project.project_token,
                project.authorization_token,
                f'{{"name":"customers/events","data":{{"n":{n},"t":"é"}}}}',
                100.0 + n,
            ),
        )
    conn.execute(
        "INSERT INTO state VALUES ('kiosk', ?)", (AppState(cookie="c-0").model_dump_json(),)
    )
    conn.commit()
    conn.close()


def test_migration_from_v0_keeps_the_backlog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, max_bytes=10**7)
    make_v0(Path(cfg.path), 250)
    s = Store(cfg)
    with caplog.at_level(logging.INFO, logger="engagement_agent.store"):
        s.open()
    assert "migrated 250 queued items from the pre-release layout" in caplog.messages
    try:
        items = s.list_items(limit=1000)
        assert [i.id for i in items] == list(range(5, 255))
        assert items[0].payload == '{"name":"customers/events","data":{"n":0,"t":"é"}}'.encode()
        assert items[0].created_at == 100.0
        assert {p.project_token for p in s.projects()} == {"token-one", "token-two"}
        assert all(p.base_url == "https://api.example.com" for p in s.projects())
        p2 = s.project_for(P2).id
        assert len(s.read_batch(p2, 1000)) == 84
        stats = s.stats()
        assert stats.items == 250
        assert_counters_match_file(s)
        assert s.load_app_states() == {"kiosk": AppState(cookie="c-0")}
        enqueue(s, item(1))
        assert s.list_items(limit=1000)[-1].id == 255
    finally:
        s.close()
    conn = sqlite3.connect(cfg.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "queue" not in tables and "outbox" in tables
    conn.close()
    s2 = Store(cfg)
    s2.open()
    assert s2.stats().items == 251
    s2.close()


# -- lock -----------------------------------------------------------------------------------------
def test_second_opener_gets_store_locked(tmp_path: Path) -> None:
    first = Store(config(tmp_path))
    first.open()
    second = Store(config(tmp_path))
    with pytest.raises(StoreLocked, match=str(first.config.path)):
        second.open()
    enqueue(first, item(1))  # the first one is unaffected
    first.close()
    second.open()
    assert second.stats().items == 1
    second.close()


def test_unusable_directory_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError):
        Store(config(tmp_path, path=blocker / "queue.db")).open()


# -- disk full ------------------------------------------------------------------------------------
def test_disk_full_fails_the_batch_and_recovers(tmp_path: Path) -> None:
    s = Store(config(tmp_path, max_bytes=10**7), max_page_count=60)
    s.open()
    rolled_back: list[int] = []
    committed: list[int] = []
    try:
        error = None
        for n in range(1000):

            def op(txn: Txn, n: int = n) -> None:
                txn.after_rollback(lambda: rolled_back.append(n))
                txn.enqueue([item(n, size=3000)], 1.0)

            try:
                s.submit(op).result()
                committed.append(n)
            except Unavailable as exc:
                error = exc
                break
        assert error is not None and error.message.startswith("disk full")
        assert rolled_back == [committed[-1] + 1]
        assert_counters_match_file(s)
        stored = [i.payload for i in s.list_items(limit=10**6)]
        assert stored == [_encode(item(n, size=3000)) for n in committed]
        with pytest.raises(Unavailable):
            enqueue(s, item(0, size=3000))
        assert s.writer_healthy(60)
        # Space returns when the uploader deletes delivered rows.
        s.submit(lambda t: t.ack([i.id for i in s.list_items(limit=5)])).result()
        enqueue(s, item(1, size=3000))
        # ... or when the filesystem grows.
        s.submit(lambda t: t.connection.execute("PRAGMA max_page_count = 100000")).result()
        enqueue(s, *[item(n, size=3000) for n in range(30)])
        assert s.stats().items == len(committed) - 5 + 1 + 30
        assert_counters_match_file(s)
    finally:
        s.close()


def _encode(it: OutboundItem) -> bytes:
    return json.dumps(it.payload, separators=(",", ":"), ensure_ascii=False).encode()


def checkpointed_size(store: Store) -> int:
    """The main file's size once the WAL is copied into it (the pages really in use)."""
    conn = sqlite3.connect(str(store.config.path))
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()
    return os.path.getsize(store.config.path)


# -- growth ---------------------------------------------------------------------------------------
def test_file_size_stays_bounded_under_churn(tmp_path: Path) -> None:
    cap = 256 * 1024
    s = Store(config(tmp_path, max_bytes=cap, durability="normal"))
    s.open()
    sizes = []
    try:
        project = s.project_for(P1).id
        for round_ in range(8):
            for n in range(0, int(cap * 1.5) // 500, 20):
                enqueue(s, *[item(round_ * 10000 + n + k, size=500) for k in range(20)])
            assert s.stats().bytes <= cap
            while batch := s.read_batch(project, 200):
                s.submit(lambda t, b=batch: t.ack([i.id for i in b])).result()
            sizes.append(checkpointed_size(s))
        assert s.stats().items == 0
    finally:
        s.close()
    # Freed pages are reused: after the first round the file does not grow.
    assert max(sizes) <= sizes[0] * 1.05, sizes
    # 1 KiB pages hold one 500-byte item each: the price of small WAL frames
    # (docs/architecture.md, "Storage writes").
    assert sizes[0] < 2.5 * cap


def test_purge_gives_space_back(tmp_path: Path) -> None:
    s = Store(config(tmp_path, max_bytes=10**7))
    s.open()
    try:
        for n in range(10):
            enqueue(s, *[item(n * 100 + k, size=1000) for k in range(100)])
        big = checkpointed_size(s)
        s.submit(lambda t: t.purge()).result()
        wait_for(lambda: checkpointed_size(s) < big / 4, 20, "the file to shrink")
    finally:
        s.close()
