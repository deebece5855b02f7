"""The durable queue: one SQLite database holding the outbox, dead letters, app states and meta.

INTERFACE STUB — signatures are the contract other modules are written against; the
implementation is being written. Keep every public name and signature below.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.config import QueueConfig
from agent.errors import AgentError
from agent.tracker.model import AppState, OutboundItem, Project

T = TypeVar("T")

SCHEMA_VERSION = 1


class StoreError(Exception):
    """The database cannot be used (newer schema, unreadable path); the message says why."""


class StoreLocked(StoreError):
    """Another agent holds the database."""


@dataclass(frozen=True)
class ProjectRow:
    id: int
    base_url: str
    project_token: str
    authorization_token: str


@dataclass(frozen=True)
class QueueStats:
    items: int
    bytes: int
    max_bytes: int
    dropped: int
    rejected: int
    dead_letters: int
    dead_letter_bytes: int
    oldest_age: float | None  # seconds since the oldest queued item was accepted


@dataclass(frozen=True)
class QueuedItem:
    id: int
    project_id: int
    payload: bytes  # compact JSON of {"name": ..., "data": {...}}
    created_at: float  # wall time when accepted


@dataclass(frozen=True)
class DeadLetter:
    id: int
    project_id: int
    payload: bytes
    created_at: float
    failed_at: float
    reason: str


class Txn:
    """Handle given to operations running on the writer thread inside a transaction."""

    def enqueue(self, items: Sequence[OutboundItem], now: float) -> None: ...
    def save_app_state(self, app: str, state: AppState) -> None: ...
    def ack(self, ids: Iterable[int]) -> int: ...  # returns rows deleted
    def dead_letter(self, entries: Iterable[tuple[int, str]], now: float) -> int: ...
    def retry_dead_letters(self, ids: Iterable[int] | None = None) -> int: ...
    def purge(self, dead: bool = False) -> int: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def after_commit(self, fn: Callable[[], None]) -> None: ...
    def after_rollback(self, fn: Callable[[], None]) -> None: ...
    @property
    def connection(self) -> sqlite3.Connection: ...


class Store:
    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self.recovered: list[dict[str, Any]] = []  # {"file", "at", "reason"}
        self.on_enqueued: Callable[[set[int]], None] | None = None  # project ids, after commit

    def open(self) -> None: ...
    def close(self) -> None: ...
    def submit(self, op: Callable[[Txn], T]) -> concurrent.futures.Future[T]: ...
    def stats(self) -> QueueStats: ...
    def projects(self) -> list[ProjectRow]: ...
    def project_for(self, project: Project) -> ProjectRow: ...
    def load_app_states(self) -> dict[str, AppState]: ...
    def get_meta(self, key: str) -> str | None: ...
    def read_batch(self, project_id: int, limit: int, after_id: int = 0) -> list[QueuedItem]: ...
    def list_items(self, limit: int = 100, after_id: int = 0) -> list[QueuedItem]: ...
    def get_item(self, item_id: int) -> QueuedItem | None: ...
    def dead_letters(self, limit: int = 100, after_id: int = 0) -> list[DeadLetter]: ...
    def writer_healthy(self, max_stall: float) -> bool: ...


__all__ = ["AgentError"]
