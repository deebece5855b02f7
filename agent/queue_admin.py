"""Queue maintenance (`engagement-agent queue ...`), one implementation for both paths:
the running agent answers the socket's admin commands with it, and the CLI runs it on the
database file itself when the agent is stopped — so both print the same thing.
"""

from __future__ import annotations

from typing import Any

from agent.commands import QueueDeadLetters, QueueList, QueuePurge, QueueRetryDead, QueueShow
from agent.errors import InvalidCommand
from agent.store import DeadLetter, QueuedItem, Store


def item_view(item: QueuedItem | DeadLetter) -> dict[str, Any]:
    """A queue row as the CLI lists it; the payload only on `queue show` (personal data)."""
    view: dict[str, Any] = {
        "id": item.id,
        "project_id": item.project_id,
        "created_at": item.created_at,
        "bytes": len(item.payload),
    }
    if isinstance(item, DeadLetter):
        view.update(failed_at=item.failed_at, reason=item.reason)
    return view


def run_admin(store: Store, command: Any) -> dict[str, Any]:
    """Blocking: call from a worker thread in the agent. Raises `AgentError` for bad requests."""
    if isinstance(command, QueueList):
        return {"items": [item_view(i) for i in store.list_items(command.limit, command.after_id)]}
    if isinstance(command, QueueDeadLetters):
        rows = store.dead_letters(command.limit, command.after_id)
        return {"dead_letters": [item_view(i) for i in rows]}
    if isinstance(command, QueueShow):
        item = store.get_item(command.id)
        if item is None:
            raise InvalidCommand(
                f"no queued item with id {command.id}",
                [{"field": "id", "reason": "no such queued item"}],
            )
        return {**item_view(item), "payload": item.payload.decode("utf-8", "replace")}
    if isinstance(command, QueueRetryDead):
        ids = command.ids
        return {"retried": store.submit(lambda t: t.retry_dead_letters(ids)).result()}
    if isinstance(command, QueuePurge):
        dead = command.dead
        return {"purged": store.submit(lambda t: t.purge(dead)).result()}
    raise InvalidCommand(f"{command.command} is not a queue maintenance command")
