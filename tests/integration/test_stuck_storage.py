"""A stuck disk: the watchdog stops hearing from the agent, and clients cannot make it buffer
without bound while nothing can be committed.

The queue lives on a small ext4 filesystem that the test freezes (`fsfreeze`), which makes
every write and fsync block exactly as a hung storage device would.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from agent.ipc import MAX_PENDING_BYTES
from tests.fixtures.daemon import AgentProcess

WATCHDOG_USEC = "2000000"  # ping every 1 s; the writer counts as stuck after 1 s


def pings_within(agent: AgentProcess, seconds: float) -> int:
    """Watchdog pings in a window of `seconds` (a measurement window, not a wait)."""
    agent.notifications.clear()
    time.sleep(seconds)
    return agent.count("WATCHDOG=1")


def test_stuck_writer_stops_the_watchdog_and_recovery_resumes_it(
    make_agent: Any, frozen_fs: Path
) -> None:
    agent: AgentProcess = make_agent({"queue": {"path": str(frozen_fs / "queue.db")}})
    agent.start(env={"WATCHDOG_USEC": WATCHDOG_USEC})
    assert pings_within(agent, 3.0) >= 2

    subprocess.run(["fsfreeze", "--freeze", str(frozen_fs)], check=True)
    replies: list[dict[str, Any]] = []
    blocked = threading.Thread(
        target=lambda: replies.append(agent.request({"command": "track_event", "name": "x"}))
    )
    try:
        blocked.start()
        assert pings_within(agent, 1.5) <= 2  # the last pings before the stall counts
        assert pings_within(agent, 3.0) == 0, "the watchdog was fed while the writer was stuck"
        assert not replies, "a command was acknowledged while its commit could not happen"
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(frozen_fs)], check=True)
    blocked.join(30)
    assert replies and replies[0]["ok"], replies
    assert pings_within(agent, 3.0) >= 2


def test_clients_cannot_pile_up_unbounded_requests_while_commits_hang(
    make_agent: Any, frozen_fs: Path
) -> None:
    agent: AgentProcess = make_agent({"queue": {"path": str(frozen_fs / "queue.db")}})
    agent.start()
    line = (
        json.dumps({"command": "track_event", "name": "big", "properties": {"p": "x" * 60_000}})
        + "\n"
    ).encode()
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    accepted = 0
    subprocess.run(["fsfreeze", "--freeze", str(frozen_fs)], check=True)
    try:
        for client in clients:
            client.connect(str(agent.socket_path))
            client.setblocking(False)
        # Each client tries to push 50 MiB; the agent stops reading once MAX_PENDING_BYTES are
        # in flight, so after a while no client can write any more (nothing writable for 2 s).
        budget = {client: 50 * 1024 * 1024 for client in clients}
        while budget:
            _, writable, _ = select.select([], list(budget), [], 2.0)
            if not writable:
                break
            for client in writable:
                try:
                    sent = client.send(line)
                except BlockingIOError:
                    continue
                accepted += sent
                budget[client] -= sent
                if budget[client] <= 0:
                    del budget[client]
        assert budget, "every client could write 50 MiB to an agent that cannot commit"
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(frozen_fs)], check=True)
    slack = len(clients) * (2 * 1024 * 1024)  # kernel socket buffers and one read each
    assert accepted < MAX_PENDING_BYTES + slack, f"the agent took {accepted} bytes while stuck"
    assert accepted > MAX_PENDING_BYTES // 2
    for client in clients:
        client.close()
    # The agent is still healthy and serves after the disk returns.
    reply = agent.request({"command": "track_event", "name": "after"})
    assert reply["ok"], reply
