"""`PahoClient`'s own PUBLISH decoding gives the message paho's decoder gives (the packet is
handed to the client as paho's reader would), and its buffered reads lose nothing."""

from __future__ import annotations

import select
import socket
import time
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.mqtt.client import PahoClient, _Received


def publish_packet(
    topic: bytes, payload: bytes, *, qos: int, mid: int = 0, properties: bytes = b"\x00",
    dup: bool = False, retain: bool = False, v5: bool = True,
) -> tuple[int, bytes]:  # fmt: skip
    header = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if v5:
        body += properties
    return header, body + payload


def deliver(client: paho.Client, header: int, body: bytes) -> paho.MQTTMessage:
    received: list[paho.MQTTMessage] = []
    client.on_message = lambda c, u, message: received.append(message)
    client._in_packet = {"command": header, "packet": body}  # what paho's reader leaves there
    client._handle_publish()
    assert len(received) == 1
    return received[0]


def clients(v5: bool) -> tuple[paho.Client, PahoClient]:
    options: dict[str, Any] = {
        "callback_api_version": CallbackAPIVersion.VERSION2,
        "client_id": "t",
        "protocol": MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        "manual_ack": True,
    }
    ours = PahoClient(idle_timeout=1.0, on_thread_exit=lambda error: None, **options)
    return paho.Client(**options), ours


RESPONSE_TOPIC = b"\x0a\x08\x00\x07replies"  # properties: length 10, Response Topic "replies"


@pytest.mark.parametrize(
    "packet",
    [
        {"qos": 1, "mid": 7},
        {"qos": 0},
        {"qos": 1, "mid": 65535, "dup": True, "retain": True},
        {"qos": 1, "mid": 9, "properties": RESPONSE_TOPIC},
        {"qos": 1, "mid": 9, "v5": False},
        {"qos": 0, "v5": False},
        {"qos": 1, "mid": 65535, "dup": True, "retain": True, "v5": False},
    ],
    ids=[
        "qos1",
        "qos0",
        "dup-retain",
        "with-properties",
        "mqtt311",
        "mqtt311-qos0",
        "mqtt311-dup-retain",
    ],
)
def test_our_decoding_matches_paho(packet: dict[str, Any]) -> None:
    v5 = packet.get("v5", True)
    header, body = publish_packet(b"engagement/d/kiosk/command", b'{"command":"status"}', **packet)
    theirs, ours = clients(v5)
    expected, got = deliver(theirs, header, body), deliver(ours, header, body)
    for field in ("topic", "payload", "qos", "mid", "dup", "retain", "state"):
        assert getattr(got, field) == getattr(expected, field), field
    assert type(got.payload) is type(expected.payload) is bytes
    assert isinstance(got, _Received) is ("properties" not in packet)  # our decoder, or paho's
    if "properties" in packet:
        assert got.properties.ResponseTopic == "replies"  # type: ignore[union-attr]


def encode(header: int, body: bytes) -> bytes:
    length, remaining = b"", len(body)
    while True:
        digit, remaining = remaining % 128, remaining // 128
        length += bytes([digit | (0x80 if remaining else 0)])
        if not remaining:
            return bytes([header]) + length + body


def test_buffered_reads_leave_nothing_behind_for_select() -> None:
    """Many packets arrive in one read, the last one split across two writes: every message
    is delivered while waiting on the socket as paho's thread does (a packet left in the read
    buffer would wait for more bytes that never come)."""
    ours = clients(True)[1]
    received: list[int] = []
    ours.on_message = lambda c, u, message: received.append(message.mid)
    stream = b"".join(
        encode(*publish_packet(b"t/d/kiosk/command", b"x" * (i % 300), qos=1, mid=i))
        for i in range(1, 501)
    )
    near, far = socket.socketpair()
    with near, far:
        near.setblocking(False)
        ours._sock = near
        far.sendall(stream[:-7])
        deadline = time.monotonic() + 10
        while len(received) < 499 and time.monotonic() < deadline:
            if select.select([near], [], [], 0.5)[0]:
                ours.loop_read()
        assert received == list(range(1, 500))
        far.sendall(stream[-7:])
        while len(received) < 500 and time.monotonic() < deadline:
            if select.select([near], [], [], 0.5)[0]:
                ours.loop_read()
        assert received == list(range(1, 501))
    ours._sock = None
