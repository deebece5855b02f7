"""A QoS 1 command stream while the broker restarts or the network between the agent and the
broker drops: everything the broker accepted reaches the API, through the agent's persistent
session and its own reconnects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.relay import Mode, Relay
from tests.reliability.harness import (
    MqttProducer,
    agent_config,
    check_no_loss,
    delivered,
    rounds,
    wait_delivered,
    wait_drained,
    wait_mqtt_connected,
)

RECEIVE_MAXIMUM = 100
#: The agent's reconnect backoff (agent/mqtt/link.py: 1 s doubling to 120 s, full jitter) is only
#: reset by a connection that lasted 30 s; back-to-back outages push it to the cap, so a
#: reconnect may legitimately take up to 120 s.
RECONNECT_WITHIN = 150.0
DUPLICATES_PER_CUT = 3000


def mqtt_agent(make_agent: Any, api: ApiStub, port: int) -> AgentProcess:
    agent: AgentProcess = make_agent(
        agent_config(
            api,
            mqtt={
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "receive_maximum": RECEIVE_MAXIMUM,
            },
        )
    )
    agent.start()
    wait_mqtt_connected(agent)
    return agent


def finish(agent: AgentProcess, api: ApiStub, producer: MqttProducer, n_rounds: int) -> None:
    producer.stop()
    producer.join(10)
    producer.settle()
    accepted = producer.accepted()
    producer.close()
    assert accepted, "the broker accepted nothing"
    # The backlog built up during long reconnects drains at well over 500/s.
    wait_delivered(api, accepted, agent, timeout=120 + len(accepted) / 500)
    wait_drained(agent)
    # A cut loses the PUBACKs of commands committed but not yet acked; the broker redelivers
    # them. That window should be Receive Maximum, but Mosquitto 2.0 overshoots it on a
    # resumed session (its debug log showed ~850 unacked in flight with a maximum of 100), so
    # the bound is loose: the property here is "nothing lost", duplicates are reported.
    bound = n_rounds * DUPLICATES_PER_CUT
    print("duplicated id runs:", describe_duplicates(api))
    counts = check_no_loss(api, accepted, max_duplicates=bound, agent=agent)
    print(f"{len(accepted)} accepted by the broker, {sum(counts.values())} delivered")


def describe_duplicates(api: ApiStub) -> str:
    """Duplicated ids as runs of consecutive numbers: shows which event made them."""
    counts = delivered(api)
    numbers = sorted(int(rid.rsplit("-", 1)[1]) for rid, n in counts.items() if n > 1)
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    stamps: dict[str, set[float]] = {}
    for record in api.received():
        rid = (record.data.get("properties") or {}).get("rid")
        if isinstance(rid, str) and counts.get(rid, 0) > 1:
            stamps.setdefault(rid, set()).add(record.data["timestamp"])
    resent = sum(1 for values in stamps.values() if len(values) == 1)
    text = ", ".join(f"{a}-{b}" for a, b in runs[:20])
    return f"{text} ({resent} of {len(stamps)} re-uploads of one row, the rest re-accepted)"


@pytest.mark.parametrize("n_rounds", rounds(2, 8))
def test_broker_restarts_during_a_qos1_stream(
    make_agent: Any, api_stub: ApiStub, broker: MosquittoBroker, n_rounds: int
) -> None:
    agent = mqtt_agent(make_agent, api_stub, broker.port)
    producer = MqttProducer(broker.port, "b", rate=1000)
    producer.start()
    for n in range(n_rounds):
        before = len(delivered(api_stub))
        wait_for(lambda b=before: len(delivered(api_stub)) >= b + 200, 30, f"progress {n}")
        broker.stop()  # graceful: Mosquitto saves its sessions and queued messages
        wait_for(lambda: not agent.status()["mqtt"]["connected"], 20, "the agent to notice")
        broker.start()
        wait_mqtt_connected(agent, timeout=RECONNECT_WITHIN)
        print(f"round {n}: broker restarted")
    finish(agent, api_stub, producer, n_rounds)


@pytest.mark.parametrize("n_rounds", rounds(2, 8))
def test_network_flaps_between_agent_and_broker(
    make_agent: Any,
    make_relay: Callable[[int], Relay],
    api_stub: ApiStub,
    broker: MosquittoBroker,
    n_rounds: int,
) -> None:
    relay = make_relay(broker.port)
    agent = mqtt_agent(make_agent, api_stub, relay.port)
    producer = MqttProducer(broker.port, "f", rate=1000)  # the apps' side stays up
    producer.start()
    for n in range(n_rounds):
        before = len(delivered(api_stub))
        wait_for(lambda b=before: len(delivered(api_stub)) >= b + 200, 30, f"progress {n}")
        relay.set_mode(Mode.RESET)  # every connection cut at once, reconnects reset too
        wait_for(lambda: not agent.status()["mqtt"]["connected"], 20, "the agent to notice")
        relay.set_mode(Mode.PASS)
        wait_mqtt_connected(agent, timeout=RECONNECT_WITHIN)
        print(f"round {n}: network flapped")
    finish(agent, api_stub, producer, n_rounds)
