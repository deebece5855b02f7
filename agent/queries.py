"""The commands that are not part of a group: `status`, `flush` and queue maintenance.

`flush --wait` may take minutes and queue maintenance reads the database, so both run in a
small thread pool of their own; past a few waiting, callers are told to retry rather than pile
up threads (a flood of `flush --wait` would otherwise do that).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any

from agent.commands import Flush, Status
from agent.dispatch import Accepted
from agent.errors import Unavailable
from agent.queue_admin import run_admin
from agent.store import Store
from agent.sync import Syncer

#: `flush --wait` and queue maintenance requests allowed to wait for a worker at once.
MAX_WAITING_QUERIES = 8


class QueryRunner:
    """`agent.dispatch.Queries` for the daemon. Construct and call on the event loop."""

    def __init__(
        self, status: Callable[[], Mapping[str, Any]], syncer: Syncer, store: Store
    ) -> None:
        self._status = status
        self._syncer = syncer
        self._store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="query")
        self._waiting = 0

    async def query(self, command: Accepted) -> Mapping[str, Any]:
        if isinstance(command.command, Status):
            return self._status()
        if isinstance(command.command, Flush):
            return await self._run(self._syncer.flush, command.command.wait)
        return await self._run(run_admin, self._store, command.command)

    async def _run(self, fn: Callable[..., Mapping[str, Any]], *args: Any) -> Mapping[str, Any]:
        if self._waiting >= MAX_WAITING_QUERIES:
            raise Unavailable("too many flush/queue requests in progress; try again shortly")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """Queries still waiting for a worker are cancelled; running ones are not waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)
