"""Values the store hands out, and its errors. Frozen so readers on other threads can keep them."""

from __future__ import annotations

from dataclasses import dataclass

#: Bump with a new entry in `schema.MIGRATIONS`; a database newer than this is refused.
SCHEMA_VERSION = 2


class StoreError(Exception):
    """The database cannot be used (newer schema, unreadable path); the message says why."""


class StoreLocked(StoreError):
    """Another agent holds the database."""


@dataclass(frozen=True)
class ProjectRow:
    """Where queued items go. The database names a project by (base_url, project_token) only:
    credentials are never stored (docs/security.md); the uploader looks them up in the current
    config when it sends."""

    id: int
    base_url: str
    project_token: str


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
    #: Queued items held back from upload (waiting for the true time; see `Txn.set_held`).
    held: int = 0


@dataclass(frozen=True)
class QueuedItem:
    id: int
    project_id: int
    payload: bytes  # compact JSON of {"name": ..., "data": {...}}
    created_at: float  # wall time when accepted
    app: str | None = None  # None for items queued before schema version 2
    kind: str | None = None  # the event type, or "customer" for a customer update
    boot_id: str | None = None  # the kernel's boot id when accepted
    accepted_mono: float | None = None  # CLOCK_MONOTONIC seconds when accepted
    held: bool = False  # waiting for the true time: not uploaded


@dataclass(frozen=True)
class DeadLetter:
    id: int
    project_id: int
    payload: bytes
    created_at: float
    failed_at: float
    reason: str
    app: str | None = None
    kind: str | None = None
    boot_id: str | None = None
    accepted_mono: float | None = None


@dataclass(frozen=True)
class _Entry:
    id: int
    project_token: str
    base_url: str
    app: str | None
    kind: str | None
    created_at: float
    size: int


@dataclass(frozen=True)
class QueueEntry(_Entry):
    """A queued item as `queue list` shows it: what it is and where it goes, no payload."""

    held: bool


@dataclass(frozen=True)
class DeadLetterEntry(_Entry):
    """A dead letter as `queue dead-letters` shows it, with the API's reason."""

    failed_at: float
    reason: str
