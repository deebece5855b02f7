"""Helpers shared by the store tests (plain functions, no tests here)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.config import QueueConfig
from agent.store import Store, Txn
from agent.tracker.model import OutboundItem, Project

P1 = Project("token-one", "auth-one", "https://api.example.com")
P2 = Project("token-two", "auth-two", "https://api.example.com")


def config(tmp_path: Path, **overrides: Any) -> QueueConfig:
    values: dict[str, Any] = {"path": tmp_path / "state" / "queue.db", "max_bytes": 65536}
    values.update(overrides)
    return QueueConfig(**values)


def item(n: int = 0, project: Project = P1, size: int = 100) -> OutboundItem:
    """An item whose stored payload is exactly `size` bytes (size >= 60)."""
    base = {"name": "customers/events", "data": {"n": n, "pad": ""}}
    overhead = len(b'{"name":"customers/events","data":{"n":,"pad":""}}') + len(str(n))
    base["data"]["pad"] = "x" * (size - overhead)  # type: ignore[index]
    return OutboundItem(project, "track_event", base)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.002)


def file_totals(path: Path | str) -> tuple[int, int, int, int]:
    """(items, bytes, dead items, dead bytes) counted in the file by an independent connection."""
    conn = sqlite3.connect(str(path))
    try:
        items, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
        dead, dead_size = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters"
        ).fetchone()
        return int(items), int(size), int(dead), int(dead_size)
    finally:
        conn.close()


def assert_no_secrets(directory: Path, secrets: list[bytes]) -> None:
    """No file in `directory` (database, WAL, shared memory, anything) holds a secret."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files, f"nothing to scan in {directory}"
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{secret!r} found in {path}"


def assert_counters_match_file(store: Store) -> None:
    stats = store.stats()
    assert file_totals(store.config.path) == (
        stats.items,
        stats.bytes,
        stats.dead_letters,
        stats.dead_letter_bytes,
    )


@contextmanager
def writer_blocked(store: Store) -> Iterator[None]:
    """Hold the writer inside an op so that everything submitted meanwhile forms one batch."""
    entered = threading.Event()
    release = threading.Event()

    def gate(txn: Txn) -> None:
        entered.set()
        release.wait(30)

    future = store.submit(gate)
    assert entered.wait(20)
    try:
        yield
    finally:
        release.set()
        future.result(20)


def enqueue(store: Store, *items: OutboundItem, now: float = 1000.0) -> None:
    store.submit(lambda txn: txn.enqueue(list(items), now)).result(20)
