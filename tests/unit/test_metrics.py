"""The status document as Prometheus metrics, read back with prometheus_client's own parser
(what Prometheus and node_exporter would make of it)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import ConfigError, load_config
from agent.metrics import render, write_textfile
from tests.unit.test_cli import REPO, STATUS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: bytes) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def types(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}


FULL: dict[str, Any] = {
    **STATUS,
    "sync": {"projects": [
        {"project_token": "tok-1", "base_url": "https://a", "state": "backoff",
         "last_success": 1714564800.5, "sent": 40},
        {"project_token": "tok-1", "base_url": "https://b", "state": "ok",
         "last_success": 1714564900.0, "sent": 2},
        {"project_token": "tok-2", "state": "paused", "last_success": None, "sent": 0},
    ]},
    "mqtt": {"enabled": True, "connected": True},
    "commands": {"socket": {"ok": 120, "invalid_command": 3}, "mqtt": {"ok": 7}},
    "clock": {"synchronized": False},
}


def test_every_documented_metric_with_its_value() -> None:
    got = samples(render(FULL))
    p = "engagement_agent_"
    assert got[(p + "queue_items", ())] == 12
    assert got[(p + "queue_bytes", ())] == 5120
    assert got[(p + "queue_max_bytes", ())] == 104857600
    assert got[(p + "queue_oldest_age_seconds", ())] == 305.0
    assert got[(p + "dropped_total", ())] == 1
    assert got[(p + "rejected_total", ())] == 2
    assert got[(p + "dead_letters", ())] == 3
    # One label set per project token: two URLs of one project are combined.
    assert got[(p + "sent_total", (("project", "tok-1"),))] == 42
    assert got[(p + "sent_total", (("project", "tok-2"),))] == 0
    assert got[(p + "sync_state", (("project", "tok-1"), ("state", "backoff")))] == 1
    assert got[(p + "sync_state", (("project", "tok-1"), ("state", "ok")))] == 0
    assert got[(p + "sync_state", (("project", "tok-2"), ("state", "paused")))] == 1
    assert sum(v for (name, labels), v in got.items()
               if name == p + "sync_state" and ("project", "tok-2") in labels) == 1
    assert got[(p + "last_success_timestamp_seconds", (("project", "tok-1"),))] == 1714564900.0
    assert (p + "last_success_timestamp_seconds", (("project", "tok-2"),)) not in got  # never
    assert got[(p + "mqtt_connected", ())] == 1
    assert got[(p + "commands_total", (("result", "ok"), ("transport", "socket")))] == 120
    assert got[(p + "commands_total",
                (("result", "invalid_command"), ("transport", "socket")))] == 3
    assert got[(p + "commands_total", (("result", "ok"), ("transport", "mqtt")))] == 7
    assert got[(p + "clock_synchronized", ())] == 0
    kinds = types(render(FULL))
    assert kinds[p + "dropped"] == kinds[p + "commands"] == kinds[p + "sent"] == "counter"
    assert kinds[p + "queue_items"] == kinds[p + "sync_state"] == "gauge"


def test_what_the_status_lacks_is_left_out_not_zero() -> None:
    sparse = {"online": True, "queue": {"items": 0, "oldest_age": None},
              "mqtt": {"enabled": False, "connected": False}}
    got = samples(render(sparse))
    names = {name for name, _ in got}
    assert got[("engagement_agent_queue_oldest_age_seconds", ())] == 0  # empty: not behind
    assert "engagement_agent_mqtt_connected" not in names  # MQTT disabled
    assert "engagement_agent_clock_synchronized" not in names
    assert not any(name.startswith("engagement_agent_commands") for name in names)
    assert "engagement_agent_queue_bytes" not in names


def test_hostile_values_do_not_break_the_format() -> None:
    weird = {"queue": {"items": "many"}, "sync": {"projects": [
        {"project_token": 'to"k\n\\', "state": "new-state", "sent": 1}, "junk"]},
        "commands": {"socket": {"ok": "x", 'we"ird': 1}, "mqtt": []}}
    got = samples(render(weird))
    assert got[("engagement_agent_sent_total", (("project", 'to"k\n\\'),))] == 1
    assert got[("engagement_agent_sync_state",
                (("project", 'to"k\n\\'), ("state", "new-state")))] == 1
    assert got[("engagement_agent_commands_total",
                (("result", 'we"ird'), ("transport", "socket")))] == 1


def test_the_textfile_is_replaced_whole_and_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "engagement_agent.prom"
    write_textfile(path, b"first\n")
    write_textfile(path, render(FULL))
    assert samples(path.read_bytes())[("engagement_agent_queue_items", ())] == 12
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["engagement_agent.prom"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "engagement_agent.prom"
    write_textfile(path, b"old\n")
    with pytest.raises(TypeError):
        write_textfile(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["engagement_agent.prom"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [("metrics.prom", "absolute"), ("/var/lib/x/metrics.txt", ".prom")],
)
def test_textfile_must_be_an_absolute_prom_path(
    tmp_path: Path, value: str, reason: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[metrics]\ntextfile = "{value}"\n')
    with pytest.raises(ConfigError) as bad:
        load_config(config)
    assert [key for key, _ in bad.value.problems] == ["metrics.textfile"]
    assert reason in bad.value.problems[0][1]


def test_the_agent_does_not_import_prometheus_client_unless_asked() -> None:
    """An agent without metrics.textfile keeps its memory: the library is loaded on first use."""
    code = "import sys, agent.daemon, agent.metrics; print('prometheus_client' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_the_documented_alert_rules_use_metrics_the_agent_writes() -> None:
    """docs/operations.md's alert rules parse, and every engagement_agent_* name in them is
    one `render` produces (a typo there would make an alert that never fires)."""
    import re

    import yaml

    text = (REPO / "docs" / "operations.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    rules = yaml.safe_load(block)["groups"][0]["rules"]
    produced = {name for name, _ in samples(render(FULL))}
    used = {name for rule in rules for name in re.findall(r"engagement_agent_\w+", rule["expr"])}
    assert len(rules) >= 4 and used and used <= produced
