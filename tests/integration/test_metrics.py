"""Metrics from the running agent: the textfile node_exporter reads, and `engagement-agent
metrics`, both parsed back with prometheus_client's text parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.daemon import REPO, AgentProcess, wait_for


def values(text: str) -> dict[str, float]:
    return {
        s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_agent_writes_the_textfile_and_keeps_it_current(
    make_agent: Any, tmp_path: Path
) -> None:
    textfile = tmp_path / "node-exporter" / "engagement_agent.prom"
    textfile.parent.mkdir()
    agent: AgentProcess = make_agent({
        "metrics": {"textfile": str(textfile), "interval": 1.0},
        "sync": {"flush_mode": "manual"},
    })
    agent.start()

    def current() -> dict[str, float]:
        return values(textfile.read_text()) if textfile.exists() else {}

    wait_for(lambda: current().get("engagement_agent_queue_items") == 0, 30, "first textfile")
    assert agent.request({"command": "track_event", "name": "tap"})["ok"]
    wait_for(lambda: current().get("engagement_agent_queue_items") == 2, 30,
             "the tracked command (and the installation) in the textfile")
    metrics = current()
    assert metrics["engagement_agent_queue_bytes"] > 0
    assert metrics["engagement_agent_dead_letters"] == 0
    assert metrics["engagement_agent_dropped_total"] == 0
    assert "engagement_agent_mqtt_connected" not in metrics  # MQTT is off in this config
    assert metrics["engagement_agent_clock_synchronized"] in (0, 1)
    assert sorted(os.listdir(textfile.parent)) == ["engagement_agent.prom"]
    assert (textfile.stat().st_mode & 0o777) == 0o644


def test_a_reload_starts_and_stops_the_textfile(make_agent: Any, tmp_path: Path) -> None:
    textfile = tmp_path / "engagement_agent.prom"
    agent: AgentProcess = make_agent({"metrics": {"interval": 1.0}})
    agent.start()
    agent.reload({"metrics": {"textfile": str(textfile), "interval": 1.0}})
    wait_for(textfile.exists, 30, "the textfile after the reload")


def test_an_unwritable_textfile_is_a_warning_not_a_failure(
    make_agent: Any, tmp_path: Path
) -> None:
    agent: AgentProcess = make_agent({
        "metrics": {"textfile": str(tmp_path / "missing-dir" / "x.prom"), "interval": 1.0},
    })
    agent.start()
    wait_for(lambda: "metrics: cannot write" in agent.log(), 30, "the warning")
    assert agent.request({"command": "track_event", "name": "tap"})["ok"]


def test_metrics_verb_prints_the_running_agents_metrics(make_agent: Any) -> None:
    agent: AgentProcess = make_agent({"sync": {"flush_mode": "manual"}})
    agent.start()
    assert agent.request({"command": "track_event", "name": "tap"})["ok"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGAGEMENT_AGENT_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "metrics", "--socket", str(agent.socket_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    metrics = values(done.stdout)
    assert metrics["engagement_agent_queue_items"] == 2
    assert metrics["engagement_agent_queue_max_bytes"] > 0
    # The tracked command (the status request is counted once it has been answered).
    assert metrics["engagement_agent_commands_total{result=ok}{transport=socket}"] == 1
