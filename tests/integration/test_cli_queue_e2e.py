"""The queue tools against the real daemon, read as an operator reads them: what each item
is (project token, app, kind), why the API refused a dead letter, one project purged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from agent_devtools.apistub import Match
from tests.fixtures.api import api_project
from tests.fixtures.daemon import REPO, AgentProcess


def cli(agent: AgentProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGAGEMENT_AGENT_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv, "--socket", str(agent.socket_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )


@pytest.fixture
def agent(make_agent: Any, api_stub: Any) -> AgentProcess:
    process: AgentProcess = make_agent(
        {"project": api_project(api_stub), "sync": {"flush_mode": "manual"}}
    )
    process.start()
    for command in (
        {"command": "track_event", "name": "purchase", "app": "kiosk-ui",
         "properties": {"price": "twelve"}},
        {"command": "identify_customer", "ids": {"registered": "j@example.com"},
         "app": "kiosk-ui"},
    ):
        assert process.request(command)["ok"]
    return process


def test_queue_list_says_what_each_item_is(agent: AgentProcess) -> None:
    listed = cli(agent, "queue", "list")
    assert (listed.returncode, listed.stderr) == (0, "")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "PROJECT", "APP", "KIND", "AGE", "SIZE"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("proj-a", "kiosk-ui", "installation"),
        ("proj-a", "kiosk-ui", "purchase"),
        ("proj-a", "kiosk-ui", "customer"),
    ]

    as_json = cli(agent, "queue", "list", "--json")
    items = json.loads(as_json.stdout)["items"]
    assert [item["kind"] for item in items] == ["installation", "purchase", "customer"]
    assert {"id", "project_token", "base_url", "app", "kind", "created_at", "size"} <= set(
        items[0]
    )

    shown = cli(agent, "queue", "show", str(items[1]["id"]))
    assert shown.returncode == 0
    assert "kind:     purchase" in shown.stdout
    payload = json.loads(shown.stdout.split("payload:\n", 1)[1])
    assert payload["data"]["event_type"] == "purchase"
    assert payload["data"]["properties"]["price"] == "twelve"


def test_dead_letters_show_the_apis_reason(agent: AgentProcess, api_stub: Any) -> None:
    api_stub.fail_commands(Match(event_type="purchase"), "Property 'price' must be a number")
    flushed = cli(agent, "flush", "--wait")
    assert flushed.returncode == 0, flushed.stderr
    dead = cli(agent, "queue", "dead-letters")
    assert dead.returncode == 0
    lines = dead.stdout.splitlines()
    assert lines[0].split()[-2:] == ["FAILED", "REASON"]
    assert len(lines) == 2
    assert lines[1].split()[1:4] == ["proj-a", "kiosk-ui", "purchase"]
    assert "Property 'price' must be a number" in lines[1]


def test_purge_one_project(agent: AgentProcess) -> None:
    purged = cli(agent, "queue", "purge", "--project", "proj-a", "--yes")
    assert (purged.returncode, purged.stdout) == (0, "deleted 3 queued items\n")
    assert cli(agent, "queue", "list").stdout == "no queued items\n"
