"""`agent.client.Client` against the real daemon and the API stand-in: what a Python app sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentUnavailable, Client, CommandError
from tests.fixtures.api import api_project
from tests.fixtures.daemon import AgentProcess, wait_for


@pytest.fixture
def agent(make_agent: Any, api_stub: Any) -> AgentProcess:
    process: AgentProcess = make_agent(
        {
            "project": api_project(api_stub),
            "apps": {"defaults": {"automatic_session_tracking": False}},
            "sync": {"flush_mode": "manual"},
        }
    )
    process.start()
    return process


def sent_events(api: Any) -> list[dict[str, Any]]:
    return [dict(r.data) for r in api.received("proj-a") if r.name == "customers/events"]


def customer_updates(api: Any) -> list[dict[str, Any]]:
    return [dict(r.data) for r in api.received("proj-a") if r.name == "customers"]


def test_every_sdk_method_reaches_the_api(agent: AgentProcess, api_stub: Any) -> None:
    with Client(agent.socket_path, app="kiosk-ui") as client:
        assert client.track_event("door_opened", {"door": 2}, timestamp=1700000000.5) == {}
        client.identify_customer({"registered": "jane@example.com"}, {"first_name": "Jane"})
        client.set_default_properties({"store": "berlin-3"})
        client.track_session_start(timestamp=1700000001.0)
        client.track_session_end(timestamp=1700000031.0)
        client.app_foreground(app_version="2.4.1")
        client.app_background()
        client.track_push_token("fcm-1")
        client.track_hms_push_token("hms-1")
        client.verify_push_token()
        client.track_payment(12.34, "EUR", "Virtual", "handbag", "Red handbag", receipt="R-1")
        customer = client.get_customer()
        assert customer["app"] == "kiosk-ui"
        assert customer["ids"]["registered"] == "jane@example.com"
        client.anonymize()
        assert client.get_customer()["ids"].keys() == {"cookie"}
        assert client.get_customer(app="other")["app"] == "other"
        assert client.status()["queue"]["items"] > 0
        assert client.flush(wait=True)["remaining"] == 0

    events = {e["event_type"]: e for e in sent_events(api_stub)}
    assert events["door_opened"]["properties"]["door"] == 2
    assert "store" not in events["door_opened"]["properties"]  # set after it
    assert events["door_opened"]["timestamp"] == 1700000000.5
    assert events["session_end"]["properties"]["duration"] == 30.0
    assert events["session_end"]["properties"]["store"] == "berlin-3"
    assert events["payment"]["properties"]["receipt"] == "R-1"
    assert events["payment"]["properties"]["brutto"] == 12.34
    assert any(
        u["customer_ids"].get("registered") == "jane@example.com"
        and u["properties"].get("first_name") == "Jane"
        for u in customer_updates(api_stub)
    )
    everything = str([r.data for r in api_stub.received("proj-a")])
    assert "fcm-1" in everything and "hms-1" in everything  # as docs/tracking.md describes


def test_a_refused_command_raises_with_code_and_details(agent: AgentProcess) -> None:
    with Client(agent.socket_path) as client:
        with pytest.raises(CommandError) as refused:
            client.track_event("")
        assert refused.value.code == "invalid_command"
        assert [d["field"] for d in refused.value.details] == ["name"]
        assert refused.value.message
        with pytest.raises(CommandError) as refused:
            client.track_session_end()
        assert refused.value.code == "invalid_state"
        # The connection stays usable after a refusal.
        assert client.track_event("fine") == {}
    assert agent.status()["queue"]["items"] == 2  # installation and "fine"; nothing refused


def test_no_agent_raises_agent_unavailable(tmp_path: Path) -> None:
    client = Client(tmp_path / "absent.sock")
    with pytest.raises(AgentUnavailable) as missing:
        client.track_event("x")
    assert missing.value.offline
    assert "absent.sock" in str(missing.value)


def test_the_client_reconnects_after_the_agent_restarts(
    agent: AgentProcess, api_stub: Any
) -> None:
    client = Client(agent.socket_path)
    client.track_event("before")
    assert agent.terminate() == 0
    with pytest.raises(AgentUnavailable):
        client.track_event("while_down")
    agent.start()
    client.track_event("after")
    client.flush(wait=True)
    client.close()
    types = [e["event_type"] for e in sent_events(api_stub)]
    assert sorted(types) == ["after", "before", "installation"]


def test_pipeline_returns_results_in_order_and_raises_after_all_were_answered(
    agent: AgentProcess,
) -> None:
    with Client(agent.socket_path, app="kiosk-ui") as client:
        with pytest.raises(CommandError) as refused, client.pipeline() as batch:
            for i in range(3000):
                batch.track_event("reading" if i != 1500 else "", {"i": i})
            batch.get_customer()
        assert refused.value.index == 1500 and refused.value.code == "invalid_command"
        assert client.status()["queue"]["items"] == 1 + 2999

        results = client.send_many(
            [{"command": "get_customer"}, {"command": "bogus"}, {"command": "status"}],
            raise_on_error=False,
        )
    assert results[0]["app"] == "default"
    assert isinstance(results[1], CommandError) and results[1].index == 1
    assert isinstance(results[2], dict) and results[2]["queue"]["items"] >= 3000


def test_pipeline_of_large_replies_does_not_deadlock(agent: AgentProcess) -> None:
    """Thousands of status replies are far more than the socket buffers hold: the client
    must read while it writes, or both sides would wait for each other."""
    with Client(agent.socket_path, timeout=120) as client:
        results = client.send_many([{"command": "status"}] * 3000)
    assert len(results) == 3000 and all(isinstance(r, dict) for r in results)


def test_default_socket_is_found_like_the_cli(
    agent: AgentProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("agent.config.load.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.setenv("ENGAGEMENT_AGENT_SOCKET__PATH", str(agent.socket_path))
    with Client() as client:
        assert client.socket_path == agent.socket_path
        wait_for(lambda: client.status()["online"], 10, "status")
