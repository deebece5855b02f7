"""Queue maintenance (`engagement-agent queue ...`), one implementation for both paths:
the running agent answers the socket's admin commands with it, and the CLI runs it on the
database file itself when the agent is stopped — so both print the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.commands import QueueDeadLetters, QueueList, QueuePurge, QueueRetryDead, QueueShow
from agent.errors import InvalidCommand
from agent.store import DeadLetterEntry, QueueEntry, Store


def item_view(entry: QueueEntry | DeadLetterEntry) -> dict[str, Any]:
    """A queue row as the CLI lists it: id, project_token, base_url, app (null for items
    queued before the agent recorded it), kind, created_at, size (+ failed_at and reason for
    a dead letter). The payload only on `queue show` (personal data)."""
    return dataclasses.asdict(entry)


def run_admin(store: Store, command: Any) -> dict[str, Any]:
    """Blocking: call from a worker thread in the agent. Raises `AgentError` for bad requests."""
    if isinstance(command, QueueList):
        entries = store.queue_entries(command.limit, command.after_id)
        return {"items": [item_view(e) for e in entries]}
    if isinstance(command, QueueDeadLetters):
        rows = store.dead_letter_entries(command.limit, command.after_id)
        return {"dead_letters": [item_view(e) for e in rows]}
    if isinstance(command, QueueShow):
        item = store.get_item(command.id)
        entries = store.queue_entries(1, command.id - 1) if item is not None else []
        if item is None or not entries or entries[0].id != command.id:
            raise InvalidCommand(
                f"no queued item with id {command.id}",
                [{"field": "id", "reason": "no such queued item"}],
            )
        return {**item_view(entries[0]), "payload": item.payload.decode("utf-8", "replace")}
    if isinstance(command, QueueRetryDead):
        ids = command.ids
        return {"retried": store.submit(lambda t: t.retry_dead_letters(ids)).result()}
    if isinstance(command, QueuePurge):
        dead, token = command.dead, command.project_token
        if token is not None:
            if dead:
                raise InvalidCommand(
                    "queue_purge takes dead or project_token, not both",
                    [{"field": "project_token", "reason": "not allowed with dead"}],
                )
            return {"purged": store.submit(lambda t: t.purge_project(token)).result()}
        return {"purged": store.submit(lambda t: t.purge(dead)).result()}
    raise InvalidCommand(f"{command.command} is not a queue maintenance command")
