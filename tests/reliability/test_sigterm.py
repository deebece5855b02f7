"""SIGTERM (systemctl stop) in the middle of work: exit 0 within a few seconds, lose nothing.

SPEC §10: on SIGTERM the agent stops taking commands, finishes in-flight ones, tries one last
flush bounded by a few seconds, and exits 0. Whatever it could not send is there after restart.
"""

from __future__ import annotations

import time
from typing import Any

from agent_devtools.apistub import ApiStub, Fault
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.reliability.harness import (
    SocketProducer,
    acked_ids,
    agent_config,
    assert_replies_well_formed,
    check_no_loss,
    delivered,
    join_producers,
    start_producers,
    stop_producers,
    wait_delivered,
    wait_drained,
)

#: The property under test: a stop that systemd's default 90 s timeout never has to escalate,
#: and that a fleet operator experiences as "a few seconds".
EXIT_WITHIN = 10.0


def sigterm(agent: AgentProcess) -> tuple[int, float]:
    started = time.monotonic()
    rc = agent.terminate(timeout=60)
    return rc, time.monotonic() - started


def test_sigterm_during_a_large_drain_with_producers_running(
    make_agent: Any, api_stub: ApiStub
) -> None:
    # Paced to 5 requests/s (250 items/s) so the drain is still going when SIGTERM comes.
    agent: AgentProcess = make_agent(agent_config(api_stub, sync={"max_requests_per_second": 5}))
    agent.start()
    api_stub.fail_next(None, 503)
    backlog = SocketProducer(agent.socket_path, "b", count=3000, window=256)
    backlog.start()
    join_producers([backlog])
    api_stub.reset()
    wait_for(lambda: len(delivered(api_stub)) >= 200, 30, "the drain to be under way")
    producers = start_producers(agent, 2, "live", window=32)
    wait_for(lambda: all(p.acked_count() > 20 for p in producers), 15, "live producers")
    rc, took = sigterm(agent)
    stop_producers(producers)
    assert rc == 0, agent.log()
    assert took < EXIT_WITHIN, f"SIGTERM took {took:.1f} s\n{agent.log()[-3000:]}"
    remaining_at_stop = 3000 - len(delivered(api_stub))
    assert remaining_at_stop > 0, "the drain finished before SIGTERM; the test proves nothing"
    all_producers = [backlog, *producers]
    assert_replies_well_formed(all_producers)
    refused = {code for p in producers for code in p.refused.values()}
    assert refused <= {"unavailable"}, refused

    agent.write_config({"sync": {"max_requests_per_second": 0}})
    agent.start()
    acked = acked_ids(all_producers)
    wait_delivered(api_stub, acked, agent)
    wait_drained(agent)
    # The last flush's batch in flight at the deadline may be resent: one batch.
    check_no_loss(api_stub, acked, max_duplicates=50, agent=agent)
    print(f"SIGTERM exit took {took:.2f} s with {remaining_at_stop} items left to send")


def test_sigterm_with_a_hung_request_exits_and_keeps_the_batch(
    make_agent: Any, api_stub: ApiStub
) -> None:
    agent: AgentProcess = make_agent(agent_config(api_stub, sync={"timeout": 30.0}))
    agent.start()
    # The API holds the request and then drops the connection: it never takes the batch.
    api_stub.add_fault(Fault(hang=60, reset=True, count=None))
    producer = SocketProducer(agent.socket_path, "h", count=300)
    producer.start()
    join_producers([producer])
    wait_for(lambda: api_stub.active_requests >= 1, 15, "a hung request")
    rc, took = sigterm(agent)
    assert rc == 0, agent.log()
    assert took < EXIT_WITHIN, f"SIGTERM took {took:.1f} s\n{agent.log()[-3000:]}"
    api_stub.reset()
    api_stub.release_hangs()
    wait_for(lambda: api_stub.active_requests == 0, 15, "the hung requests to end")
    agent.start()
    wait_drained(agent)
    check_no_loss(api_stub, producer.acked, max_duplicates=0, agent=agent)
    print(f"SIGTERM exit took {took:.2f} s with a hung request")
