"""kill -9 at arbitrary moments: during socket ingest, MQTT ingest and uploads.

After every crash the agent is restarted on the same database; at the end the queue is
drained to the API stand-in and every acknowledged id must be there (docs/protocol.md: `ok: true`
means committed; docs/sync.md: at-least-once delivery).
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.sync import MAX_ACKS_IN_FLIGHT
from agent_devtools.apistub import ApiStub, Fault
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.mosquitto import MosquittoBroker
from tests.reliability.harness import (
    MqttProducer,
    acked_ids,
    agent_config,
    assert_replies_well_formed,
    check_no_loss,
    delivered,
    kill_at_random,
    rounds,
    seeded,
    start_producers,
    stop_producers,
    wait_delivered,
    wait_drained,
    wait_ingest_progress,
    wait_mqtt_connected,
)

BATCH = 50
#: A crash can lose the deletes of the batch on the wire plus those still being committed
#: while the next request overlaps them (agent.sync.MAX_ACKS_IN_FLIGHT): each is resent.
UPLOAD_DUPLICATES_PER_KILL = (MAX_ACKS_IN_FLIGHT + 1) * BATCH


@pytest.mark.parametrize("n_rounds", rounds(3, 20))
def test_kill_9_during_pipelined_socket_ingest(
    make_agent: Any, api_stub: ApiStub, n_rounds: int
) -> None:
    rng = seeded()
    agent: AgentProcess = make_agent(agent_config(api_stub))
    agent.start()
    producers = start_producers(agent, 3, "s", reconnect=True, window=128)
    try:
        for n in range(n_rounds):
            # Ingest must be in full swing (and uploads running) when the crash comes.
            before = wait_ingest_progress(agent, producers, 300, f"ingest progress in round {n}")
            delay = kill_at_random(agent, rng, 0.0, 0.25)
            print(f"round {n}: killed {delay:.3f} s later, {before} acked so far")
            agent.start()
    finally:
        stop_producers(producers)
    assert_replies_well_formed(producers)
    acked = acked_ids(producers)
    wait_delivered(api_stub, acked, agent)
    wait_drained(agent)
    counts = check_no_loss(
        api_stub, acked, max_duplicates=n_rounds * UPLOAD_DUPLICATES_PER_KILL, agent=agent
    )
    print(
        f"{len(acked)} acked, {sum(counts.values())} delivered, "
        f"{sum(n - 1 for n in counts.values())} duplicates over {n_rounds} kills"
    )


@pytest.mark.parametrize("n_rounds", rounds(2, 20))
def test_kill_9_during_mqtt_ingest(
    make_agent: Any, api_stub: ApiStub, broker: MosquittoBroker, n_rounds: int
) -> None:
    """The broker PUBACKs the publisher before the agent has the message; what the broker
    accepted sits in the agent's persistent session and must be delivered in the end."""
    rng = seeded()
    receive_maximum = 100
    agent: AgentProcess = make_agent(
        agent_config(
            api_stub,
            mqtt={
                "enabled": True,
                "host": "127.0.0.1",
                "port": broker.port,
                "receive_maximum": receive_maximum,
            },
        )
    )
    agent.start()
    wait_mqtt_connected(agent)
    producer = MqttProducer(broker.port, "m")
    producer.start()
    try:
        for n in range(n_rounds):
            before = len(delivered(api_stub))
            wait_for(
                lambda before=before: len(delivered(api_stub)) >= before + 200,
                30,
                f"MQTT ingest progress in round {n}\n{agent.log()[-3000:]}",
            )
            delay = kill_at_random(agent, rng, 0.0, 0.25)
            print(f"round {n}: killed {delay:.3f} s later")
            agent.start()
            wait_mqtt_connected(agent)
        producer.stop()
        producer.join(10)
        producer.settle()
        accepted = producer.accepted()
    finally:
        producer.close()
    assert accepted, "the broker accepted nothing"
    wait_delivered(api_stub, accepted, agent, timeout=120)
    wait_drained(agent)
    # Each crash may redeliver what was committed but not yet PUBACKed (nominally ≤
    # receive_maximum, but Mosquitto overshoots it on resumed sessions: see
    # test_mqtt_faults.py) and resend what was uploaded but not yet deleted.
    bound = n_rounds * (3000 + UPLOAD_DUPLICATES_PER_KILL)
    counts = check_no_loss(api_stub, accepted, max_duplicates=bound, agent=agent)
    print(f"{len(accepted)} accepted by the broker, {sum(counts.values())} delivered")


@pytest.mark.parametrize("accept", [False, True], ids=["request-lost", "response-lost"])
@pytest.mark.parametrize("n_rounds", rounds(2, 10))
def test_kill_9_while_a_batch_is_in_flight(
    make_agent: Any, api_stub: ApiStub, n_rounds: int, accept: bool
) -> None:
    """The request is on the wire (the stand-in holds it); with `accept` the API has already
    taken it — its response is what gets lost. Nothing may go missing, and the resend may
    duplicate at most the one batch that was in flight."""
    agent: AgentProcess = make_agent(agent_config(api_stub))
    agent.start()
    acked: list[str] = []
    for n in range(n_rounds):
        # Long enough to kill inside it; short enough that the stand-in then finishes the
        # request (and, with `accept`, records what it took) on its own.
        # Without `accept` the stand-in then resets the connection: the API never took it.
        api_stub.add_fault(Fault(hang=2.0, accept=accept, reset=not accept, count=1))
        with agent.client() as client:
            for i in range(120):
                reply = client.request(
                    {
                        "command": "track_event",
                        "name": "rel",
                        "request_id": f"u{n}-{i}",
                        "properties": {"rid": f"u{n}-{i}"},
                    }
                )
                assert reply["ok"], reply
                acked.append(f"u{n}-{i}")
        wait_for(lambda: api_stub.active_requests >= 1, 15, "a request hanging at the API")
        before = len(api_stub.received())
        agent.kill()
        print(f"round {n}: killed with a request in flight; {before} received so far")
        wait_for(lambda: api_stub.active_requests == 0, 15, "the hung request to end")
        agent.start()
        wait_drained(agent)
    wait_delivered(api_stub, acked, agent)
    counts = check_no_loss(
        api_stub, acked, max_duplicates=n_rounds * BATCH if accept else 0, agent=agent
    )
    if accept:
        assert sum(n - 1 for n in counts.values()) > 0, "the lost response caused no resend?"


def test_kill_9_right_after_ack_keeps_the_command(make_agent: Any, api_stub: ApiStub) -> None:
    """The tightest window: kill the moment the reply is read. With sync off, the command
    must be in the queue after restart."""
    agent: AgentProcess = make_agent(agent_config(api_stub, sync={"flush_mode": "manual"}))
    agent.start()
    for n in range(5):
        with agent.client() as client:
            reply = client.request(
                {"command": "track_event", "name": "rel", "properties": {"rid": f"k{n}"}}
            )
        agent.kill()
        assert reply["ok"], reply
        agent.start()
    reply = agent.request({"command": "flush", "wait": True})
    assert reply["ok"] and reply["result"]["remaining"] == 0, reply
    check_no_loss(api_stub, [f"k{n}" for n in range(5)], max_duplicates=0, agent=agent)
