"""What sync tells the journal about a project (agent/sync/journal.py, docs/sync.md "Logging"):
the `Change` values come from a real `Schedule`, the rate limits run on a test clock."""

from __future__ import annotations

import logging

import pytest

from agent.sync.journal import LOG_INTERVAL, Journal, label
from agent.sync.schedule import Kind, Outcome, Schedule, Settings

SETTINGS = Settings(max_backoff=300.0, probe_interval=15.0)
TOKEN = "proj-a-0123456789"


class Rig:
    """A schedule and a journal fed the way a worker feeds them."""

    def __init__(self) -> None:
        self.now = 0.0
        self.schedule = Schedule()
        self.journal = Journal(label("https://api.example.com", TOKEN), lambda: self.now)

    def fail(self, outcome: Outcome) -> None:
        change = self.schedule.record(outcome, self.now, SETTINGS, 0.5)
        attempts = self.schedule.failures + self.schedule.unreachable
        self.journal.failed(outcome, change, attempts, SETTINGS.max_backoff)

    def deliver(self) -> None:
        self.journal.delivered(self.schedule.record(Outcome(Kind.DELIVERED), self.now, SETTINGS, 0))


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="engagement_agent.sync")
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_a_project_is_named_by_host_and_token_prefix_never_the_whole_token() -> None:
    assert label("https://api.example.com/", TOKEN) == "api.example.com project proj…"
    assert label("http://10.0.0.5:8080", "") == "10.0.0.5 (unconfigured project)"


def test_a_run_of_failures_is_logged_once_a_minute_with_a_count(
    lines: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    for _ in range(3):
        rig.fail(Outcome(Kind.API_TROUBLE, "HTTP 503"))
    assert messages(lines) == [
        (
            "WARNING",
            "sync for api.example.com project proj… failed (HTTP 503, 1 attempt(s) in a row)"
            "; retrying in 0.5 s",
        )
    ]
    rig.now += LOG_INTERVAL
    rig.fail(Outcome(Kind.API_TROUBLE, "HTTP 503"))
    assert len(lines.records) == 2
    assert "4 attempt(s) in a row" in lines.records[1].getMessage()
    assert "(repeated 2 times in the last 60 s)" in lines.records[1].getMessage()
    assert TOKEN not in lines.text


def test_a_new_reason_is_logged_at_once(lines: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    rig.fail(Outcome(Kind.API_TROUBLE, "HTTP 503"))
    rig.fail(Outcome(Kind.API_TROUBLE, "no answer within 30 s"))
    assert [m for _, m in messages(lines)][1].startswith(
        "sync for api.example.com project proj… failed (no answer within 30 s, 2 attempt(s)"
    )


def test_the_recovery_is_logged_and_the_next_failure_is_news_again(
    lines: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    rig.fail(Outcome(Kind.UNREACHABLE, "cannot connect: connection refused"))
    rig.fail(Outcome(Kind.UNREACHABLE, "cannot connect: connection refused"))
    rig.deliver()
    rig.fail(Outcome(Kind.UNREACHABLE, "cannot connect: connection refused"))
    assert messages(lines)[1:] == [
        ("INFO", "sync for api.example.com project proj… recovered after 2 failed attempt(s)"),
        (
            "WARNING",
            "sync for api.example.com project proj… cannot reach the API (cannot connect: "
            "connection refused, 1 attempt(s) in a row); retrying in 15.0 s",
        ),
    ]


@pytest.mark.parametrize(
    "reason",
    ["HTTP 401: Could not authenticate", "paused: HTTP 401: Could not authenticate"],
    ids=["probe", "batch"],
)
def test_a_pause_is_logged_once_and_its_end_at_info(
    lines: pytest.LogCaptureFixture, reason: str
) -> None:
    rig = Rig()
    for _ in range(3):
        rig.fail(Outcome(Kind.REFUSED, reason))
    rig.deliver()
    assert messages(lines) == [
        (
            "WARNING",
            "sync for api.example.com project proj… paused: HTTP 401: Could not authenticate; "
            "its items are kept, retrying every 300 s and after a config reload",
        ),
        ("INFO", "sync for api.example.com project proj… resumed: the API accepts the credentials"),
    ]


def test_store_failures_are_errors_and_their_end_says_how_many_were_held_back(
    lines: pytest.LogCaptureFixture,
) -> None:
    journal = Journal("api.example.com project proj…", lambda: 0.0)
    for attempt in (1, 2, 3):
        journal.store_failed("cannot record the API's answer: disk full", 1.5, attempt)
    journal.store_recovered(3)
    assert messages(lines) == [
        (
            "ERROR",
            "sync for api.example.com project proj…: cannot record the API's answer: disk full; "
            "the items stay queued and are sent again in 1.5 s (1 attempt(s) in a row)",
        ),
        (
            "INFO",
            "sync for api.example.com project proj…: the API's answers are recorded again after "
            "3 failed attempt(s) (2 more failures were not logged)",
        ),
    ]
