"""The MQTT adapter against a real Mosquitto, in-process, with a stand-in backend.

The daemon's wiring is tested elsewhere; here the backend is a small fake that commits into a
list (and can be held or made unavailable), so every test is about the MQTT layer: when the
PUBACK goes out, what the broker redelivers, which topic each reply lands on.

Every wait is a condition with a deadline; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig, MqttConfig
from agent.dispatch import Accepted, Dispatcher, Result
from agent.errors import Unavailable
from agent.mqtt.adapter import MAX_PENDING_BYTES, MqttAdapter
from agent.mqtt.client import READ_CHUNK, PahoClient
from tests.fixtures.daemon import wait_for, wait_for_async
from tests.fixtures.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]
DEVICE = "dev1"
CMD = f"engagement/{DEVICE}/kiosk/command"
ERR = f"engagement/{DEVICE}/kiosk/error"
REPLY = f"engagement/{DEVICE}/kiosk/reply"
RESPONSES = f"engagement/{DEVICE}/kiosk/response/ui"  # an app's responses go under its topics
STATUS = f"engagement/{DEVICE}/status"
#: Seconds a scenario waits for something the broker or the adapter should do.
WAIT = 15.0
RESPONSES = f"engagement/{DEVICE}/kiosk/response/"


# ---------------------------------------------------------------------------- helpers


class FakeBackend:
    """The dispatcher's writer and queries: commits into a list. `gate` holds commits, `delay`
    slows each group down; `fail_next` makes commands unavailable."""

    def __init__(self) -> None:
        self.committed: list[tuple[str, Any]] = []
        self.calls = 0
        self.groups = 0
        self.waiting = 0
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.delay = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def commit(self, commands: Sequence[Accepted], done: Callable[[list[Result]], None]) -> None:
        self.groups += 1
        task = asyncio.ensure_future(self._commit(list(commands), done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, commands: list[Accepted], done: Callable[[list[Result]], None]) -> None:
        if self.gate is not None:  # a stalled writer holds the whole group
            self.waiting += len(commands)
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        results: list[Result] = []
        for command in commands:
            self.calls += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                results.append(Unavailable("the disk is full"))
            else:
                self.committed.append((command.app, command.command))
                results.append(None)
        done(results)

    async def query(self, command: Accepted) -> Mapping[str, Any]:
        return {"app": command.app, "queried": command.command_name}

    def names(self) -> list[str]:
        return [command.name for _, command in self.committed if command.command == "track_event"]


class AppClient:
    """The app side: a plain paho client on its own network thread."""

    def __init__(
        self,
        port: int,
        *,
        protocol: int = 5,
        client_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        v5 = protocol == 5
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"app-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not persistent,
        )
        self._lock = threading.Lock()
        self._messages: list[paho.MQTTMessage] = []
        self._subacks: set[int] = set()
        self.pubacks: set[int] = set()
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        properties = None
        if v5 and persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        if v5:
            self.client.connect(
                "127.0.0.1", port, clean_start=not persistent, properties=properties
            )
        else:
            self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._lock:
            self._subacks.add(mid)

    def _on_publish(self, client: Any, userdata: Any, mid: int, code: Any, props: Any) -> None:
        with self._lock:
            self.pubacks.add(mid)

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        wait_for(lambda: mid in self._subacks, what=f"SUBACK for {topic}")

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        properties: Properties | None = None,
        retain: bool = False,
    ) -> paho.MQTTMessageInfo:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        return self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)

    def messages(self, topic: str) -> list[paho.MQTTMessage]:
        with self._lock:
            return [m for m in self._messages if m.topic == topic]

    def payloads(self, topic: str) -> list[Any]:
        return [json.loads(m.payload) for m in self.messages(topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 90))


def make_config(port: int, **mqtt: Any) -> AgentConfig:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": port, **mqtt}
    return AgentConfig(device_id=DEVICE, mqtt=MqttConfig(**settings))


class Harness:
    """Builds adapters that share a client id (so they share the broker-side session)."""

    def __init__(self, broker: MosquittoBroker, **mqtt: Any) -> None:
        self.broker = broker
        self.config = make_config(broker.port, **mqtt)
        self.status: dict[str, Any] = {"online": True, "version": "test", "uptime": 0.0}

    async def start(self, backend: FakeBackend, **timings: Any) -> MqttAdapter:
        options: dict[str, Any] = {
            "reconnect_base": 0.1,
            "reconnect_cap": 1.0,
            "retry_base": 0.05,
            "drain_timeout": 0.5,
            **timings,
        }
        adapter = MqttAdapter(
            self.config,
            Dispatcher(self.config, backend, backend),
            asyncio.get_running_loop(),
            lambda: dict(self.status),
            **options,
        )
        adapter.start()
        await wait_for_async(lambda: adapter.connected, WAIT, "the adapter to connect")
        return adapter


def track(name: str, **extra: Any) -> dict[str, Any]:
    return {"command": "track_event", "name": name, **extra}


async def to_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


# ---------------------------------------------------------------------------- delivery and acks


def test_command_is_acked_only_after_commit_and_redelivered_otherwise(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        held = FakeBackend()
        held.gate = asyncio.Event()
        first = await harness.start(held)
        app = AppClient(mosquitto.port)
        app.publish(CMD, track("held"))
        await wait_for_async(
            lambda: held.waiting == 1, WAIT, "the backend to be committing the command"
        )
        # The agent goes away while the commit is still pending: no PUBACK may have been sent.
        await first.stop()
        held.gate.set()

        backend = FakeBackend()
        second = await harness.start(backend)
        await wait_for_async(
            lambda: backend.names() == ["held"], WAIT, "the broker to redeliver the command"
        )

        # This time it was committed and acked: a third agent must not see it again. The
        # broker resends unacked messages before anything new, so a sentinel settles it.
        await second.stop()
        third_backend = FakeBackend()
        third = await harness.start(third_backend)
        app.publish(CMD, track("sentinel"))
        await wait_for_async(lambda: third_backend.names() == ["sentinel"], WAIT, "the sentinel")
        await third.stop()
        app.close()

    run(scenario)


@pytest.mark.parametrize("protocol", [5, 3])
def test_commands_published_while_stopped_arrive_after_start(
    mosquitto: MosquittoBroker, protocol: int
) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto, protocol=protocol)
        backend = FakeBackend()
        adapter = await harness.start(backend)  # creates the persistent session
        await adapter.stop()
        app = AppClient(mosquitto.port, protocol=protocol)
        infos = [app.publish(CMD, track(f"offline-{i}")) for i in range(20)]
        await to_thread(lambda: [info.wait_for_publish(5) for info in infos])
        assert backend.committed == []

        adapter = await harness.start(backend)
        expected = [f"offline-{i}" for i in range(20)]
        await wait_for_async(
            lambda: sorted(backend.names()) == sorted(expected), WAIT, "queued commands"
        )
        app.publish("engagement/all/kiosk/command", track("broadcast"))
        await wait_for_async(lambda: "broadcast" in backend.names(), WAIT, "the broadcast command")
        await adapter.stop()
        app.close()

    run(scenario)


def test_rejected_commands_are_acked_and_reported_on_the_error_topic(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        adapter = await harness.start(backend)
        app = AppClient(mosquitto.port)
        app.subscribe("engagement/dev1/+/error")
        app.publish(CMD, b'{"command": "track_event", "name": ')
        app.publish("engagement/dev1/Bad_App/command", track("x", request_id="bad-app"))
        app.publish(CMD, track("x", app="other", request_id="mismatch"))
        app.publish(CMD, track("x", colour="blue"))
        app.publish(CMD, b'{"command": "track_event", "name": "x", "properties": {"v": NaN}}')

        def errors() -> list[Any]:
            return [*app.payloads(ERR), *app.payloads("engagement/dev1/Bad_App/error")]

        await wait_for_async(lambda: len(errors()) == 5, WAIT, "five error replies")
        codes = sorted(reply["error"]["code"] for reply in errors())
        assert codes == sorted(
            [
                "invalid_json",
                "invalid_command",
                "invalid_command",
                "invalid_command",
                "invalid_json",
            ]
        )
        bad_app = app.payloads("engagement/dev1/Bad_App/error")
        assert bad_app[0]["ok"] is False and bad_app[0]["request_id"] == "bad-app"
        mismatch = [r for r in app.payloads(ERR) if r["request_id"] == "mismatch"]
        assert mismatch[0]["error"]["details"][0]["field"] == "app"
        assert all(m.retain is False for m in app.messages(ERR))
        assert backend.committed == []

        # All were acked: a fresh connection gets only the sentinel.
        await adapter.stop()
        backend2 = FakeBackend()
        adapter = await harness.start(backend2)
        app.publish(CMD, track("sentinel"))
        await wait_for_async(lambda: backend2.names() == ["sentinel"], WAIT, "the sentinel")
        assert backend2.calls == 1
        await adapter.stop()
        app.close()

    run(scenario)


def test_retained_command_is_refused_not_replayed(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto, protocol=3)
        app = AppClient(mosquitto.port)
        app.subscribe(ERR)
        info = app.publish(CMD, track("retained"), retain=True)
        await to_thread(lambda: info.wait_for_publish(5))
        backend = FakeBackend()
        adapter = await harness.start(backend)  # 3.1.1 gets retained messages on subscribe
        await wait_for_async(lambda: app.payloads(ERR), WAIT, "the retained command's error")
        assert "retained" in app.payloads(ERR)[0]["error"]["message"]
        assert backend.committed == []
        await adapter.stop()
        app.publish(CMD, b"", retain=True)
        app.close()

    run(scenario)


def test_a_broker_sending_past_receive_maximum_waits_in_tcp_until_commits_make_room(
    make_mosquitto: Callable[..., MosquittoBroker],
) -> None:
    """Mosquitto 2.0, resuming a session with a backlog, sends past the Receive Maximum once
    acks flow (thousands at a time). The agent stops reading while it holds twice that many
    commands, so a backlog of any size costs bounded memory; reading resumes as commits
    finish, and everything arrives."""
    mosquitto = make_mosquitto(["max_queued_messages 0", "max_queued_bytes 0"])
    maximum, backlog = 100, 3000

    async def scenario() -> None:
        harness = Harness(mosquitto, receive_maximum=maximum)
        first = await harness.start(FakeBackend())
        await first.stop()  # the session and its subscription stay on the broker
        app = AppClient(mosquitto.port)
        pad = "x" * 1000  # ~64 commands per read of the socket
        infos = [app.publish(CMD, track(f"e{i}", properties={"pad": pad})) for i in range(backlog)]
        await to_thread(lambda: [info.wait_for_publish(10) for info in infos])
        slow = FakeBackend()
        slow.delay = 0.02  # each group commits 20 ms after it is handed over: acks lag behind
        adapter = await harness.start(slow)
        await wait_for_async(lambda: len(slow.names()) >= backlog, WAIT, "the whole backlog")
        assert sorted(set(slow.names())) == sorted(f"e{i}" for i in range(backlog))
        peak = adapter.pending_commands.peak_count
        # Mosquitto 2.0.11 (Debian 12) overshoots; a broker that does not leaves nothing to
        # hold back, and this test nothing to prove.
        assert peak > maximum, "the broker kept to Receive Maximum: nothing was held back"
        assert peak <= 2 * maximum + 1 + READ_CHUNK // 1000  # the limit, and one read's worth
        await adapter.stop()
        app.close()

    run(scenario)


# ---------------------------------------------------------------------------- replies


def test_request_id_and_queries_reply_on_the_reply_topic(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        adapter = await harness.start(backend)
        app = AppClient(mosquitto.port)
        app.subscribe(REPLY)
        app.publish(CMD, track("silent"))  # no request_id: no reply
        app.publish(CMD, track("loud", request_id="r1"))
        app.publish(CMD, {"command": "status"})
        app.publish(CMD, track("x", bogus=1, request_id="r2"))
        await wait_for_async(lambda: len(app.payloads(REPLY)) == 3, WAIT, "three replies")
        replies = {r["request_id"]: r for r in app.payloads(REPLY)}
        assert replies["r1"] == {"ok": True, "request_id": "r1", "result": {}}
        assert replies[None]["result"] == {"app": "kiosk", "queried": "status"}
        assert replies["r2"]["ok"] is False
        assert replies["r2"]["error"]["code"] == "invalid_command"
        assert sorted(backend.names()) == ["loud", "silent"]
        await adapter.stop()
        app.close()

    run(scenario)


def test_mqtt5_response_topic_gets_every_reply_with_correlation_data(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        adapter = await harness.start(backend)
        app = AppClient(mosquitto.port)
        app.subscribe(RESPONSES + "#")
        app.subscribe(ERR)
        app.subscribe(REPLY)
        response_topic = RESPONSES + "ui"

        def request(payload: Any, correlation: bytes) -> None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
            properties.CorrelationData = correlation
            app.publish(CMD, payload, properties=properties)

        request(track("ok"), b"\x00corr-1")
        request(b"not json", b"corr-2")
        await wait_for_async(lambda: len(app.messages(response_topic)) == 2, WAIT, "two responses")
        by_correlation = {
            m.properties.CorrelationData: json.loads(m.payload)  # type: ignore[union-attr]
            for m in app.messages(response_topic)
        }
        assert by_correlation[b"\x00corr-1"]["ok"] is True
        assert by_correlation[b"corr-2"]["error"]["code"] == "invalid_json"
        # The error is also on the error topic; the reply topic stays quiet.
        await wait_for_async(lambda: app.payloads(ERR), WAIT, "the error topic copy")
        assert app.payloads(ERR)[0]["error"]["code"] == "invalid_json"
        assert app.messages(REPLY) == []
        await adapter.stop()
        app.close()

    run(scenario)


def test_a_response_topic_outside_the_apps_own_subtree_is_ignored(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """App "kiosk" names another app's reply topic (and other foreign topics) as its response
    topic: nothing is published there, the replies go to kiosk's own topics, and the journal
    says so once."""
    pos_reply = f"engagement/{DEVICE}/pos/reply"
    # (Mosquitto refuses control characters in a response topic: escaping is tested with the
    # log lines themselves, tests/unit/test_logs.py.)
    forged = [pos_reply, f"engagement/{DEVICE}/pos/response/x", "elsewhere/kiosk/response/x"]

    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        adapter = await harness.start(backend)
        spy = AppClient(mosquitto.port)
        spy.subscribe("#")
        app = AppClient(mosquitto.port)
        for number, topic in enumerate(forged):
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = topic
            properties.CorrelationData = b"forged"
            app.publish(CMD, track("forged", request_id=f"r{number}"), properties=properties)
        broadcast = Properties(PacketTypes.PUBLISH)
        broadcast.ResponseTopic = pos_reply
        app.publish("engagement/all/kiosk/command", {"command": "status"}, properties=broadcast)
        await wait_for_async(
            lambda: len(spy.messages(REPLY)) == 4, WAIT, "the replies on kiosk's reply topic"
        )
        assert sorted(r["request_id"] or "" for r in spy.payloads(REPLY)) == ["", "r0", "r1", "r2"]
        assert all(
            m.properties is None or not hasattr(m.properties, "CorrelationData")
            for m in spy.messages(REPLY)
        )
        # Then a legitimate request: once its answer is in, the forged ones would be too.
        legit = Properties(PacketTypes.PUBLISH)
        legit.ResponseTopic = RESPONSES + "xyz"
        legit.CorrelationData = b"c-ok"
        app.publish(CMD, track("legit"), properties=legit)
        await wait_for_async(
            lambda: spy.messages(RESPONSES + "xyz"), WAIT, "the legitimate response"
        )
        for topic in forged:
            assert spy.messages(topic) == []
        assert len(backend.names()) == 4  # ignoring the topic refuses nothing
        lines = [r.getMessage() for r in caplog.records if "response topic" in r.getMessage()]
        assert len(lines) == 1, lines  # said once (a minute), not per command
        assert pos_reply in lines[0]
        await adapter.stop()
        spy.close()
        app.close()

    run(scenario)


# ---------------------------------------------------------------------------- status and will


def test_status_is_retained_on_connect_changes_and_goes_offline_on_stop(
    mosquitto: MosquittoBroker,
) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        harness.status["queue"] = {"items": 0}
        watcher = AppClient(mosquitto.port)
        watcher.subscribe(STATUS)
        adapter = await harness.start(FakeBackend(), status_min_interval=0.0)
        await wait_for_async(lambda: watcher.messages(STATUS), WAIT, "the status on connect")
        assert watcher.payloads(STATUS)[0] == {
            "online": True,
            "version": "test",
            "uptime": 0.0,
            "queue": {"items": 0},
        }
        early = AppClient(mosquitto.port)
        early.subscribe(STATUS)
        await wait_for_async(lambda: early.messages(STATUS), WAIT, "the retained status")
        assert early.messages(STATUS)[0].retain is True
        early.close()

        harness.status["uptime"] = 5.0  # uptime alone is not a change
        adapter.status_changed()
        harness.status["queue"] = {"items": 7}
        adapter.status_changed()
        await wait_for_async(lambda: len(watcher.messages(STATUS)) >= 2, WAIT, "the changed status")
        changed = watcher.payloads(STATUS)[1]
        assert changed["queue"] == {"items": 7} and changed["online"] is True

        await adapter.stop()
        await wait_for_async(
            lambda: watcher.payloads(STATUS)[-1] == {"online": False}, WAIT, "the offline status"
        )
        assert len(watcher.messages(STATUS)) == 3
        # Retained: a late subscriber sees offline too.
        late = AppClient(mosquitto.port)
        late.subscribe(STATUS)
        await wait_for_async(
            lambda: late.payloads(STATUS) == [{"online": False}], WAIT, "retained offline"
        )
        watcher.close()
        late.close()

    run(scenario)


def test_status_is_not_republished_for_values_that_move_with_the_clock(
    mosquitto: MosquittoBroker,
) -> None:
    """`uptime`, `as_of` and `queue.oldest_age` change on every call, and times computed from the
    monotonic clock (`next_attempt`) wobble in their last digits: none of it is a change, or
    an agent with a backlog would republish its retained status every 10 s forever."""

    async def scenario() -> None:
        harness = Harness(mosquitto)
        harness.status["queue"] = {"items": 3, "oldest_age": 1.0}
        harness.status["sync"] = {"projects": [{"next_attempt": 1795950159.010444}]}
        watcher = AppClient(mosquitto.port)
        watcher.subscribe(STATUS)
        adapter = await harness.start(FakeBackend(), status_min_interval=0.0)
        await wait_for_async(lambda: watcher.messages(STATUS), WAIT, "the status on connect")
        for step in range(1, 6):
            harness.status["uptime"] = float(step)
            harness.status["as_of"] = 1.8e9 + step
            harness.status["queue"] = {"items": 3, "oldest_age": 1.0 + step}
            harness.status["sync"] = {"projects": [{"next_attempt": 1795950159.0104437}]}
            adapter.status_changed()
            await asyncio.sleep(0.02)
        # A real change: it is published, and everything above would have arrived before it.
        harness.status["queue"] = {"items": 4, "oldest_age": 9.0}
        adapter.status_changed()
        await wait_for_async(lambda: len(watcher.messages(STATUS)) >= 2, WAIT, "the changed status")
        await asyncio.sleep(0.1)
        statuses = watcher.payloads(STATUS)
        assert len(statuses) == 2
        assert statuses[1]["queue"] == {"items": 4, "oldest_age": 9.0}  # still published
        await adapter.stop()
        watcher.close()

    run(scenario)


AGENT_PROCESS = """
import asyncio, sys
from agent.config import AgentConfig, MqttConfig
from agent.dispatch import Dispatcher
from agent.mqtt.adapter import MqttAdapter

class Backend:
    def commit(self, commands, done):
        done([None] * len(commands))
    async def query(self, command):
        return {}

async def main():
    config = AgentConfig(device_id="dev9", mqtt=MqttConfig(host="127.0.0.1", port=int(sys.argv[1])))
    backend = Backend()
    adapter = MqttAdapter(config, Dispatcher(config, backend, backend),
                          asyncio.get_running_loop(), lambda: {"online": True, "pid": 1})
    adapter.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_last_will_marks_a_killed_agent_offline(mosquitto: MosquittoBroker) -> None:
    watcher = AppClient(mosquitto.port)
    watcher.subscribe("engagement/dev9/status")
    agent = subprocess.Popen([sys.executable, "-c", AGENT_PROCESS, str(mosquitto.port)], cwd=REPO)
    try:
        wait_for(
            lambda: {"online": True, "pid": 1} in watcher.payloads("engagement/dev9/status"),
            what="the agent's online status",
        )
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        wait_for(
            lambda: watcher.payloads("engagement/dev9/status")[-1] == {"online": False},
            what="the last will",
        )
        will = watcher.messages("engagement/dev9/status")[-1]
        assert will.qos == 1
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        watcher.close()
    late = AppClient(mosquitto.port)
    late.subscribe("engagement/dev9/status")
    wait_for(
        lambda: late.payloads("engagement/dev9/status") == [{"online": False}],
        what="the retained will",
    )
    late.close()


# ---------------------------------------------------------------------------- failures


def test_unavailable_is_not_acked_and_retried_until_accepted(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        backend.fail_next = 3
        adapter = await harness.start(backend)
        app = AppClient(mosquitto.port)
        app.subscribe(ERR)
        app.publish(CMD, track("eventually", request_id="r-un"))
        await wait_for_async(lambda: backend.names() == ["eventually"], WAIT, "the retried command")
        assert backend.calls == 4
        app.publish(CMD, b"{}")  # a permanent error, as a marker on the error topic
        await wait_for_async(lambda: app.payloads(ERR), WAIT, "the marker error")
        assert [r["error"]["code"] for r in app.payloads(ERR)] == ["invalid_command"]

        # It was acked once accepted: not redelivered to the next connection.
        await adapter.stop()
        backend2 = FakeBackend()
        adapter = await harness.start(backend2)
        app.publish(CMD, track("sentinel"))
        await wait_for_async(lambda: backend2.names() == ["sentinel"], WAIT, "the sentinel")
        await adapter.stop()
        app.close()

    run(scenario)


def test_unavailable_during_stop_is_left_to_the_broker(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        backend.fail_next = 10**6  # shutting down: everything is unavailable
        adapter = await harness.start(backend, retry_base=0.05)
        app = AppClient(mosquitto.port)
        app.publish(CMD, track("later"))
        await wait_for_async(lambda: backend.calls >= 2, WAIT, "a retry")
        await adapter.stop()
        backend2 = FakeBackend()
        adapter = await harness.start(backend2)
        await wait_for_async(lambda: backend2.names() == ["later"], WAIT, "the redelivered command")
        await adapter.stop()
        app.close()

    run(scenario)


def test_broker_restart_mid_stream_loses_no_acknowledged_message(
    mosquitto: MosquittoBroker,
) -> None:
    total = 400

    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        adapter = await harness.start(backend)
        app = AppClient(mosquitto.port, client_id="publisher", persistent=True)
        infos: list[paho.MQTTMessageInfo] = []
        for i in range(total):
            infos.append(app.publish(CMD, track(f"m{i}")))
            if i == total // 3:
                await wait_for_async(
                    lambda: len(backend.committed) > 20, WAIT, "some commands through"
                )
                await to_thread(mosquitto.stop)
            if i == total // 2:
                await to_thread(mosquitto.start)
            if i % 50 == 0:
                await asyncio.sleep(0)
        # Every message the broker acknowledged to the publisher must reach the backend.
        mids = [info.mid for info in infos]
        await wait_for_async(lambda: app.pubacks.issuperset(mids), 30, "publisher PUBACKs")
        expected = {f"m{i}" for i in range(total)}
        await wait_for_async(
            lambda: expected <= set(backend.names()), 30, "every acknowledged message"
        )
        assert adapter.connected
        await adapter.stop()
        app.close()

    run(scenario)


def test_on_connect_is_called_for_every_connection_however_short_the_outage(
    mosquitto: MosquittoBroker,
) -> None:
    """The daemon's network hint for sync (docs/sync.md, "When things go wrong") hangs on this."""

    async def scenario() -> None:
        connects: list[float] = []
        adapter = await Harness(mosquitto).start(
            FakeBackend(), on_connect=lambda: connects.append(time.monotonic())
        )
        await wait_for_async(lambda: len(connects) == 1, WAIT, "the first connection's call")
        await to_thread(mosquitto.stop)
        await wait_for_async(lambda: not adapter.connected, WAIT, "the link to drop")
        await to_thread(mosquitto.start)
        await wait_for_async(lambda: len(connects) == 2, WAIT, "the reconnection's call")
        assert adapter.connected
        await adapter.stop()

    run(scenario)


def test_broker_down_at_start_neither_raises_nor_blocks(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        mosquitto.stop()
        backend = FakeBackend()
        config = make_config(mosquitto.port)
        adapter = MqttAdapter(
            config,
            Dispatcher(config, backend, backend),
            asyncio.get_running_loop(),
            lambda: {"online": True},
            reconnect_base=0.1,
            reconnect_cap=0.5,
        )
        adapter.start()
        assert not adapter.connected
        await asyncio.sleep(0.3)  # let a few attempts fail
        await to_thread(mosquitto.start)
        await wait_for_async(
            lambda: adapter.connected, WAIT, "the adapter to connect once the broker is up"
        )
        app = AppClient(mosquitto.port)
        app.publish(CMD, track("hello"))
        await wait_for_async(lambda: backend.names() == ["hello"], WAIT, "a command")
        await adapter.stop()
        app.close()

    run(scenario)


def test_stop_while_broker_is_down_returns(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        adapter = await harness.start(FakeBackend())
        await to_thread(mosquitto.stop)
        await wait_for_async(lambda: not adapter.connected, WAIT, "the adapter to notice")
        await asyncio.wait_for(adapter.stop(), 15)

    run(scenario)


def test_reload_moves_to_new_topics(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        adapter = await harness.start(backend)
        new_config = AgentConfig(
            device_id=DEVICE,
            mqtt=MqttConfig(
                host="127.0.0.1",
                port=mosquitto.port,
                topic_prefix="site/a",
                client_id=f"engagement-agent-{DEVICE}",
            ),
        )
        adapter.reload(new_config)
        app = AppClient(mosquitto.port)
        app.subscribe(f"site/a/{DEVICE}/status")
        await wait_for_async(
            lambda: app.payloads(f"site/a/{DEVICE}/status"), WAIT, "status on the new prefix"
        )
        app.publish(CMD, track("old-prefix"))
        app.publish(f"site/a/{DEVICE}/kiosk/command", track("new-prefix"))
        await wait_for_async(
            lambda: "new-prefix" in backend.names(), WAIT, "a command on the new prefix"
        )
        assert "old-prefix" not in backend.names()
        await adapter.stop()
        app.close()

    run(scenario)


def test_invalid_settings_never_raise_from_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = AgentConfig(
            device_id=DEVICE,
            mqtt=MqttConfig(host="127.0.0.1", port=1, tls=True, ca_file=tmp_path / "missing"),
        )
        backend = FakeBackend()
        adapter = MqttAdapter(
            config,
            Dispatcher(config, backend, backend),
            asyncio.get_running_loop(),
            lambda: {"online": True},
            reconnect_base=0.05,
            reconnect_cap=0.1,
        )
        adapter.start()
        await asyncio.sleep(0.2)
        assert not adapter.connected
        await asyncio.wait_for(adapter.stop(), 10)

    run(scenario)


# ---------------------------------------------------------------------------- flow control


@pytest.mark.parametrize(
    ("receive_maximum", "size", "flood"),
    [(20, 200, 100), (1000, 60_000, 400)],
    ids=["count-cap", "byte-cap"],
)
def test_qos0_flood_is_capped_and_qos1_still_all_processed(
    mosquitto: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
    receive_maximum: int,
    size: int,
    flood: int,
) -> None:
    """QoS 0 has no flow control: a flood faster than the backend used to pile up in memory
    (1.5 GB for 60 KiB commands). Beyond `receive_maximum` commands or the byte cap the
    adapter drops QoS 0 (at most once by definition); QoS 1 is never dropped."""
    caplog.set_level(logging.WARNING, logger="engagement_agent.mqtt")

    async def scenario() -> None:
        harness = Harness(mosquitto, receive_maximum=receive_maximum)
        backend = FakeBackend()
        backend.gate = asyncio.Event()  # a backend slower than any flood
        adapter = await harness.start(backend)
        max_count, max_bytes = adapter.pending_limits
        assert (max_count, max_bytes) == (receive_maximum, MAX_PENDING_BYTES)
        app = AppClient(mosquitto.port)
        blob = "x" * size
        for i in range(flood):
            app.client.publish(CMD, json.dumps(track(f"q0-{i}", properties={"b": blob})), qos=0)

        def seen() -> int:
            pending = adapter.pending_commands
            return pending.count + pending.qos0_dropped

        await wait_for_async(lambda: seen() == flood, WAIT, "the whole flood to reach the adapter")
        pending = adapter.pending_commands
        assert pending.qos0_dropped > 0
        assert pending.peak_count <= max_count
        assert pending.peak_bytes <= max_bytes
        drops = [r for r in caplog.records if "dropped a QoS 0 command" in r.getMessage()]
        assert len(drops) == 1  # rate-limited; the line counts the drops

        # QoS 1 while the cap is full: not dropped, all processed once the backend catches up.
        infos = [app.publish(CMD, track(f"q1-{i}")) for i in range(30)]
        await wait_for_async(
            lambda: backend.waiting > pending.count, WAIT, "a QoS 1 command being handled"
        )
        backend.gate.set()
        expected = {f"q1-{i}" for i in range(30)}
        await wait_for_async(lambda: expected <= set(backend.names()), WAIT, "every QoS 1 command")
        await wait_for_async(
            lambda: app.pubacks.issuperset(i.mid for i in infos), WAIT, "their PUBACKs"
        )
        await wait_for_async(lambda: adapter.pending_commands.count == 0, WAIT, "nothing pending")
        assert adapter.pending_commands.bytes == 0
        assert len([n for n in backend.names() if n.startswith("q0-")]) == pending.count
        await adapter.stop()
        app.close()

    run(scenario)


# ---------------------------------------------------------------------------- network thread


def test_loop_stop_never_races_the_ending_network_thread(mosquitto: MosquittoBroker) -> None:
    """paho's `loop_stop()` checks `_thread` and then joins it; a thread that cleared
    `_thread` as it ended made that join an AttributeError, which killed the relink task.
    Our thread keeps `_thread`; `loop_start()` forgets an ended one, so reconnects work."""
    rng = random.Random(3)
    for i in range(40):
        connected = threading.Event()
        ended = threading.Event()
        client = PahoClient(
            idle_timeout=15.0,
            on_thread_exit=lambda error, ended=ended: ended.set(),
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"race-{i}",
            reconnect_on_failure=False,
        )
        client.on_connect = lambda *args, connected=connected: connected.set()
        client.connect_async("127.0.0.1", mosquitto.port, 60)
        client.loop_start()
        assert connected.wait(5)
        client.disconnect()
        time.sleep(rng.uniform(0, 0.002))
        client.loop_stop()  # could raise AttributeError: None.join()
        assert ended.wait(5)
        assert client._thread is not None  # what made it possible is gone
        if i == 0:  # the same client connects again, as the adapter's reconnect does
            connected.clear()
            ended.clear()
            client.connect_async("127.0.0.1", mosquitto.port, 60)
            assert client.loop_start() == 0
            assert connected.wait(5)
            client.disconnect()
            client.loop_stop()
            assert ended.wait(5)


def test_reload_reconnects_even_if_stopping_the_old_thread_fails(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong closing the old connection, the relink goes on: MQTT must not be
    left down until the next restart."""

    async def scenario() -> None:
        harness = Harness(mosquitto)
        backend = FakeBackend()
        adapter = await harness.start(backend)
        link = adapter._connection.link
        assert link is not None and link.client is not None

        def broken_loop_stop() -> Any:
            raise AttributeError("'NoneType' object has no attribute 'join'")

        link.client.loop_stop = broken_loop_stop  # type: ignore[method-assign]
        adapter.reload(
            AgentConfig(
                device_id=DEVICE,
                mqtt=MqttConfig(host="127.0.0.1", port=mosquitto.port, topic_prefix="site/b"),
            )
        )
        await wait_for_async(
            lambda: adapter._connection.link not in (None, link), WAIT, "a new link"
        )
        await wait_for_async(lambda: adapter.connected, WAIT, "the new connection")
        app = AppClient(mosquitto.port)
        app.publish(f"site/b/{DEVICE}/kiosk/command", track("after-reload"))
        await wait_for_async(
            lambda: backend.names() == ["after-reload"], WAIT, "a command on the new link"
        )
        assert "stopping the network thread failed" in caplog.text
        await adapter.stop()
        app.close()

    run(scenario)
