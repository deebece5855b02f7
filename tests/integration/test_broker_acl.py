"""The shipped Mosquitto config and ACL (deploy/mosquitto/), run by a real Mosquitto: an app's
account can neither command as another app, nor read another app's replies, nor broadcast;
its own commands reach the agent's account; only the fleet account broadcasts; nobody gets in
without an account; oversized packets are refused by the broker.

Each "cannot" is proven by a marker: the forbidden message is published first, then an
allowed one on the same connection; once the allowed one has arrived, the forbidden one would
have arrived before it (one publisher, one subscriber, QoS 1: Mosquitto keeps the order).
"""

from __future__ import annotations

import queue
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.fixtures.daemon import wait_for
from tests.fixtures.shipped_broker import PASSWORD, SHIPPED, ShippedBroker, running_broker

DEVICE = "kiosk-042"
CMD = "engagement/{device}/{app}/command"


class Peer:
    """One MQTT 5 connection with a user name; received messages queue up as (topic, body)."""

    def __init__(
        self,
        broker: ShippedBroker,
        user: str | None,
        password: str = PASSWORD,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connect_result: list[ReasonCode] = []
        self.granted: list[list[ReasonCode]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{protocol}", protocol=protocol
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(
            (msg.topic, bytes(msg.payload))
        )
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connect_result.append(rc)
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.granted.append(list(rcs))
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        wait_for(lambda: self.connect_result, 15, f"CONNACK for {user}")

    @property
    def accepted(self) -> bool:
        return not self.connect_result[0].is_failure

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        before = len(self.granted)
        self.client.subscribe([(f, 1) for f in filters])
        wait_for(lambda: len(self.granted) > before, 15, f"SUBACK for {filters}")
        return self.granted[before]

    def publish(self, topic: str, body: bytes) -> None:
        self.client.publish(topic, body, qos=1).wait_for_publish(15)

    def next_message(self, timeout: float = 15.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedBroker]:
    with running_broker(tmp_path, ("_agent", "_fleet", "kiosk-ui", "pos")) as started:
        yield started


@pytest.fixture
def peers(broker: ShippedBroker) -> Iterator[dict[str, Peer]]:
    made = {user: Peer(broker, user) for user in ("_agent", "_fleet", "kiosk-ui", "pos")}
    assert all(peer.accepted for peer in made.values())
    try:
        yield made
    finally:
        for peer in made.values():
            peer.close()


def test_app_commands_only_as_itself(peers: dict[str, Peer]) -> None:
    agent, app_a = peers["_agent"], peers["kiosk-ui"]
    granted = agent.subscribe(f"engagement/{DEVICE}/+/command", "engagement/all/+/command")
    assert all(not rc.is_failure for rc in granted), granted

    app_a.publish(CMD.format(device=DEVICE, app="pos"), b"as B")
    app_a.publish(CMD.format(device="all", app="kiosk-ui"), b"broadcast by an app")
    app_a.publish(CMD.format(device="all", app="pos"), b"broadcast as B")
    app_a.publish(CMD.format(device=DEVICE, app="kiosk-ui"), b"own")
    assert agent.next_message() == (CMD.format(device=DEVICE, app="kiosk-ui"), b"own")

    peers["_fleet"].publish(CMD.format(device="all", app="pos"), b"fleet broadcast")
    assert agent.next_message() == (CMD.format(device="all", app="pos"), b"fleet broadcast")
    assert agent.messages.empty()


def test_app_reads_only_its_own_replies(peers: dict[str, Peer]) -> None:
    agent, app_a, app_b = peers["_agent"], peers["kiosk-ui"], peers["pos"]
    # Mosquitto's acl_file grants every SUBSCRIBE and checks each message at delivery: B's
    # topics, named or by wildcard, must deliver nothing to A. (A's own reply matches only
    # "engagement/#", so it arrives once.)
    app_a.subscribe(
        f"engagement/{DEVICE}/pos/reply",
        f"engagement/{DEVICE}/pos/error",
        f"engagement/{DEVICE}/pos/response/#",
        "engagement/#",
    )
    own = app_b.subscribe(f"engagement/{DEVICE}/pos/reply", f"engagement/{DEVICE}/pos/error")
    assert all(not rc.is_failure for rc in own), own

    for kind in ("reply", "error", "response/abc"):
        agent.publish(f"engagement/{DEVICE}/pos/{kind}", b"B's secret")
    agent.publish(f"engagement/{DEVICE}/kiosk-ui/reply", b"A's reply")
    assert app_a.next_message() == (f"engagement/{DEVICE}/kiosk-ui/reply", b"A's reply")
    assert app_a.messages.empty()
    # B, the control: its replies were published and readable.
    assert app_b.next_message() == (f"engagement/{DEVICE}/pos/reply", b"B's secret")
    assert app_b.next_message() == (f"engagement/{DEVICE}/pos/error", b"B's secret")


def test_app_cannot_write_what_the_agent_writes(peers: dict[str, Peer]) -> None:
    """An app cannot fake replies for another app, nor the device's status."""
    agent, app_a, app_b = peers["_agent"], peers["kiosk-ui"], peers["pos"]
    app_b.subscribe(f"engagement/{DEVICE}/pos/reply")
    peers["_fleet"].subscribe(f"engagement/{DEVICE}/status")
    app_a.publish(f"engagement/{DEVICE}/pos/reply", b"forged")
    app_a.publish(f"engagement/{DEVICE}/status", b'{"online": false}')
    agent.publish(f"engagement/{DEVICE}/pos/reply", b"real")
    agent.publish(f"engagement/{DEVICE}/status", b'{"online": true}')
    assert app_b.next_message() == (f"engagement/{DEVICE}/pos/reply", b"real")
    assert peers["_fleet"].next_message() == (f"engagement/{DEVICE}/status", b'{"online": true}')


def test_no_account_no_entry(broker: ShippedBroker) -> None:
    for user, password in ((None, PASSWORD), ("kiosk-ui", "wrong"), ("stranger", PASSWORD)):
        peer = Peer(broker, user, password)
        try:
            assert not peer.accepted, user
        finally:
            peer.close()


def test_oversized_packet_refused_by_the_broker(
    broker: ShippedBroker, peers: dict[str, Peer]
) -> None:
    """max_packet_size = limits.max_command_bytes (default 65536) + 1024. MQTT 3.1.1, whose
    clients are not told the limit: the broker itself drops the packet and the connection."""
    agent = peers["_agent"]
    agent.subscribe(f"engagement/{DEVICE}/+/command")
    sender = Peer(broker, "kiosk-ui", protocol=MQTTProtocolVersion.MQTTv311)
    try:
        topic = CMD.format(device=DEVICE, app="kiosk-ui")
        fits = b"x" * 65536
        sender.publish(topic, fits)
        assert agent.next_message() == (topic, fits)
        sender.client.publish(topic, b"y" * 66560, qos=1)
        wait_for(lambda: not sender.client.is_connected(), 15, "the broker to drop the sender")
    finally:
        sender.close()
    peers["pos"].publish(CMD.format(device=DEVICE, app="pos"), b"marker")
    assert agent.next_message() == (CMD.format(device=DEVICE, app="pos"), b"marker")


def test_add_app_refuses_names_that_are_not_apps(broker: ShippedBroker) -> None:
    for name in ("Kiosk", "_admin", "defaults", "a/b", "+", "#", "-x", ""):
        result = subprocess.run(
            [str(SHIPPED / "add-app"), "--passwd", str(broker.passwd), name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0, name
        assert name == "" or f"{name}:" not in broker.passwd.read_text()
