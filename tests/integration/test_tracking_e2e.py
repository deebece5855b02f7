"""Commands sent to the running daemon end up as the right requests at the API stand-in."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import api_project
from tests.fixtures.daemon import AgentProcess, wait_for


@pytest.fixture
def agent(make_agent: Any, api_stub: ApiStub) -> AgentProcess:
    process: AgentProcess = make_agent(
        {
            "project": api_project(api_stub),
            "apps": {"defaults": {"session_timeout": 1.0}},
            "sync": {"flush_mode": "immediate"},
        }
    )
    process.start()
    return process


def ok(agent: AgentProcess, command: dict[str, Any]) -> dict[str, Any]:
    reply = agent.request(command)
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


def events(api: ApiStub, project_token: str = "proj-a") -> list[dict[str, Any]]:
    return [dict(r.data) for r in api.received(project_token) if r.name == "customers/events"]


def wait_events(api: ApiStub, count: int, project_token: str = "proj-a") -> list[dict[str, Any]]:
    wait_for(lambda: len(events(api, project_token)) >= count, 15, f"{count} events at the API")
    return events(api, project_token)


def test_track_event_reaches_the_api_with_ids_and_automatic_properties(
    agent: AgentProcess, api_stub: ApiStub
) -> None:
    before = time.time()
    ok(agent, {"command": "track_event", "name": "tap", "properties": {"a": [1, {"b": None}]}})
    after = time.time()
    ok(agent, {"command": "track_event", "name": "old", "timestamp": 1700000000.5})
    received = wait_events(api_stub, 3)
    installation, tap, old = received[0], received[1], received[2]
    cookie = ok(agent, {"command": "get_customer"})["ids"]["cookie"]
    assert installation["event_type"] == "installation"
    for prop in ("os_name", "os_version", "sdk", "sdk_version", "device_model", "device_type"):
        assert prop in installation["properties"], prop
    assert installation["properties"]["os_name"] == "Linux"
    assert installation["properties"]["sdk"] == "engagement-agent"
    assert tap["event_type"] == "tap"
    assert tap["customer_ids"] == {"cookie": cookie}
    assert tap["properties"]["a"] == [1, {"b": None}]
    assert tap["properties"]["application_id"] == "default-application"
    assert len(tap["properties"]["device_id"]) == 36
    assert "os_name" not in tap["properties"]
    assert before <= tap["timestamp"] <= after
    assert old["timestamp"] == 1700000000.5


def test_identify_merges_ids_and_anonymize_starts_a_new_customer(
    agent: AgentProcess, api_stub: ApiStub
) -> None:
    ok(agent, {"command": "identify_customer", "ids": {"registered": "jane@example.com"}})
    ok(agent, {"command": "identify_customer", "ids": {"loyalty": "L1"}, "properties": {"x": 1}})
    ok(agent, {"command": "track_event", "name": "tap"})
    wait_for(lambda: len(api_stub.received("proj-a")) >= 4, 15, "4 commands")
    updates = [dict(r.data) for r in api_stub.received("proj-a") if r.name == "customers"]
    assert updates[0]["customer_ids"]["registered"] == "jane@example.com"
    assert updates[1]["customer_ids"]["loyalty"] == "L1"
    assert updates[1]["customer_ids"]["registered"] == "jane@example.com"
    assert updates[1]["properties"] == {"x": 1}
    tap = events(api_stub)[-1]
    assert tap["customer_ids"]["registered"] == "jane@example.com"
    old_cookie = tap["customer_ids"]["cookie"]

    ok(agent, {"command": "anonymize"})
    customer = ok(agent, {"command": "get_customer"})
    assert customer["ids"]["cookie"] != old_cookie
    assert set(customer["ids"]) == {"cookie"}
    wait_for(
        lambda: any(
            e["event_type"] == "installation" and e["customer_ids"]["cookie"] != old_cookie
            for e in events(api_stub)
        ),
        15,
        "an installation for the new customer",
    )


def test_session_times_out_while_the_agent_runs(agent: AgentProcess, api_stub: ApiStub) -> None:
    ok(agent, {"command": "app_foreground", "timestamp": 1700000000.0, "app_version": "2.1"})
    ok(agent, {"command": "app_background", "timestamp": 1700000030.0})
    received = wait_for(
        lambda: [e for e in events(api_stub) if e["event_type"] == "session_end"],
        15,
        "session_end from the timer",
    )
    end = received[0]
    assert end["timestamp"] == 1700000030.0
    assert end["properties"]["duration"] == pytest.approx(30.0)
    assert end["properties"]["app_version"] == "2.1"
    assert agent.status()["apps"]["default"]["session"] == "none"


def test_state_and_queue_survive_kill_9(make_agent: Any, api_stub: ApiStub) -> None:
    agent = make_agent(
        {
            "project": api_project(api_stub),
            "apps": {"defaults": {"session_timeout": 2.0}},
            "sync": {"flush_mode": "manual"},
        }
    )
    agent.start()
    ok(agent, {"command": "identify_customer", "ids": {"registered": "a@b.c"}})
    ok(agent, {"command": "set_default_properties", "properties": {"store": "S1"}})
    ok(agent, {"command": "track_push_token", "token": "tok-1"})
    ok(agent, {"command": "app_foreground"})
    ok(agent, {"command": "app_background"})
    customer = ok(agent, {"command": "get_customer"})
    agent.kill()

    agent.start()
    assert ok(agent, {"command": "get_customer"}) == customer
    # The backgrounded session's timer is re-armed after the restart.
    ok(agent, {"command": "flush", "wait": True})
    ends = wait_for(
        lambda: (
            ok(agent, {"command": "flush", "wait": True})
            and [e for e in events(api_stub) if e["event_type"] == "session_end"]
        ),
        15,
        "session_end after the restart",
    )
    assert ends[0]["customer_ids"] == customer["ids"]
    ok(agent, {"command": "track_event", "name": "after"})
    ok(agent, {"command": "flush", "wait": True})
    after = next(e for e in events(api_stub) if e["event_type"] == "after")
    assert after["properties"]["store"] == "S1"
    assert after["customer_ids"]["registered"] == "a@b.c"


def test_mapping_fans_out_and_apps_are_independent(make_agent: Any, api_stub: ApiStub) -> None:
    agent = make_agent(
        {
            "project": api_project(api_stub),
            "mapping": {"payment": [api_project(api_stub, "proj-b")]},
        }
    )
    agent.start()
    payment = {
        "value": 12.34,
        "currency": "EUR",
        "payment_system": "Virtual",
        "product_id": "handbag",
        "product_title": "Handbag",
    }
    ok(agent, {"command": "track_payment", "item": payment, "app": "kiosk-ui"})
    ok(agent, {"command": "track_event", "name": "tap", "app": "kiosk-ui"})
    ok(agent, {"command": "track_event", "name": "tap", "app": "pos"})
    copies = wait_events(api_stub, 1, "proj-b")
    assert [e["event_type"] for e in copies] == ["payment"]
    assert copies[0]["properties"]["brutto"] == 12.34
    assert copies[0]["properties"]["item_id"] == "handbag"
    received = wait_events(api_stub, 5)
    cookies = {e["customer_ids"]["cookie"] for e in received}
    assert len(cookies) == 2  # one per app
    assert [e["event_type"] for e in received].count("installation") == 2


def test_anonymize_project_switch_persists_across_restart(
    make_agent: Any, api_stub: ApiStub
) -> None:
    # The project switched to must be one the config names (credentials come from the config).
    agent = make_agent(
        {
            "project": api_project(api_stub),
            "mapping": {"banner": [api_project(api_stub, "proj-b")]},
            "sync": {"flush_mode": "manual"},
        }
    )
    agent.start()
    ok(agent, {"command": "track_event", "name": "before"})
    ok(agent, {"command": "anonymize", "project": api_project(api_stub, "proj-b")})
    agent.kill()
    agent.start()
    assert ok(agent, {"command": "get_customer"})["project_token"] == "proj-b"
    ok(agent, {"command": "track_event", "name": "later"})
    ok(agent, {"command": "flush", "wait": True})
    assert "before" in [e["event_type"] for e in events(api_stub, "proj-a")]
    assert "later" in [e["event_type"] for e in events(api_stub, "proj-b")]
    assert "later" not in [e["event_type"] for e in events(api_stub, "proj-a")]


def test_manual_session_commands_while_automatic_are_invalid_state(agent: AgentProcess) -> None:
    before = agent.status()["queue"]["items"]
    reply = agent.request({"command": "track_session_start"})
    assert reply["error"]["code"] == "invalid_state"
    assert agent.status()["queue"]["items"] == before
