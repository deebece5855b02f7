"""The socket cannot be starved (docs/security.md): idle connections are closed, one user
cannot take every slot, and a client that does not read its replies cannot grow the agent.

The real daemon, the real socket; other users are real processes that setuid() to them, and
the agent's memory is read from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.ipc import MAX_PENDING_BYTES, MAX_UNREAD_REPLY_BYTES, READ_CHUNK
from agent_devtools.apistub import ApiStub
from tests.fixtures.api import api_project
from tests.fixtures.daemon import AgentProcess, cli, wait_for

NOBODY = 65534
OTHER_USER = 65533

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other users")


@pytest.fixture
def public_agent(make_agent: Any) -> Iterator[Callable[..., AgentProcess]]:
    """Agents whose socket other users can reach (pytest's tmp dirs are private to root)."""
    public_dir = Path(tempfile.mkdtemp(prefix="ea-limits-"))
    public_dir.chmod(0o755)

    def factory(config: dict[str, Any] | None = None) -> AgentProcess:
        path = public_dir / "agent.sock"
        agent: AgentProcess = make_agent(
            {"sync": {"flush_mode": "manual"}, **(config or {})}
            | {"socket": {"mode": "0666", "path": str(path), **(config or {}).get("socket", {})}}
        )
        agent.socket_path = path
        agent.start()
        return agent

    yield factory
    shutil.rmtree(public_dir, ignore_errors=True)


# A process of another user opening `count` connections, asking `status` on each, and holding
# the ones that were let in until its stdin closes. Prints one JSON summary line.
_HOLDER = """
import json, os, socket, sys
uid, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
held, codes, message = [], {}, ""
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    try:
        s.sendall(b'{"command": "status"}\\n')
    except OSError:
        pass  # refused and already closed: its one line is still there to read
    line = s.makefile("rb").readline()
    reply = json.loads(line) if line else {"ok": False, "error": {"code": "eof", "message": ""}}
    code = "ok" if reply["ok"] else reply["error"]["code"]
    codes[code] = codes.get(code, 0) + 1
    if reply["ok"]:
        held.append(s)
    else:
        message = message or reply["error"]["message"]
        s.close()
print(json.dumps({"codes": codes, "message": message}), flush=True)
sys.stdin.readline()
"""


@contextmanager
def connections_as(uid: int, path: Path, count: int) -> Iterator[dict[str, Any]]:
    """Hold up to `count` connections as `uid`; yields {"codes": {code: n}, "message": ...}."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(uid), str(path), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line, f"the holder as uid {uid} died (exit {holder.wait(30)})"
        yield json.loads(line)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)


@needs_root
def test_a_flood_from_one_user_leaves_room_for_others_root_and_reload(
    public_agent: Callable[..., AgentProcess],
) -> None:
    # The attack: 256 idle connections from one unprivileged user (the default caps).
    agent = public_agent()
    socket_path = str(agent.socket_path)
    with connections_as(NOBODY, agent.socket_path, 256) as flood:
        assert flood["codes"] == {"ok": 32, "unavailable": 224}, flood
        assert "socket.max_connections_per_uid" in flood["message"]
        with connections_as(OTHER_USER, agent.socket_path, 1) as other:
            assert other["codes"] == {"ok": 1}, other
        status = cli("status", "--json", "--socket", socket_path)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["online"] is True  # --json prints the result
        reload = cli("reload", "--config", str(agent.config_path), "--socket", socket_path)
        assert reload.returncode == 0, reload.stderr
    # The flood's slots are free again once it hangs up.
    with connections_as(NOBODY, agent.socket_path, 1) as again:
        assert again["codes"] == {"ok": 1}, again


@needs_root
def test_the_global_cap_holds_for_users_but_root_finds_a_reserved_slot(
    public_agent: Callable[..., AgentProcess],
) -> None:
    agent = public_agent({"socket": {"max_connections": 4, "max_connections_per_uid": 3}})
    with connections_as(NOBODY, agent.socket_path, 3) as first:
        assert first["codes"] == {"ok": 3}, first
        with connections_as(OTHER_USER, agent.socket_path, 3) as second:
            assert second["codes"] == {"ok": 1, "unavailable": 2}, second
            assert "socket.max_connections =" in second["message"]
            status = cli("status", "--json", "--socket", str(agent.socket_path))
            assert status.returncode == 0, status.stderr


def _wait_closed_by_agent(sock: socket.socket, timeout: float = 30.0) -> None:
    sock.settimeout(timeout)
    # Closed with replies unread is a reset: also closed.
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b"", "the agent sent something instead of closing"


def test_an_idle_connection_is_closed_after_idle_timeout(make_agent: Any) -> None:
    agent: AgentProcess = make_agent({"socket": {"idle_timeout": 1.0}})
    agent.start()
    with agent.client() as used, agent.client() as silent:
        assert used.request({"command": "status"})["ok"]
        _wait_closed_by_agent(used.sock)
        _wait_closed_by_agent(silent.sock)
    # The agent itself is fine and serves new connections.
    assert agent.status()["online"] is True


def test_a_request_in_flight_keeps_its_connection_past_idle_timeout(
    make_agent: Any, api_stub: ApiStub
) -> None:
    agent: AgentProcess = make_agent(
        {
            "project": api_project(api_stub),
            "sync": {"flush_mode": "manual"},
            "socket": {"idle_timeout": 1.0},
        }
    )
    agent.start()
    assert agent.request({"command": "track_event", "name": "x"})["ok"]
    api_stub.hang_next(1, 4.0)  # the upload, and so the flush, takes 4 idle timeouts
    with agent.client() as client:
        reply = client.request({"command": "flush", "wait": True, "request_id": "f"})
        assert reply["ok"] and reply["request_id"] == "f", reply
        assert api_stub.received(), "the flush did not wait for the upload"
        _wait_closed_by_agent(client.sock)  # idle again once answered


def test_a_slow_sender_of_a_partial_line_is_closed_as_idle(make_agent: Any) -> None:
    agent: AgentProcess = make_agent({"socket": {"idle_timeout": 1.0}})
    agent.start()
    with agent.client() as slow:
        slow.sock.sendall(b'{"command": "track_event", "name": "')
        sent = 0
        closed = False
        deadline = time.monotonic() + 30.0
        while not closed and time.monotonic() < deadline:
            # One more byte every 0.2 s: never a whole line, always something new.
            readable, _, _ = select.select([slow.sock], [], [], 0.2)
            if readable:
                try:
                    closed = slow.sock.recv(1) == b""
                except ConnectionResetError:
                    closed = True
                continue
            try:
                slow.sock.sendall(b"x")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "a trickling partial line kept its connection open"
        assert sent > 0
    assert agent.status()["queue"]["items"] == 0


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_clients_that_pipeline_status_and_never_read_are_bounded(make_agent: Any) -> None:
    """The attack that grew the agent by 133 MB: pipelined `status`, replies never read."""
    max_pending_reply_bytes = 65536
    agent: AgentProcess = make_agent(
        {
            "sync": {"flush_mode": "manual"},
            "socket": {"max_pending_reply_bytes": max_pending_reply_bytes},
        }
    )
    agent.start()
    # Many apps make the status reply large.
    with agent.client() as client:
        for i in range(60):
            app = f"app-{i:02d}-" + "x" * 50
            assert client.request({"command": "track_event", "name": "e", "app": app})["ok"]
    status_bytes = len(json.dumps(agent.status()))
    assert agent.process is not None
    pid = agent.process.pid
    before_kb = _memory_kb(pid, "VmRSS")

    line = b'{"command": "status"}\n'
    greedy = [agent.client() for _ in range(4)]
    try:
        offered = 20 * 1024 * 1024
        left = {client.sock: offered for client in greedy}
        for sock in left:
            sock.setblocking(False)
        # Push until no connection can take more for 2 s: the agent stopped reading them.
        while left:
            _, writable, _ = select.select([], list(left), [], 2.0)
            if not writable:
                break
            for sock in writable:
                try:
                    left[sock] -= sock.send(line * 4096)
                except BlockingIOError:
                    continue
                if left[sock] <= 0:
                    del left[sock]
        assert left, "the agent read everything from clients that never read a reply"
        # Still serving everyone else.
        assert agent.status()["online"] is True
        peak_kb = _memory_kb(pid, "VmHWM")
    finally:
        for client in greedy:
            client.close()
    # Per connection: the replies it may owe (plus the one that crossed the limit), a read
    # chunk held back unparsed, a partial line; the shared budget of requests in flight; and
    # room for the allocator and interpreter.
    max_command_bytes = 65536
    per_connection = max_pending_reply_bytes + 2 * status_bytes + READ_CHUNK + max_command_bytes
    bound = len(greedy) * per_connection + 4 * MAX_PENDING_BYTES + 16 * 1024 * 1024
    growth = (peak_kb - before_kb) * 1024
    assert growth <= bound, f"grew by {growth} bytes (bound {bound}); status is {status_bytes}"
    # And the agent is still healthy afterwards.
    wait_for(lambda: agent.status()["online"], what="the agent answering after the flood")


# A process of another user opening `count` connections and pipelining on each, never reading:
# `status` (the largest reply), invalid lines (an error reply each), a command with thousands of
# unknown fields (the largest error reply) and a large event; until no connection has taken
# anything for 3 s, then a partial line on each. Prints one JSON summary, holds until stdin closes.
_HOSTILE = """
import json, os, select, socket, sys, time
uid, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    held.append(s)
unknown = {"command": "track_event", "name": "x"}
unknown.update({f"f{i}": 0 for i in range(6000)})
event = {"command": "track_event", "name": "x", "properties": {f"k{i}": i for i in range(2000)}}
chunk = (
    b'{"command": "status"}\\n' * 40
    + b'{"command": "track_event", "name": 1, "properties": [], "extra": true}\\n' * 200
    + json.dumps(unknown).encode() + b"\\n"
    + json.dumps(event).encode() + b"\\n"
)
offset = dict.fromkeys(held, 0)
sent = 0
deadline = time.monotonic() + 120
while held and time.monotonic() < deadline:
    _, writable, _ = select.select([], held, [], 3.0)
    if not writable:
        break
    for s in writable:
        start = offset[s] % len(chunk)
        try:
            n = s.send(chunk[start:] + chunk[:start])
        except BlockingIOError:
            continue
        except OSError:
            held.remove(s)
            continue
        offset[s] += n
        sent += n
for s in held:
    try:
        s.send(b'{"command": "track_event", "name": "' + b"y" * 60000)
    except OSError:
        pass
print(json.dumps({"connections": len(held), "sent": sent}), flush=True)
sys.stdin.readline()
"""

# An honest client of another user: pipelines commands, reads every reply, prints the results.
_HONEST = """
import json, os, socket, sys
uid, path = int(sys.argv[1]), sys.argv[2]
os.setgroups([]); os.setgid(uid); os.setuid(uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(path)
requests = []
for i in range(20):
    requests.append({"command": "track_event", "name": "honest", "request_id": f"t{i}"})
    requests.append({"command": "status", "request_id": f"s{i}"})
    requests.append({"command": "track_event", "name": 1, "request_id": f"x{i}"})
s.sendall(b"".join(json.dumps(r).encode() + b"\\n" for r in requests))
lines = s.makefile("rb")
replies = [json.loads(lines.readline()) for _ in requests]
print(json.dumps([[r["request_id"], r["ok"]] for r in replies]), flush=True)
"""


@needs_root
def test_several_hostile_accounts_together_stay_within_the_global_bound(
    public_agent: Callable[..., AgentProcess],
) -> None:
    """Four accounts with all their connections, none reading: the unread replies of all of
    them share one budget, so the agent's growth does not scale with the number of accounts;
    root and an honest client of another account are served meanwhile."""
    agent = public_agent()
    # The largest status the config allows: apps.max_apps (64) apps, `default` included, with
    # the longest names.
    with agent.client() as client:
        for i in range(63):
            app = f"{i:02d}" + "x" * 62
            assert client.request({"command": "track_event", "name": "e", "app": app})["ok"]
        assert client.request({"command": "track_event", "name": "e"})["ok"]
    status_bytes = len(json.dumps(agent.status())) + 1024  # room for the counts growing
    assert agent.process is not None
    pid = agent.process.pid
    before_kb = _memory_kb(pid, "VmRSS")

    hostile_uids = (NOBODY, OTHER_USER, 65532, 65531)
    per_uid = 32  # socket.max_connections_per_uid
    attackers = [
        subprocess.Popen(
            [sys.executable, "-c", _HOSTILE, str(uid), str(agent.socket_path), str(per_uid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for uid in hostile_uids
    ]
    try:
        reports = []
        for attacker in attackers:
            assert attacker.stdout is not None
            line = attacker.stdout.readline()
            assert line, f"an attacker died (exit {attacker.wait(30)})"
            reports.append(json.loads(line))
        # Every connection got in and was stopped: nothing was taken for 3 s.
        assert [r["connections"] for r in reports] == [per_uid] * len(hostile_uids), reports
        # Root's CLI is served.
        status = cli("status", "--json", "--socket", str(agent.socket_path))
        assert status.returncode == 0, status.stderr
        # So is an honest client of another account, in order, every reply.
        honest = subprocess.run(
            [sys.executable, "-c", _HONEST, "65530", str(agent.socket_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert honest.returncode == 0, honest.stderr
        answered = json.loads(honest.stdout)
        expected = [[f"{kind}{i}", kind != "x"] for i in range(20) for kind in "tsx"]
        assert answered == expected
        peak_kb = _memory_kb(pid, "VmHWM")
    finally:
        for attacker in attackers:
            assert attacker.stdin is not None
            attacker.stdin.close()
            attacker.wait(30)
    # docs/security.md, "What hostile clients can cost": hostile clients grow the agent by at
    # most 64 MB together. The budgets behind it (the shared budget of unread replies, per
    # connection a partial line or a read chunk and the one reply that crossed the budget, the
    # writer's budget) come to 30-35 MiB; the rest is what the interpreter and its allocators keep,
    # which depends on how far the writer is behind (36-40 MB measured on a quiet machine, 49 MB
    # once in a loaded CI run).
    max_connections = 256
    budgets = (
        MAX_UNREAD_REPLY_BYTES
        + max_connections * (max(65536, READ_CHUNK) + status_bytes)
        + 4 * MAX_PENDING_BYTES
    )
    growth = (peak_kb - before_kb) * 1024
    sent = sum(r["sent"] for r in reports)
    assert growth <= 64_000_000, (
        f"grew by {growth} bytes after {sent} bytes sent (the budgets come to {budgets})"
    )
    wait_for(lambda: agent.status()["online"], what="the agent answering after the attack")
