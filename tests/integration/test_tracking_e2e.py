"""Commands sent to the running daemon end up as the right requests at the API stand-in."""

from __future__ import annotations

import json
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


def two_projects_agent(make_agent: Any, api_stub: ApiStub) -> AgentProcess:
    """A started agent sending to proj-a (`default`) that also knows proj-b as `second`;
    uploads only on `flush`, so tests see exactly what went where."""
    agent: AgentProcess = make_agent(
        {
            "project": api_project(api_stub),
            "projects": {"second": api_project(api_stub, "proj-b")},
            "sync": {"flush_mode": "manual"},
        }
    )
    agent.start()
    return agent


def test_anonymize_to_a_named_project_delivers_there_and_persists(
    make_agent: Any, api_stub: ApiStub
) -> None:
    agent = two_projects_agent(make_agent, api_stub)
    ok(agent, {"command": "set_default_properties", "properties": {"store": "S1"}})
    ok(agent, {"command": "track_event", "name": "before"})
    ok(agent, {"command": "anonymize", "project": "second"})
    agent.kill()
    agent.start()
    assert ok(agent, {"command": "get_customer"})["project_token"] == "proj-b"
    # Without a project, anonymize stays on the app's current project (the switched one).
    ok(agent, {"command": "anonymize"})
    ok(agent, {"command": "track_event", "name": "later"})
    ok(agent, {"command": "flush", "wait": True})
    assert "before" in [e["event_type"] for e in events(api_stub, "proj-a")]
    on_b = events(api_stub, "proj-b")
    assert [e["event_type"] for e in on_b] == ["installation", "installation", "later"]
    assert "later" not in [e["event_type"] for e in events(api_stub, "proj-a")]
    # Runtime default properties survive anonymize.
    assert all(e["properties"]["store"] == "S1" for e in on_b)
    # The key sent is the config's, found by project: the stand-in checks it.
    assert all(r.authorization_ok for r in api_stub.requests("proj-b"))


def test_anonymize_to_an_unconfigured_project_is_forbidden_and_leaves_no_trace(
    make_agent: Any, api_stub: ApiStub
) -> None:
    attacker = ApiStub("127.0.0.1", 0)  # accepts anything: what a hostile app would run
    attacker.start()
    try:
        agent = make_agent(
            {
                "project": api_project(api_stub),
                "projects": {"second": api_project(api_stub, "proj-b")},
                "apps": {"kiosk-ui": {"projects": ["second"]}},
            }
        )
        agent.start()
        ok(agent, {"command": "identify_customer", "ids": {"registered": "jane@example.com"}})
        ok(agent, {"command": "flush", "wait": True})
        customer = ok(agent, {"command": "get_customer"})
        requests_before = len(api_stub.requests())
        items_before = agent.status()["queue"]["items"]
        redirect = {"project_token": "proj-a", "base_url": attacker.url}
        refused = [
            {"project": redirect},
            {"project": {**redirect, "authorization_token": "key-a"}},
            {"project": "unknown"},
            {"mapping": {"track_customer": ["second", redirect]}},
        ]
        for fields in refused:
            reply = agent.request({"command": "anonymize", **fields})
            assert reply["error"]["code"] == "forbidden", reply
            assert reply["error"]["message"].startswith("project not configured"), reply
        # apps.<app>.projects narrows what kiosk-ui may choose; default stays allowed.
        reply = agent.request(
            {"command": "anonymize", "app": "kiosk-ui", "project": api_project(api_stub)}
        )
        assert reply["ok"], reply
        reply = agent.request(
            {"command": "anonymize", "app": "kiosk-ui", "mapping": {"install": ["default"]}}
        )
        assert reply["ok"], reply
        ok(agent, {"command": "flush", "wait": True})
        kiosk_requests = len(api_stub.requests()) - requests_before
        reply = agent.request({"command": "anonymize", "app": "kiosk-ui", "project": "x"})
        assert reply["error"]["code"] == "forbidden", reply

        # Nothing changed: the same customer, nothing queued, nothing sent anywhere.
        assert ok(agent, {"command": "get_customer"}) == customer
        assert agent.status()["queue"]["items"] == items_before
        ok(agent, {"command": "flush", "wait": True})
        assert len(api_stub.requests()) == requests_before + kiosk_requests
        # The real app's next identify goes to the configured project only.
        ok(agent, {"command": "identify_customer", "ids": {"phone": "+421900000000"}})
        ok(agent, {"command": "flush", "wait": True})
        update = [dict(r.data) for r in api_stub.received("proj-a") if r.name == "customers"][-1]
        assert update["customer_ids"]["phone"] == "+421900000000"
        assert attacker.requests() == []
        assert agent.terminate() == 0
        for path in agent.workdir.iterdir():
            if path.name.startswith("queue.db"):
                assert attacker.url.encode() not in path.read_bytes(), path
    finally:
        attacker.stop()


def test_status_has_no_customer_ids(agent: AgentProcess) -> None:
    ok(agent, {"command": "identify_customer", "ids": {"registered": "jane@example.com"}})
    ok(agent, {"command": "app_foreground"})
    customer = ok(agent, {"command": "get_customer"})
    status = agent.status()
    assert status["apps"] == {"default": {"session": "active", "push_token_tracked_at": None}}
    text = json.dumps(status)
    assert customer["ids"]["cookie"] not in text and "jane@example.com" not in text


def test_max_apps_bounds_the_apps_with_state(make_agent: Any, api_stub: ApiStub) -> None:
    agent = make_agent({"project": api_project(api_stub), "apps": {"max_apps": 3}})
    agent.start()
    ok(agent, {"command": "status", "app": "not-counted"})
    ok(agent, {"command": "flush", "app": "not-counted"})
    ok(agent, {"command": "get_customer", "app": "a"})
    ok(agent, {"command": "track_event", "name": "e", "app": "b"})
    ok(agent, {"command": "track_event", "name": "e"})  # `default` counts too
    items = agent.status()["queue"]["items"]
    for command in ({"command": "get_customer"}, {"command": "track_event", "name": "e"}):
        reply = agent.request({**command, "app": "fourth"})
        assert reply["error"]["code"] == "unknown_app", reply
        assert reply["error"]["message"].startswith("too many apps"), reply
    assert agent.status()["queue"]["items"] == items
    assert set(agent.status()["apps"]) == {"a", "b", "default"}
    ok(agent, {"command": "track_event", "name": "e", "app": "a"})  # known apps go on
    agent.kill()
    agent.start()
    reply = agent.request({"command": "get_customer", "app": "fourth"})
    assert reply["error"]["code"] == "unknown_app", reply


def test_relaunch_ends_the_stale_session_at_the_last_command(
    agent: AgentProcess, api_stub: ApiStub
) -> None:
    t0 = 1700000000.0
    ok(agent, {"command": "track_push_token", "token": "tok"})
    ok(agent, {"command": "app_foreground", "timestamp": t0, "app_version": "1.0"})
    ok(agent, {"command": "track_event", "name": "tap", "timestamp": t0 + 5})
    # The app crashed and comes back (updated) without an app_background.
    ok(agent, {"command": "app_foreground", "timestamp": t0 + 100, "app_version": "1.1"})
    received = wait_events(api_stub, 7)
    kinds = [(e["event_type"], e["timestamp"]) for e in received]
    end = next(e for e in received if e["event_type"] == "session_end")
    assert end["timestamp"] == t0 + 5
    assert end["properties"]["duration"] == pytest.approx(5.0)
    assert end["properties"]["app_version"] == "1.0"
    assert kinds[-3:] == [
        ("session_end", t0 + 5),
        ("session_start", t0 + 100),
        ("notification_state", t0 + 100),  # the new app version re-tracks the token
    ]


def test_manual_session_commands_while_automatic_are_invalid_state(agent: AgentProcess) -> None:
    before = agent.status()["queue"]["items"]
    reply = agent.request({"command": "track_session_start"})
    assert reply["error"]["code"] == "invalid_state"
    assert agent.status()["queue"]["items"] == before


def test_a_switch_ends_when_its_project_leaves_the_config(
    make_agent: Any, api_stub: ApiStub
) -> None:
    agent = two_projects_agent(make_agent, api_stub)
    ok(agent, {"command": "anonymize", "project": "second"})
    assert ok(agent, {"command": "get_customer"})["project_token"] == "proj-b"
    del agent.config["projects"]
    agent.reload()
    assert ok(agent, {"command": "get_customer"})["project_token"] == "proj-a"
    ok(agent, {"command": "track_event", "name": "after_reload"})
    ok(agent, {"command": "flush", "wait": True})
    assert "after_reload" in [e["event_type"] for e in events(api_stub, "proj-a")]
