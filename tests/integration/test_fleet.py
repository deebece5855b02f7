"""`engagement-agent fleet` against a real Mosquitto holding retained statuses, as an operator
runs it during an incident: which devices are offline, which are stuck, since when."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from tests.fixtures.daemon import REPO, AgentProcess, wait_for
from tests.fixtures.mosquitto import MosquittoBroker, free_port
from tests.fixtures.rabbitmq import RabbitMQNode
from tests.unit import test_cli

# The machine's /etc config and environment stay out (fixtures shared with test_cli).
_no_system_config = test_cli._no_system_config
short_dir = test_cli.short_dir

#: When the statuses were published: set by `fleet` (a suite under load may reach a test
#: minutes after import, and the table shows ages to the minute).
NOW = time.time()


def status(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "online": True,
        "version": "0.2.0",
        "uptime": 100.0,
        "as_of": NOW,
        "queue": {"items": 0, "bytes": 0, "max_bytes": 100, "dropped": 0, "dead_letters": 0,
                  "oldest_age": None},
        "sync": {"projects": [{"project_token": "t1", "state": "ok",
                               "last_success": NOW - 30}]},
        "mqtt": {"connected": True},
        "clock": {"synchronized": True},
    }
    document.update(overrides)
    return document


def publish_retained(broker: MosquittoBroker, topic: str, payload: bytes | str) -> None:
    data = payload.encode() if isinstance(payload, str) else payload
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-r",
         "-t", topic, "-s"],
        input=data, check=True, timeout=30,
    )  # fmt: skip


@pytest.fixture
def fleet(mosquitto: MosquittoBroker) -> MosquittoBroker:
    """Four devices as an operator finds them: healthy, stuck, gone, and broken."""
    global NOW
    NOW = time.time()
    publish_retained(mosquitto, "engagement/kiosk-001/status", json.dumps(status()))
    stuck = status(
        version="0.1.0",
        queue={"items": 1200, "oldest_age": 3725.0},
        sync={"projects": [
            {"project_token": "t1", "state": "backoff", "last_success": NOW - 600},
            {"project_token": "t2", "state": "paused", "last_success": NOW - 7200},
            {"project_token": "t3", "state": "ok", "last_success": NOW},
        ]},
        clock={"synchronized": False},
    )
    publish_retained(mosquitto, "engagement/kiosk-002/status", json.dumps(stuck))
    publish_retained(mosquitto, "engagement/kiosk-003/status", '{"online":false}')
    publish_retained(mosquitto, "engagement/kiosk-004/status", b"\xff not json")
    publish_retained(mosquitto, "engagement/kiosk-001/kiosk-ui/error", "{}")  # not a status
    publish_retained(mosquitto, "other/kiosk-009/status", json.dumps(status()))
    return mosquitto


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_one_line_per_device_offline_first(
    fleet: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "fleet", "--host", "127.0.0.1", "--port", str(fleet.port))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "ONLINE", "VERSION", "QUEUE", "OLDEST", "SYNC",
                                "LAST", "SUCCESS", "CLOCK"]
    assert [line.split()[0] for line in lines[1:5]] == [
        "kiosk-003", "kiosk-004", "kiosk-001", "kiosk-002"]
    assert lines[1].split() == ["kiosk-003", "OFFLINE", "-", "-", "-", "-", "-", "-"]
    assert "unreadable status" in lines[2]
    assert lines[3].split()[1:6] == ["online", "0.2.0", "0", "-", "ok"]
    assert lines[3].split()[-2:] == ["ago", "synced"]  # 30 s ago when published
    # The worst of its projects, and how long that one has been failing.
    assert lines[4].split() == ["kiosk-002", "online", "0.1.0", "1200", "1h", "2m", "paused",
                                "2h", "ago", "UNSYNCED"]
    assert lines[5] == "4 devices, 1 offline"


def test_json_is_a_list_of_objects_with_nulls_where_a_device_said_nothing(
    fleet: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "fleet", "--json", "--host", "127.0.0.1",
                       "--port", str(fleet.port))
    assert code == 0
    rows = json.loads(out)
    assert [row["device_id"] for row in rows] == [
        "kiosk-003", "kiosk-004", "kiosk-001", "kiosk-002"]
    assert rows[0] == {"device_id": "kiosk-003", "online": False, "version": None,
                       "queue_items": None, "oldest_age": None, "sync_state": None,
                       "last_success": None, "clock_synchronized": None, "status_age": None}
    assert rows[1]["error"] == "unreadable status message" and rows[1]["online"] is None
    assert rows[3] == {"device_id": "kiosk-002", "online": True, "version": "0.1.0",
                       "queue_items": 1200, "oldest_age": 3725.0, "sync_state": "paused",
                       "last_success": pytest.approx(NOW - 7200),
                       "clock_synchronized": False, "status_age": None}
    # kiosk-002's clock is not synchronized: its status is shown as it was made, not aged.


def test_the_oldest_age_is_brought_forward_from_when_the_status_was_made(
    mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backlog that stopped changing is republished only every 5 minutes; the age an
    operator reads must be the age now, not the one from the last publication."""
    made = time.time() - 240
    publish_retained(mosquitto, "engagement/kiosk-005/status", json.dumps(status(
        as_of=made, queue={"items": 5, "oldest_age": 3540.0})))
    args = ("fleet", "kiosk-005", "--host", "127.0.0.1", "--port", str(mosquitto.port))
    code, out, _ = run(capsys, *args, "--json")
    [row] = json.loads(out)
    elapsed = time.time() - made
    assert code == 0 and 240 <= row["status_age"] <= elapsed
    assert 3540 + 240 <= row["oldest_age"] <= 3540 + elapsed
    code, out, _ = run(capsys, *args)
    assert out.splitlines()[1].split()[3:6] == ["5", "1h", "3m"]  # 59 min when it was made


def test_named_devices_use_exact_topics(
    fleet: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "fleet", "kiosk-002", "kiosk-404", "--json",
                       "--host", "127.0.0.1", "--port", str(fleet.port))
    assert code == 0
    assert [row["device_id"] for row in json.loads(out)] == ["kiosk-002"]


def test_broker_settings_come_from_the_config(
    fleet: MosquittoBroker, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {fleet.port}\n'
                      'topic_prefix = "other"\n')
    code, out, _ = run(capsys, "fleet", "--json", "--config", str(config))
    assert code == 0
    assert [row["device_id"] for row in json.loads(out)] == ["kiosk-009"]


def test_no_broker_exits_69_in_one_line(
    mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    mosquitto.stop()
    code, out, err = run(capsys, "fleet", "--host", "127.0.0.1", "--port", str(mosquitto.port))
    assert (code, out) == (69, "")
    assert err.startswith("engagement-agent: cannot reach the MQTT broker at 127.0.0.1:")
    assert err.count("\n") == 1


def test_an_empty_broker_says_so(
    mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("fleet", "--host", "127.0.0.1", "--port", str(mosquitto.port))
    assert run(capsys, *args) == (0, "no devices found\n", "")
    assert run(capsys, *args, "--json") == (0, "[]\n", "")


def test_a_real_agent_shows_online_then_offline_after_kill(
    make_agent: Any, mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    agent: AgentProcess = make_agent({
        "device_id": "kiosk-real",
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": mosquitto.port},
    })
    agent.start()
    args = ("fleet", "--json", "--host", "127.0.0.1", "--port", str(mosquitto.port))

    def row() -> dict[str, Any] | None:
        code, out, _ = run(capsys, *args)
        assert code == 0
        rows = json.loads(out)
        return rows[0] if rows else None

    online = wait_for(lambda: (r := row()) and r["online"] and r, 30, "the agent's status")
    assert online["version"] == agent.status()["version"]
    assert online["queue_items"] == 0 and online["sync_state"] == "idle"
    assert online["clock_synchronized"] is agent.status()["clock"]["synchronized"]
    # Its status says when it was made, which fleet turns into an age on a synchronized clock.
    assert abs(agent.status()["as_of"] - time.time()) < 30
    assert (online["status_age"] is not None) is online["clock_synchronized"]
    if online["clock_synchronized"]:
        assert 0 <= online["status_age"] < 30
    agent.kill()
    wait_for(lambda: (r := row()) and r["online"] is False, 30, "the agent's last will")


def test_watch_refreshes_until_ctrl_c(fleet: MosquittoBroker) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGAGEMENT_AGENT_")}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "fleet", "--watch", "--json", "--interval", "0.2",
         "--host", "127.0.0.1", "--port", str(fleet.port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        assert [row["online"] for row in first][:1] == [False]
        publish_retained(fleet, "engagement/kiosk-003/status", json.dumps(status()))
        deadline = time.monotonic() + 30
        while True:
            rows = json.loads(process.stdout.readline())
            if all(row["online"] is not False for row in rows):
                break
            assert time.monotonic() < deadline, "kiosk-003 never came back online"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()


def test_tls_and_a_password_file(
    tmp_path: Path,
    make_mosquitto: Callable[..., MosquittoBroker],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An operator's usual way in: TLS with the fleet's CA, a user, the password from a file."""
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(certs / "server.key"), "-out", str(certs / "server.crt"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "ops", "s3cret"],
                   check=True, capture_output=True, timeout=30)
    passwd.chmod(0o600)
    # The fixture's plain listener stays for publishing; the operator's is TLS. A client that
    # gives a user name must give its password (anonymous clients are still let in).
    tls_port = free_port()
    broker = make_mosquitto(
        [
            f"password_file {passwd}",
            f"listener {tls_port} 127.0.0.1",
            f"certfile {certs / 'server.crt'}",
            f"keyfile {certs / 'server.key'}",
        ]
    )
    publish_retained(broker, "engagement/kiosk-001/status", json.dumps(status()))
    secret = tmp_path / "ops-pass"
    secret.write_text("s3cret\n")
    base = ("fleet", "--json", "--host", "127.0.0.1", "--port", str(tls_port), "--tls",
            "--ca-file", str(certs / "server.crt"), "--username", "ops")
    code, out, err = run(capsys, *base, "--password-file", str(secret))
    assert (code, err) == (0, "")
    assert [row["device_id"] for row in json.loads(out)] == ["kiosk-001"]
    code, out, err = run(capsys, *base, "--password", "wrong")
    assert (code, out) == (69, "")
    assert "refused" in err and err.count("\n") == 1
    untrusted = [arg for arg in base if arg != str(certs / "server.crt") and arg != "--ca-file"]
    code, out, err = run(capsys, *untrusted, "--password-file", str(secret))
    assert (code, out) == (69, "")
    assert "certificate verify failed" in err and err.count("\n") == 1


def test_named_devices_work_on_rabbitmq(
    make_agent: Any, rabbitmq: RabbitMQNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """RabbitMQ's MQTT plugin sends retained messages only to exact-topic subscriptions:
    naming the device is how `fleet` reads it there (docs/mqtt.md)."""
    agent: AgentProcess = make_agent({
        "device_id": "rabbit-fleet",
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": rabbitmq.mqtt_port, "protocol": 3},
    })
    agent.start()
    args = ("fleet", "rabbit-fleet", "--json", "--host", "127.0.0.1",
            "--port", str(rabbitmq.mqtt_port))

    def rows() -> list[dict[str, Any]]:
        code, out, err = run(capsys, *args)
        assert code == 0, err
        listed: list[dict[str, Any]] = json.loads(out)
        return listed

    online = wait_for(lambda: (r := rows()) and r[0]["online"] and r, 60, "the retained status")
    assert online[0]["device_id"] == "rabbit-fleet"
    assert online[0]["version"] == agent.status()["version"]
