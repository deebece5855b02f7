"""Network faults beyond a closed port, through a relay the test controls (tests/fixtures/relay.py).

Each fault must be detected within a bounded time (`sync.timeout` bounds a whole request, body
included; the MQTT keepalive bounds a silent broker link), show in status (the project's
state `backoff` with `last_error` naming what happened, or `mqtt.connected = false`), heal by
itself once the relay passes again, and lose nothing: every command the agent acknowledged
reaches the API stand-in. See docs/sync.md and docs/mqtt.md.

The deadlines below are bounds on behaviour, generous for a loaded machine, not measurements:
an agent whose request timeout only bounds each read waits minutes on a trickle, far beyond them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import api_project
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.relay import Mode, Relay
from tests.integration.test_mqtt_e2e import Subscriber, publish

#: `sync.timeout` in these tests: the whole request, connect to last body byte.
REQUEST_TIMEOUT = 3.0
#: `mqtt.keepalive` in these tests (the smallest the config allows).
KEEPALIVE = 5
#: Detection bound: the timeout plus room for a loaded machine.
DETECT = REQUEST_TIMEOUT + 20.0
#: Recovery bound after the relay passes again: a backoff of at most `sync.max_backoff` (2 s
#: in the test config) or one network probe interval (15 s ± 50% by default), plus room.
RECOVER = 60.0
DEVICE = "test-device"


def event_names(api: ApiStub) -> set[str]:
    return {str(r.data.get("event_type", "")) for r in api.received("proj-a")}


def names_timeout(error: str) -> bool:
    """`last_error` says the request ran out of time ("timed out after 3 s", "no answer within
    3 s"): what a silent or trickling API is, and what a refused connection is not."""
    return "timed out" in error or re.search(r"\bwithin [0-9.]+ s\b", error) is not None


def track(agent: AgentProcess, name: str) -> None:
    """Track an event over the socket; the agent's `ok` is its promise not to lose it."""
    reply = agent.request({"command": "track_event", "name": name})
    assert reply["ok"], reply


def project_status(agent: AgentProcess) -> dict[str, Any]:
    projects = [p for p in agent.status()["sync"]["projects"] if p["project_token"] == "proj-a"]
    assert len(projects) == 1, projects
    result: dict[str, Any] = projects[0]
    return result


def wait_backoff(agent: AgentProcess, accept: Callable[[str], bool], what: str) -> str:
    """Wait until the project is in `backoff` with a `last_error` that `accept`s; return it."""

    def failed() -> str | None:
        project = project_status(agent)
        error = project["last_error"]
        if project["state"] == "backoff" and error and accept(error):
            return str(error)
        return None

    try:
        result: str = wait_for(failed, DETECT, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; project status: {project_status(agent)}") from None
    return result


def wait_drained(agent: AgentProcess, api: ApiStub, names: set[str]) -> None:
    """Every acked event reached the stand-in, the queue is empty and the project healthy."""
    wait_for(lambda: names <= event_names(api), RECOVER, f"{sorted(names)} at the API")
    wait_for(
        lambda: (
            agent.status()["queue"]["items"] == 0
            and project_status(agent)["state"] in ("ok", "idle")
        ),
        RECOVER,
        "an empty queue and a healthy project",
    )


@pytest.fixture
def api_agent(
    make_agent: Callable[..., AgentProcess],
    make_relay: Callable[[int], Relay],
    api_stub: ApiStub,
) -> tuple[AgentProcess, Relay]:
    """An agent whose API traffic goes through a relay; one event already delivered."""
    relay = make_relay(api_stub.port)
    project = {**api_project(api_stub), "base_url": relay.url}
    agent = make_agent(
        {
            "project": project,
            "sync": {"flush_mode": "immediate", "timeout": REQUEST_TIMEOUT, "max_backoff": 2.0},
        }
    )
    agent.start()
    track(agent, "before")
    wait_for(lambda: "before" in event_names(api_stub), 15, "the first event at the API")
    return agent, relay


def break_api(
    agent: AgentProcess, relay: Relay, mode: Mode, accept: Callable[[str], bool], what: str
) -> tuple[set[str], str]:
    """Switch the relay to `mode`, track five events (all acked), wait for the backoff whose
    `last_error` `accept`s; return the events and that error."""
    relay.set_mode(mode)
    names = {f"{mode.value}{i}" for i in range(5)}
    for name in sorted(names):
        track(agent, name)
    error = wait_backoff(agent, accept, what)
    assert agent.status()["queue"]["items"] >= 1  # nothing was dropped meanwhile
    return names, error


def heal_api(agent: AgentProcess, relay: Relay, api: ApiStub, names: set[str]) -> None:
    relay.set_mode(Mode.PASS)
    wait_drained(agent, api, names)


def test_api_black_hole_is_detected_and_heals(
    api_agent: tuple[AgentProcess, Relay], api_stub: ApiStub
) -> None:
    agent, relay = api_agent
    names, error = break_api(
        agent, relay, Mode.BLACKHOLE, names_timeout, "backoff after a silent API"
    )
    assert "refused" not in error
    assert not names & event_names(api_stub)  # the black hole really held them
    heal_api(agent, relay, api_stub, names)


def test_trickling_response_is_bounded_by_the_request_timeout(
    api_agent: tuple[AgentProcess, Relay], api_stub: ApiStub
) -> None:
    # The request reaches the API (only the response trickles), so the stand-in may well have
    # the events already; the agent must not take that for granted without the full answer.
    agent, relay = api_agent
    names, _ = break_api(
        agent,
        relay,
        Mode.TRICKLE,
        names_timeout,
        "backoff after a trickling response",
    )
    heal_api(agent, relay, api_stub, names)


def test_refused_connection_is_named_as_refused_and_heals(
    api_agent: tuple[AgentProcess, Relay], api_stub: ApiStub
) -> None:
    # The kept-alive connection is reset first ("connection lost"); the attempts after that
    # are refused, and the error must say so rather than call it a timeout.
    agent, relay = api_agent
    names, error = break_api(
        agent,
        relay,
        Mode.REFUSE,
        lambda e: "refused" in e.lower() or names_timeout(e),
        "backoff naming the refused connection",
    )
    assert "refused" in error.lower(), error
    assert not names_timeout(error), error
    heal_api(agent, relay, api_stub, names)


def test_broker_link_dying_without_fin_is_detected_and_heals(
    make_agent: Callable[..., AgentProcess],
    make_relay: Callable[[int], Relay],
    mosquitto: MosquittoBroker,
    api_stub: ApiStub,
) -> None:
    relay = make_relay(mosquitto.port)
    agent = make_agent(
        {
            "device_id": DEVICE,
            "project": api_project(api_stub),
            "mqtt": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": relay.port,
                "keepalive": KEEPALIVE,
            },
            "sync": {"flush_mode": "immediate"},
        }
    )
    agent.start()
    wait_for(lambda: agent.status()["mqtt"]["connected"], 15, "the agent's MQTT connection")
    watcher = Subscriber(mosquitto.port, f"engagement/{DEVICE}/status")
    try:
        publish(mosquitto, "kiosk-ui", json.dumps({"command": "track_event", "name": "linked"}))
        wait_for(lambda: "linked" in event_names(api_stub), 15, "a command through the link")

        relay.set_mode(Mode.CUT)
        # Published straight to the broker (not through the relay): it holds them for the agent.
        names = {f"cut{i}" for i in range(5)}
        for name in sorted(names):
            publish(mosquitto, "kiosk-ui", json.dumps({"command": "track_event", "name": name}))
        # Both ends notice by their keepalive alone: the agent (no PINGRESP) ...
        wait_for(
            lambda: agent.status()["mqtt"]["connected"] is False,
            3 * KEEPALIVE + 20,
            "mqtt.connected = false after the link went silent",
        )
        # ... and the broker (1.5 × keepalive without a packet), which publishes the last will.
        wait_for(
            lambda: watcher.on(f"engagement/{DEVICE}/status")[-1:] == [{"online": False}],
            3 * KEEPALIVE + 20,
            "the last will after the link went silent",
        )
        # The socket side is untouched by a dead broker link.
        track(agent, "socket-during-cut")
        assert not names & event_names(api_stub)

        relay.set_mode(Mode.PASS)
        wait_for(lambda: agent.status()["mqtt"]["connected"], RECOVER, "the MQTT reconnect")
        wait_for(
            lambda: names | {"socket-during-cut"} <= event_names(api_stub),
            RECOVER,
            "the commands the broker queued during the cut",
        )
        wait_for(
            lambda: (watcher.on(f"engagement/{DEVICE}/status")[-1:] or [{}])[0].get("online"),
            RECOVER,
            "the retained status online again",
        )
    finally:
        watcher.close()
