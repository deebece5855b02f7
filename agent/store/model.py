"""Values the store hands out, and its errors. Frozen so readers on other threads can keep them."""

from __future__ import annotations

from dataclasses import dataclass

#: Bump with a new entry in `schema.MIGRATIONS`; a database newer than this is refused.
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
    #: Dead letters removed to keep `queue.max_dead_letter_bytes` (oldest first).
    dead_letters_dropped: int = 0


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
