"""A local account attacking the running agent (docs/security.md): the daemon as a subprocess,
its real socket, a real Mosquitto, real SQLite files and the API stand-in.

One broker and one API stand-in serve the whole module; the `kiosk` agent is shared by the
attacks that leave it as it was (refused commands, oversized or hostile messages). Tests that
restart the agent or fill its app table start their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig
from agent.mqtt.topics import client_id_for
from agent_devtools.apistub import ApiStub, Match
from tests.fixtures.daemon import AgentProcess, SocketClient, deep_merge, wait_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.shipped_broker import PASSWORD as SHIPPED_PASSWORD
from tests.fixtures.shipped_broker import running_broker
from tests.integration.test_mqtt_e2e import Subscriber
from tests.unit.test_store_v2 import SECRETS as V1_SECRETS
from tests.unit.test_store_v2 import make_v1

PREFIX = "engagement"
DEVICE = "sec-device"
MAX_COMMAND_BYTES = 4096

#: Secrets the config holds; none of them may ever be written to the state directory. Long
#: and unlike anything else, so a hit in a scan is never a coincidence.
KEYS = {"proj-a": "key-a-7Hq2vLw9Xc4ZpRk8", "proj-b": "key-b-Ue5nGt3Jy6MsWd1F"}
MQTT_PASSWORD = "mqtt-pw-Qz8rTb2VnK4hLx7C"
SECRETS = [*KEYS.values(), MQTT_PASSWORD]


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/<pid>/status we measure: Threads, VmRSS and VmHWM (KiB)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def pid_of(agent: AgentProcess) -> int:
    assert agent.process is not None and agent.process.poll() is None
    return agent.process.pid


def project(api: ApiStub, token: str) -> dict[str, str]:
    return {"project_token": token, "authorization_token": KEYS[token], "base_url": api.url}


def ok(agent: AgentProcess | SocketClient, command: Mapping[str, Any]) -> dict[str, Any]:
    reply = agent.request(command)
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


def topic(app: str, kind: str, device: str = DEVICE) -> str:
    return f"{PREFIX}/{device}/{app}/{kind}"


class MqttApp:
    """An app on MQTT: one paho connection publishing commands at QoS 1 to its command topic
    and recording what the agent says on its reply and error topics."""

    def __init__(self, broker: MosquittoBroker, app: str, device: str = DEVICE) -> None:
        self.app = app
        self.device = device
        self.replies = Subscriber(broker.port, topic(app, "reply", device))
        self.refusals = Subscriber(broker.port, topic(app, "error", device))
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def publish(self, command: Mapping[str, Any] | bytes) -> None:
        payload = command if isinstance(command, bytes) else json.dumps(command).encode()
        info = self.client.publish(topic(self.app, "command", self.device), payload, qos=1)
        info.wait_for_publish(30)

    def reply(self, request_id: str) -> dict[str, Any] | None:
        for reply in self.replies.on(topic(self.app, "reply", self.device)):
            if reply.get("request_id") == request_id:
                found: dict[str, Any] = reply
                return found
        return None

    def errors(self) -> list[dict[str, Any]]:
        return self.refusals.on(topic(self.app, "error", self.device))

    def __enter__(self) -> MqttApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.replies.close()
        self.refusals.close()


def kiosk_config(api: ApiStub, broker: MosquittoBroker, **extra: Any) -> dict[str, Any]:
    """Two configured projects (`default` = proj-a, `second` = proj-b), payments mapped to
    `second`, MQTT with a password, uploads only on `flush`."""
    config: dict[str, Any] = {
        "device_id": DEVICE,
        "project": project(api, "proj-a"),
        "projects": {"second": project(api, "proj-b")},
        "mapping": {"payment": ["second"]},
        "mqtt": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": broker.port,
            "username": "_agent",
            "password": MQTT_PASSWORD,
        },
        "limits": {"max_command_bytes": MAX_COMMAND_BYTES},
        "sync": {"flush_mode": "manual"},
    }
    return deep_merge(config, extra)


def start(agent: AgentProcess) -> AgentProcess:
    agent.start()
    wait_for(lambda: agent.status()["mqtt"]["connected"], 30, "the agent's MQTT connection")
    return agent


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    directory = tmp_path_factory.mktemp("mosquitto")
    broker = MosquittoBroker(directory)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def api() -> Iterator[ApiStub]:
    """The stand-in, knowing this module's keys (not the shared fixture's short ones)."""
    with ApiStub("127.0.0.1", 0, KEYS) as stub:
        yield stub


@pytest.fixture(scope="module")
def kiosk(
    tmp_path_factory: pytest.TempPathFactory, api: ApiStub, broker: MosquittoBroker
) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path_factory.mktemp("kiosk"), kiosk_config(api, broker))
    try:
        yield start(agent)
    finally:
        agent.close()


# ------------------------------------------------------------------ threads bounded by config


def test_clients_cannot_add_threads(
    kiosk: AgentProcess, api: ApiStub, broker: MosquittoBroker
) -> None:
    """Upload threads follow the configured projects: once every configured project has
    uploaded, 300 `anonymize` commands naming new projects and 300 naming new mapping entries
    (all `forbidden`), over the socket and over MQTT, leave the thread count where it was."""
    pid = pid_of(kiosk)
    idle = proc_status(pid)["Threads"]
    configured = len(kiosk.status()["sync"]["projects"])
    assert configured == 2
    # Every configured project uploads once: their threads exist from now on.
    ok(kiosk, {"command": "track_event", "name": "warm", "app": "warm"})
    ok(kiosk, {"command": "anonymize", "app": "warm", "project": "second"})
    ok(kiosk, {"command": "track_event", "name": "warm", "app": "warm"})
    ok(kiosk, {"command": "flush", "wait": True})
    assert {r.project for r in api.requests() if r.authorization_ok} == {"proj-a", "proj-b"}
    working = proc_status(pid)["Threads"]
    # Started on first use: one upload thread per configured project, the one timer that ends
    # slow requests, and the fixed pools for queries (2) and control work (1).
    assert working <= idle + configured + 1 + 3, (idle, working)

    def attacks(i: int) -> list[dict[str, Any]]:
        new = {"project_token": f"new-{i}", "base_url": f"http://127.0.0.1:9/{i}"}
        return [
            {"command": "anonymize", "app": "warm", "project": new},
            {"command": "anonymize", "app": "warm", "mapping": {"track_event": ["second", new]}},
        ]

    with kiosk.client() as client:
        for i in range(300):
            for attack in attacks(i):
                reply = client.request(attack)
                assert reply["error"]["code"] == "forbidden", reply
            # A configured project, by name and as an object, keeps the thread count too.
            target = "second" if i % 2 else {"project_token": "proj-a", "base_url": api.url}
            ok(client, {"command": "anonymize", "app": "warm", "project": target})
    with MqttApp(broker, "warm") as app:
        for i in range(300, 600):
            for attack in attacks(i):
                app.publish(attack)
        app.publish({"command": "track_event", "name": "last", "request_id": "last"})
        wait_for(lambda: app.reply("last"), 60, "the reply to the last MQTT command")
        # The error topic comes over a connection of its own: its order is not the reply's.
        errors = wait_for(lambda: len(app.errors()) >= 600 and app.errors(), 60, "600 errors")
        assert len(errors) == 600 and {e["error"]["code"] for e in errors} == {"forbidden"}
    ok(kiosk, {"command": "flush", "wait": True})
    assert proc_status(pid)["Threads"] <= working
    assert {r.project for r in api.requests()} == {"proj-a", "proj-b"}
    assert {p["project_token"] for p in kiosk.status()["sync"]["projects"]} == set(KEYS)


# ------------------------------------------------------------------ no credentials at rest


def state_files(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_no_secrets(directory: Path, secrets: list[str]) -> None:
    """Every file in the state directory, whatever its name (database, WAL, shared memory,
    files moved aside), holds none of the secrets; and, as they hold every app's customers,
    none is open to other users (the agent's group may read them: the offline CLI does)."""
    files = state_files(directory)
    assert files, f"nothing in {directory}"
    for path, data in files.items():
        assert path.stat().st_mode & 0o007 == 0, f"{path} is {oct(path.stat().st_mode)}"
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} in {path}"


def a_run(agent: AgentProcess, broker: MosquittoBroker, api: ApiStub) -> None:
    """What a kiosk's apps do: track, identify, map a payment to a named project, switch to a
    named project (by name, and as an object that even carries the key); some of it is sent,
    some is still queued at the end."""
    ok(agent, {"command": "identify_customer", "ids": {"registered": "jane@example.com"}})
    ok(agent, {"command": "identify_customer", "ids": {"phone": "+421900000000"}})
    payment = {
        "value": 1.5,
        "currency": "EUR",
        "payment_system": "Virtual",
        "product_id": "tea",
        "product_title": "Tea",
    }
    ok(agent, {"command": "track_payment", "item": payment})
    ok(agent, {"command": "anonymize", "app": "pos", "project": "second"})
    ok(agent, {"command": "identify_customer", "app": "pos", "ids": {"registered": "joe@b.c"}})
    second_with_key = {**project(api, "proj-b")}
    ok(agent, {"command": "anonymize", "app": "till", "project": second_with_key})
    ok(agent, {"command": "anonymize", "app": "till", "mapping": {"payment": ["default"]}})
    ok(agent, {"command": "track_payment", "app": "till", "item": payment})
    with MqttApp(broker, "kiosk-ui", agent.config["device_id"]) as app:
        app.publish({"command": "track_event", "name": "tap", "request_id": "tap"})
        wait_for(lambda: app.reply("tap"), 30, "the MQTT reply")
    ok(agent, {"command": "flush", "wait": True})
    ok(agent, {"command": "track_event", "name": "queued", "app": "pos"})
    ok(agent, {"command": "track_event", "name": "queued"})
    assert agent.status()["queue"]["items"] >= 2


def test_no_credentials_at_rest_after_a_run(
    make_agent: Any, tmp_path: Path, api: ApiStub, broker: MosquittoBroker
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = kiosk_config(api, broker, device_id="at-rest", queue={"path": str(state / "queue.db")})
    agent: AgentProcess = start(make_agent(config))
    before = len(api.requests())
    a_run(agent, broker, api)
    sent = api.requests()[before:]
    assert {r.project for r in sent if r.authorization_ok} == {"proj-a", "proj-b"}
    assert {"queue.db", "queue.db-wal"} <= {p.name for p in state.iterdir()}
    assert_no_secrets(state, SECRETS)  # while running: the WAL holds the latest writes
    # Not vacuous: the files do name both projects, by token and URL.
    everything = b"".join(state_files(state).values())
    assert b"proj-b" in everything and api.url.encode() in everything
    agent.kill()
    assert_no_secrets(state, SECRETS)  # as a crash leaves them

    agent.start()
    ok(agent, {"command": "track_event", "name": "after-restart", "app": "till"})
    assert agent.terminate() == 0
    assert_no_secrets(state, SECRETS)

    # A damaged database is moved aside (and with it whatever it held) and a new one begun.
    database = state / "queue.db"
    with database.open("r+b") as damaged:
        damaged.write(b"not an sqlite file")
    start(agent)
    moved = [p for p in state.iterdir() if p.name.startswith("queue.db.corrupt-")]
    assert moved, sorted(p.name for p in state.iterdir())
    a_run(agent, broker, api)
    assert_no_secrets(state, SECRETS)
    # Nor does what the agent says: its status (socket and retained on MQTT) and its log.
    status = json.dumps(agent.status()) + retained_status(broker, "at-rest")[0].decode()
    assert agent.terminate() == 0
    for secret in SECRETS:
        assert secret not in status and secret not in agent.log(), secret


def test_an_upgraded_database_keeps_no_credentials(
    make_agent: Any, tmp_path: Path, api: ApiStub, broker: MosquittoBroker
) -> None:
    """A database the first release wrote (keys in its project rows, in an app's project
    switch, in the WAL and in free pages) loses them when this agent opens it."""
    state = tmp_path / "state"
    make_v1(state / "queue.db")
    for path in state.iterdir():
        path.chmod(0o600)  # as the first release created them
    old_secrets = [s.decode() for s in V1_SECRETS]
    assert all(s in b"".join(state_files(state).values()) for s in V1_SECRETS)
    config = kiosk_config(
        api, broker, device_id="upgraded", queue={"path": str(state / "queue.db")}
    )
    agent: AgentProcess = start(make_agent(config))
    assert_no_secrets(state, old_secrets + SECRETS)
    a_run(agent, broker, api)
    assert_no_secrets(state, old_secrets + SECRETS)
    assert agent.terminate() == 0
    assert_no_secrets(state, old_secrets + SECRETS)


# ------------------------------------------------------------------ bounded state and status

MAX_APPS = 64  # apps.max_apps, default
LONGEST_APP_NAME = 64  # app names match ^[a-z0-9][a-z0-9._-]{0,63}$
#: One app's entry in the status at its largest, apart from the name: session state and the
#: time the push token was last tracked.
APP_ENTRY = len('"":{"session":"background","push_token_tracked_at":1700000000.1234567},')
#: Everything in the status but its apps (queue, sync, projects, MQTT, counters) for a device
#: with two configured projects, with room to spare.
STATUS_REST = 4096


def retained_status(broker: MosquittoBroker, device: str) -> tuple[bytes, dict[str, Any]]:
    """The status message the broker keeps for the device, as a newcomer receives it."""
    watcher = Subscriber(broker.port, topic("x", "x", device).rsplit("/", 2)[0] + "/status")
    try:
        wait_for(lambda: watcher.messages, 15, "the retained status")
        name, payload, retained = watcher.messages[0]
        assert retained, name
        return payload, json.loads(payload)
    finally:
        watcher.close()


def test_two_thousand_app_names_leave_a_small_retained_status(
    make_agent: Any, api: ApiStub, broker: MosquittoBroker
) -> None:
    device = "crowded"
    agent: AgentProcess = start(make_agent(kiosk_config(api, broker, device_id=device)))
    names = [f"{i:04d}-" + "x" * (LONGEST_APP_NAME - 5) for i in range(2000)]
    with agent.client() as client:
        for name in names[: MAX_APPS - 1]:
            ok(client, {"command": "app_foreground", "app": name})
            ok(client, {"command": "track_push_token", "token": "t", "app": name})
        ok(client, {"command": "track_event", "name": "e"})  # `default` is the 64th
        for name in names[MAX_APPS - 1 : 1800]:
            reply = client.request({"command": "track_event", "name": "e", "app": name})
            assert reply["error"]["code"] == "unknown_app", reply
    with MqttApp(broker, "mqtt-app", device) as app:
        for name in names[1800:]:
            app.app = name
            app.publish({"command": "track_event", "name": "e"})
        app.app = "mqtt-app"
        app.publish({"command": "track_event", "name": "e", "request_id": "last"})
        wait_for(lambda: app.reply("last"), 30, "the reply to the last MQTT command")
        reply = app.reply("last")
        assert reply is not None and reply["error"]["code"] == "unknown_app", reply
    assert len(agent.status()["apps"]) == MAX_APPS
    # A fresh connection publishes the status at once (changes wait up to 10 s).
    agent.kill()
    start(agent)
    payload, status = retained_status(broker, device)
    assert len(status["apps"]) == MAX_APPS
    assert max(len(a) for a in status["apps"]) == LONGEST_APP_NAME
    assert all(a["push_token_tracked_at"] for n, a in status["apps"].items() if n != "default")
    assert len(payload) <= MAX_APPS * (LONGEST_APP_NAME + APP_ENTRY) + STATUS_REST, len(payload)


# ------------------------------------------------------------------ logs


#: A terminal escape (clear screen), a carriage return and a line that looks like the agent's.
HOSTILE = "\x1b[2J\r\nFORGED engagement-agent: all good"
RAW = ("\x1b", "\r", "\u2028", "\u0085")


def test_client_text_never_reaches_the_log_raw(
    make_agent: Any, api: ApiStub, broker: MosquittoBroker
) -> None:
    """Names and text a client chose — over the socket, in an MQTT topic and payload, and
    echoed back by the API in its refusal — are escaped in every log line."""
    device = "logged"
    api.fail_commands(Match(text="echo-"), "invalid event type echo-" + HOSTILE)
    agent: AgentProcess = start(
        make_agent(kiosk_config(api, broker, device_id=device, log_level="debug"), name="logged")
    )
    with agent.client() as client:
        client.send_line(b"\x1b[2J\rFORGED not json")
        assert client.read_reply()["error"]["code"] == "invalid_json"
        for command in (
            {"command": HOSTILE},
            {"command": "track_event", "name": "x", "app": "evil" + HOSTILE},
            {"command": "track_event", "name": "x", "properties": {HOSTILE: HOSTILE}},
        ):
            reply = client.request(command)
            assert reply["ok"] is ("properties" in command), reply
        ok(client, {"command": "track_event", "name": "echo-" + HOSTILE})
    # Mosquitto refuses C0 and C1 controls in topics, but lets U+2028 (a line separator) pass.
    with MqttApp(broker, "evil\u2028FORGED", device) as app:
        app.publish({"command": "track_event", "name": "x", "request_id": "bad-app"})
        wait_for(lambda: app.errors(), 30, "the refusal of the bad app name")
    with MqttApp(broker, "kiosk-ui", device) as app:
        app.publish({"command": "track_event", "name": "echo-mqtt" + HOSTILE, "request_id": "e"})
        wait_for(lambda: app.reply("e"), 30, "the MQTT reply")
    ok(agent, {"command": "flush", "wait": True})
    assert agent.status()["queue"]["dead_letters"] == 2, (agent.status(), agent.log())
    assert agent.terminate() == 0

    log = agent.log()
    for char in RAW:
        assert char not in log, (char, log)
    assert not [line for line in log.split("\n") if line.startswith("FORGED")], log
    # Not vacuous: the lines that carry the client's text were written, escaped.
    assert "evil\\u2028FORGED" in log, log
    assert "echo-\\x1b[2J\\x0d\\x0aFORGED" in log, log


# ------------------------------------------------------------------ oversized MQTT messages

#: Far above `limits.max_command_bytes` (4 KiB here): were it taken in, the agent would grow
#: by at least this much.
OVERSIZED = 32 * 1024 * 1024


def publish_raw(broker: MosquittoBroker, topic_name: str, payload: bytes, protocol: int) -> None:
    """One message at QoS 1 from a client of its own, acknowledged by the broker."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(topic_name, payload, qos=1).wait_for_publish(60)
    finally:
        client.loop_stop()
        client.disconnect()


def test_an_oversized_mqtt5_message_never_reaches_the_agent(
    kiosk: AgentProcess, broker: MosquittoBroker
) -> None:
    """On MQTT 5 the agent announces a Maximum Packet Size of limits.max_command_bytes + 1 KiB;
    the broker drops a larger message for it instead of sending it, so the agent's memory does
    not grow by the message's size (and it counts no command: it never saw one)."""
    assert kiosk.status()["mqtt"]["protocol"] == 5
    pid = pid_of(kiosk)
    before = proc_status(pid)
    counts = dict(kiosk.status()["commands"].get("mqtt", {}))
    big = json.dumps(
        {"command": "track_event", "name": "big", "properties": {"x": "y" * OVERSIZED}}
    )
    with MqttApp(broker, "big") as app:
        publish_raw(broker, topic("big", "command"), big.encode(), mqtt.MQTTv5)
        # Delivered in order: had the big one reached the agent, it would be counted first.
        app.publish({"command": "track_event", "name": "after", "request_id": "after"})
        wait_for(lambda: app.reply("after"), 30, "the reply to the command after it")
    after = proc_status(pid)
    assert after["VmHWM"] - before["VmHWM"] < OVERSIZED // 4 // 1024, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < OVERSIZED // 4 // 1024, (before, after)
    counts["ok"] = counts.get("ok", 0) + 1
    assert kiosk.status()["commands"]["mqtt"] == counts


def test_an_oversized_mqtt311_message_is_too_large(
    make_agent: Any, api: ApiStub, broker: MosquittoBroker
) -> None:
    """MQTT 3.1.1 has no Maximum Packet Size: the message arrives and is refused as
    `too_large` on the error topic; the agent goes on (the shipped broker config's
    max_packet_size keeps such messages from the agent, docs/security.md)."""
    device = "old-protocol"
    config = kiosk_config(api, broker, device_id=device, mqtt={"protocol": 3})
    agent: AgentProcess = start(make_agent(config))
    assert agent.status()["mqtt"]["protocol"] == 3
    big = b'{"command": "track_event", "name": "big", "x": "' + b"y" * (4 * 1024 * 1024) + b'"}'
    with MqttApp(broker, "big", device) as app:
        publish_raw(broker, topic("big", "command", device), big, mqtt.MQTTv311)
        app.publish({"command": "track_event", "name": "after", "request_id": "after"})
        wait_for(lambda: app.reply("after"), 30, "the reply to the command after it")
        wait_for(lambda: app.errors(), 30, "the error report")
        assert [e["error"]["code"] for e in app.errors()] == ["too_large"]
    assert agent.status()["commands"]["mqtt"] == {"ok": 1, "too_large": 1}


# ------------------------------------------------------------------ MQTT 5 response topics


def publish_with_response_topic(
    broker: MosquittoBroker, app: str, command: Mapping[str, Any], response_topic: str
) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = response_topic
        properties.CorrelationData = b"corr"
        payload = json.dumps(command).encode()
        client.publish(
            topic(app, "command"), payload, qos=1, properties=properties
        ).wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_response_topic_cannot_make_the_agent_speak_elsewhere(
    kiosk: AgentProcess, broker: MosquittoBroker
) -> None:
    """The agent may publish where apps may not (the shipped ACL lets it write every app's
    reply and error topics and the device's status): an app's MQTT 5 Response Topic is
    honoured only under that app's own `response/` topics; any other is ignored, and the
    answer goes to the app's own reply topic as if none had been given."""
    victim = Subscriber(broker.port, f"{PREFIX}/{DEVICE}/#")
    try:
        with MqttApp(broker, "attacker") as attacker:
            for target in (
                topic("kiosk-ui", "reply"),
                topic("kiosk-ui", "response/ui"),
                f"{PREFIX}/{DEVICE}/status",
                f"{PREFIX}/other-device/attacker/response/x",
                f"{PREFIX}/{DEVICE}/attacker/reply/response/x",
                "elsewhere/entirely",
            ):
                command = {"command": "status", "request_id": target}
                publish_with_response_topic(broker, "attacker", command, target)
                reply = wait_for(lambda t=target: attacker.reply(t), 30, target)
                assert reply["ok"] is True, reply
            # Under its own response/ topics, the app gets its answer there.
            own = topic("attacker", "response/ui")
            publish_with_response_topic(broker, "attacker", {"command": "status"}, own)
            wait_for(lambda: victim.on(own), 30, "the response on the app's own topic")
            assert victim.on(own)[0]["ok"] is True
        spoken = {t for t, _, _ in victim.messages}
        assert not {t for t in spoken if "/kiosk-ui/" in t}, spoken
        statuses = [p for t, p, _ in victim.messages if t.endswith("/status")]
        assert all(json.loads(p).get("online") is not None for p in statuses)
    finally:
        victim.close()


# ------------------------------------------------------------------ one app's state


def test_one_app_cannot_grow_its_ids_to_push_out_the_others(
    make_agent: Any, api: ApiStub, broker: MosquittoBroker
) -> None:
    """`identify_customer` merges ids, and every later item carries them all: without a bound,
    a public-facing app sending new ids over and over would make its items huge and, with
    `queue.on_full = "drop_oldest"`, push every other app's queued items out."""
    config = kiosk_config(api, broker, device_id="ids", queue={"max_bytes": 2 * 1024 * 1024})
    agent: AgentProcess = start(make_agent(config))
    ok(agent, {"command": "identify_customer", "app": "pos", "ids": {"registered": "a@b.c"}})
    for i in range(20):
        ok(agent, {"command": "track_event", "name": f"sale-{i}", "app": "pos"})
    queued = agent.status()["queue"]["items"]
    refused = 0
    with agent.client() as client:
        for i in range(300):
            ids = {f"visitor-{i}-{j}": "x" * 900 for j in range(3)}
            reply = client.request({"command": "identify_customer", "app": "public", "ids": ids})
            if not reply["ok"]:
                assert reply["error"]["code"] == "too_large", reply
                assert reply["error"]["message"].startswith("customer ids too large"), reply
                refused += 1
            ok(client, {"command": "track_event", "name": "visit", "app": "public"})
    assert refused >= 290
    queue = agent.status()["queue"]
    assert queue["dropped"] == 0 and queue["items"] >= queued
    ok(agent, {"command": "flush", "wait": True})
    sales = [
        r.data for r in api.received("proj-a") if str(r.data.get("event_type")).startswith("sale-")
    ]
    assert len([s for s in sales if s["customer_ids"].get("registered") == "a@b.c"]) == 20


# ------------------------------------------------------------------ the agent's MQTT session


def account(broker: MosquittoBroker, user: str, client_id: str = "") -> mqtt.Client:
    """A connected MQTT 5 client with an account of the shipped broker config."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.username_pw_set(user, SHIPPED_PASSWORD)
    connected: list[Any] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: connected.append(rc)
    client.connect("127.0.0.1", broker.port, clean_start=True)
    client.loop_start()
    wait_for(lambda: connected, 15, f"CONNACK for {user}")
    assert not connected[0].is_failure, connected
    return client


def test_an_app_account_cannot_take_over_the_agents_session(
    make_agent: Any, tmp_path: Path, api: ApiStub
) -> None:
    """A broker keeps a session per client id, and a client may ask for any id: an app's
    account connecting with the agent's id would kick the agent off and, starting clean,
    discard the commands the broker kept for it while it was away (other apps' commands the
    broker had acknowledged). The shipped broker config makes every client's id its account's
    user name, so an app cannot take the agent's session."""
    device = "takeover"
    with running_broker(tmp_path, ("_agent", "pos", "kiosk-ui")) as shipped:
        mqtt_config = {"port": shipped.port, "password": SHIPPED_PASSWORD}
        config = kiosk_config(api, shipped, device_id=device, mqtt=mqtt_config)
        agent: AgentProcess = start(make_agent(config))
        client_id = client_id_for(AgentConfig.model_validate(agent.config))
        assert agent.terminate() == 0  # its session, with its subscription, stays on the broker

        pos = account(shipped, "pos")
        command = {"command": "track_event", "name": "while-away", "app": "pos"}
        pos.publish(topic("pos", "command", device), json.dumps(command), qos=1).wait_for_publish(
            15
        )
        pos.loop_stop()
        pos.disconnect()
        thief = account(shipped, "kiosk-ui", client_id=client_id)  # clean start
        thief.loop_stop()
        thief.disconnect()

        start(agent)
        ok(agent, {"command": "flush", "wait": True})

        def arrived() -> bool:
            ok(agent, {"command": "flush", "wait": True})
            return any(r.data.get("event_type") == "while-away" for r in api.received("proj-a"))

        wait_for(arrived, 30, "the command pos published while the agent was away")
