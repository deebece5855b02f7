"""The pure part of `engagement-agent fleet`: one status document → one device's line."""

from __future__ import annotations

import json
from typing import Any

from agent.cli.fleet import device_row, fleet_table, sort_rows

NOW = 1_800_000_000.0


def row(document: Any, now: float = NOW) -> dict[str, Any]:
    return device_row("d", json.dumps(document).encode(), now)


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
                   "clock_synchronized": None, "status_age": None}
    assert device_row("d", b"[1]", NOW)["error"] == "unreadable status message"
    assert device_row("d", b" " * (2 * 1024 * 1024), NOW)["error"] == "unreadable status message"
    assert device_row("d", b"[" * 100_000, NOW)["error"] == "unreadable status message"
    overflowing = b'{"as_of": -Infinity, "clock": {"synchronized": true, "skew": NaN}, ' \
        b'"queue": {"items": 1, "oldest_age": 5.0, "bytes": 1e999}, "online": true}'
    infinite = device_row("d", overflowing, NOW)
    assert (infinite["status_age"], infinite["oldest_age"]) == (None, 5.0)
    huge = row({"as_of": 10**400, "clock": {"synchronized": True},
                "queue": {"items": 10**30, "oldest_age": 1.7e308},
                "sync": {"projects": [{"state": "ok", "last_success": -1e300}]}})
    assert (huge["status_age"], huge["queue_items"], huge["oldest_age"],
            huge["last_success"]) == (None, None, None, None)
    assert fleet_table([huge, infinite], NOW)  # and the table renders them


def synced(
    as_of: float, oldest: float | None, synchronized: bool = True, skew: float | None = None
) -> dict[str, Any]:
    return {"online": True, "as_of": as_of,
            "clock": {"synchronized": synchronized, "skew": skew},
            "queue": {"items": 0 if oldest is None else 3, "oldest_age": oldest}}


def test_the_oldest_age_is_brought_forward_to_now_on_a_synchronized_clock() -> None:
    aged = row(synced(NOW - 120.0, 60.0))
    assert (aged["status_age"], aged["oldest_age"]) == (120.0, 180.0)
    assert row(synced(NOW - 120.0, None))["oldest_age"] is None  # an empty queue stays empty
    # An unsynchronized device clock says nothing about when: shown as the device made it.
    assert row(synced(NOW - 120.0, 60.0, synchronized=False))["oldest_age"] == 60.0
    assert row(synced(NOW - 120.0, 60.0, synchronized=False))["status_age"] is None
    # This machine's clock behind the device's: no negative age.
    assert row(synced(NOW + 50.0, 60.0))["oldest_age"] == 60.0
    # By at most one heartbeat interval: a wrong clock here cannot age a queue by hours.
    stale = row(synced(NOW - 7200.0, 60.0))
    assert (stale["status_age"], stale["oldest_age"]) == (7200.0, 360.0)
    # A device clock NTP calls synchronized but the API found 30 s behind: its as_of is too.
    assert row(synced(NOW - 120.0, 60.0, skew=30.0))["status_age"] == 90.0


def test_a_status_older_than_a_heartbeat_is_flagged_in_the_table() -> None:
    """Online but silent: a dead bridge between a site's broker and this one, or a network
    that failed without a last will yet. The operator must see that the line is old."""
    old, fresh = row(synced(NOW - 7200.0, 60.0)), row(synced(NOW - 200.0, 60.0))
    old["device_id"] = "old"
    lines = fleet_table([fresh, old], NOW).splitlines()
    assert lines[1].endswith("synced") and "status" not in lines[1]
    assert lines[2].split()[0] == "old" and lines[2].endswith("(status 2h old)")


def test_offline_first_then_unknown_then_online() -> None:
    rows = [{"device_id": d, "online": o} for d, o in
            (("b", True), ("a", True), ("z", False), ("c", None), ("y", False))]
    assert [r["device_id"] for r in sort_rows(rows)] == ["y", "z", "c", "a", "b"]
