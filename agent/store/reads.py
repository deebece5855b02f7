"""What the Store answers without the writer: stats, listings, and the uploader's batches.

Every read runs on the calling thread's own read-only connection (`Store.reader()`, in
`agent/store/core.py`) or from the counters the writer publishes with each commit, so none of
them waits for a transaction; they see what was committed.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

from agent.clock import Releasable
from agent.config import QueueConfig
from agent.store.model import (
    DeadLetter,
    DeadLetterEntry,
    ProjectRow,
    QueuedItem,
    QueueEntry,
    QueueStats,
)
from agent.store.writer_state import Counters
from agent.tracker.model import AppState

log = logging.getLogger("engagement_agent.store")

_ITEM_COLUMNS = "id, project_id, payload, created_at, app, kind, boot_id, accepted_mono, held"
_DEAD_COLUMNS = (
    "id, project_id, payload, created_at, failed_at, reason, app, kind, boot_id, accepted_mono"
)


class StoreReads:
    """The reading half of `Store` (which provides the connection and the counters)."""

    config: QueueConfig
    #: The counters as of the last commit (replaced by the writer, never mutated in place).
    _published: Counters

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection; `Store` provides it."""
        raise NotImplementedError

    def stats(self) -> QueueStats:
        """From memory only (safe on the event loop); reflects committed transactions."""
        c = self._published
        oldest = None
        if c.items and c.head_created_at is not None:
            oldest = max(0.0, time.time() - c.head_created_at)
        return QueueStats(
            items=c.items,
            bytes=c.bytes,
            max_bytes=self.config.max_bytes,
            dropped=c.dropped,
            rejected=c.rejected,
            dead_letters=c.dead_items,
            dead_letter_bytes=c.dead_bytes,
            oldest_age=oldest,
            dead_letters_dropped=c.dead_dropped,
            held=c.held,
        )

    def projects(self) -> list[ProjectRow]:
        rows = (
            self.reader()
            .execute("SELECT id, base_url, project_token FROM projects ORDER BY id")
            .fetchall()
        )
        return [ProjectRow(*row) for row in rows]

    def load_app_states(self) -> dict[str, AppState]:
        """Every app's state; one that no longer parses is logged and skipped, not fatal."""
        states: dict[str, AppState] = {}
        for app, text in self.reader().execute("SELECT app, state FROM app_states").fetchall():
            try:
                states[app] = AppState.model_validate_json(text)
            except ValueError as exc:
                log.error("stored state of app %s is invalid and was ignored: %s", app, exc)
        return states

    def get_meta(self, key: str) -> str | None:
        row = self.reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def read_batch(
        self,
        project_id: int,
        limit: int,
        after_id: int = 0,
        release: Releasable | None = None,
    ) -> list[QueuedItem]:
        """Oldest first: the project's next `limit` items with id > after_id that are not held,
        or held but released by `release` (the clock's rule, `agent.clock.Releasable`: the
        release rewrites no row, so the stored bytes and the byte accounting never change).

        The outbox has no per-project index (it would cost a page written per command): the
        committed counters say whether the project has anything to send at all, and from which
        id on, so a project with nothing sendable costs no read and a scan starts near its
        first item rather than at the head of the whole queue. Released held items have no
        such bound: while some are queued, the scan starts at `after_id`.
        """
        if release is not None and self._published.held and not release.only_unheld:
            where, params = _released_sql(release)
            rows = (
                self.reader()
                .execute(
                    f"SELECT {_ITEM_COLUMNS} FROM outbox WHERE id > ? AND project_id = ? "
                    f"AND (held = 0 OR {where}) ORDER BY id LIMIT ?",
                    (after_id, project_id, *params, limit),
                )
                .fetchall()
            )
            return [_item(row) for row in rows]
        entry = self._published.sendable.get(project_id)
        if entry is None:
            return []
        start = max(after_id, entry[1] - 1)
        rows = (
            self.reader()
            .execute(
                f"SELECT {_ITEM_COLUMNS} FROM outbox "
                "WHERE id > ? AND project_id = ? AND held = 0 ORDER BY id LIMIT ?",
                (start, project_id, limit),
            )
            .fetchall()
        )
        return [_item(row) for row in rows]

    def held_waiting(self, release: Releasable) -> int:
        """How many held items `release` does not release yet (status: `clock.held`)."""
        if not self._published.held or release.everything:
            return 0
        if release.only_unheld:
            return self._published.held
        where, params = _released_sql(release)
        (count,) = (
            self.reader()
            .execute(
                f"SELECT count(*) FROM outbox WHERE held != 0 AND NOT coalesce({where}, 0)",
                params,
            )
            .fetchone()
        )
        return int(count)

    def has_held(self, project_id: int, boot_id: str) -> bool:
        """Does the project hold items accepted in this boot (they wait for its true time)?"""
        if not self._published.held:
            return False
        row = (
            self.reader()
            .execute(
                "SELECT 1 FROM outbox WHERE held != 0 AND project_id = ? AND boot_id = ? LIMIT 1",
                (project_id, boot_id),
            )
            .fetchone()
        )
        return row is not None

    def list_items(self, limit: int = 100, after_id: int = 0) -> list[QueuedItem]:
        """Queued items with their payloads, oldest first (held ones included)."""
        rows = (
            self.reader()
            .execute(
                f"SELECT {_ITEM_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            .fetchall()
        )
        return [_item(row) for row in rows]

    def get_item(self, item_id: int) -> QueuedItem | None:
        row = (
            self.reader()
            .execute(f"SELECT {_ITEM_COLUMNS} FROM outbox WHERE id = ?", (item_id,))
            .fetchone()
        )
        return None if row is None else _item(row)

    def dead_letters(self, limit: int = 100, after_id: int = 0) -> list[DeadLetter]:
        rows = (
            self.reader()
            .execute(
                f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            .fetchall()
        )
        return [DeadLetter(*row) for row in rows]

    def queue_entries(self, limit: int = 100, after_id: int = 0) -> list[QueueEntry]:
        """Queued items as `queue list` shows them (project by token, no payload)."""
        rows = (
            self.reader()
            .execute(
                "SELECT o.id, p.project_token, p.base_url, o.app, o.kind, o.created_at, o.size, "
                "o.held != 0 FROM outbox o JOIN projects p ON p.id = o.project_id "
                "WHERE o.id > ? ORDER BY o.id LIMIT ?",
                (after_id, limit),
            )
            .fetchall()
        )
        return [QueueEntry(*row) for row in rows]

    def dead_letter_entries(self, limit: int = 100, after_id: int = 0) -> list[DeadLetterEntry]:
        """Dead letters as `queue dead-letters` shows them, with the API's reason."""
        rows = (
            self.reader()
            .execute(
                "SELECT d.id, p.project_token, p.base_url, d.app, d.kind, d.created_at, d.size, "
                "d.failed_at, d.reason FROM dead_letters d JOIN projects p "
                "ON p.id = d.project_id WHERE d.id > ? ORDER BY d.id LIMIT ?",
                (after_id, limit),
            )
            .fetchall()
        )
        return [DeadLetterEntry(*row) for row in rows]


def _released_sql(release: Releasable) -> tuple[str, tuple[Any, ...]]:
    """The SQL condition (and its parameters) under which a held row is released."""
    if release.everything:
        return "1", ()
    boots = release.boots
    marks = ", ".join("?" * len(boots))
    clauses = [f"(boot_id IN ({marks}) AND accepted_mono IS NOT NULL)"] if boots else []
    clauses.append("(boot_id = ? AND accepted_mono <= ?)")
    params: list[Any] = [*boots, release.current_boot, release.current_until]
    if release.earlier_boots:
        # Rows without a boot id or monotonic time cannot be corrected: like an earlier boot's.
        clauses.append("(boot_id IS NULL OR boot_id != ? OR accepted_mono IS NULL)")
        params.append(release.current_boot)
    return " OR ".join(clauses), tuple(params)


def _item(row: tuple[Any, ...]) -> QueuedItem:
    item_id, project_id, payload, created_at, app, kind, boot_id, mono, held = row
    return QueuedItem(
        item_id, project_id, payload, created_at, app, kind, boot_id, mono, bool(held)
    )
