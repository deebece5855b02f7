"""Sync over networks that fail in more ways than a closed port (docs/sync.md, "When things go
wrong").

Real parts: the store on a temp SQLite file, urllib3, the API stand-in with its black-hole and
trickle faults, a closed port for refused connections, and a real tinyproxy. Waits are on
conditions with deadlines; the only fixed pause is the length of a simulated outage.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from agent.sync import Syncer
from agent.tracker.model import Project
from agent_devtools.apistub import ApiStub
from tests.fixtures.mosquitto import free_port
from tests.fixtures.sync import TIMEOUT, Harness, event, eventually, project_state
from tests.fixtures.tinyproxy import VIA_NAME, Tinyproxy


class _High(random.Random):
    """Every draw near 1: the backoff then waits its whole window (2, 4, 8, ... s), which is
    what makes "the probe schedule, not the backoff" visible in a short test."""

    def random(self) -> float:
        return 0.999


def test_a_refused_connection_is_named_as_such_and_probed_not_backed_off(
    harness: Harness,
) -> None:
    closed = free_port()
    project = Project("proj-a", "key-a", f"http://127.0.0.1:{closed}")
    _, syncer = harness.start(harness.config_with(project, probe_interval=30.0, max_backoff=1.0))
    harness.enqueue(project, [event(1)])
    state = eventually(
        lambda: (s := project_state(syncer))["last_error"] and s, "the failure in status"
    )
    assert state["state"] == "backoff"
    assert "refused" in state["last_error"] and "timed out" not in state["last_error"]
    # The probe schedule (30 s ± 50%), not the 1 s backoff cap, decides the next attempt.
    assert state["next_attempt"] - time.time() > 10.0


def test_the_queue_drains_soon_after_the_api_returns(tmp_path: Path) -> None:
    stub = ApiStub("127.0.0.1", free_port(), {"proj-a": "key-a"})  # restarts on the same port
    stub.start()
    harness = Harness(tmp_path, stub)
    try:
        config = harness.config(probe_interval=0.5, max_backoff=300.0)
        store = harness.open_store(config)
        syncer = Syncer(store, config, rng=_High())
        store.on_enqueued = syncer.notify
        harness.syncer = syncer
        stub.stop()  # the API (and the network to it) goes away
        syncer.start()
        harness.enqueue(harness.project(), [event(i) for i in range(20)])
        eventually(lambda: "refused" in (project_state(syncer)["last_error"] or ""), "refused")
        time.sleep(9.0)  # the outage: a backoff would now wait until ~15 s (0, 1, 3, 7, 15)
        stub.start()  # same port
        started = time.monotonic()
        assert stub.wait_received(20, 4.0)  # the probe (0.5 s ± 50 %) finds it back
        eventually(lambda: harness.queued() == 0, "queue drained")
        assert time.monotonic() - started < 4.0
    finally:
        harness.close()
        stub.stop()


def test_the_mqtt_hint_brings_a_waiting_project_back_at_once(tmp_path: Path) -> None:
    stub = ApiStub("127.0.0.1", free_port(), {"proj-a": "key-a"})  # restarts on the same port
    stub.start()
    harness = Harness(tmp_path, stub)
    try:
        config = harness.config(probe_interval=120.0)
        harness.open_store(config)
        stub.stop()
        _, syncer = harness.start(config)
        harness.enqueue(harness.project(), [event(i) for i in range(3)])
        eventually(lambda: "refused" in (project_state(syncer)["last_error"] or ""), "refused")
        stub.start()
        syncer.network_hint()  # what the daemon calls when the MQTT link connects
        assert stub.wait_received(3, 10.0)  # long before the next probe (60 s at the soonest)
    finally:
        harness.close()
        stub.stop()


def test_a_trickling_answer_is_cut_at_the_deadline_and_the_batch_sent_again(
    harness: Harness,
) -> None:
    stub = harness.stub
    stub.trickle_next(1, 1.0)
    _, syncer = harness.start(harness.config(timeout=2.0))
    harness.enqueue(harness.project(), [event(i) for i in range(3)])
    eventually(
        lambda: "no complete answer within 2 s" in (project_state(syncer)["last_error"] or ""),
        "the deadline named in status",
    )
    eventually(lambda: harness.queued() == 0, "queue drained after the trickle")
    assert [r.commands for r in stub.requests()] == [3, 3]  # the same batch, sent again


def test_a_black_hole_is_detected_and_recovered_from(harness: Harness) -> None:
    stub = harness.stub
    stub.black_hole_next(1)
    _, syncer = harness.start(harness.config(timeout=1.0))
    harness.enqueue(harness.project(), [event(i) for i in range(3)])
    eventually(
        lambda: "within 1 s" in (project_state(syncer)["last_error"] or ""), "timeout in status"
    )
    assert project_state(syncer)["state"] in ("backoff", "ok", "idle")
    eventually(lambda: harness.queued() == 0, "queue drained after the black hole")
    assert len(stub.received()) == 3


def test_linger_groups_kiosk_rate_events(harness: Harness) -> None:
    """5 events per second, one at a time: at most 0.25 requests per event."""
    stub = harness.stub
    harness.start(harness.config(linger=1.0))
    events = 30
    for i in range(events):
        harness.enqueue(harness.project(), [event(i)])
        time.sleep(0.2)  # the producer's rate, not a synchronisation
    assert stub.wait_received(events, TIMEOUT)
    requests = len(stub.requests())
    assert requests / events <= 0.25, f"{requests} requests for {events} events"


def test_linger_zero_sends_at_once(harness: Harness) -> None:
    stub = harness.stub
    harness.start(harness.config(linger=0.0))
    for i in range(3):
        harness.enqueue(harness.project(), [event(i)])
        assert stub.wait_received(i + 1, TIMEOUT)  # each goes out before the next is queued
    assert len(stub.requests()) == 3


# -- proxies -------------------------------------------------------------------------------


def test_batches_go_through_the_configured_proxy(harness: Harness, tinyproxy: Tinyproxy) -> None:
    stub = harness.stub
    harness.start(harness.config(proxy=tinyproxy.url))
    harness.enqueue(harness.project(), [event(i) for i in range(4)])
    assert stub.wait_received(4, TIMEOUT)
    assert all(VIA_NAME in r.via for r in stub.requests())


def test_the_environment_proxy_is_used_unless_no_proxy_exempts_the_host(
    harness: Harness, tinyproxy: Tinyproxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = harness.stub
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    harness.start(harness.config())
    harness.enqueue(harness.project(), [event(1)])
    assert stub.wait_received(1, TIMEOUT)
    assert VIA_NAME in stub.requests()[-1].via
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert harness.syncer is not None
    harness.syncer.reload(harness.config())  # the environment is read again with the config
    harness.enqueue(harness.project(), [event(2)])
    assert stub.wait_received(2, TIMEOUT)
    assert stub.requests()[-1].via == ""


def test_a_refusing_proxy_is_a_clear_error_and_nothing_is_lost(
    harness: Harness, refusing_tinyproxy: Tinyproxy, caplog: pytest.LogCaptureFixture
) -> None:
    stub = harness.stub
    _, syncer = harness.start(harness.config(proxy=refusing_tinyproxy.url, probe_interval=0.5))
    harness.enqueue(harness.project(), [event(i) for i in range(2)])
    state: dict[str, Any] = eventually(
        lambda: (s := project_state(syncer))["last_error"] and s, "the refusal in status"
    )
    assert state["state"] == "backoff"
    proxy = f"proxy 127.0.0.1:{refusing_tinyproxy.port}"
    assert state["last_error"].startswith(f"{proxy} answered HTTP 403")
    assert any(proxy in r.getMessage() for r in caplog.records)  # the journal says it too
    assert stub.requests() == [] and harness.queued() == 2
    syncer.reload(harness.config())  # the proxy setting removed: straight to the API
    assert stub.wait_received(2, TIMEOUT)


def test_a_proxy_that_is_down_is_named(harness: Harness) -> None:
    closed = free_port()
    _, syncer = harness.start(harness.config(proxy=f"http://127.0.0.1:{closed}"))
    harness.enqueue(harness.project(), [event(1)])
    error = eventually(lambda: project_state(syncer)["last_error"], "the error in status")
    assert error.startswith(f"proxy 127.0.0.1:{closed}: cannot connect")
    assert "refused" in error


def test_an_api_down_behind_a_working_proxy_is_unreachable_not_a_refusal(
    harness: Harness, tinyproxy: Tinyproxy
) -> None:
    """The proxy answers for the API it cannot reach: that is the network's fault (probe
    schedule), not the API refusing the project (which would pause it)."""
    closed = free_port()
    project = Project("proj-a", "key-a", f"http://127.0.0.1:{closed}")
    _, syncer = harness.start(harness.config_with(project, proxy=tinyproxy.url))
    harness.enqueue(project, [event(1)])
    state = eventually(lambda: (s := project_state(syncer))["last_error"] and s, "the error")
    assert state["state"] == "backoff"
    # tinyproxy answers 500 and closes at once; whether the answer is read before the reset
    # depends on timing, and both are named as the proxy's failure to reach the API.
    assert state["last_error"].startswith(
        (
            f"proxy 127.0.0.1:{tinyproxy.port} answered HTTP 5",
            f"proxy 127.0.0.1:{tinyproxy.port}: closed the connection unanswered",
        )
    )
    assert harness.queued() == 1
