"""The API's answers on their way into the store, and the flushes waiting for them.

Acknowledgements and dead letters go through `Store.submit`, so they join the writer's group
commit; up to `MAX_ACKS_IN_FLIGHT` of them overlap the next HTTP request. An item counts as
sent (status `sent`, a flush's `flushed`) only once its deletion is committed: a commit that
fails (disk full, a closed store) leaves its items queued, and `Commits.failure` tells the
drain to stop and back off instead of resending them at once (docs/sync.md).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from agent.store import Store, Txn

#: Store commits (acks/dead letters) that may be pending while the next batch is on the wire.
#: Overlapping the fsync with the HTTP exchange is what makes the drain rate independent of
#: the disk's sync latency; the writer folds concurrent ones into one group commit.
MAX_ACKS_IN_FLIGHT = 4


@dataclass
class FlushRequest:
    """One `flush()` (or the final flush of `stop()`) as seen by one worker.

    `budget` bounds the work to "what was queued at that moment" even while ingest continues;
    `deadline` (monotonic) bounds the final flush. `processed` counts items the API answered
    for (accepted or refused), `flushed` the accepted ones whose deletion is committed; `done`
    is set once the budget is spent and committed, or the drain ended.
    """

    budget: int
    deadline: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    flushed: int = 0
    processed: int = 0


def _commit_op(acks: list[int], dead: list[tuple[int, str]], now: float) -> Callable[[Txn], int]:
    def op(txn: Txn) -> int:
        done = txn.ack(acks) if acks else 0
        if dead:
            done += txn.dead_letter(dead, now)
        return done

    return op


class Commits:
    """The commits of one drain, oldest first. Used by the drain's thread only.

    `on_recorded(accepted)` runs for every commit that succeeded, before the flushes it
    served are told: whatever a flush's waiter reads afterwards (status `sent`) includes it.
    """

    def __init__(self, store: Store, on_recorded: Callable[[int], None]) -> None:
        self._store = store
        self._on_recorded = on_recorded
        self._pending: collections.deque[tuple[Future[int], int, list[FlushRequest]]] = (
            collections.deque()
        )
        #: The first commit that failed in this drain, if any.
        self.failure: BaseException | None = None

    def submit(
        self,
        acks: list[int],
        dead: list[tuple[int, str]],
        requests: list[FlushRequest],
        now: float,
    ) -> list[FlushRequest]:
        """Hand one batch's answers to the writer (`now`: wall time, the dead letters' date)
        and count them against each flush's budget; returns the flushes with budget left."""
        future = self._store.submit(_commit_op(acks, dead, now))
        self._pending.append((future, len(acks), list(requests)))
        for request in requests:
            request.processed += len(acks) + len(dead)
        return [r for r in requests if r.processed < r.budget]

    def settle(self, keep: int) -> None:
        """Wait for commits until at most `keep` are pending; count what they made final."""
        while len(self._pending) > keep:
            future, accepted, requests = self._pending.popleft()
            try:
                future.result()
            except Exception as exc:
                if self.failure is None:
                    self.failure = exc
                accepted = 0
            else:
                self._on_recorded(accepted)
            for request in requests:
                request.flushed += accepted
                if request.processed >= request.budget:
                    request.done.set()


__all__ = ["MAX_ACKS_IN_FLIGHT", "Commits", "FlushRequest"]
