"""systemd notifications against a real datagram socket bound by the test."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode("utf-8").split("\n")


def test_messages(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready()
    assert receive(notify_socket) == ["READY=1"]
    notifier.status("queue 3 items\nsync ok grün €")
    assert receive(notify_socket) == ["STATUS=queue 3 items sync ok grün €"]
    notifier.watchdog()
    assert receive(notify_socket) == ["WATCHDOG=1"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    fields = receive(notify_socket)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields[0] == "RELOADING=1"
    assert fields[1].startswith("MONOTONIC_USEC=")
    assert before <= int(fields[1].split("=")[1]) <= after
    notifier.ready("reloaded")
    assert receive(notify_socket) == ["READY=1", "STATUS=reloaded"]
    notifier.stopping()
    assert receive(notify_socket) == ["STOPPING=1"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"engagement-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier().ready()
        assert receive(sock) == ["READY=1"]


def test_reconnects_after_socket_replaced(notify_socket: socket.socket, tmp_path: Path) -> None:
    notifier = Notifier()
    notifier.watchdog()
    assert receive(notify_socket) == ["WATCHDOG=1"]
    # systemd re-executed: a new socket at the same path.
    notify_socket.close()
    os.unlink(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as new:
        new.bind(str(tmp_path / "notify"))
        new.settimeout(2)
        notifier.watchdog()
        assert receive(new) == ["WATCHDOG=1"]


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    assert not notifier.notify("READY=1")


def test_failures_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = Notifier()
    notifier.ready()
    assert not notifier.notify("WATCHDOG=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    pid = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", pid)
    assert Notifier().watchdog_interval() == 0.5


def test_a_reader_that_falls_behind_never_blocks_the_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel queues ~10 unread datagrams; the 11th send must be dropped, not block."""
    address = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    notifier = Notifier()
    done = threading.Event()

    def flood() -> None:
        for _ in range(200):
            notifier.watchdog()
        done.set()

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        assert done.wait(30), "notify() blocked on a full notification socket"
        assert receiver.recv(4096) == b"WATCHDOG=1"
    finally:
        receiver.close()
