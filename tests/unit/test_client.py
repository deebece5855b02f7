"""`agent.client` against a stand-in agent on a real socket: the exact commands each method
sends, and how replies become results or exceptions. The real daemon: tests/integration."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentUnavailable, Client, CommandError
from tests.unit import test_cli
from tests.unit.test_cli import FakeAgent, ok, rejected

# Fixtures shared with test_cli (re-bound here so pytest finds them in this module).
_no_system_config = test_cli._no_system_config
agent = test_cli.agent
short_dir = test_cli.short_dir


def test_methods_send_the_commands_of_the_protocol(agent: FakeAgent) -> None:
    with Client(agent.path, app="kiosk-ui") as client:
        client.track_event("tap")
        client.track_event("buy", {"sku": "H-42"}, timestamp=5.0, app="other")
        client.identify_customer({"registered": "j@example.com"})
        client.anonymize(project="payments", mapping={})
        client.anonymize({"project_token": "t"})
        client.app_foreground(app_version="2.4.1")
        client.track_payment(1.5, "EUR", "Virtual", "p", "Title")
        client.flush()
        client.status()
    assert agent.requests == [
        {"command": "track_event", "app": "kiosk-ui", "name": "tap"},
        {"command": "track_event", "app": "other", "name": "buy", "properties": {"sku": "H-42"},
         "timestamp": 5.0},
        {"command": "identify_customer", "app": "kiosk-ui", "ids": {"registered": "j@example.com"}},
        {"command": "anonymize", "app": "kiosk-ui", "project": "payments", "mapping": {}},
        {"command": "anonymize", "app": "kiosk-ui", "project": {"project_token": "t"}},
        {"command": "app_foreground", "app": "kiosk-ui", "app_version": "2.4.1"},
        {"command": "track_payment", "app": "kiosk-ui", "item": {
            "value": 1.5, "currency": "EUR", "payment_system": "Virtual", "product_id": "p",
            "product_title": "Title"}},
        {"command": "flush", "wait": False},
        {"command": "status"},
    ]
    assert agent.connections == 1


def test_a_refusal_carries_code_message_and_details(agent: FakeAgent) -> None:
    agent.responder = lambda request: {"ok": False, "request_id": "r1", "error": {
        "code": "invalid_command", "message": "name: too long",
        "details": [{"field": "name", "reason": "too long"}]}}
    with Client(agent.path) as client, pytest.raises(CommandError) as refused:
        client.track_event("x" * 200)
    error = refused.value
    assert (error.code, error.message, error.request_id) == (
        "invalid_command", "name: too long", "r1")
    assert error.details == [{"field": "name", "reason": "too long"}]
    assert str(error) == "invalid_command: name: too long"


def test_shutting_down_is_a_refusal_an_app_retries_like_a_missing_agent(
    agent: FakeAgent,
) -> None:
    agent.responder = rejected("unavailable", "the agent is shutting down")
    with Client(agent.path) as client:
        with pytest.raises(AgentUnavailable) as later:
            client.track_event("x")
        assert isinstance(later.value, CommandError) and later.value.code == "unavailable"


def test_an_unreadable_reply_is_agent_unavailable_and_the_next_call_reconnects(
    agent: FakeAgent,
) -> None:
    def garbage(request: dict[str, Any]) -> Any:
        return "not a reply"

    agent.responder = garbage
    client = Client(agent.path)
    with pytest.raises(AgentUnavailable, match="unreadable reply"):
        client.status()
    agent.responder = ok({"online": True})
    assert client.status() == {"online": True}
    assert agent.connections == 2
    client.close()


def test_a_silent_agent_times_out(short_dir: Path) -> None:
    mute = short_dir / "mute.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(mute))
    server.listen(1)  # accepts (in the backlog) but never answers
    try:
        with Client(mute, timeout=0.2) as client, pytest.raises(AgentUnavailable) as silent:
            client.status()
    finally:
        server.close()
    assert silent.value.timed_out and not silent.value.offline
    assert str(silent.value).endswith("did not reply within 0.2 s")
