"""`engagement-agent queue ...`: live through the socket, and offline on a real database file."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import QueueConfig
from agent.store import Store
from agent.tracker.model import OutboundItem, Project
from tests.unit import test_cli
from tests.unit.test_cli import FakeAgent, Run, ok

# Fixtures shared with test_cli (re-bound here so pytest finds them in this module).
_no_system_config = test_cli._no_system_config
agent = test_cli.agent
cli = test_cli.cli
short_dir = test_cli.short_dir


def queued_item(**changes: Any) -> dict[str, Any]:
    """An item as the agent lists it, queued 1 h 2 min before now (ages are shown relative to
    the moment the CLI renders, so the time is taken when the test runs, not at import)."""
    item = {"id": 7, "project_token": "0b7e-tok", "base_url": "https://api.example.com",
            "app": "kiosk-ui", "kind": "purchase", "created_at": time.time() - 3725,
            "size": 120, "held": False}
    return {**item, **changes}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


# -- live ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["list"], {"command": "queue_list"}),
        (["list", "--limit", "2", "--after", "5"], {"command": "queue_list", "limit": 2,
                                                    "after_id": 5}),
        (["show", "3"], {"command": "queue_show", "id": 3}),
        (["dead-letters", "--limit", "10"], {"command": "queue_dead_letters", "limit": 10}),
        (["retry-dead"], {"command": "queue_retry_dead"}),
        (["retry-dead", "4", "9"], {"command": "queue_retry_dead", "ids": [4, 9]}),
        (["purge", "--yes"], {"command": "queue_purge", "dead": False}),
        (["purge", "--dead", "--yes"], {"command": "queue_purge", "dead": True}),
        (["purge", "--project", "0b7e-tok", "--yes"],
         {"command": "queue_purge", "dead": False, "project_token": "0b7e-tok"}),
    ],
)
def test_live_queue_commands(
    cli: Run, agent: FakeAgent, argv: list[str], expected: dict[str, Any]
) -> None:
    code, _, err = cli("queue", *argv)
    assert (code, err) == (0, "")
    assert agent.requests == [expected]


def test_live_list_says_what_each_item_is(cli: Run, agent: FakeAgent) -> None:
    """Project token (never an internal number), app, kind, age, size: enough to act on."""
    customer = queued_item(id=8, app=None, kind="customer", size=2048, held=True)
    agent.responder = ok({"items": [queued_item(), customer]})
    code, out, _ = cli("queue", "list", "--limit", "2")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["ID", "PROJECT", "APP", "KIND", "AGE", "SIZE"]
    assert lines[1].split() == ["7", "0b7e-tok", "kiosk-ui", "purchase", "1h", "2m", "120", "B"]
    assert lines[2].split()[:8] == ["8", "0b7e-tok", "-", "customer", "1h", "2m", "2.0", "KiB"]
    assert lines[2].endswith("held: waiting for the true time")
    assert lines[-1] == "(more: engagement-agent queue list --after 8)"


def test_live_list_json_is_the_objects(cli: Run, agent: FakeAgent) -> None:
    item = queued_item()
    agent.responder = ok({"items": [item]})
    code, out, err = cli("queue", "list", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"items": [item]}


def test_live_dead_letters_show_the_apis_reason(cli: Run, agent: FakeAgent) -> None:
    dead = queued_item(failed_at=time.time() - 60, reason="invalid customer_ids")
    agent.responder = ok({"dead_letters": [dead]})
    code, out, _ = cli("queue", "dead-letters")
    lines = out.splitlines()
    assert code == 0 and "(more" not in out
    assert lines[0].split() == ["ID", "PROJECT", "APP", "KIND", "AGE", "SIZE", "FAILED",
                                "REASON"]
    assert lines[1].split()[:4] == ["7", "0b7e-tok", "kiosk-ui", "purchase"]
    assert lines[1].endswith("ago  invalid customer_ids")


def test_live_show_prints_the_payload(cli: Run, agent: FakeAgent) -> None:
    payload = {"name": "customers/events", "data": {"event_type": "door_opened"}}
    agent.responder = ok(queued_item(payload=json.dumps(payload)))
    code, out, _ = cli("queue", "show", "7")
    assert code == 0
    head, body = out.split("payload:\n", 1)
    assert head.splitlines()[:4] == [
        "id:       7", "project:  0b7e-tok @ https://api.example.com", "app:      kiosk-ui",
        "kind:     purchase"]
    assert json.loads(body) == payload


def test_purge_dead_and_project_together_is_a_usage_error(cli: Run, agent: FakeAgent) -> None:
    code, _, err = cli("queue", "purge", "--dead", "--project", "t", "--yes")
    assert code == 64 and "not both" in err
    assert agent.requests == []


def test_purge_of_a_project_names_it_when_asking(
    cli: Run, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    agent.responder = ok({"purged": 5})
    code, out, err = cli("queue", "purge", "--project", "0b7e-tok")
    assert (code, out) == (0, "deleted 5 queued items\n")
    assert "Delete every queued item of project 0b7e-tok (they will never be sent)?" in err


def test_live_show_of_a_missing_item_exits_1(cli: Run, agent: FakeAgent) -> None:
    agent.responder = lambda r: {"ok": False, "request_id": None, "error": {
        "code": "invalid_command", "message": "no queued item with id 99"}}
    code, _, err = cli("queue", "show", "99")
    assert code == 1 and err == (
        "engagement-agent: rejected (invalid_command): no queued item with id 99\n")


def test_live_admin_refusal_exits_1(cli: Run, agent: FakeAgent) -> None:
    agent.responder = lambda r: {"ok": False, "request_id": None, "error": {
        "code": "forbidden", "message": "queue maintenance needs root or the agent's own user"}}
    code, _, err = cli("queue", "list")
    assert code == 1 and "forbidden" in err


# -- purge confirmation ----------------------------------------------------------------------

def test_purge_without_a_terminal_needs_yes(
    cli: Run, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", _Pipe("y\n"))
    code, out, err = cli("queue", "purge")
    assert (code, out) == (64, "")
    assert "pass --yes" in err and err.count("\n") == 1
    assert agent.requests == []


def test_purge_asks_on_a_terminal(
    cli: Run, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    agent.responder = ok({"purged": 3})
    code, out, err = cli("queue", "purge", "--dead")
    assert (code, out) == (0, "deleted 3 dead letters\n")
    assert "Delete every dead letter?" in err
    assert agent.requests == [{"command": "queue_purge", "dead": True}]


def test_purge_declined_sends_nothing(
    cli: Run, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", _Terminal("\n"))
    code, _, err = cli("queue", "purge")
    assert code == 1 and err.endswith("engagement-agent: not purged\n")
    assert agent.requests == []


# -- offline, on a real database -------------------------------------------------------------

PROJECT = Project("tok-1", "secret")


def _event(name: str) -> OutboundItem:
    payload = {"name": "customers/events",
               "data": {"customer_ids": {"cookie": "c"}, "event_type": name,
                        "timestamp": 1714564800.0, "properties": {}}}
    return OutboundItem(PROJECT, "track_event", payload)


@pytest.fixture
def offline(short_dir: Path) -> Iterator[tuple[Path, Store]]:
    """A config whose socket nobody listens on, and a queue with three items, one of them
    dead-lettered. Yields the config path and an unopened Store for checking afterwards."""
    db = short_dir / "queue.db"
    config = short_dir / "agent.toml"
    config.write_text(f'[socket]\npath = "{short_dir}/stopped.sock"\n[queue]\npath = "{db}"\n')
    store = Store(QueueConfig(path=db))
    store.open()
    try:
        store.submit(lambda t: t.enqueue([_event("a"), _event("b"), _event("c")], 1.0)).result()
        first = store.list_items(1)[0].id
        store.submit(lambda t: t.dead_letter([(first, "invalid event")], 2.0)).result()
    finally:
        store.close()
    yield config, Store(QueueConfig(path=db))


NOTE = "engagement-agent: the agent is not running; working on"


def test_offline_list_and_json(cli: Run, offline: tuple[Path, Store]) -> None:
    config, _ = offline
    code, out, err = cli("queue", "list", "--config", str(config), socket=False)
    assert code == 0
    assert err.startswith(NOTE) and err.count("\n") == 1
    assert [line.split()[0] for line in out.splitlines()] == ["ID", "2", "3"]
    code, out, _ = cli("queue", "list", "--json", "--config", str(config), socket=False)
    result = json.loads(out)
    assert [item["id"] for item in result["items"]] == [2, 3]
    assert set(result["items"][0]) >= {"id", "project_token", "app", "kind", "size"}


def test_offline_show(cli: Run, offline: tuple[Path, Store]) -> None:
    config, _ = offline
    code, out, _ = cli("queue", "show", "2", "--config", str(config), socket=False)
    assert code == 0
    assert json.loads(out.split("payload:\n", 1)[1])["data"]["event_type"] == "b"
    code, _, err = cli("queue", "show", "99", "--config", str(config), socket=False)
    assert code == 1 and err.splitlines()[-1] == (
        "engagement-agent: rejected (invalid_command): no queued item with id 99")


def test_offline_dead_letters_retry_and_purge(cli: Run, offline: tuple[Path, Store]) -> None:
    config, store = offline
    args = ("--config", str(config))
    code, out, _ = cli("queue", "dead-letters", *args, socket=False)
    assert code == 0 and "invalid event" in out
    assert cli("queue", "retry-dead", *args, socket=False)[:2] == (
        0, "moved 1 dead letters back to the queue\n")
    assert cli("queue", "purge", "--yes", *args, socket=False)[:2] == (
        0, "deleted 3 queued items\n")
    assert cli("queue", "list", *args, socket=False)[1] == "no queued items\n"
    store.open()
    try:
        assert (store.stats().items, store.stats().dead_letters) == (0, 0)
    finally:
        store.close()


def test_offline_while_the_agent_holds_the_database(
    cli: Run, offline: tuple[Path, Store]
) -> None:
    config, store = offline
    store.open()  # stands in for a running agent whose socket is gone
    try:
        code, out, err = cli("queue", "list", "--config", str(config), socket=False)
    finally:
        store.close()
    assert (code, out) == (69, "")
    assert err.startswith("engagement-agent: the agent is running (it holds ")
    assert err.count("\n") == 1


def test_offline_without_a_database(cli: Run, short_dir: Path) -> None:
    config = short_dir / "agent.toml"
    config.write_text(f'[socket]\npath = "{short_dir}/stopped.sock"\n'
                      f'[queue]\npath = "{short_dir}/none.db"\n')
    code, _, err = cli("queue", "list", "--config", str(config), socket=False)
    assert code == 69
    assert "no queue database at" in err and err.count("\n") == 1
    assert not (short_dir / "none.db").exists()
