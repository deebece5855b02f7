"""Hostile input against one running agent: fuzzed socket lines and MQTT payloads, a slow
client, a connection flood. The agent keeps serving well-formed clients, every reply is one
valid JSON line with a documented error code, and nothing it accepted is lost."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.ipc import RESERVED_CONNECTIONS
from agent_devtools.apistub import ApiStub
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.reliability.harness import (
    DEVICE_ID,
    DOCUMENTED_ERROR_CODES,
    EVENT,
    SocketProducer,
    agent_config,
    check_no_loss,
    join_producers,
    wait_delivered,
    wait_drained,
    wait_mqtt_connected,
)

MAX_COMMAND = 4096
EXAMPLES = int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "150"))


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def hostile_lines(draw: st.DrawFn) -> bytes:
    """One request line (without its newline) from a zoo of malformed and odd inputs."""
    kind = draw(st.sampled_from(["bytes", "json", "command", "deep", "number", "utf8", "huge"]))
    if kind == "bytes":
        line = draw(st.binary(max_size=300))
    elif kind == "json":
        line = json.dumps(draw(json_values)).encode()
    elif kind == "command":
        body: dict[str, Any] = {
            "command": draw(st.sampled_from(["track_event", "status", "flush", "nope", ""])),
        }
        body.update(
            draw(
                st.dictionaries(
                    st.sampled_from(
                        ["name", "properties", "timestamp", "app", "request_id", "extra"]
                    ),
                    json_values,
                    max_size=4,
                )
            )
        )
        line = json.dumps(body).encode()
    elif kind == "deep":
        depth = draw(st.integers(1, 3000))
        line = (
            b'{"command":"track_event","name":"d","properties":{"a":'
            + b"[" * depth
            + b"]" * draw(st.integers(0, depth))
            + b"}}"
        )
    elif kind == "number":
        digits = draw(st.integers(1, 5000))
        line = b'{"command":"track_event","name":"n","properties":{"a":1' + b"0" * digits + b"}}"
    elif kind == "utf8":
        junk = draw(st.binary(min_size=1, max_size=8))
        line = b'{"command":"track_event","name":"' + junk + b'"}'
    else:
        line = (
            b'{"command":"track_event","name":"h","properties":{"a":"'
            + b"x" * (MAX_COMMAND + draw(st.integers(0, 3 * MAX_COMMAND)))
            + b'"}}'
        )
    return line.replace(b"\n", b" ")


def check_reply(raw: bytes) -> dict[str, Any]:
    reply = json.loads(raw)  # raises on anything that is not one valid JSON document
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        assert reply["error"]["code"] in DOCUMENTED_ERROR_CODES, reply
        assert reply["error"]["code"] != "internal", reply
    return reply


@pytest.mark.parametrize(
    "examples",
    [pytest.param(EXAMPLES, id="sample"), pytest.param(2000, marks=pytest.mark.full, id="full")],
)
def test_fuzzed_socket_lines_and_a_well_formed_client_alongside(
    make_agent: Any, api_stub: ApiStub, examples: int
) -> None:
    agent: AgentProcess = make_agent(
        agent_config(api_stub, limits={"max_command_bytes": MAX_COMMAND})
    )
    agent.start()
    honest = SocketProducer(agent.socket_path, "honest", count=None, window=8)
    honest.start()
    accepted: list[str] = []
    counter = iter(range(10**9))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(agent.socket_path))
    stream = sock.makefile("rb")

    @fuzz_settings(examples)
    @given(line=hostile_lines(), split=st.lists(st.integers(0, 400), max_size=3))
    def one(line: bytes, split: list[int]) -> None:
        n = next(counter)
        sentinel = json.dumps({"command": "status", "request_id": f"sentinel-{n}"}).encode()
        data = line + b"\n" + sentinel + b"\n"
        # Partial frames: the line arrives in pieces.
        cuts = sorted({min(c, len(data)) for c in split})
        start = 0
        for cut in [*cuts, len(data)]:
            if cut > start:
                sock.sendall(data[start:cut])
                start = cut
        replies = []
        while True:
            raw = stream.readline()
            assert raw, f"the agent closed the connection after {line[:200]!r}"
            reply = check_reply(raw)
            if reply.get("request_id") == f"sentinel-{n}":
                break
            replies.append(reply)
        expected = 0 if not line.rstrip(b"\r").strip() else 1
        assert len(replies) == expected, (line[:200], replies)
        if replies and replies[0]["ok"]:
            document = json.loads(line)
            if isinstance(document, dict) and document.get("command") == "track_event":
                accepted.append(document["name"])

    try:
        one()
    finally:
        sock.close()
        honest.stop()
        join_producers([honest])
    assert honest.acked, "the well-formed client was starved"
    assert not honest.refused, honest.refused
    wait_delivered(api_stub, honest.acked, agent)
    wait_drained(agent)
    check_no_loss(api_stub, honest.acked, max_duplicates=0, agent=agent)
    # Fuzzed commands that were accepted reached the API too (matched by event name).
    names = collections.Counter(r.data.get("event_type") for r in api_stub.received())
    short = {name: n for name, n in collections.Counter(accepted).items() if names[name] < n}
    assert not short, f"accepted fuzzed events missing at the API: {short}"
    print(f"{examples} fuzzed lines, {len(accepted)} accepted; honest acked {len(honest.acked)}")


@pytest.mark.parametrize(
    "examples",
    [pytest.param(EXAMPLES, id="sample"), pytest.param(2000, marks=pytest.mark.full, id="full")],
)
def test_fuzzed_mqtt_payloads(
    make_agent: Any, api_stub: ApiStub, broker: MosquittoBroker, examples: int
) -> None:
    agent: AgentProcess = make_agent(
        agent_config(
            api_stub,
            limits={"max_command_bytes": MAX_COMMAND},
            mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port},
        )
    )
    agent.start()
    wait_mqtt_connected(agent)
    errors: list[bytes] = []
    lock = threading.Lock()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)

    def on_message(c: Any, u: Any, message: paho.MQTTMessage) -> None:
        with lock:
            errors.append(bytes(message.payload))

    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.subscribe(f"engagement/{DEVICE_ID}/+/error", qos=1)
    topic = f"engagement/{DEVICE_ID}/kiosk/command"
    good: list[str] = []
    counter = iter(range(10**9))

    @fuzz_settings(examples)
    @given(payload=hostile_lines())
    def one(payload: bytes) -> None:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
        # A well-formed command after every hostile one: the agent keeps accepting them.
        rid = f"g{next(counter)}"
        body = {"command": "track_event", "name": EVENT, "properties": {"rid": rid}}
        client.publish(topic, json.dumps(body).encode(), qos=1).wait_for_publish(10)
        good.append(rid)

    try:
        one()
        wait_delivered(api_stub, good, agent, timeout=60)
        wait_drained(agent)
        assert agent.status()["mqtt"]["connected"]
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        received = list(errors)
    assert received, "no hostile payload was reported on the error topic?"
    for raw in received:
        check_reply(raw)
    check_no_loss(api_stub, good, max_duplicates=0, agent=agent)
    print(f"{examples} fuzzed payloads, {len(received)} error reports")


def test_slow_client_and_connection_churn(make_agent: Any, api_stub: ApiStub) -> None:
    limit = 16
    agent: AgentProcess = make_agent(agent_config(api_stub, socket={"max_connections": limit}))
    agent.start()
    honest = SocketProducer(agent.socket_path, "honest", count=None, window=16)
    honest.start()
    wait_for(lambda: honest.acked_count() > 10, 15, "the honest client")

    # A slow client dribbles one command a byte at a time.
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.settimeout(30)
    slow.connect(str(agent.socket_path))
    slow_line = json.dumps(
        {"command": "track_event", "name": EVENT, "properties": {"rid": "slow"}}
    ).encode()
    dribble_done = threading.Event()

    def dribble() -> None:
        for i in range(len(slow_line)):
            slow.sendall(slow_line[i : i + 1])
            time.sleep(0.005)  # input shaping, not a wait for a condition
        slow.sendall(b"\n")
        dribble_done.set()

    threading.Thread(target=dribble, daemon=True).start()

    # The flood: a burst of idle connections (up to the cap) and connect/close churn.
    held: list[socket.socket] = []
    for _ in range(limit - 2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(agent.socket_path))
        held.append(sock)
    for _ in range(300):
        churn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(OSError):
            churn.connect(str(agent.socket_path))
        churn.close()
    for sock in held:
        sock.close()

    assert dribble_done.wait(30)
    slow.settimeout(30)
    reply = check_reply(slow.makefile("rb").readline())
    slow.close()
    # The slow client held its slot from before the flood: it must be served.
    assert reply["ok"], reply
    acked_before = honest.acked_count()
    wait_for(
        lambda: honest.acked_count() > acked_before + 100, 30, "the honest client after the flood"
    )
    honest.stop()
    join_producers([honest])
    # The honest client kept its connection through the flood: no refusals, nothing lost.
    assert not honest.refused, honest.refused
    acked = [*honest.acked, "slow"]
    wait_delivered(api_stub, acked, agent)
    check_no_loss(api_stub, acked, max_duplicates=0, agent=agent)
    assert agent.status()["queue"]["items"] >= 0


def test_connection_cap_holds_against_a_burst_of_connects(make_agent: Any) -> None:
    """socket.max_connections must bound connections however fast they arrive."""
    agent: AgentProcess = make_agent({"socket": {"max_connections": 4}})
    agent.start()
    # The test connects as the agent's own user, which also gets the reserved slots.
    limit = 4 + RESERVED_CONNECTIONS
    held = []
    try:
        for _ in range(limit + 4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(agent.socket_path))
            held.append(sock)
        # Every connection is either refused (one `unavailable` line, then EOF) or served.
        outcomes = []
        for sock in held:
            sock.settimeout(10)
            # A refused connection may already be closed by the agent: its line is still there.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b'{"command": "status"}\n')
            line = sock.makefile("rb").readline()
            reply = check_reply(line) if line else {"ok": False, "error": {"code": "eof"}}
            outcomes.append("served" if reply["ok"] else reply["error"]["code"])
        served = outcomes.count("served")
        assert served <= limit, (
            f"{served} connections served with socket.max_connections = {limit}: {outcomes}"
        )
    finally:
        for sock in held:
            sock.close()
