"""The pure part of `engagement-agent fleet`: one status document → one device's line."""

from __future__ import annotations

import json
from typing import Any

from agent.cli.fleet import device_row, sort_rows


def row(document: Any) -> dict[str, Any]:
    return device_row("d", json.dumps(document).encode())


def projects(*states: tuple[str, float | None]) -> dict[str, Any]:
    return {"online": True, "sync": {"projects": [
        {"project_token": f"t{i}", "state": state, "last_success": last}
        for i, (state, last) in enumerate(states)]}}


def test_the_worst_state_wins_in_the_documented_order() -> None:
    order = ["paused", "backoff", "unconfigured", "ok", "idle"]
    for worst, *better in (order[i:] for i in range(len(order))):
        states = [(state, 1.0) for state in [*better, worst]]
        assert row(projects(*states))["sync_state"] == worst


def test_last_success_is_the_worst_projects_and_never_beats_a_time() -> None:
    assert row(projects(("ok", 50.0), ("backoff", 10.0)))["last_success"] == 10.0
    assert row(projects(("backoff", 10.0), ("backoff", None)))["last_success"] is None
    assert row(projects(("backoff", 10.0), ("backoff", 5.0)))["last_success"] == 5.0


def test_no_projects_yet_is_idle_but_no_sync_section_is_unknown() -> None:
    assert row({"online": True, "sync": {"projects": []}})["sync_state"] == "idle"
    assert row({"online": True})["sync_state"] is None


def test_wrong_types_from_a_hostile_broker_become_nulls() -> None:
    bad = row({"online": "yes", "version": 3, "queue": {"items": True, "oldest_age": "old"},
               "sync": {"projects": ["x", {"state": 5}]}, "clock": {"synchronized": 1}})
    assert bad == {"device_id": "d", "online": None, "version": None, "queue_items": None,
                   "oldest_age": None, "sync_state": "idle", "last_success": None,
                   "clock_synchronized": None}
    assert device_row("d", b"[1]")["error"] == "unreadable status message"
    assert device_row("d", b" " * (2 * 1024 * 1024))["error"] == "unreadable status message"


def test_offline_first_then_unknown_then_online() -> None:
    rows = [{"device_id": d, "online": o} for d, o in
            (("b", True), ("a", True), ("z", False), ("c", None), ("y", False))]
    assert [r["device_id"] for r in sort_rows(rows)] == ["y", "z", "c", "a", "b"]
