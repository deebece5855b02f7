"""The Unix socket as an app sees it: the real daemon, the real socket, the real database."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.ipc import RESERVED_CONNECTIONS
from tests.fixtures.daemon import AgentProcess, SocketClient, wait_for


@pytest.fixture
def agent(make_agent: Any) -> AgentProcess:
    process: AgentProcess = make_agent({"sync": {"flush_mode": "manual"}})
    process.start()
    return process


def queued_items(agent: AgentProcess) -> int:
    items: int = agent.status()["queue"]["items"]
    return items


def test_pipelined_requests_are_answered_in_order(agent: AgentProcess) -> None:
    count = 300
    lines = b"".join(
        json.dumps(
            {"command": "track_event", "name": "tap", "request_id": f"r{i}", "properties": {"i": i}}
        ).encode()
        + b"\n"
        for i in range(count)
    )
    with agent.client() as client:
        client.sock.sendall(lines)
        replies = [client.read_reply() for _ in range(count)]
    assert [r["request_id"] for r in replies] == [f"r{i}" for i in range(count)]
    assert all(r["ok"] for r in replies)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'{"command": "track_event", "name": "\xff\xfe"}', "invalid_json"),
        (b'{"command": "track_event", "name": "x", "properties": {"a": NaN}}', "invalid_json"),
        (b'{"command": "track_event", "name": "x", "properties": {"a": Infinity}}', "invalid_json"),
        (b'{"command": "track_event", "name": "x", "properties": {"a": 1e999}}', "invalid_json"),
        (b"[1, 2, 3]", "invalid_command"),
        (b'"track_event"', "invalid_command"),
        (b'{"command": "track_event", "name": "x", "propertes": {}}', "invalid_command"),
        (b'{"command": "track_event"}', "invalid_command"),
        (b'{"command": "no_such_command"}', "invalid_command"),
        (b'{"command": "track_event", "name": "x", "timestamp": "1700000000"}', "invalid_command"),
        (b'{"command": "track_event", "name": "x", "timestamp": 1700000000000}', "invalid_command"),
        (b'{"command": "track_event", "name": "x", "app": "Bad App"}', "invalid_command"),
        (b'{"command": "track_event", "name": "x", "app": "defaults"}', "invalid_command"),
        (b'{"command": "identify_customer", "ids": {"cookie": "c"}}', "invalid_command"),
        (
            b'{"command": "track_event", "name": "x", "properties": '
            + b'{"a": ' * 11
            + b"1"
            + b"}" * 11
            + b"}",
            "invalid_command",
        ),
        (b'{"command": "track_event", "properties": ' + b"[" * 5000, "invalid_command"),
    ],
)
def test_bad_commands_get_a_clear_error_and_leave_no_trace(
    agent: AgentProcess, line: bytes, code: str
) -> None:
    before = queued_items(agent)
    with agent.client() as client:
        client.send_line(line)
        reply = client.read_reply()
        assert reply["ok"] is False
        assert reply["error"]["code"] == code
        assert reply["error"]["message"]
        # The connection stays usable after a bad line.
        ok = client.request({"command": "track_event", "name": "after", "request_id": "next"})
        assert ok["ok"] and ok["request_id"] == "next"
    # Only the good command (and the app's installation on first use) was queued.
    assert queued_items(agent) - before in (1, 2)


def test_schema_errors_list_field_paths_not_values(agent: AgentProcess) -> None:
    reply = agent.request(
        {
            "command": "track_payment",
            "request_id": "p1",
            "item": {"value": "12.34", "currency": "EUR", "secret_field": "jane@example.com"},
        }
    )
    assert reply["request_id"] == "p1"
    assert reply["error"]["code"] == "invalid_command"
    fields = {d["field"] for d in reply["error"]["details"]}
    assert {"item.value", "item.secret_field", "item.payment_system"} <= fields
    assert "jane@example.com" not in json.dumps(reply)


def test_oversized_line_is_refused_without_losing_the_connection(make_agent: Any) -> None:
    agent = make_agent({"limits": {"max_command_bytes": 2048}})
    agent.start()
    huge = b'{"command": "track_event", "name": "x", "properties": {"a": "' + b"y" * 1_000_000
    with agent.client() as client:
        # Sent in pieces, as a slow or hostile client would; the agent never buffers it whole.
        for start in range(0, len(huge), 65536):
            client.sock.sendall(huge[start : start + 65536])
        client.sock.sendall(b'"}}\n')
        reply = client.read_reply()
        assert reply["error"]["code"] == "too_large"
        assert client.request({"command": "status"})["ok"]


def test_blank_lines_are_ignored_and_a_last_line_without_newline_is_answered(
    agent: AgentProcess,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(agent.socket_path))
        sock.sendall(b'\n\r\n{"command": "status", "request_id": "s"}')
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    replies = [json.loads(line) for line in data.splitlines()]
    assert [r["request_id"] for r in replies] == ["s"]


def test_socket_file_has_the_configured_mode(make_agent: Any) -> None:
    agent = make_agent({"socket": {"mode": "0600"}})
    agent.start()
    assert stat.S_IMODE(agent.socket_path.stat().st_mode) == 0o600


def test_connection_cap_refuses_extra_clients_and_recovers(make_agent: Any) -> None:
    agent = make_agent({"socket": {"max_connections": 4}})
    agent.start()
    # The tests run as root, which also gets the reserved slots (tests/integration/
    # test_socket_limits.py covers other users).
    slots = 4 + RESERVED_CONNECTIONS
    clients = [agent.client() for _ in range(slots)]
    try:
        for client in clients:
            assert client.request({"command": "status"})["ok"]
        with agent.client() as extra:
            reply = extra.read_reply()
            assert reply["error"]["code"] == "unavailable"
        clients.pop().close()

        def another_connects() -> bool:
            with agent.client() as again:
                return bool(again.request({"command": "status"})["ok"])

        wait_for(another_connects, what="a free connection slot")
    finally:
        for client in clients:
            client.close()


def test_a_slow_client_does_not_block_others(agent: AgentProcess) -> None:
    with agent.client() as slow, agent.client() as fast:
        slow.sock.sendall(b'{"command": "track_ev')
        for i in range(20):
            assert fast.request({"command": "track_event", "name": "tap", "request_id": str(i)})[
                "ok"
            ]
        slow.sock.sendall(b'ent", "name": "late"}\n')
        assert slow.read_reply()["ok"]


def _request_as(uid: int, socket_path: Path, command: dict[str, Any]) -> dict[str, Any]:
    script = textwrap.dedent(
        f"""
        import json, os, socket, sys
        os.setgid({uid}); os.setuid({uid})
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect({str(socket_path)!r})
        s.sendall(json.dumps({command!r}).encode() + b"\\n")
        sys.stdout.write(s.makefile().readline())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other users")
def test_allowed_uids_restrict_who_speaks_for_an_app(make_agent: Any) -> None:
    # Other users must be able to reach the socket: pytest's tmp dirs are private to root.
    public_dir = Path(tempfile.mkdtemp(prefix="ea-sock-"))
    public_dir.chmod(0o755)
    agent = make_agent(
        {
            "socket": {"mode": "0666", "path": str(public_dir / "agent.sock")},
            "apps": {"kiosk-ui": {"allowed_uids": [4242]}},
        }
    )
    agent.socket_path = public_dir / "agent.sock"
    agent.start()
    command = {"command": "track_event", "name": "tap", "app": "kiosk-ui", "request_id": "u"}
    denied = _request_as(4343, agent.socket_path, command)
    assert denied["error"]["code"] == "forbidden"
    allowed = _request_as(4242, agent.socket_path, command)
    assert allowed["ok"], allowed
    # Other apps are open to everyone; queue maintenance is not.
    other = _request_as(4343, agent.socket_path, {**command, "app": "other"})
    assert other["ok"], other
    admin = _request_as(4343, agent.socket_path, {"command": "queue_list"})
    assert admin["error"]["code"] == "forbidden"
    # root (the agent's own uid here) is always allowed.
    assert agent.request(command)["ok"]
    # A reload decides again for uids it allowed before (the agent remembers who was allowed
    # only until then).
    agent.reload({"apps": {"kiosk-ui": {"allowed_uids": [4343]}}})
    assert _request_as(4242, agent.socket_path, command)["error"]["code"] == "forbidden"
    assert _request_as(4343, agent.socket_path, command)["ok"]


def test_unknown_apps_are_refused_when_not_allowed(make_agent: Any) -> None:
    agent = make_agent({"apps": {"allow_unknown": False, "kiosk-ui": {}}})
    agent.start()
    assert agent.request({"command": "track_event", "name": "x", "app": "kiosk-ui"})["ok"]
    reply = agent.request({"command": "track_event", "name": "x", "app": "stranger"})
    assert reply["error"]["code"] == "unknown_app"
    assert "stranger" not in agent.status()["apps"]


def test_client_that_never_reads_cannot_grow_the_agent_unbounded(agent: AgentProcess) -> None:
    """A client that writes thousands of requests but never reads replies is throttled by
    back-pressure; other clients are still served."""
    line = json.dumps({"command": "status"}).encode() + b"\n"
    with agent.client() as greedy:
        greedy.sock.setblocking(False)
        sent = 0
        try:
            for _ in range(200_000):
                sent += greedy.sock.send(line * 64)
        except BlockingIOError:
            pass  # the agent stopped reading: back-pressure works
        assert sent < 200_000 * len(line) * 64
        with agent.client() as polite:
            assert polite.request({"command": "status"})["ok"]


def test_client_helper_sees_agent_replies(agent: AgentProcess) -> None:
    with SocketClient(agent.socket_path) as client:
        reply = client.request({"command": "get_customer", "request_id": "c"})
    assert reply["ok"]
    assert reply["result"]["app"] == "default"
    assert len(reply["result"]["ids"]["cookie"]) == 36
