"""One batch's round with the API (agent/sync/batch.py): bisection, acks, dead letters and
failures, with the API's HTTP answers classified by the real `agent.wire` — no threads, no
sockets, no store."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from agent import wire
from agent.store import QueuedItem
from agent.sync.batch import BatchRound
from agent.sync.schedule import Kind, Outcome

REFUSED_BATCH = b'{"success": false, "errors": ["bad item"]}'


def queued(ids: range | list[int]) -> list[QueuedItem]:
    return [QueuedItem(i, 1, b'{"name": "customers/events"}', 1_700_000_000.0) for i in ids]


def answer(status: int, body: bytes, sent: int, **headers: str) -> wire.Verdict:
    return wire.classify(status, body, sent, retry_after=headers.get("retry_after"), now=0.0)


def results(*success: bool) -> bytes:
    per_command = [
        {"success": s, "errors": [] if s else ["Event type not allowed"]} for s in success
    ]
    return json.dumps({"success": True, "results": per_command}).encode()


def run(batch: BatchRound, poison: set[int]) -> list[list[int]]:
    """Play an API that refuses any batch holding a poison item as a whole (HTTP 400) and
    accepts the others; returns the ids of each request, in order."""
    requests = []
    while (chunk := batch.next_chunk()) is not None:
        ids = [item.id for item in chunk]
        requests.append(ids)
        if poison & set(ids):
            batch.answer(answer(400, REFUSED_BATCH, len(ids)))
        else:
            batch.answer(answer(200, results(*[True] * len(ids)), len(ids)))
    return requests


def test_an_accepted_batch_is_acknowledged_in_one_request() -> None:
    batch = BatchRound(queued(range(1, 4)))
    chunk = batch.next_chunk()
    assert chunk is not None and [i.id for i in chunk] == [1, 2, 3]
    answered = batch.answer(answer(200, results(True, True, True), 3))
    assert answered.reached and not answered.refused and not answered.split
    assert batch.next_chunk() is None
    assert batch.acks == [1, 2, 3] and batch.dead == [] and batch.failure is None


def test_items_refused_one_by_one_become_dead_letters_with_the_apis_reason() -> None:
    batch = BatchRound(queued(range(1, 5)))
    answered = batch.answer(answer(200, results(True, False, True, False), 4))
    assert answered.reached and answered.refused == 2
    assert answered.reason == "Event type not allowed"
    assert batch.acks == [1, 3]
    assert batch.dead == [(2, "Event type not allowed"), (4, "Event type not allowed")]
    assert batch.next_chunk() is None and batch.failure is None


def test_a_whole_batch_refusal_is_bisected_down_to_the_refused_item() -> None:
    batch = BatchRound(queued(range(1, 51)))
    requests = run(batch, poison={13})
    assert batch.dead == [(13, "HTTP 400: bad item")]
    assert batch.acks == [i for i in range(1, 51) if i != 13]
    assert requests[0] == list(range(1, 51))
    assert len(requests) <= 1 + 2 * math.ceil(math.log2(50))


def test_the_journal_hears_of_a_split_once_per_round() -> None:
    batch = BatchRound(queued(range(1, 9)))
    splits = []
    while (chunk := batch.next_chunk()) is not None:
        ids = [item.id for item in chunk]
        if 5 in ids:
            splits.append(batch.answer(answer(400, REFUSED_BATCH, len(ids))).split)
        else:
            batch.answer(answer(200, results(*[True] * len(ids)), len(ids)))
    assert splits == [8, 0, 0, 0]  # 8 → 4 → 2 → 1: the journal says so at the first split
    assert batch.dead == [(5, "HTTP 400: bad item")]


@given(st.integers(1, 50).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(1, n)))))
def test_bisection_dead_letters_exactly_the_refused_items_and_keeps_the_order(
    case: tuple[int, set[int]],
) -> None:
    size, poison = case
    batch = BatchRound(queued(range(1, size + 1)))
    requests = run(batch, poison)
    assert sorted(i for i, _ in batch.dead) == sorted(poison)
    assert batch.acks == [i for i in range(1, size + 1) if i not in poison]
    # Oldest first: the requests the API accepted carry ascending ids, in order.
    accepted = [ids for ids in requests if not poison & set(ids)]
    flat = [i for ids in accepted for i in ids]
    assert flat == sorted(flat)
    assert batch.failure is None


def test_a_pause_ends_the_round_and_answers_already_received_stand() -> None:
    batch = BatchRound(queued(range(1, 5)))
    batch.answer(answer(400, REFUSED_BATCH, 4))  # split: [1, 2] then [3, 4]
    batch.answer(answer(200, results(True, True), 2))
    answered = batch.answer(answer(401, b'{"errors": ["Could not authenticate"]}', 2))
    assert not answered.reached
    assert batch.next_chunk() is None
    assert batch.acks == [1, 2] and batch.dead == []  # 3 and 4 stay queued
    assert batch.failure is not None and batch.failure.kind is Kind.REFUSED
    assert batch.failure.reason.startswith("paused: HTTP 401")


def test_a_server_in_trouble_keeps_the_batch_and_passes_on_retry_after() -> None:
    batch = BatchRound(queued(range(1, 4)))
    answered = batch.answer(answer(503, b"{}", 3, retry_after="30"))
    assert not answered.reached
    assert batch.acks == [] and batch.dead == [] and batch.next_chunk() is None
    assert batch.failure == Outcome(Kind.API_TROUBLE, "HTTP 503", 30.0)


def test_no_answer_ends_the_round_with_the_transports_outcome() -> None:
    batch = BatchRound(queued(range(1, 4)))
    first = batch.next_chunk()
    assert batch.next_chunk() == first  # handed out again until answered
    batch.fail(Outcome(Kind.UNREACHABLE, "cannot connect: connection refused"))
    assert batch.next_chunk() is None
    assert batch.acks == [] and batch.dead == []
    assert batch.failure == Outcome(Kind.UNREACHABLE, "cannot connect: connection refused")


def test_an_empty_round_sends_nothing() -> None:
    batch = BatchRound([])
    assert batch.next_chunk() is None and batch.failure is None
