"""The daemon's lifecycle as systemd sees it: notify messages, reload, stop, exit codes."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import api_project
from tests.fixtures.daemon import AgentProcess, cli, wait_for


def test_notify_protocol_ready_status_watchdog_stopping(make_agent: Any) -> None:
    agent: AgentProcess = make_agent()
    agent.start(env={"WATCHDOG_USEC": "400000"})  # asks for a ping every 0.2 s
    assert agent.socket_path.exists()
    assert agent.request({"command": "status"})["ok"]  # READY=1 came after the socket listened
    agent.wait_notification("STATUS=queue")
    before = agent.count("WATCHDOG=1")
    wait_for(lambda: agent.count("WATCHDOG=1") >= before + 3, 10, "periodic WATCHDOG=1")
    assert agent.terminate() == 0
    agent.wait_notification("STOPPING=1")
    assert not agent.socket_path.exists()


def test_sigterm_finishes_and_exits_zero_keeping_everything(
    make_agent: Any, api_stub: ApiStub
) -> None:
    agent: AgentProcess = make_agent(
        {
            "project": api_project(api_stub),
            "sync": {"flush_mode": "manual"},
        }
    )
    agent.start()
    with agent.client() as client:
        for i in range(50):
            assert client.request({"command": "track_event", "name": "e", "properties": {"i": i}})[
                "ok"
            ]
    assert agent.terminate() == 0
    # The last bounded flush on SIGTERM sent what was queued.
    received = [r for r in api_stub.received("proj-a") if r.data.get("event_type") == "e"]
    assert sorted(r.data["properties"]["i"] for r in received) == list(range(50))


def test_reload_applies_changes_and_refuses_a_bad_file(make_agent: Any) -> None:
    agent: AgentProcess = make_agent({"apps": {"allow_unknown": True}})
    agent.start()
    assert agent.request({"command": "track_event", "name": "x", "app": "newcomer"})["ok"]
    agent.write_config({"apps": {"allow_unknown": False}})
    result = cli("reload", "--config", str(agent.config_path), "--socket", str(agent.socket_path))
    assert result.returncode == 0, result.stderr
    reply = agent.request({"command": "track_event", "name": "x", "app": "stranger"})
    assert reply["error"]["code"] == "unknown_app"

    agent.write_config({"sync": {"batch_size": 500}})
    result = cli("reload", "--config", str(agent.config_path), "--socket", str(agent.socket_path))
    assert result.returncode == 78
    assert "batch_size" in result.stderr
    assert agent.status()["config"]["reload_error"] is None  # nothing was sent to the agent


def test_sighup_with_an_invalid_file_keeps_the_running_config(make_agent: Any) -> None:
    agent: AgentProcess = make_agent()
    agent.start()
    agent.config_path.write_text("this is = not [toml")
    agent.notifications.clear()
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_notification("READY=1")
    status = agent.status()
    assert status["config"]["reload_error"]
    assert agent.request({"command": "track_event", "name": "still-works"})["ok"]


def test_reload_cannot_raise_the_line_limit_past_what_the_running_socket_admits(
    make_agent: Any,
) -> None:
    """Socket settings apply at restart only: a file that lowers socket.max_connections and
    raises limits.max_command_bytes is valid, but the running agent still admits the old
    number of connections, each with a partial line of the new size."""
    agent: AgentProcess = make_agent(
        {"socket": {"max_connections": 256}, "limits": {"max_command_bytes": 65536}}
    )
    agent.start()
    agent.write_config(
        {"socket": {"max_connections": 16}, "limits": {"max_command_bytes": 1024 * 1024}}
    )
    assert cli("check-config", "--config", str(agent.config_path)).returncode == 0
    agent.notifications.clear()
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_notification("READY=1")
    error = agent.status()["config"]["reload_error"]
    assert error.startswith("limits.max_command_bytes: with the running socket.max_connections")
    assert "socket.max_connections (256) × limits.max_command_bytes (1048576)" in error
    big = {"command": "track_event", "name": "big", "properties": {"blob": "x" * 100_000}}
    assert agent.request(big)["error"]["code"] == "too_large"  # the running limit holds


def test_invalid_config_exits_78_listing_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[sync]\nflush_mode = "sometimes"\nbatch_size = 51\n[queue]\nmax_bytes = 10\n'
        "[apps.kiosk-ui]\nsession_timeout = 0.1\n"
    )
    for verb in ("run", "check-config"):
        result = cli(verb, "--config", str(config))
        assert result.returncode == 78, result.stderr
        for key in ("sync.flush_mode", "sync.batch_size", "queue.max_bytes"):
            assert key in result.stderr
        assert "apps.kiosk-ui.session_timeout" in result.stderr


def test_second_agent_on_the_same_database_refuses_to_start(make_agent: Any) -> None:
    first: AgentProcess = make_agent(name="first")
    first.start()
    second: AgentProcess = make_agent({"queue": {"path": str(first.db_path)}}, name="second")
    second.start(wait_ready=False)
    assert second.process is not None
    assert second.process.wait(30) != 0
    assert "queue.db" in second.log()
    assert first.request({"command": "status"})["ok"]


def test_environment_overrides_reach_the_running_agent(make_agent: Any) -> None:
    agent: AgentProcess = make_agent({"device_id": "from-file"})
    agent.start(env={"ENGAGEMENT_AGENT_DEVICE_ID": "from-env"})
    assert agent.status()["device_id"] == "from-env"


def test_reload_rearms_session_timers_with_the_new_timeout(
    make_agent: Any, api_stub: ApiStub
) -> None:
    agent: AgentProcess = make_agent(
        {
            "project": api_project(api_stub),
            "apps": {"defaults": {"session_timeout": 300.0}},
        }
    )
    agent.start()
    assert agent.request({"command": "app_foreground"})["ok"]
    assert agent.request({"command": "app_background"})["ok"]
    agent.reload({"apps": {"defaults": {"session_timeout": 1.0}}})
    wait_for(
        lambda: any(r.data.get("event_type") == "session_end" for r in api_stub.received()),
        15,
        "session_end after the timeout was shortened",
    )


def test_waiting_flushes_cannot_block_reload_or_shutdown(
    make_agent: Any, api_stub: ApiStub
) -> None:
    agent: AgentProcess = make_agent(
        {
            "project": api_project(api_stub),
            "sync": {"flush_mode": "manual", "timeout": 60.0},
        }
    )
    agent.start()
    assert agent.request({"command": "track_event", "name": "x"})["ok"]
    api_stub.hang_next(None, 60.0)  # the API accepts connections and never answers
    try:
        with agent.client() as client:
            for _ in range(16):
                client.send_line(b'{"command": "flush", "wait": true}')
            result = cli(
                "reload", "--config", str(agent.config_path), "--socket", str(agent.socket_path)
            )
            assert result.returncode == 0, result.stderr
            assert agent.terminate(timeout=20) == 0
    finally:
        api_stub.release_hangs()
