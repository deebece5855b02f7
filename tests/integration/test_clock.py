"""End to end: items accepted while the clock is not synchronized wait for the true time and
go out with corrected timestamps (docs/tracking.md, "Timestamps on devices without a
real-time clock").

The daemon runs as a subprocess against the API stand-in, whose clock (`system/time` and
`Date`) is set hours or days away from this machine's. The daemon reads its kernel's clock as
not synchronized, the case under test, even on a machine whose clock is
(`UNSYNCHRONIZED_CLOCK_ENV`). A reboot is simulated by changing the file the agent reads its
boot id from.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.clock import UNSYNCHRONIZED_CLOCK_ENV
from agent.device import BOOT_ID_PATH_ENV
from agent_devtools.apistub import ApiStub
from tests.fixtures.api import API_PROJECTS, api_project
from tests.fixtures.daemon import AgentProcess, wait_for

DAY = 86400.0
TIMEOUT = 30.0
EVENT = "clock_probe"


class Api:
    """The stand-in on a fixed port that can be down (connection refused) and come back."""

    def __init__(self) -> None:
        self.stub = ApiStub("127.0.0.1", 0, API_PROJECTS)
        self.stub.start()
        self.url = self.stub.url
        self.port = self.stub.port

    def down(self) -> None:
        self.stub.stop()

    def up(self, offset: float) -> None:
        self.stub = ApiStub("127.0.0.1", self.port, API_PROJECTS, clock_offset=offset)
        self.stub.start()

    def events(self) -> list[dict[str, Any]]:
        return [dict(r.data) for r in self.stub.received() if r.data.get("event_type") == EVENT]


@pytest.fixture
def api() -> Iterator[Api]:
    instance = Api()
    try:
        yield instance
    finally:
        instance.stub.stop()


class Boot:
    """The boot id the agent reads (a new id is a reboot), and its kernel clock read as not
    synchronized."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reboot()

    def reboot(self) -> None:
        self.path.write_text(f"{uuid.uuid4()}\n")

    def env(self) -> dict[str, str]:
        return {BOOT_ID_PATH_ENV: str(self.path), UNSYNCHRONIZED_CLOCK_ENV: "1"}


@pytest.fixture
def boot(tmp_path: Path) -> Boot:
    return Boot(tmp_path / "boot_id")


def agent_for(make_agent: Any, stub: ApiStub, **clock: Any) -> AgentProcess:
    """An agent sending to `stub`'s address (also while it is down) that retries quickly."""
    agent: AgentProcess = make_agent(
        {
            "project": api_project(stub),
            "sync": {"max_backoff": 1.0, "probe_interval": 0.3, "max_requests_per_second": 0},
            "clock": clock,
        }
    )
    return agent


def track(agent: AgentProcess, rid: str, **extra: Any) -> None:
    reply = agent.request(
        {"command": "track_event", "name": EVENT, "properties": {"rid": rid}, **extra}
    )
    assert reply["ok"], reply


def stamps(api: Api) -> dict[str, float]:
    return {e["properties"]["rid"]: e["timestamp"] for e in api.events()}


def wait_events(api: Api, count: int, agent: AgentProcess) -> dict[str, float]:
    wait_for(lambda: len(api.events()) >= count, TIMEOUT, f"{count} events\n{agent.log()[-3000:]}")
    return stamps(api)


def test_held_items_wait_for_the_apis_time_and_go_out_shifted(
    make_agent: Any, api: Api, boot: Boot
) -> None:
    offset = 3 * DAY + 1234.0
    api.down()
    agent = agent_for(make_agent, api.stub)
    agent.start(env=boot.env())
    before = time.time()
    track(agent, "a")
    track(agent, "b", timestamp=before - 600.0)  # an app-given time, from the same clock
    after = time.time()
    clock = agent.status()["clock"]
    queued = agent.status()["queue"]["items"]
    assert clock["held"] == queued >= 2, clock
    assert clock["source"] == "none" and clock["synchronized"] is False
    assert clock["corrected"] == 0
    api.up(offset)
    got = wait_events(api, 2, agent)
    assert before + offset - 2 <= got["a"] <= after + offset + 2, (got, before, offset)
    assert got["b"] == pytest.approx(before - 600.0 + offset, abs=2.0)
    status = wait_for(
        lambda: (s := agent.status()["clock"])["corrected"] >= queued and s, TIMEOUT, "counted"
    )
    assert status["source"] == "api" and status["held"] == 0 and status["uncorrected"] == 0
    # Once the true time is known new items are not held: they go out at once, corrected.
    now = time.time()
    track(agent, "c")
    got = wait_events(api, 3, agent)
    assert got["c"] == pytest.approx(now + offset, abs=2.0)


@pytest.mark.parametrize(
    ("offset", "hold"),
    [(2.0, True), (DAY, False)],
    ids=["error-under-min-correction", "holding-turned-off"],
)
def test_items_go_out_at_once_with_the_devices_time(
    make_agent: Any, api_stub: ApiStub, boot: Boot, offset: float, hold: bool
) -> None:
    """An error under clock.min_correction (5 s) moves nothing and nothing waits; with
    clock.hold_unsynced = false not even a day's error is corrected."""
    api_stub.set_clock_offset(offset)
    agent = agent_for(make_agent, api_stub, hold_unsynced=hold)
    agent.start(env=boot.env())
    before = time.time()
    track(agent, "a")
    after = time.time()
    event = wait_for(
        lambda: [r.data for r in api_stub.received() if r.data.get("event_type") == EVENT],
        TIMEOUT,
        "the event",
    )[0]
    assert before - 0.5 <= event["timestamp"] <= after + 0.5, (event, before, after)
    clock = wait_for(
        lambda: (c := agent.status()["clock"])["source"] == "api" and c, TIMEOUT, "source api"
    )
    assert clock["corrected"] == 0 and clock["held"] == 0


def test_kill_9_and_restart_within_the_boot_keep_held_items_and_correct_them(
    make_agent: Any, api: Api, boot: Boot
) -> None:
    offset = -5 * 3600.0  # the device is five hours ahead
    api.down()
    agent = agent_for(make_agent, api.stub)
    agent.start(env=boot.env())
    before = time.time()
    for rid in ("a", "b", "c"):
        track(agent, rid)
    after = time.time()
    held = agent.status()["clock"]["held"]
    assert held >= 3
    agent.kill()
    agent.start(env=boot.env())  # same boot id: a restart, not a reboot
    clock = agent.status()["clock"]
    assert clock["held"] == held and clock["source"] == "none", clock
    api.up(offset)
    got = wait_events(api, 3, agent)
    for rid in ("a", "b", "c"):
        assert before + offset - 2 <= got[rid] <= after + offset + 2, (rid, got, before)
    clock = wait_for(
        lambda: (c := agent.status()["clock"])["corrected"] >= held and c, TIMEOUT, "counted"
    )
    assert clock["uncorrected"] == 0 and clock["held"] == 0


def test_after_a_reboot_earlier_held_items_go_out_unchanged_after_max_hold(
    make_agent: Any, api: Api, boot: Boot
) -> None:
    api.down()
    agent = agent_for(make_agent, api.stub)
    agent.start(env=boot.env())
    before = time.time()
    track(agent, "a")
    track(agent, "b")
    after = time.time()
    held = agent.status()["clock"]["held"]
    assert held >= 2
    assert agent.terminate() == 0
    boot.reboot()
    max_hold = 3.0
    agent.write_config({"clock": {"max_hold": max_hold}})
    api.up(DAY)  # the API is back, but this boot's clock cannot date the earlier boot's items
    started = time.monotonic()
    agent.start(env=boot.env())
    assert agent.status()["clock"]["held"] == held
    got = wait_events(api, 2, agent)
    assert time.monotonic() - started >= max_hold - 0.5, "released before clock.max_hold"
    for rid in ("a", "b"):
        assert before - 0.5 <= got[rid] <= after + 0.5, (rid, got)  # unchanged
    clock = wait_for(
        lambda: (c := agent.status()["clock"])["uncorrected"] >= held and c, TIMEOUT, "counted"
    )
    assert clock["corrected"] == 0 and clock["held"] == 0


def test_a_project_whose_credentials_are_refused_still_learns_the_true_time(
    make_agent: Any, api_stub: ApiStub, boot: Boot
) -> None:
    """Its own system/time is refused; another configured project's answer (or the
    refusal's Date header) settles the time, and its items wait only for its credentials."""
    api_stub.set_clock_offset(DAY)
    agent: AgentProcess = make_agent(
        {
            "project": {**api_project(api_stub), "authorization_token": "wrong"},
            "projects": {"other": api_project(api_stub, "proj-b")},
            "sync": {"max_backoff": 1.0, "probe_interval": 0.3},
        }
    )
    agent.start(env=boot.env())
    track(agent, "a")
    status = wait_for(
        lambda: (s := agent.status())["sync"]["projects"][0]["state"] == "paused" and s,
        TIMEOUT,
        "proj-a paused",
    )
    assert status["clock"]["source"] == "api", status["clock"]
    assert status["clock"]["held"] == 0  # the item waits for the credentials, not the clock
    assert api_stub.received() == []
