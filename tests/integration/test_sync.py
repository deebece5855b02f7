"""The uploader end to end: real Store on a temp SQLite file, real urllib3, the API stand-in.

Every wait is on a condition with a deadline (the stub's request log, the store's counters);
the only timing assertions are correctness properties (nothing sent before Retry-After, the
pacing floor, stop() honouring its bound).
"""

from __future__ import annotations

import json
import logging
import time

import pytest

from agent.store import Txn
from agent.sync import USER_AGENT
from agent.tracker.model import UNCONFIGURED_PROJECT
from agent_devtools.apistub import ApiStub, Match
from tests.fixtures.sync import TIMEOUT, Harness, event, eventually, project_state


def seqs(stub: ApiStub, project: str | None = None) -> list[int]:
    return [int(r.data["properties"]["seq"]) for r in stub.received(project)]


def test_offline_backlog_goes_out_in_batches_of_at_most_50_oldest_first(
    harness: Harness,
) -> None:
    stub = harness.stub
    port = stub.port
    stub.stop()  # the API is unreachable: connection refused
    config = harness.config()
    _, syncer = harness.start(config)
    harness.enqueue(harness.project(), [event(i) for i in range(120)])
    eventually(lambda: project_state(syncer)["state"] == "backoff", "backoff")
    assert harness.queued() == 120

    back = ApiStub("127.0.0.1", port, {"proj-a": "key-a"})
    back.start()
    try:
        assert back.wait_received(120, TIMEOUT)
        eventually(lambda: harness.queued() == 0, "queue drained")
        assert seqs(back) == list(range(120))
        assert all(0 < r.commands <= 50 for r in back.requests())
        assert sum(r.commands for r in back.requests() if r.status == 200) == 120
        eventually(lambda: project_state(syncer)["sent"] == 120, "sent count")
        assert project_state(syncer)["last_success"] is not None
    finally:
        syncer.stop(2.0)
        back.stop()


def test_requests_carry_the_documented_headers(harness: Harness) -> None:
    harness.start(harness.config())
    harness.enqueue(harness.project(), [event(0)])
    assert harness.stub.wait_received(1, TIMEOUT)
    request = harness.stub.requests()[0]
    assert request.path == "/track/v2/projects/proj-a/batch"
    assert request.user_agent == USER_AGENT
    assert request.content_type == "application/json"
    assert request.authorization_ok


def test_5xx_and_lost_responses_then_recovery_deliver_everything(harness: Harness) -> None:
    stub = harness.stub
    stub.fail_next(2, 503)
    stub.fail_next(1, 500, accept=True)  # processed, but the answer is lost: resent
    stub.reset_next(1)
    harness.start(harness.config(batch_size=20))
    harness.enqueue(harness.project(), [event(i) for i in range(100)])
    eventually(lambda: harness.queued() == 0, "queue drained")
    received = seqs(stub)
    assert set(received) == set(range(100))
    duplicates = len(received) - len(set(received))
    assert duplicates <= 20  # at most the one batch whose response was lost
    statuses = [r.status for r in stub.requests()]
    assert statuses[:4] == [503, 503, 500, 0]


def test_429_retry_after_is_honoured_even_above_max_backoff(harness: Harness) -> None:
    stub = harness.stub
    stub.fail_next(1, 429, retry_after=3)
    _, syncer = harness.start(harness.config())  # max_backoff = 1 s
    harness.enqueue(harness.project(), [event(i) for i in range(10)])
    assert stub.wait_for(lambda: len(stub.requests()) >= 1, TIMEOUT)
    eventually(lambda: project_state(syncer)["next_attempt"] is not None, "a retry")
    assert stub.wait_received(10, TIMEOUT)
    first, second = stub.requests()[:2]
    assert first.status == 429
    assert second.at - first.at >= 3.0


def test_wrong_key_pauses_keeps_data_and_delivers_after_reload(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engagement_agent.sync")
    stub = harness.stub
    wrong = harness.project(key="not-the-key")
    _, syncer = harness.start(harness.config_with(wrong))
    harness.enqueue(wrong, [event(i) for i in range(30)])
    # Two attempts at the cap interval (1 s): still one warning, nothing lost.
    assert stub.wait_for(lambda: len(stub.requests()) >= 2, TIMEOUT)
    status = project_state(syncer)
    assert status["state"] == "paused"
    assert "Could not authenticate" in status["last_error"]
    assert harness.queued() == 30
    assert stub.received() == []
    pauses = [r for r in caplog.records if r.levelno == logging.WARNING and "paused" in r.message]
    assert len(pauses) == 1
    assert "not-the-key" not in caplog.text

    syncer.reload(harness.config())  # the right key for the same project
    assert stub.wait_received(30, TIMEOUT)
    eventually(lambda: harness.queued() == 0, "queue drained")
    assert project_state(syncer)["state"] in ("ok", "idle")
    assert seqs(stub) == list(range(30))


def test_unknown_project_400_pauses_instead_of_splitting(harness: Harness) -> None:
    stub = harness.stub
    ghost = harness.project(token="no-such-project")
    _, syncer = harness.start(harness.config_with(ghost))
    harness.enqueue(ghost, [event(i) for i in range(10)])
    eventually(lambda: project_state(syncer, "no-such-project")["state"] == "paused", "pause")
    assert "Invalid project id" in project_state(syncer, "no-such-project")["last_error"]
    assert all(r.commands == 10 for r in stub.requests())  # never split
    assert harness.store is not None and harness.store.stats().dead_letters == 0


def test_one_poison_item_among_50_is_the_only_dead_letter(harness: Harness) -> None:
    stub = harness.stub
    stub.poison(Match(property="poison"))
    store, _ = harness.start(harness.config())
    payloads = [event(i, poison=True) if i == 23 else event(i) for i in range(50)]
    harness.enqueue(harness.project(), payloads)
    eventually(lambda: harness.queued() == 0, "queue drained")
    dead = store.dead_letters()
    assert len(dead) == 1
    assert json.loads(dead[0].payload)["data"]["properties"] == {"seq": 23, "poison": True}
    assert "poison" in dead[0].reason
    assert sorted(seqs(stub)) == [i for i in range(50) if i != 23]


def test_per_command_refusal_is_dead_lettered_with_the_apis_error(harness: Harness) -> None:
    stub = harness.stub
    stub.fail_commands(Match(event_type="bad"), "Event type not allowed")
    store, syncer = harness.start(harness.config())
    harness.enqueue(harness.project(), [event(0), event(1, "bad"), event(2)])
    eventually(lambda: harness.queued() == 0, "queue drained")
    dead = store.dead_letters()
    assert [json.loads(d.payload)["data"]["event_type"] for d in dead] == ["bad"]
    assert dead[0].reason == "Event type not allowed"
    assert seqs(stub) == [0, 2]
    assert len(stub.requests()) == 1  # the accepted rest is not resent
    # `sent` is counted once the worker saw its commit, a moment after the store's counters.
    eventually(lambda: project_state(syncer)["sent"] == 2, "sent count")


def test_a_hung_request_does_not_delay_other_projects(harness: Harness) -> None:
    stub = harness.stub
    stub.hang_next(1, 60, project="proj-a")
    a, b = harness.project("proj-a", "key-a"), harness.project("proj-b", "key-b")
    config = harness.config_with(a, also=(b,))
    harness.open_store(config)
    harness.enqueue(a, [event(i) for i in range(5)])
    harness.enqueue(b, [event(100 + i) for i in range(5)])
    harness.start(config)
    assert stub.wait_received(5, TIMEOUT, project="proj-b")
    assert stub.received("proj-a") == []  # still hung
    stub.release_hangs()
    assert stub.wait_received(5, TIMEOUT, project="proj-a")


def test_items_queued_before_any_project_wait_for_one(harness: Harness) -> None:
    stub = harness.stub
    config = harness.config_with(None)
    _, syncer = harness.start(config)
    harness.enqueue(UNCONFIGURED_PROJECT, [event(i) for i in range(7)])
    eventually(lambda: project_state(syncer, "")["state"] == "unconfigured", "held")
    assert project_state(syncer, "")["last_error"] == "no project configured"
    assert stub.requests() == []
    syncer.reload(harness.config())
    assert stub.wait_received(7, TIMEOUT, project="proj-a")
    eventually(lambda: harness.queued() == 0, "queue drained")


def test_new_project_rows_get_a_worker_on_notify(harness: Harness) -> None:
    stub = harness.stub
    b = harness.project("proj-b", "key-b")
    harness.start(harness.config(also=(b,)))
    harness.enqueue(b, [event(1)])
    assert stub.wait_received(1, TIMEOUT, project="proj-b")


def test_items_of_a_project_no_longer_configured_are_held_until_it_is_again(
    harness: Harness,
) -> None:
    stub = harness.stub
    b = harness.project("proj-b", "key-b")
    _, syncer = harness.start(harness.config())
    harness.enqueue(b, [event(i) for i in range(4)])
    eventually(lambda: project_state(syncer, "proj-b")["state"] == "unconfigured", "held")
    assert project_state(syncer, "proj-b")["last_error"] == "project not configured"
    harness.enqueue(b, [event(4)])  # more items for it: still held, still nothing sent
    harness.enqueue(harness.project(), [event(100)])  # a configured project is not held up
    assert stub.wait_received(1, TIMEOUT, project="proj-a")
    eventually(lambda: harness.queued() == 5, "proj-a's item acknowledged")
    assert stub.requests("proj-b") == []
    syncer.reload(harness.config(also=(b,)))
    assert stub.wait_received(5, TIMEOUT, project="proj-b")
    eventually(lambda: harness.queued() == 0, "queue drained")


def test_credentials_come_from_the_current_config(harness: Harness) -> None:
    """The store keeps no authorization token: a key changed in the config is what the next
    request carries, also for items queued before the change."""
    stub = harness.stub
    stub.add_project("proj-a", "key-new")
    _, syncer = harness.start(harness.config(flush_mode="manual"))
    harness.enqueue(harness.project(), [event(i) for i in range(3)])
    syncer.flush(wait=True)
    assert project_state(syncer)["state"] == "paused"
    syncer.reload(
        harness.config_with(harness.project("proj-a", "Token key-new"), flush_mode="manual")
    )
    assert syncer.flush(wait=True) == {"flushed": 3, "remaining": 0}


def test_flush_wait_sends_everything_and_counts_accepted(harness: Harness) -> None:
    stub = harness.stub
    stub.fail_commands(Match(event_type="bad"))
    b = harness.project("proj-b", "key-b")
    _, syncer = harness.start(harness.config(flush_mode="manual", also=(b,)))
    harness.enqueue(harness.project(), [event(i, "bad" if i == 5 else "test") for i in range(75)])
    harness.enqueue(b, [event(i) for i in range(10)])
    assert stub.requests() == []  # manual: nothing without flush
    result = syncer.flush(wait=True)
    assert result == {"flushed": 84, "remaining": 0}
    assert syncer.flush(wait=True) == {"flushed": 0, "remaining": 0}


def test_flush_wait_reports_an_error_as_remaining(harness: Harness) -> None:
    harness.stub.fail_next(None, 503)
    _, syncer = harness.start(harness.config(flush_mode="manual"))
    harness.enqueue(harness.project(), [event(i) for i in range(5)])
    assert syncer.flush(wait=True) == {"flushed": 0, "remaining": 5}
    assert project_state(syncer)["state"] == "backoff"


def test_period_mode_sends_without_being_asked(harness: Harness) -> None:
    _, syncer = harness.start(harness.config(flush_mode="period", flush_period=0.2))
    harness.enqueue(harness.project(), [event(i) for i in range(3)])
    assert harness.stub.wait_received(3, TIMEOUT)
    assert project_state(syncer)["next_attempt"] is not None


def test_pacing_caps_requests_per_second(harness: Harness) -> None:
    stub = harness.stub
    harness.start(harness.config(max_requests_per_second=10, batch_size=5))
    harness.enqueue(harness.project(), [event(i) for i in range(40)])
    assert stub.wait_received(40, TIMEOUT)
    starts = [r.at for r in stub.requests()]
    assert len(starts) == 8
    # 8 request starts at >= 0.1 s intervals span >= 0.7 s (a little slack for the server
    # reading a request later than the client sent it).
    assert starts[-1] - starts[0] >= 0.7 - 0.05


def test_stop_is_bounded_even_with_a_hung_request_and_keeps_the_items(
    harness: Harness,
) -> None:
    stub = harness.stub
    stub.hang_next(None, 60)
    _, syncer = harness.start(harness.config(timeout=60))
    harness.enqueue(harness.project(), [event(i) for i in range(5)])
    assert stub.wait_for(lambda: stub.active_requests >= 1, TIMEOUT)
    started = time.monotonic()
    syncer.stop(1.0)
    assert time.monotonic() - started < 1.0 + 1.0
    assert harness.queued() == 5
    harness.syncer = None


def test_stop_makes_a_last_flush(harness: Harness) -> None:
    _, syncer = harness.start(harness.config(flush_mode="manual"))
    harness.enqueue(harness.project(), [event(i) for i in range(60)])
    syncer.stop(5.0)
    assert harness.queued() == 0
    assert len(harness.stub.received()) == 60
    harness.syncer = None


def test_status_lists_configured_projects_and_is_idle_when_drained(harness: Harness) -> None:
    _, syncer = harness.start(harness.config())
    assert syncer.status()["projects"] == [
        {
            "project_token": "proj-a",
            "base_url": harness.stub.url,
            "state": "idle",
            "last_success": None,
            "last_error": None,
            "next_attempt": None,
            "sent": 0,
        }
    ]
    harness.enqueue(harness.project(), [event(0)])
    eventually(lambda: project_state(syncer)["sent"] == 1, "sent")
    eventually(lambda: project_state(syncer)["state"] == "idle", "idle")


def test_answers_the_store_cannot_record_back_off_instead_of_being_resent_at_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Disk full after the API answered: the items stay queued and are sent again, but after
    a backoff (not in a tight loop that floods the API with duplicates and the journal with
    a line per attempt), and status says why. A real SQLITE_FULL: the file is capped at its
    current size, and refusals become dead letters carrying the API's long error text, which
    need new pages (unlike plain deletions)."""
    caplog.set_level(logging.INFO, logger="engagement_agent.sync")
    stub = harness.stub
    stub.fail_commands(Match(event_type="bad"), "refused: " + "x" * 1990)
    config = harness.config(batch_size=50, max_backoff=2.0)
    store = harness.open_store(config)
    harness.enqueue(harness.project(), [event(i, "bad" if i % 5 else "test") for i in range(50)])

    def cap_the_file(txn: Txn) -> None:
        pages = txn.connection.execute("PRAGMA page_count").fetchone()[0]
        txn.connection.execute(f"PRAGMA max_page_count = {pages}")

    store.submit(cap_the_file).result()
    _, syncer = harness.start(config)

    assert stub.wait_for(lambda: len(stub.requests()) >= 1, TIMEOUT)
    eventually(
        lambda: (project_state(syncer)["last_error"] or "").startswith(
            "cannot record the API's answer: disk full"
        ),
        "the store failure in status",
    )
    time.sleep(2.0)  # the failure lasts: a tight loop would send hundreds of requests here
    assert len(stub.requests()) <= 12
    eventually(lambda: project_state(syncer)["next_attempt"] is not None, "a retry time")
    status = project_state(syncer)
    assert status["state"] == "backoff"
    assert status["sent"] == 0
    assert harness.queued() == 50
    failures = [r for r in caplog.records if "cannot record the API's" in r.getMessage()]
    assert len(failures) == 1  # the repeats are counted, not logged

    # Space returns: the next attempt records the answers.
    store.submit(lambda txn: txn.connection.execute("PRAGMA max_page_count = 100000")).result()
    eventually(lambda: harness.queued() == 0, "queue drained")
    assert store.stats().dead_letters == 40
    assert set(seqs(stub)) == set(range(0, 50, 5))
    # `sent` and the recovery line follow the commit by a moment.
    eventually(lambda: project_state(syncer)["sent"] == 10, "sent count")
    eventually(lambda: project_state(syncer)["state"] in ("ok", "idle"), "healthy again")
    eventually(lambda: "recorded again" in caplog.text, "the recovery line")
