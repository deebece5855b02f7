"""The API's answers on their way into the store (agent/sync/commits.py), against a real store
on a temp SQLite file: what leaves the queue, what a flush is told, what counts as sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.store import Store
from agent.sync.commits import Commits, FlushRequest
from agent.tracker.model import OutboundItem, Project
from tests.fixtures.sync import event

PROJECT = Project("proj-a", "key-a", "http://api.test")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    config = AgentConfig.model_validate(
        {"queue": {"path": str(tmp_path / "q.db"), "durability": "normal"}}
    )
    store = Store(config.queue)
    store.open()
    yield store
    store.close()


def enqueue(store: Store, count: int) -> list[int]:
    items = [OutboundItem(PROJECT, "track_event", event(i)) for i in range(count)]
    store.submit(lambda txn: txn.enqueue(items, time.time())).result()
    (row,) = store.projects()
    return [item.id for item in store.read_batch(row.id, count)]


def test_acks_leave_the_queue_and_refusals_become_dead_letters_with_the_reason(
    store: Store,
) -> None:
    ids = enqueue(store, 5)
    recorded: list[int] = []
    commits = Commits(store, recorded.append)
    commits.submit(ids[:3], [(ids[3], "Event type not allowed")], [], time.time())
    commits.settle(0)
    stats = store.stats()
    assert stats.items == 1 and stats.dead_letters == 1
    assert [d.reason for d in store.dead_letters()] == ["Event type not allowed"]
    assert recorded == [3]  # accepted items count as sent once committed
    assert commits.failure is None


def test_a_flush_is_done_once_its_budget_is_answered_and_committed(store: Store) -> None:
    ids = enqueue(store, 4)
    request = FlushRequest(budget=3)
    commits = Commits(store, lambda accepted: None)
    active = commits.submit(ids[:2], [], [request], time.time())
    assert active == [request]  # one item of its budget still to go
    active = commits.submit([ids[2]], [(ids[3], "refused")], active, time.time())
    assert active == []
    assert not request.done.is_set()  # not told before the commit
    commits.settle(0)
    assert request.done.is_set()
    assert (request.processed, request.flushed) == (4, 3)


def test_settle_keeps_up_to_the_given_number_of_commits_pending(store: Store) -> None:
    ids = enqueue(store, 3)
    recorded: list[int] = []
    commits = Commits(store, recorded.append)
    for item_id in ids:
        commits.submit([item_id], [], [], time.time())
    commits.settle(1)
    assert recorded == [1, 1]  # the oldest two are final, the newest may still be pending
    commits.settle(0)
    assert recorded == [1, 1, 1] and store.stats().items == 0


def test_a_failed_commit_counts_nothing_as_sent_and_is_reported(store: Store) -> None:
    ids = enqueue(store, 2)
    request = FlushRequest(budget=2)
    recorded: list[int] = []
    commits = Commits(store, recorded.append)
    store.close()  # from now on every commit fails, as on a full disk
    commits.submit(ids, [], [request], time.time())
    commits.settle(0)
    assert commits.failure is not None and "closed" in str(commits.failure)
    assert recorded == [] and request.flushed == 0
    assert request.done.is_set()  # the flush is not left hanging
