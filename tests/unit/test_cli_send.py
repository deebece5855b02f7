"""`engagement-agent send`: NDJSON in, one reply line out per command, pipelined, streaming.

Run as a process so stdin and stdout are real pipes, as in `send < file > replies`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from tests.unit import test_cli
from tests.unit.test_cli import REPO, FakeAgent, rejected

# Fixtures shared with test_cli (re-bound here so pytest finds them in this module).
_no_system_config = test_cli._no_system_config
agent = test_cli.agent
short_dir = test_cli.short_dir



def _send(
    sock: Path, data: bytes, *extra: str, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGAGEMENT_AGENT_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "send", "--socket", str(sock), *extra],
        input=data, capture_output=True, env=env, timeout=timeout,
    )


@contextlib.contextmanager
def _one_connection_agent(
    path: Path, serve: Callable[[socket.socket, BinaryIO], None]
) -> Iterator[Path]:
    """A scripted agent on `path` for tests of the client's side: it accepts one connection
    and hands it, with its lines, to `serve` on a thread; the socket closes with the block."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def accept() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            serve(conn, lines)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield path
    finally:
        server.close()


def _line(name: str, request_id: str | None = None) -> bytes:
    command = {"command": "track_event", "name": name}
    if request_id:
        command["request_id"] = request_id
    return json.dumps(command).encode() + b"\n"


def test_each_command_gets_its_reply_in_order(agent: FakeAgent) -> None:
    data = b"".join(_line(f"e{i}", f"r{i}") for i in range(5))
    done = _send(agent.path, b"\n  \n" + data + b"\r\n")  # blank lines are not commands
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["request_id"] for r in replies] == [f"r{i}" for i in range(5)]
    assert [r["name"] for r in agent.requests] == [f"e{i}" for i in range(5)]
    assert done.stderr == b""


def test_a_last_line_without_newline_is_sent(agent: FakeAgent) -> None:
    done = _send(agent.path, _line("a") + _line("b").rstrip(b"\n"))
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 2 and len(agent.requests) == 2


def test_empty_input_is_fine(agent: FakeAgent) -> None:
    done = _send(agent.path, b"")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_any_rejection_exits_1_and_every_reply_is_printed(agent: FakeAgent) -> None:
    accept = agent.responder
    deny = rejected("invalid_command", "bad")
    agent.responder = lambda r: deny(r) if r.get("name") == "bad" else accept(r)
    done = _send(agent.path, _line("a") + _line("bad") + _line("c") + b"{not json\n")
    assert done.returncode == 1
    assert [json.loads(x)["ok"] for x in done.stdout.splitlines()] == [True, False, True, True]
    assert done.stderr == b"engagement-agent: 1 of 4 commands were rejected\n"


def test_a_large_input_streams_without_deadlock(agent: FakeAgent) -> None:
    """Far more than the socket buffers hold: a client that wrote everything before reading
    would block forever, as the agent stops reading while its replies are not consumed."""
    count = 30_000
    padding = "x" * 200
    data = b"".join(
        json.dumps({"command": "track_event", "name": "bulk", "properties": {"p": padding}})
        .encode() + b"\n" for _ in range(count)
    )
    done = _send(agent.path, data)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(b"\n") == count and len(agent.requests) == count


def test_a_line_longer_than_a_chunk_arrives_whole(agent: FakeAgent) -> None:
    big = {"command": "track_event", "name": "big", "properties": {"blob": "y" * 1_000_000}}
    done = _send(agent.path, json.dumps(big).encode() + b"\n" + _line("after"))
    assert done.returncode == 0
    assert agent.requests[0] == big and agent.requests[1]["name"] == "after"


def test_requests_are_pipelined(short_dir: Path) -> None:
    """This agent answers nothing until it has all three requests: only a client that sends
    before it has the earlier replies can finish."""
    def serve(conn: socket.socket, lines: BinaryIO) -> None:
        got = [lines.readline() for _ in range(3)]
        for line in got:
            rid = json.loads(line)["request_id"]
            conn.sendall(json.dumps({"ok": True, "request_id": rid, "result": {}}).encode()
                         + b"\n")

    with _one_connection_agent(short_dir / "pipe.sock", serve) as path:
        done = _send(path, _line("a", "1") + _line("b", "2") + _line("c", "3"),
                     "--timeout", "5", timeout=20)
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["request_id"] for x in done.stdout.splitlines()] == ["1", "2", "3"]


def test_interactive_use_sees_each_reply_before_the_next_line(agent: FakeAgent) -> None:
    """A slow producer (a person, a script) longer than --timeout is not an agent timeout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "send", "--socket", str(agent.path),
         "--timeout", "0.3"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for name in ("one", "two"):
            proc.stdin.write(_line(name, name))
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, "no reply before the next line was written"
            assert json.loads(proc.stdout.readline())["request_id"] == name
            time.sleep(0.6)  # idle longer than --timeout
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_no_agent_exits_69(short_dir: Path) -> None:
    done = _send(short_dir / "none.sock", _line("a"))
    assert done.returncode == 69
    assert done.stderr.count(b"\n") == 1 and b"cannot reach the agent" in done.stderr


def test_an_agent_that_hangs_up_early_exits_69(short_dir: Path) -> None:
    def serve(conn: socket.socket, lines: BinaryIO) -> None:
        lines.readline()
        conn.sendall(b'{"ok": true, "request_id": null, "result": {}}\n')

    with _one_connection_agent(short_dir / "rude.sock", serve) as path:
        done = _send(path, _line("a") + _line("b") + _line("c"), timeout=20)
    assert done.returncode == 69
    assert done.stdout.count(b"\n") == 1
    assert b"closed the connection after 1 replies" in done.stderr
