"""Wall-clock jumps while the agent runs: +1 day, −1 day, back to 1970 (a device without an RTC).

libfaketime changes the agent's wall clock (time.time) at run time through a timestamp file,
and leaves the monotonic clock alone — exactly what an NTP step or an RTC-less boot looks like
to the process. Timers, backoff and queue order must not care (DESIGN: monotonic time for all
of those); stored timestamps must be what the wall clock said at accept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent.clock import read_kernel_clock
from agent_devtools.apistub import ApiStub
from tests.fixtures.api import API_PROJECTS
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.reliability.harness import EVENT, agent_config, delivered_order, wait_drained

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
SESSION_TIMEOUT = 2.0
DAY = 86400

pytestmark = pytest.mark.skipif(
    not LIBFAKETIME.exists(), reason="libfaketime missing (apt-get install faketime)"
)


class FakeClock:
    """The agent's wall clock = real time + `offset`, changeable while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.set(0)

    def set(self, offset: int) -> None:
        self.offset = offset
        self.path.write_text(f"{offset:+d}\n")

    def now(self) -> float:
        return time.time() + self.offset

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }


def to_1970(hours: float = 1.0) -> int:
    """The offset that puts the clock `hours` after the epoch."""
    return -int(time.time() - hours * 3600)


OFFSETS = {"+1d": DAY, "-1d": -DAY, "1970": None}


def events(api: ApiStub, event_type: str) -> list[dict[str, Any]]:
    return [dict(r.data) for r in api.received() if r.data.get("event_type") == event_type]


@pytest.fixture
def clock(tmp_path: Path) -> FakeClock:
    return FakeClock(tmp_path / "faketime.rc")


def start(
    make_agent: Any, api: ApiStub, clock: FakeClock, *, hold: bool = False, **config: Any
) -> AgentProcess:
    """An agent on the fake clock. Without `hold`, items go out with the device's time
    (`clock.hold_unsynced = false`): the tests of timers and order want to see the jumped
    stamps themselves; the correction has its own test below."""
    agent: AgentProcess = make_agent(
        agent_config(
            api,
            apps={"defaults": {"session_timeout": SESSION_TIMEOUT}},
            clock={"hold_unsynced": hold},
            **config,
        )
    )
    agent.start(env=clock.env())
    return agent


def ok(agent: AgentProcess, command: dict[str, Any]) -> dict[str, Any]:
    reply = agent.request(command)
    assert reply["ok"], reply
    return reply


def test_faketime_moves_the_agents_wall_clock_only(
    make_agent: Any, api_stub: ApiStub, clock: FakeClock
) -> None:
    """The tool itself: without this, the tests below would prove nothing."""
    agent = start(make_agent, api_stub, clock)
    clock.set(to_1970())
    ok(agent, {"command": "track_event", "name": EVENT, "properties": {"rid": "probe"}})
    event = wait_for(lambda: events(api_stub, EVENT), 15, "the probe event")[0]
    assert event["timestamp"] < 86400, f"the agent's clock did not move: {event['timestamp']}"
    assert agent.status()["uptime"] < 3600, "uptime (monotonic) must not jump with the wall clock"


@pytest.mark.parametrize("jump", sorted(OFFSETS))
def test_session_timer_fires_across_a_jump_and_stamps_are_accept_times(
    make_agent: Any, api_stub: ApiStub, clock: FakeClock, jump: str
) -> None:
    agent = start(make_agent, api_stub, clock)
    sent: list[str] = []
    before = clock.now()
    ok(agent, {"command": "app_foreground"})
    for i in range(5):
        ok(agent, {"command": "track_event", "name": EVENT, "properties": {"rid": f"a{i}"}})
        sent.append(f"a{i}")
    ok(agent, {"command": "app_background"})
    after = clock.now()
    # The jump lands while the session timer is armed.
    offset = OFFSETS[jump]
    clock.set(to_1970() if offset is None else offset)
    jumped_before = clock.now()
    for i in range(5):
        ok(agent, {"command": "track_event", "name": EVENT, "properties": {"rid": f"b{i}"}})
        sent.append(f"b{i}")
    jumped_after = clock.now()
    ends = wait_for(
        lambda: events(api_stub, "session_end"),
        SESSION_TIMEOUT + 15,
        f"session_end after a {jump} jump\n{agent.log()[-3000:]}",
    )
    end = ends[0]
    # session_end is stamped with the background time: the clock before the jump.
    assert before - 1 <= end["timestamp"] <= after + 1, (end, before, after)
    assert end["properties"]["duration"] >= 0
    wait_drained(agent)
    assert delivered_order(api_stub) == sent, "queue order changed across the jump"
    stamps = {e["properties"]["rid"]: e["timestamp"] for e in events(api_stub, EVENT)}
    for rid in sent:
        low, high = (before, after) if rid.startswith("a") else (jumped_before, jumped_after)
        assert low - 1 <= stamps[rid] <= high + 1, (rid, stamps[rid], low, high)
    # A new session after the jump also starts and times out.
    ok(agent, {"command": "app_foreground"})
    ok(agent, {"command": "app_background"})
    wait_for(
        lambda: len(events(api_stub, "session_end")) >= 2,
        SESSION_TIMEOUT + 15,
        f"a second session_end on the jumped clock\n{agent.log()[-3000:]}",
    )


def test_backoff_keeps_retrying_across_jumps(
    make_agent: Any, api_stub: ApiStub, clock: FakeClock
) -> None:
    agent = start(make_agent, api_stub, clock, sync={"max_backoff": 1.0})
    api_stub.fail_next(None, 503)
    sent = []
    for i in range(100):
        ok(agent, {"command": "track_event", "name": EVENT, "properties": {"rid": f"r{i}"}})
        sent.append(f"r{i}")
    for offset in (DAY, to_1970(), -DAY):
        seen = len(api_stub.requests())
        clock.set(offset)
        # With max_backoff 1 s, two more attempts come within seconds — unless backoff were
        # on the wall clock, where a backward jump would push them days away.
        wait_for(
            lambda seen=seen: len(api_stub.requests()) >= seen + 2,
            20,
            f"retries after a jump to offset {offset}\n{agent.log()[-3000:]}",
        )
        assert agent.status()["sync"]["projects"][0]["state"] == "backoff"
    api_stub.reset()
    wait_drained(agent)
    assert delivered_order(api_stub) == sent


def test_jumps_while_items_are_held_are_corrected_to_the_true_time(
    make_agent: Any, api_stub: ApiStub, clock: FakeClock, tmp_path: Path
) -> None:
    """The clock is not synchronized (this machine's kernel says so): items wait for the
    API's time, and each is shifted by the error its own accept moment had, whatever jumps
    the wall clock made in between (docs/tracking.md)."""
    if (kernel := read_kernel_clock()) is not None and kernel.synchronized:
        pytest.skip("this machine's clock is synchronized; holding needs an unsynchronized one")
    api_stub.stop()  # no true time yet: the items are held
    agent = start(make_agent, api_stub, clock, hold=True, sync={"probe_interval": 0.3})
    true_times: dict[str, tuple[float, float]] = {}
    for rid, offset in (("a", 0), ("b", DAY), ("c", to_1970()), ("d", -DAY)):
        clock.set(offset)
        low = time.time()
        ok(agent, {"command": "track_event", "name": EVENT, "properties": {"rid": rid}})
        true_times[rid] = (low, time.time())
    status = agent.status()
    assert status["clock"]["held"] == status["queue"]["items"] >= 4, status["clock"]
    # The API comes back on the same address with the true time.
    api = ApiStub("127.0.0.1", api_stub.port, API_PROJECTS)
    api.start()
    try:
        stamps = wait_for(
            lambda: (
                (s := {e["properties"]["rid"]: e["timestamp"] for e in events(api, EVENT)})
                and len(s) >= 4
                and s
            ),
            30,
            f"the held events\n{agent.log()[-3000:]}",
        )
        for rid, (low, high) in true_times.items():
            assert low - 2 <= stamps[rid] <= high + 2, (rid, stamps[rid], low, high)
        clock_status = wait_for(
            lambda: (c := agent.status()["clock"])["corrected"] >= 3 and c, 30, "counted"
        )
        assert clock_status["source"] == "api" and clock_status["held"] == 0
    finally:
        api.stop()
