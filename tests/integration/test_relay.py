"""The relay fixture itself (tests/fixtures/relay.py), against an echo server.

The network fault tests trust the relay to misbehave exactly as described; these check each
mode on a plain socket so a broken relay cannot make those tests pass for the wrong reason.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.relay import Mode, Relay

#: Long enough that a relay which forwarded would have answered an echo on 127.0.0.1.
SILENCE = 1.0


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    port: int = server.getsockname()[1]

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the relay resets it in REFUSE
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield port
    server.close()


def connect(relay: Relay) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=10)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def assert_echoed(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def assert_relays(relay: Relay, data: bytes) -> None:
    """A new connection through `relay` reaches the echo server and back."""
    with connect(relay) as sock:
        assert_echoed(sock, data)


def assert_reset(sock: socket.socket) -> None:
    with pytest.raises(ConnectionResetError):
        sock.sendall(b"x")
        sock.recv(1)


def test_pass_forwards_both_ways(make_relay: Callable[[int], Relay], echo_port: int) -> None:
    assert_relays(make_relay(echo_port), b"hello")


def test_blackhole_accepts_and_never_answers(
    make_relay: Callable[[int], Relay], echo_port: int
) -> None:
    relay = make_relay(echo_port)
    with connect(relay) as kept:
        assert_echoed(kept, b"a")
        relay.set_mode(Mode.BLACKHOLE)
        with connect(relay) as fresh:
            for sock in (kept, fresh):
                sock.sendall(b"ping")
                sock.settimeout(SILENCE)
                with pytest.raises(TimeoutError):
                    sock.recv(1)
        relay.set_mode(Mode.PASS)
        assert_relays(relay, b"back")


def test_trickle_sends_responses_one_byte_at_a_time(
    make_relay: Callable[[int], Relay], echo_port: int
) -> None:
    relay = make_relay(echo_port)
    relay.set_mode(Mode.TRICKLE)
    with connect(relay) as sock:
        sock.sendall(b"abc")
        assert sock.recv(65536) == b"a"
        relay.set_mode(Mode.PASS)  # the rest follows at once
        assert recv_exactly(sock, 2) == b"bc"


def test_cut_is_silent_and_heals_without_losing_bytes(
    make_relay: Callable[[int], Relay], echo_port: int
) -> None:
    relay = make_relay(echo_port)
    with connect(relay) as sock:
        assert_echoed(sock, b"1")
        relay.set_mode(Mode.CUT)
        sock.sendall(b"23")
        sock.settimeout(SILENCE)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # no answer, and no FIN or RST either
        relay.set_mode(Mode.PASS)
        sock.settimeout(10)
        assert recv_exactly(sock, 2) == b"23"


def test_refuse_closes_the_listener_and_resets_connections(
    make_relay: Callable[[int], Relay], echo_port: int
) -> None:
    relay = make_relay(echo_port)
    with connect(relay) as sock:
        relay.set_mode(Mode.REFUSE)
        with pytest.raises(ConnectionRefusedError):
            connect(relay)
        assert_reset(sock)
    relay.set_mode(Mode.PASS)
    assert_relays(relay, b"again")


def test_reset_resets_open_and_new_connections(
    make_relay: Callable[[int], Relay], echo_port: int
) -> None:
    relay = make_relay(echo_port)
    with connect(relay) as sock:
        assert_echoed(sock, b"1")
        relay.set_mode(Mode.RESET)
        assert_reset(sock)
    # Accepted, then reset (not refused: the listener is still there). The reset can beat the
    # end of connect() itself.
    with pytest.raises(ConnectionResetError), connect(relay) as fresh:
        fresh.sendall(b"x")
        fresh.recv(1)
    relay.set_mode(Mode.PASS)
    assert_relays(relay, b"again")


def test_a_screen_sees_the_first_bytes_and_may_hang_up(
    make_relay: Callable[..., Relay], echo_port: int
) -> None:
    def screen(client: socket.socket) -> bytes | None:
        head = recv_exactly(client, 3)
        return None if head == b"no!" else head

    relay = make_relay(echo_port, screen=screen)
    assert_relays(relay, b"yes, please")  # the screened bytes are forwarded first
    with connect(relay) as sock:
        sock.sendall(b"no!")
        assert sock.recv(1) == b""  # a FIN, not a reset
