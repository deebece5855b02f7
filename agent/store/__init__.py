"""The durable queue: one SQLite database holding the outbox, dead letters, app states and meta.

    store = Store(config.queue)
    store.open()                       # lock, check/recover, migrate, start the writer
    store.submit(lambda txn: txn.enqueue(items, now)).result()   # committed when it returns
    store.read_batch(project_id, 50)   # any thread; a connection per thread; skips held items
    store.queue_entries()              # what `queue list` shows: token, app, kind, age, size
    store.close()                      # drains submitted ops

Modules: `model` (values and errors), `schema` (DDL, pragmas, migrations), `files` (lock,
start-up check, moving a corrupt file aside), `txn` (what an op may do; exact counters),
`core` (the Store and its writer thread).
"""

from __future__ import annotations

from agent.errors import AgentError
from agent.store.core import MAX_BATCH, Store
from agent.store.model import (
    SCHEMA_VERSION,
    DeadLetter,
    DeadLetterEntry,
    ProjectRow,
    QueuedItem,
    QueueEntry,
    QueueStats,
    StoreError,
    StoreLocked,
)
from agent.store.txn import Txn

__all__ = [
    "MAX_BATCH",
    "SCHEMA_VERSION",
    "AgentError",
    "DeadLetter",
    "DeadLetterEntry",
    "ProjectRow",
    "QueueEntry",
    "QueueStats",
    "QueuedItem",
    "Store",
    "StoreError",
    "StoreLocked",
    "Txn",
]
