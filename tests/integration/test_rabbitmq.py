"""The MQTT path through the daemon against RabbitMQ's MQTT plugin (3.10: MQTT 3.1.1 only).

The same guarantees as with Mosquitto (docs/mqtt.md): a persistent session that keeps QoS 1
commands while the agent is down, a retained status with a last will, and the PUBACK only
after the commit. One private node serves the module (tests/fixtures/rabbitmq.py); each test
uses its own device id, hence its own client id, session and topics.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paho.mqtt.enums import MQTTProtocolVersion

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import api_project
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.rabbitmq import RabbitMQNode
from tests.integration.test_mqtt_e2e import Subscriber

PREFIX = "engagement"
#: RabbitMQ boots slowly and a loaded machine is slower: the bound for the agent's connect.
CONNECT = 60.0


def publish(node: RabbitMQNode, device: str, payload: str) -> None:
    """QoS 1 with MQTT 3.1.1: once this returns, the broker holds the command."""
    subprocess.run(
        [
            "mosquitto_pub", "-V", "mqttv311", "-h", "127.0.0.1", "-p", str(node.mqtt_port),
            "-q", "1", "-t", f"{PREFIX}/{device}/kiosk-ui/command", "-m", payload,
        ],
        check=True,
        timeout=30,
    )  # fmt: skip


def track(node: RabbitMQNode, device: str, name: str) -> None:
    publish(node, device, json.dumps({"command": "track_event", "name": name}))


def event_names(api: ApiStub) -> set[str]:
    return {str(r.data.get("event_type", "")) for r in api.received("proj-a")}


def rabbit_agent(
    make_agent: Callable[..., AgentProcess],
    node: RabbitMQNode,
    api: ApiStub,
    device: str,
    **extra: Any,
) -> AgentProcess:
    """An agent of `device` on the node (MQTT 3.1.1 unless `mqtt` overrides say otherwise)."""
    mqtt_config = {"enabled": True, "host": "127.0.0.1", "port": node.mqtt_port, "protocol": 3}
    config: dict[str, Any] = {
        "device_id": device,
        "project": api_project(api),
        "mqtt": mqtt_config,
        "sync": {"flush_mode": "immediate"},
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    agent = make_agent(config, name=device)
    agent.start()
    return agent


def wait_connected(agent: AgentProcess) -> None:
    try:
        wait_for(lambda: agent.status()["mqtt"]["connected"], CONNECT, "the MQTT connection")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent.log()[-3000:]}") from None


def session_queue(node: RabbitMQNode, client_id: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages in the agent's QoS 1 session queue, as RabbitMQ sees it."""
    out = node.rabbitmqctl(
        "list_queues", "-q", "--no-table-headers", "name", "messages_ready",
        "messages_unacknowledged",
    ).stdout  # fmt: skip
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == f"mqtt-subscription-{client_id}qos1":
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"no session queue for {client_id} in:\n{out}")


def wait_subscribed(node: RabbitMQNode, device: str) -> None:
    """Connected is not yet subscribed: RabbitMQ drops a message published before the agent's
    session queue is bound (a race that a loaded machine widens)."""

    def bound() -> bool:
        try:
            session_queue(node, f"engagement-agent-{device}")
        except AssertionError:
            return False
        return True

    wait_for(bound, 30, "the agent's subscription")


def test_protocol_3_session_keeps_commands_while_the_agent_is_down(
    make_agent: Callable[..., AgentProcess], rabbitmq: RabbitMQNode, api_stub: ApiStub
) -> None:
    device = "rabbit-session"
    agent = rabbit_agent(make_agent, rabbitmq, api_stub, device)
    wait_connected(agent)
    wait_subscribed(rabbitmq, device)
    track(rabbitmq, device, "online")
    wait_for(lambda: "online" in event_names(api_stub), 30, "a command through RabbitMQ")

    assert agent.terminate() == 0
    names = {f"offline{i}" for i in range(20)}
    for name in sorted(names):
        track(rabbitmq, device, name)
    agent.start()
    wait_connected(agent)
    wait_for(lambda: names <= event_names(api_stub), 60, "the commands queued in the session")


def test_retained_status_and_last_will_on_the_exact_topic(
    make_agent: Callable[..., AgentProcess], rabbitmq: RabbitMQNode, api_stub: ApiStub
) -> None:
    device = "rabbit-status"
    topic = f"{PREFIX}/{device}/status"
    agent = rabbit_agent(make_agent, rabbitmq, api_stub, device)
    wait_connected(agent)
    # RabbitMQ 3.10 hands out retained messages only to exact-topic subscriptions.
    watcher = Subscriber(rabbitmq.mqtt_port, topic, protocol=MQTTProtocolVersion.MQTTv311)
    try:
        first = wait_for(lambda: watcher.on(topic), 30, "the retained status")[0]
        assert first["online"] is True
        assert first["mqtt"]["connected"] is True
        agent.kill()
        wait_for(lambda: watcher.on(topic)[-1] == {"online": False}, 30, "the last will")
    finally:
        watcher.close()
    # A new subscriber gets the will as the retained status: the device shows offline.
    late = Subscriber(rabbitmq.mqtt_port, topic, protocol=MQTTProtocolVersion.MQTTv311)
    try:
        wait_for(lambda: late.on(topic) == [{"online": False}], 30, "the retained will")
    finally:
        late.close()


def test_puback_waits_for_the_commit(
    make_agent: Callable[..., AgentProcess],
    rabbitmq: RabbitMQNode,
    api_stub: ApiStub,
    frozen_fs: Path,
) -> None:
    device = "rabbit-puback"
    agent = rabbit_agent(
        make_agent, rabbitmq, api_stub, device, queue={"path": str(frozen_fs / "queue.db")}
    )
    wait_connected(agent)
    client_id = f"engagement-agent-{device}"
    wait_subscribed(rabbitmq, device)
    track(rabbitmq, device, "warmup")
    wait_for(lambda: "warmup" in event_names(api_stub), 30, "a first command")

    subprocess.run(["fsfreeze", "--freeze", str(frozen_fs)], check=True)
    try:
        track(rabbitmq, device, "held")
        # Delivered to the agent, which cannot commit it: RabbitMQ must see it unacknowledged.
        wait_for(lambda: session_queue(rabbitmq, client_id) == (0, 1), 30, "delivery, no ack")
        for _ in range(3):  # a measurement window: an early PUBACK would show within it
            time.sleep(0.5)
            assert session_queue(rabbitmq, client_id) == (0, 1)
        assert "held" not in event_names(api_stub)
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(frozen_fs)], check=True)
    wait_for(lambda: session_queue(rabbitmq, client_id) == (0, 0), 30, "the ack after the commit")
    wait_for(lambda: "held" in event_names(api_stub), 30, "the held command at the API")


def test_default_protocol_falls_back_to_3_1_1(
    make_agent: Callable[..., AgentProcess], rabbitmq: RabbitMQNode, api_stub: ApiStub
) -> None:
    """`mqtt.protocol = "auto"` (the default) tries MQTT 5, which RabbitMQ 3.10 refuses by
    closing the connection at CONNECT, then 3.1.1, and says so in status."""
    device = "rabbit-auto"
    agent = make_agent(
        {
            "device_id": device,
            "project": api_project(api_stub),
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": rabbitmq.mqtt_port},
            "sync": {"flush_mode": "immediate"},
        },
        name=device,
    )
    agent.start()
    wait_connected(agent)
    assert agent.status()["mqtt"]["protocol"] in (3, "3", "3.1.1")
    # The journal says so once (not once per attempt): the line naming both versions.
    switches = [line for line in agent.log().splitlines() if "MQTT 5" in line and "3.1.1" in line]
    assert len(switches) == 1, agent.log()
    track(rabbitmq, device, "auto")
    wait_for(lambda: "auto" in event_names(api_stub), 30, "a command after the fallback")
