"""The uploader's pipeline against a fake transport: a real store on a temp SQLite file, the
real worker threads, and a handler function in place of the API (tests/fixtures/transport.py).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.store import Store
from agent.sync import Syncer
from agent.sync.transport import Interrupted, Request, Response, Unreachable
from agent.tracker.model import OutboundItem, Project
from tests.fixtures.daemon import wait_for
from tests.fixtures.sync import event
from tests.fixtures.transport import FakeTransport, commands, ok_for_all

PROJECT = Project("proj-a", "key-a", "http://api.test")


class Rig:
    def __init__(self, tmp_path: Path, transport: FakeTransport, **sync: Any) -> None:
        self.config = AgentConfig.model_validate(
            {
                "queue": {"path": str(tmp_path / "q.db"), "durability": "normal"},
                "sync": {"max_requests_per_second": 0, "linger": 0, "max_backoff": 60, **sync},
                "project": {
                    "project_token": PROJECT.project_token,
                    "authorization_token": PROJECT.authorization_token,
                    "base_url": PROJECT.base_url,
                },
            }
        )
        self.transport = transport
        self.store = Store(self.config.queue)
        self.store.open()
        self.syncer = Syncer(
            self.store, self.config, rng=random.Random(3), transport=lambda: transport
        )
        self.store.on_enqueued = self.syncer.notify

    def enqueue(self, payloads: list[dict[str, Any]]) -> None:
        items = [OutboundItem(PROJECT, "track_event", p) for p in payloads]
        self.store.submit(lambda txn: txn.enqueue(items, time.time())).result()

    def state(self) -> dict[str, Any]:
        entry: dict[str, Any] = self.syncer.status()["projects"][0]
        return entry

    def close(self) -> None:
        self.syncer.stop(1.0)
        self.store.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(handler: Any = ok_for_all, **sync: Any) -> Rig:
        rig = Rig(tmp_path, FakeTransport(handler), **sync)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def test_a_poison_item_is_found_by_bisection_and_alone_dead_lettered(rig_factory: Any) -> None:
    def handler(request: Request) -> Response:
        if any(c["data"]["event_type"] == "poison" for c in commands(request)):
            return Response(400, b'{"success": false, "errors": ["bad item"]}')
        return ok_for_all(request)

    rig = rig_factory(handler, flush_mode="manual")
    rig.enqueue([event(i, "poison" if i == 13 else "test") for i in range(50)])
    rig.syncer.start()
    assert rig.syncer.flush(wait=True) == {"flushed": 49, "remaining": 0}
    assert rig.store.stats().dead_letters == 1
    sizes = [len(commands(r)) for r in rig.transport.requests]
    assert sizes[0] == 50 and len(sizes) <= 1 + 2 * 6  # log2(50) halvings, two halves each
    delivered = sorted(
        c["data"]["properties"]["seq"]
        for r in rig.transport.requests[1:]
        for c in commands(r)
        if c["data"]["event_type"] == "test"
    )
    assert set(delivered) == set(range(50)) - {13}


def test_per_command_refusals_are_dead_letters_and_the_rest_acknowledged(rig_factory: Any) -> None:
    def handler(request: Request) -> Response:
        results = [
            {"success": c["data"]["properties"]["seq"] % 2 == 0, "errors": ["odd"]}
            for c in commands(request)
        ]
        return Response(200, json.dumps({"success": True, "results": results}).encode())

    rig = rig_factory(handler, flush_mode="manual")
    rig.enqueue([event(i) for i in range(10)])
    rig.syncer.start()
    assert rig.syncer.flush(wait=True) == {"flushed": 5, "remaining": 0}
    assert rig.store.stats().dead_letters == 5
    assert rig.state()["sent"] == 5


def test_requests_carry_credentials_from_the_config(rig_factory: Any) -> None:
    rig = rig_factory(flush_mode="manual")
    rig.enqueue([event(1)])
    rig.syncer.start()
    rig.syncer.flush(wait=True)
    request = rig.transport.requests[0]
    assert request.url == "http://api.test/track/v2/projects/proj-a/batch"
    assert request.headers["Authorization"] == "Token key-a"
    assert request.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("error", "next_within"),
    [
        (Unreachable("cannot connect: connection refused"), (5.0, 16.0)),  # probe 10 s ± 50 %
        (Interrupted("no answer within 30 s"), (0.0, 1.5)),  # backoff: [0, 1 s) at first
    ],
)
def test_what_a_failure_does_to_the_schedule(
    rig_factory: Any, error: Exception, next_within: tuple[float, float]
) -> None:
    def handler(request: Request) -> Response:
        raise error

    rig = rig_factory(handler, probe_interval=10.0)
    rig.enqueue([event(1)])
    rig.syncer.start()
    state = wait_for(lambda: (s := rig.state())["last_error"] and s, 10.0, "failure")
    assert state["state"] == "backoff" and state["last_error"] == str(error)
    low, high = next_within
    assert low - 0.5 <= state["next_attempt"] - time.time() <= high
    assert rig.store.stats().items == 1


def test_a_server_error_keeps_the_batch_and_honours_retry_after(rig_factory: Any) -> None:
    answers = iter([Response(503, b"{}", {"retry-after": "2"})])

    def handler(request: Request) -> Response:
        return next(answers, None) or ok_for_all(request)

    rig = rig_factory(handler)
    rig.enqueue([event(i) for i in range(3)])
    rig.syncer.start()
    wait_for(lambda: rig.store.stats().items == 0, 15.0, "delivered after the Retry-After")
    first, second = rig.transport.requests
    assert len(commands(first)) == len(commands(second)) == 3
