"""The MQTT package's pure policies, without a broker or sockets (and, but for the inbox's
hand-off between threads, without threads)."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from agent.config import AgentConfig, MqttConfig
from agent.mqtt.inbox import Inbox
from agent.mqtt.link import Attempt, ProtocolChoice, describe_failure, reconnect_delay
from agent.mqtt.status import StatusPolicy, change_key
from agent.mqtt.topics import Topics, client_id_for

# ---------------------------------------------------------------------------- topics

TOPICS = Topics("site/a", "dev1")


def test_topics_are_built_from_prefix_and_device() -> None:
    assert TOPICS.command_filters == ("site/a/dev1/+/command", "site/a/all/+/command")
    assert TOPICS.status == "site/a/dev1/status"
    assert TOPICS.reply("kiosk") == "site/a/dev1/kiosk/reply"
    assert TOPICS.error("kiosk") == "site/a/dev1/kiosk/error"


@pytest.mark.parametrize(
    ("topic", "app"),
    [
        ("site/a/dev1/kiosk/command", "kiosk"),
        ("site/a/all/kiosk/command", "kiosk"),
        ("site/a/dev1/Bad App\n/command", "Bad App\n"),  # the caller validates the name
        ("site/a/dev2/kiosk/command", None),  # another device
        ("site/a/dev1/kiosk/reply", None),
        ("site/a/dev1/kiosk/x/command", None),
        ("site/b/dev1/kiosk/command", None),
        ("site/adev1/kiosk/command", None),
        ("site/a/dev1/command", None),
    ],
)
def test_app_of_reads_only_our_command_topics(topic: str, app: str | None) -> None:
    assert TOPICS.app_of(topic) == app


@pytest.mark.parametrize(
    ("app", "requested", "honoured"),
    [
        ("kiosk", "site/a/dev1/kiosk/response/ui", True),
        ("kiosk", "site/a/dev1/kiosk/response/ui/42", True),
        ("kiosk", "site/a/dev1/kiosk/response/ ", True),
        # Forgeries: another app's replies, errors or responses, which the agent may write.
        ("kiosk", "site/a/dev1/pos/reply", False),
        ("kiosk", "site/a/dev1/pos/error", False),
        ("kiosk", "site/a/dev1/pos/response/ui", False),
        ("kiosk", "site/a/dev1/status", False),
        ("kiosk", "site/a/dev1/kiosk/command", False),  # a command loop
        ("kiosk", "site/a/dev1/kiosk/reply", False),
        ("kiosk", "site/a/dev2/kiosk/response/ui", False),  # another device's app
        ("kiosk", "site/a/all/kiosk/response/ui", False),
        ("kiosk", "site/b/dev1/kiosk/response/ui", False),
        ("kiosk", "site/a/dev1/kiosk/response/", False),  # nothing under it
        ("kiosk", "site/a/dev1/kiosk/response", False),
        ("kiosk", "site/a/dev1/kiosk/responses/ui", False),
        ("kiosk", "site/a/dev1/kiosk-2/response/ui", False),
        ("kiosk-2", "site/a/dev1/kiosk/response/ui", False),
        ("kiosk", "site/a/dev1/kiosk/response/+", False),  # wildcards: not a topic name
        ("kiosk", "site/a/dev1/kiosk/response/#", False),
        ("kiosk", "app/responses/kiosk", False),
        ("kiosk", "", False),
    ],
)
def test_only_the_apps_own_response_subtree_is_honoured(
    app: str, requested: str, honoured: bool
) -> None:
    """Commands on the device's topic and on the broadcast topic get the same rule: the app's
    subtree on this device (the only one the broker ACL lets that app read)."""
    assert TOPICS.response_prefix(app) == f"site/a/dev1/{app}/response/"
    assert TOPICS.honours_response_topic(app, requested) is honoured


def test_stale_filters_are_the_old_ones_no_longer_used() -> None:
    new = Topics("site/b", "dev1")
    assert new.stale_filters(TOPICS) == ("site/a/all/+/command", "site/a/dev1/+/command")
    assert TOPICS.stale_filters(TOPICS) == ()


def test_client_id_is_fixed_per_device_unless_configured() -> None:
    assert client_id_for(AgentConfig(device_id="d7")) == "engagement-agent-d7"
    configured = AgentConfig(device_id="d7", mqtt=MqttConfig(client_id="mine"))
    assert client_id_for(configured) == "mine"


# ---------------------------------------------------------------------------- status policy


def status(
    items: int, uptime: float = 1.0, oldest: float | None = 5.0, as_of: float = 1e9
) -> dict[str, object]:
    return {"uptime": uptime, "as_of": as_of, "queue": {"items": items, "oldest_age": oldest},
            "sync": {}}


def test_status_is_published_on_change_but_not_for_clock_values() -> None:
    policy = StatusPolicy(10.0, 300.0)
    first = policy.payload(status(1), 0.0, force=True)
    assert first is not None and json.loads(first)["online"] is True
    assert policy.payload(
        status(1, uptime=99.0, oldest=80.0, as_of=2e9), 20.0, force=False) is None
    assert policy.payload(status(2), 30.0, force=False) is not None
    assert policy.payload(status(2), 31.0, force=True) is not None  # connect, heartbeat


def test_status_changes_wait_for_the_minimum_interval_and_heartbeat_follows() -> None:
    policy = StatusPolicy(10.0, 300.0)
    assert policy.hint_delay(0.0) == 0.0  # never published: at once
    policy.payload(status(1), 100.0, force=True)
    assert policy.hint_delay(104.0) == pytest.approx(6.0)
    assert policy.hint_delay(111.0) == 0.0
    assert policy.heartbeat_delay(150.0) == pytest.approx(250.0)
    assert policy.heartbeat_delay(500.0) == 0.0


def test_change_key_rounds_times_to_the_second() -> None:
    a = {"sync": {"projects": [{"next_attempt": 10.2}]}}
    b = {"sync": {"projects": [{"next_attempt": 10.4}]}}
    c = {"sync": {"projects": [{"next_attempt": 12.0}]}}
    assert change_key(a) == change_key(b) != change_key(c)


# ---------------------------------------------------------------------------- link policy


def test_reconnect_delay_is_full_jitter_under_a_doubling_cap() -> None:
    rng = random.Random(7)
    for attempts, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 120.0), (1000, 120.0)]:
        delays = [reconnect_delay(attempts, 1.0, 120.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range, not a fixed step
        assert min(delays) < ceiling * 0.2


def test_auto_falls_back_to_311_when_the_broker_refuses_5_and_says_so_once() -> None:
    choice = ProtocolChoice("auto")
    assert choice.version == 5
    line = choice.after(Attempt(5, connack=0x84))
    assert choice.version == 3
    assert line is not None and "3.1.1" in line and "mqtt.protocol" in line
    # A 3.1.1-only broker that also refuses 3.1.1 would flip us back, but silently.
    assert choice.after(Attempt(3, connack=0x01)) is None
    assert choice.version == 5


def test_auto_falls_back_when_the_connection_closes_at_connect() -> None:
    choice = ProtocolChoice("auto")
    assert choice.after(Attempt(5, closed_at_connect=True)) is not None
    assert choice.version == 3
    assert choice.after(Attempt(3, connack=0)) is None
    assert choice.version == 3  # it worked: kept


def test_auto_keeps_a_version_that_worked_when_later_connections_drop() -> None:
    choice = ProtocolChoice("auto")
    choice.after(Attempt(5, connack=0))
    assert choice.after(Attempt(5, closed_at_connect=True)) is None
    assert choice.version == 5


def test_other_failures_never_change_the_version() -> None:
    choice = ProtocolChoice("auto")
    for attempt in (Attempt(5), Attempt(5, connack=0x87), Attempt(5, connack=0x86)):
        assert choice.after(attempt) is None
    assert choice.version == 5


@pytest.mark.parametrize("setting", [5, 3])
def test_a_forced_version_is_never_changed(setting: int) -> None:
    choice = ProtocolChoice(setting)  # type: ignore[arg-type]
    assert choice.version == setting
    assert choice.after(Attempt(setting, connack=0x84)) is None
    assert choice.after(Attempt(setting, closed_at_connect=True)) is None
    assert choice.version == setting


def test_unhelpful_failures_name_the_likely_cause() -> None:
    closed = describe_failure(Attempt(5, closed_at_connect=True), "disconnected: Unspecified error")
    assert closed.startswith("disconnected: Unspecified error: ")
    assert "MQTT 5" in closed and "mqtt.protocol = 3" in closed
    refused = describe_failure(Attempt(3, connack=1), "refused: Unsupported protocol version")
    assert "MQTT 3.1.1" in refused
    assert describe_failure(Attempt(5, connack=0x86), "bad user") == "bad user"


# ---------------------------------------------------------------------------- inbox


def test_inbox_wakes_once_per_pass_and_hands_over_in_order() -> None:
    inbox: Inbox[str] = Inbox()
    assert inbox.put("a", 10, 1, 5, 1000).wake
    assert not inbox.put("b", 10, 1, 5, 1000).wake
    assert inbox.take() == ["a", "b"]
    assert inbox.put("c", 10, 1, 5, 1000).wake  # the next pass needs a new wake-up
    assert inbox.snapshot().count == 3
    inbox.release([10, 10])
    assert (inbox.snapshot().count, inbox.snapshot().bytes) == (1, 10)


def test_inbox_drops_qos0_beyond_the_caps_but_never_qos1() -> None:
    inbox: Inbox[int] = Inbox()
    for i in range(3):
        assert inbox.put(i, 100, 0, 3, 10_000).admitted
    dropped = inbox.put(99, 100, 0, 3, 10_000)
    assert not dropped.admitted and (dropped.held_count, dropped.held_bytes) == (3, 300)
    assert inbox.put(4, 100, 1, 3, 10_000).admitted  # QoS 1: the broker bounds it
    assert not inbox.put(5, 9_700, 0, 100, 10_000).admitted  # the byte cap
    pending = inbox.snapshot()
    assert (pending.count, pending.qos0_dropped, pending.peak_count) == (4, 2, 4)


def test_inbox_has_room_below_the_limit_and_again_once_commands_are_released() -> None:
    inbox: Inbox[int] = Inbox()
    for i in range(3):
        inbox.put(i, 100, 1, 3, 10_000)
    assert inbox.wait_for_room(4, timeout=0.0)
    assert not inbox.wait_for_room(3, timeout=0.01)  # full: the caller reads nothing yet
    inbox.release([100])
    assert inbox.wait_for_room(3, timeout=0.0)


def test_a_release_wakes_the_reader_waiting_for_room_at_once() -> None:
    """The one test here with a thread: the inbox is the network thread's hand-off."""
    inbox: Inbox[int] = Inbox()
    for i in range(3):
        inbox.put(i, 100, 1, 3, 10_000)
    answers: list[tuple[bool, float]] = []

    def reader() -> None:
        started = time.monotonic()
        answers.append((inbox.wait_for_room(3, timeout=30.0), time.monotonic() - started))

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + 30.0
    while not inbox._readers_waiting and time.monotonic() < deadline:  # the reader waits
        time.sleep(0.001)
    inbox.release([100])
    thread.join(30.0)
    [(room, waited)] = answers
    assert room and waited < 10.0
