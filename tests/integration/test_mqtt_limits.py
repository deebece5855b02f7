"""MQTT trust and limits through the running daemon and a real Mosquitto: `apps.<app>.mqtt`,
the Maximum Packet Size, `mqtt.protocol = "auto"`, and what status counts (docs/mqtt.md)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.relay import Relay
from tests.integration.test_mqtt_e2e import Subscriber

PREFIX = "engagement"
DEVICE = "test-device"
MAX_COMMAND_BYTES = 4096


def topic(app: str, kind: str) -> str:
    return f"{PREFIX}/{DEVICE}/{app}/{kind}"


def publish(broker: MosquittoBroker, app: str, payload: bytes, version: str = "5") -> None:
    """Published at QoS 1 by the C client; the message body comes from stdin."""
    subprocess.run(
        [
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-V", version,
            "-t", topic(app, "command"), "-s",
        ],
        input=payload,
        check=True,
        timeout=30,
    )  # fmt: skip


def start_agent(make_agent: Any, port: int, **extra: Any) -> AgentProcess:
    config: dict[str, Any] = {
        "device_id": DEVICE,
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port},
        "limits": {"max_command_bytes": MAX_COMMAND_BYTES},
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    agent: AgentProcess = make_agent(config)
    agent.start()
    wait_for(lambda: agent.status()["mqtt"]["connected"], 20, "the agent's MQTT connection")
    return agent


def track(name: str, **extra: Any) -> bytes:
    return json.dumps({"command": "track_event", "name": name, **extra}).encode()


# ---------------------------------------------------------------------------- apps.<app>.mqtt


def test_app_with_allowed_uids_refuses_mqtt_unless_turned_on(
    make_agent: Any, mosquitto: MosquittoBroker
) -> None:
    agent = start_agent(
        make_agent,
        mosquitto.port,
        apps={
            "locked": {"allowed_uids": [12345]},
            "shared": {"allowed_uids": [12345], "mqtt": True},
        },
    )
    watcher = Subscriber(mosquitto.port, f"{PREFIX}/{DEVICE}/+/+")
    try:
        publish(mosquitto, "locked", track("sneaky", request_id="r-locked"))
        wait_for(lambda: watcher.on(topic("locked", "error")), 15, "the error report")
        error = watcher.on(topic("locked", "error"))[0]
        assert error["error"]["code"] == "forbidden" and error["request_id"] == "r-locked"
        assert "apps.locked.mqtt = true" in error["error"]["message"]
        wait_for(lambda: watcher.on(topic("locked", "reply")), 15, "the reply")
        assert watcher.on(topic("locked", "reply"))[0]["error"]["code"] == "forbidden"

        publish(mosquitto, "shared", track("allowed", request_id="r-shared"))
        wait_for(lambda: watcher.on(topic("shared", "reply")), 15, "the shared app's reply")
        assert watcher.on(topic("shared", "reply"))[0]["ok"] is True

        status = agent.status()
        assert "locked" not in status["apps"]  # nothing was tracked for it
        assert status["commands"]["mqtt"] == {"forbidden": 1, "ok": 1}
        assert "shared" in status["apps"]

        # The refusal was acked: after a restart the broker does not deliver it again.
        assert agent.terminate() == 0
        agent.start()
        wait_for(lambda: agent.status()["mqtt"]["connected"], 20, "the reconnect")
        publish(mosquitto, "shared", track("probe", request_id="probe"))
        wait_for(lambda: agent.status()["commands"]["mqtt"].get("ok") == 1, 15, "the probe")
        assert agent.status()["commands"]["mqtt"] == {"ok": 1}
    finally:
        watcher.close()


# ---------------------------------------------------------------------------- packet size


@pytest.mark.parametrize("version", ["5", "311"])
def test_oversized_commands_are_too_large_or_never_delivered(
    make_agent: Any, mosquitto: MosquittoBroker, version: str
) -> None:
    """Over limits.max_command_bytes: `too_large` on the error topic. On MQTT 5 the agent
    announces limits.max_command_bytes + 1 KiB as its Maximum Packet Size, so the broker does
    not even send bigger messages (Mosquitto drops them for this subscriber); on 3.1.1 they
    arrive and are refused like any other oversized command."""
    protocol = 5 if version == "5" else 3
    agent = start_agent(make_agent, mosquitto.port, mqtt={"protocol": protocol})
    assert agent.status()["mqtt"]["protocol"] == protocol
    watcher = Subscriber(mosquitto.port, topic("kiosk", "error"))
    try:
        slightly = track("a", properties={"blob": "x" * MAX_COMMAND_BYTES})
        far = track("b", properties={"blob": "y" * (MAX_COMMAND_BYTES + 4096)})
        publish(mosquitto, "kiosk", slightly, version)
        publish(mosquitto, "kiosk", far, version)
        publish(mosquitto, "kiosk", track("sentinel"), version)  # delivered in order
        wait_for(lambda: agent.status()["commands"]["mqtt"].get("ok") == 1, 15, "the sentinel")
        counts = agent.status()["commands"]["mqtt"]
        assert counts == ({"too_large": 1, "ok": 1} if protocol == 5 else {"too_large": 2, "ok": 1})
        expected = ["too_large"] * (1 if protocol == 5 else 2)

        def codes() -> list[str]:
            return [e["error"]["code"] for e in watcher.on(topic("kiosk", "error"))]

        wait_for(lambda: len(codes()) >= len(expected), 15, "the error reports")
        assert codes() == expected
    finally:
        watcher.close()


# ---------------------------------------------------------------------------- protocol auto


class RefuseMqtt5:
    """A relay screen that hangs up on an MQTT 5 CONNECT, as brokers without MQTT 5 do
    (RabbitMQ 3.10 closes the connection); MQTT 3.1.1 connections are relayed."""

    def __init__(self) -> None:
        self.refused = 0

    def __call__(self, client: socket.socket) -> bytes | None:
        head = b""
        while len(head) < 9:  # fixed header (2) + protocol name (6) + level (1)
            chunk = client.recv(9 - len(head))
            if not chunk:
                return None
            head += chunk
        if head[8] == 5:
            self.refused += 1
            return None
        return head


@pytest.fixture
def refuse_mqtt5() -> RefuseMqtt5:
    return RefuseMqtt5()


@pytest.fixture
def relay(
    mosquitto: MosquittoBroker, make_relay: Callable[..., Relay], refuse_mqtt5: RefuseMqtt5
) -> Relay:
    """A relay to the broker (tests/fixtures/relay.py) behind the `refuse_mqtt5` screen."""
    return make_relay(mosquitto.port, screen=refuse_mqtt5)


def test_auto_uses_mqtt5_with_a_broker_that_speaks_it(
    make_agent: Any, mosquitto: MosquittoBroker
) -> None:
    agent = start_agent(make_agent, mosquitto.port)
    assert agent.status()["mqtt"]["protocol"] == 5
    assert "trying MQTT" not in agent.log()


def test_auto_falls_back_to_311_when_the_broker_hangs_up_on_mqtt5(
    make_agent: Any, mosquitto: MosquittoBroker, relay: Relay, refuse_mqtt5: RefuseMqtt5
) -> None:
    agent = start_agent(make_agent, relay.port, mqtt={"keepalive": 10})
    assert refuse_mqtt5.refused >= 1
    assert agent.status()["mqtt"]["protocol"] == 3
    assert agent.log().count("trying MQTT 3.1.1") == 1
    assert "closed the connection at an MQTT 5 CONNECT" in agent.log()
    publish(mosquitto, "kiosk", track("through-the-relay"))
    wait_for(lambda: agent.status()["commands"]["mqtt"].get("ok") == 1, 15, "the command")


def test_forced_mqtt5_names_the_likely_cause(
    make_agent: Any, mosquitto: MosquittoBroker, relay: Relay
) -> None:
    agent: AgentProcess = make_agent(
        {
            "device_id": DEVICE,
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": relay.port, "protocol": 5},
        }
    )
    agent.start()
    wait_for(lambda: "may not support MQTT 5" in agent.log(), 20, "the explained failure")
    assert "mqtt.protocol = 3" in agent.log()
    status = agent.status()["mqtt"]
    assert (status["connected"], status["protocol"]) == (False, None)
