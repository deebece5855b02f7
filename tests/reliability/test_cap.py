"""An API outage long enough to hit `queue.max_bytes`: the cap policy decides what goes, and
every loss is counted — drop_oldest counts exactly what is missing, reject refuses visibly."""

from __future__ import annotations

from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.reliability.harness import (
    EVENT,
    SocketProducer,
    agent_config,
    assert_replies_well_formed,
    check_no_loss,
    delivered,
    join_producers,
    rounds,
    wait_drained,
)

CAP = 65536


def outage_then_recovery(
    agent: AgentProcess, api: ApiStub, producers: list[SocketProducer]
) -> None:
    for producer in producers:
        producer.start()
    join_producers(producers)
    assert_replies_well_formed(producers)
    assert not delivered(api), "the API was down; nothing should have arrived yet"
    status = agent.status()
    assert status["queue"]["bytes"] <= CAP, status["queue"]
    api.reset()  # the API comes back; the agent's backoff (max 1 s) finds it
    wait_drained(agent)


@pytest.mark.parametrize("per_producer", rounds(800, 10000))
def test_drop_oldest_counts_exactly_what_is_missing(
    make_agent: Any, api_stub: ApiStub, per_producer: int
) -> None:
    agent: AgentProcess = make_agent(
        agent_config(api_stub, queue={"max_bytes": CAP, "on_full": "drop_oldest"})
    )
    agent.start()
    api_stub.fail_next(None, 503)
    producers = [SocketProducer(agent.socket_path, "d", count=per_producer)]
    outage_then_recovery(agent, api_stub, producers)
    status = agent.status()
    acked = producers[0].acked
    assert len(acked) == per_producer, producers[0].refused
    counts = delivered(api_stub)
    installation = sum(1 for r in api_stub.received() if r.data.get("event_type") == "installation")
    missing = [rid for rid in acked if rid not in counts]
    dropped = status["queue"]["dropped"]
    assert dropped > 0, "the cap was never reached; the test proves nothing"
    assert len(missing) + (1 - installation) == dropped, (
        f"status says {dropped} dropped, but {len(missing)} events (and "
        f"{1 - installation} installation) are missing\n{agent.log()[-4000:]}"
    )
    # Oldest first: the missing ones are a prefix of the acknowledged sequence.
    assert missing == acked[: len(missing)], "eviction did not take the oldest items"
    check_no_loss(api_stub, acked, max_duplicates=0, dropped=dropped, agent=agent)


@pytest.mark.parametrize("per_producer", rounds(400, 5000))
def test_reject_refuses_visibly_and_loses_nothing_accepted(
    make_agent: Any, api_stub: ApiStub, per_producer: int
) -> None:
    agent: AgentProcess = make_agent(
        agent_config(api_stub, queue={"max_bytes": CAP, "on_full": "reject"})
    )
    agent.start()
    api_stub.fail_next(None, 503)
    producers = [SocketProducer(agent.socket_path, f"r{i}", count=per_producer) for i in range(2)]
    outage_then_recovery(agent, api_stub, producers)
    status = agent.status()
    refused = {rid: code for p in producers for rid, code in p.refused.items()}
    acked = [rid for p in producers for rid in p.acked]
    assert refused, "the cap was never reached; the test proves nothing"
    assert set(refused.values()) == {"queue_full"}, refused
    assert status["queue"]["rejected"] == len(refused)
    assert status["queue"]["dropped"] == 0
    counts = check_no_loss(api_stub, acked, max_duplicates=0, agent=agent)
    leaked = sorted(set(refused) & set(counts))
    assert not leaked, f"refused commands reached the API: {leaked[:10]}"
    # Serving normally again once the queue drained.
    reply = agent.request({"command": "track_event", "name": EVENT, "properties": {"rid": "z"}})
    assert reply["ok"], reply
    wait_for(lambda: "z" in delivered(api_stub), 15, "a new command after the outage")
