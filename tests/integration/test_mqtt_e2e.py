"""MQTT through the running daemon: a real Mosquitto, real publishers, the API stand-in."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import API_PROJECTS, api_project
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.mosquitto import MosquittoBroker, free_port

PREFIX = "engagement"
DEVICE = "test-device"


class Subscriber:
    """An app-side client that records every message on the topics it subscribed to."""

    def __init__(
        self, port: int, topic: str, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.correlation: list[tuple[str, bytes | None]] = []  # (topic, correlation data)
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))
            data = getattr(message.properties, "CorrelationData", None)
            self.correlation.append((message.topic, bytes(data) if data is not None else None))

    def on(self, topic: str) -> list[Any]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish(broker: MosquittoBroker, app: str, payload: str) -> None:
    subprocess.run(
        [
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
            "-t", f"{PREFIX}/{DEVICE}/{app}/command", "-m", payload,
        ],
        check=True,
        timeout=30,
    )  # fmt: skip


@pytest.fixture
def agent(make_agent: Any, mosquitto: MosquittoBroker, api_stub: ApiStub) -> AgentProcess:
    process: AgentProcess = make_agent(
        {
            "device_id": DEVICE,
            "project": api_project(api_stub),
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": mosquitto.port},
            "sync": {"flush_mode": "immediate"},
        }
    )
    process.start()
    wait_for(lambda: process.status()["mqtt"]["connected"], 15, "the agent's MQTT connection")
    return process


def event_types(api: ApiStub) -> list[str]:
    return [r.data.get("event_type", "") for r in api.received("proj-a")]


def test_mqtt_command_reaches_the_api(
    agent: AgentProcess, mosquitto: MosquittoBroker, api_stub: ApiStub
) -> None:
    publish(mosquitto, "kiosk-ui", json.dumps({"command": "track_event", "name": "via_mqtt"}))
    wait_for(lambda: "via_mqtt" in event_types(api_stub), 15, "the event at the API")
    assert "kiosk-ui" in agent.status()["apps"]


def test_commands_published_while_the_agent_is_down_arrive_after_restart(
    agent: AgentProcess, mosquitto: MosquittoBroker, api_stub: ApiStub
) -> None:
    assert agent.terminate() == 0
    for i in range(20):
        command = {"command": "track_event", "name": f"offline{i}"}
        publish(mosquitto, "kiosk-ui", json.dumps(command))
    agent.start()
    wait_for(
        lambda: all(f"offline{i}" in event_types(api_stub) for i in range(20)),
        30,
        "all 20 commands published while the agent was down",
    )


def test_bad_command_is_reported_on_the_error_topic(
    agent: AgentProcess, mosquitto: MosquittoBroker
) -> None:
    error_topic = f"{PREFIX}/{DEVICE}/kiosk-ui/error"
    reply_topic = f"{PREFIX}/{DEVICE}/kiosk-ui/reply"
    app_side = Subscriber(mosquitto.port, f"{PREFIX}/{DEVICE}/kiosk-ui/#")
    try:
        publish(mosquitto, "kiosk-ui", '{"command": "track_event", "name": "x", "typo": 1}')
        publish(mosquitto, "kiosk-ui", "{not json")
        wait_for(lambda: len(app_side.on(error_topic)) >= 2, 15, "two error messages")
        codes = [e["error"]["code"] for e in app_side.on(error_topic)]
        assert codes == ["invalid_command", "invalid_json"]
        # Both were acked: after a restart the broker does not deliver them again. The probe's
        # reply comes after anything the broker still had queued for the agent.
        assert agent.terminate() == 0
        agent.start()
        publish(mosquitto, "kiosk-ui", '{"command": "status", "request_id": "probe"}')
        wait_for(lambda: app_side.on(reply_topic), 15, "the probe's reply")
        assert app_side.on(reply_topic)[0]["request_id"] == "probe"
        assert len(app_side.on(error_topic)) == 2
    finally:
        app_side.close()


def test_retained_status_and_last_will(agent: AgentProcess, mosquitto: MosquittoBroker) -> None:
    status_topic = f"{PREFIX}/{DEVICE}/status"
    watcher = Subscriber(mosquitto.port, status_topic)
    try:
        first = wait_for(lambda: watcher.on(status_topic), 15, "retained status")[0]
        assert first["online"] is True
        assert {"items", "bytes", "max_bytes", "dropped", "dead_letters", "oldest_age"} <= set(
            first["queue"]
        )
        assert first["mqtt"]["connected"] is True
        agent.kill()
        wait_for(lambda: watcher.on(status_topic)[-1] == {"online": False}, 30, "the last will")
    finally:
        watcher.close()


def test_redirect_attack_over_mqtt_is_forbidden_and_status_shows_no_ids(
    agent: AgentProcess, mosquitto: MosquittoBroker, api_stub: ApiStub
) -> None:
    """The attack as it was tried: read the app's cookie from the retained status, then
    anonymize it towards one's own server and wait for its next identify_customer."""
    attacker = ApiStub("127.0.0.1", 0)
    attacker.start()
    status_topic = f"{PREFIX}/{DEVICE}/status"
    app_topics = f"{PREFIX}/{DEVICE}/kiosk-ui/#"
    watcher = Subscriber(mosquitto.port, status_topic)
    app_side = Subscriber(mosquitto.port, app_topics)
    try:
        identify = {"command": "identify_customer", "ids": {"registered": "jane@example.com"}}
        publish(mosquitto, "kiosk-ui", json.dumps(identify))
        wait_for(lambda: "kiosk-ui" in agent.status()["apps"], 15, "kiosk-ui's state")
        customer = agent.request({"command": "get_customer", "app": "kiosk-ui"})["result"]
        wait_for(
            lambda: any("kiosk-ui" in s.get("apps", {}) for s in watcher.on(status_topic)),
            30,
            "a retained status listing kiosk-ui",
        )
        published = json.dumps(watcher.on(status_topic))
        assert customer["ids"]["cookie"] not in published
        assert "jane@example.com" not in published

        redirect = {"project_token": "proj-a", "base_url": attacker.url}
        command = {"command": "anonymize", "project": redirect, "request_id": "evil"}
        publish(mosquitto, "kiosk-ui", json.dumps(command))
        error_topic = f"{PREFIX}/{DEVICE}/kiosk-ui/error"
        reply_topic = f"{PREFIX}/{DEVICE}/kiosk-ui/reply"
        wait_for(lambda: app_side.on(error_topic), 15, "the error message")
        (error,) = app_side.on(error_topic)
        assert error["request_id"] == "evil" and error["error"]["code"] == "forbidden"
        wait_for(lambda: app_side.on(reply_topic), 15, "the reply")
        assert app_side.on(reply_topic)[0]["error"]["code"] == "forbidden"

        phone = {"command": "identify_customer", "ids": {"phone": "+421900000000"}}
        publish(mosquitto, "kiosk-ui", json.dumps(phone))
        wait_for(
            lambda: any(
                r.data.get("customer_ids", {}).get("phone") == "+421900000000"
                for r in api_stub.received("proj-a")
            ),
            15,
            "the phone number at the configured project",
        )
        after = agent.request({"command": "get_customer", "app": "kiosk-ui"})["result"]
        assert after["ids"]["cookie"] == customer["ids"]["cookie"]
        assert after["project_token"] == "proj-a"
        assert attacker.requests() == []
    finally:
        app_side.close()
        watcher.close()
        attacker.stop()


def test_an_app_cannot_forge_another_apps_replies_through_a_response_topic(
    agent: AgentProcess, mosquitto: MosquittoBroker
) -> None:
    """kiosk-ui names pos's reply topic as its MQTT 5 response topic: the agent may write it
    (so the broker cannot stop this), but only kiosk-ui's own response/ subtree is honoured;
    the reply goes to kiosk-ui's reply topic, and the journal says so once."""
    pos_reply = f"{PREFIX}/{DEVICE}/pos/reply"
    own = f"{PREFIX}/{DEVICE}/kiosk-ui"
    spy = Subscriber(mosquitto.port, f"{PREFIX}/#")
    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    app.connect("127.0.0.1", mosquitto.port)
    app.loop_start()

    def request(command: dict[str, Any], response_topic: str, correlation: bytes) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = response_topic
        properties.CorrelationData = correlation
        app.publish(f"{own}/command", json.dumps(command), qos=1, properties=properties)

    try:
        forged = {"command": "track_event", "name": "paid", "request_id": "forged"}
        request(forged, pos_reply, b"c-forged")
        request({"command": "status"}, f"{PREFIX}/{DEVICE}/pos/response/x", b"c-forged-2")
        wait_for(lambda: len(spy.on(f"{own}/reply")) == 2, 15, "kiosk-ui's own replies")
        request({"command": "status", "request_id": "legit"}, f"{own}/response/xyz", b"c-1")
        wait_for(lambda: spy.on(f"{own}/response/xyz"), 15, "the legitimate response")
        (response,) = spy.on(f"{own}/response/xyz")
        assert response["ok"] and response["request_id"] == "legit"
        assert (f"{own}/response/xyz", b"c-1") in spy.correlation
        assert spy.on(pos_reply) == [] and spy.on(f"{PREFIX}/{DEVICE}/pos/response/x") == []
        # (A query and a tracking command are answered in either order.)
        assert {r["request_id"] for r in spy.on(f"{own}/reply")} == {"forged", None}
        assert all(c is None for t, c in spy.correlation if t == f"{own}/reply")
        said = [line for line in agent.log().splitlines() if "ignored the response topic" in line]
        assert len(said) == 1 and pos_reply in said[0]
    finally:
        app.loop_stop()
        app.disconnect()
        spy.close()


def test_an_mqtt_reconnect_wakes_a_project_waiting_on_the_probe_schedule(
    make_agent: Any, mosquitto: MosquittoBroker
) -> None:
    """The API is unreachable, so the project waits for its next network probe (minutes
    away); the network comes back, and the broker link reconnecting is what says so: the
    queue drains long before the probe. The broker's outage is far shorter than the
    daemon's watchdog period, which a hint taken from the watchdog would miss."""
    probe_interval = 600.0  # the next probe is 300 to 900 s away
    api = ApiStub("127.0.0.1", free_port(), API_PROJECTS)  # restarts on the same port
    api.start()
    api.stop()  # the API (and the network to it) is gone
    agent: AgentProcess = make_agent(
        {
            "device_id": DEVICE,
            "project": api_project(api),
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": mosquitto.port},
            "sync": {"flush_mode": "immediate", "probe_interval": probe_interval},
        }
    )
    try:
        agent.start()
        wait_for(lambda: agent.status()["mqtt"]["connected"], 15, "the agent's MQTT connection")
        for i in range(5):
            reply = agent.request({"command": "track_event", "name": f"offline{i}"})
            assert reply["ok"], reply

        def waiting_for_probe() -> dict[str, Any] | None:
            (project,) = agent.status()["sync"]["projects"]
            refused = "refused" in (project["last_error"] or "")
            return project if refused and project["next_attempt"] is not None else None

        project = wait_for(waiting_for_probe, 30, "the project waiting for its network probe")
        assert project["state"] == "backoff"
        assert project["next_attempt"] - time.time() > probe_interval / 2 - 30
        api.start()
        mosquitto.stop()
        wait_for(lambda: not agent.status()["mqtt"]["connected"], 30, "the link to drop")
        mosquitto.start()
        deadline = time.monotonic() + 60.0  # a tenth of the probe interval
        wait_for(lambda: agent.status()["queue"]["items"] == 0, 60, "the queue to drain")
        assert time.monotonic() < deadline
        assert {f"offline{i}" for i in range(5)} <= set(event_types(api))
    finally:
        agent.close()
        api.stop()
