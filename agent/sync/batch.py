"""One batch's round with the API: bisection and what each answer makes of the items (pure).

A drain sends the chunks a `BatchRound` hands out and reports what came back; the round
decides which items are acknowledged, which become dead letters (with the API's reason) and
whether the round ends in a failure for the schedule (docs/sync.md, "When things go wrong").
Nothing here does I/O, reads a clock or logs, so the whole policy is tested with plain
verdicts (tests/unit/test_sync_batch.py), h11 style.

Why bisection: a whole-batch refusal (a 400 without an authentication message, 413, 422, a
200 with top-level `success: false`) does not say which item the API disliked. The batch is
halved until the refused item(s) stand alone; only those are dead-lettered, the rest is
delivered. The first half goes out first, so items still reach the API oldest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent import wire
from agent.store import QueuedItem
from agent.sync.schedule import Kind, Outcome


@dataclass(frozen=True)
class Answered:
    """What one verdict did, for the schedule and the journal.

    `reached`: the API judged the request on its merits, so the endpoint and the credentials
    work (false when the round failed). `refused` items became dead letters, the last one for
    `reason`. `split` is the size of the batch being halved when this round halves one for
    the first time (the journal says so once per round), else 0; `reason` is then the API's.
    """

    reached: bool
    refused: int = 0
    reason: str = ""
    split: int = 0


def _failure_of(verdict: wire.Verdict) -> Outcome:
    """The schedule's outcome for a verdict that ends a round (`PAUSE` or `RETRY`)."""
    if verdict.action is wire.Action.PAUSE:
        return Outcome(Kind.REFUSED, f"paused: {verdict.reason}")
    return Outcome(Kind.API_TROUBLE, verdict.reason, verdict.retry_after)


class BatchRound:
    """The items of one batch on their way through the API's answers.

    Use: `while (chunk := round.next_chunk()) is not None`, send `chunk` and report the API's
    verdict with `answer()`, or `fail()` when no answer came. Afterwards `acks` (item ids the
    API accepted) and `dead` (item id, the API's reason) are what the store must record —
    also after a failure: answers already received stand — and `failure`, if any, is what
    the schedule must be told. Items not in `acks` or `dead` stay queued.
    """

    def __init__(self, items: Sequence[QueuedItem]) -> None:
        self.acks: list[int] = []
        self.dead: list[tuple[int, str]] = []
        self.failure: Outcome | None = None
        self._pending = [list(items)] if items else []  # a stack: the next chunk is last
        self._split = False

    def next_chunk(self) -> list[QueuedItem] | None:
        """The items to send next (the same until answered), or None when the round is over."""
        if self.failure is not None or not self._pending:
            return None
        return self._pending[-1]

    def answer(self, verdict: wire.Verdict) -> Answered:
        """Apply the API's verdict on the chunk last handed out."""
        chunk = self._pending.pop()
        if verdict.action is wire.Action.OK:
            refused, reason = 0, ""
            for item, result in zip(chunk, verdict.results, strict=True):
                if result.success:
                    self.acks.append(item.id)
                else:
                    self.dead.append((item.id, result.error))
                    refused, reason = refused + 1, result.error
            return Answered(True, refused, reason)
        if verdict.action is wire.Action.SPLIT:
            if len(chunk) == 1:
                self.dead.append((chunk[0].id, verdict.reason))
                return Answered(True, 1, verdict.reason)
            first, self._split = not self._split, True
            middle = len(chunk) // 2
            self._pending.append(chunk[middle:])
            self._pending.append(chunk[:middle])
            return Answered(True, reason=verdict.reason, split=len(chunk) if first else 0)
        self.fail(_failure_of(verdict))
        return Answered(False)

    def fail(self, outcome: Outcome) -> None:
        """No answer came for the chunk last handed out: the round ends with `outcome`."""
        self.failure = outcome


__all__ = ["Answered", "BatchRound"]
