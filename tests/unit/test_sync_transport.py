"""The HTTP boundary of sync (agent/sync/transport.py): what each failure is called, which
proxy a URL takes, and the wire helpers it uses. Real urllib3 exceptions; the few tests that
need a peer use a closed or a silent local port."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from urllib3.exceptions import (
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
)

from agent.sync.transport import (
    Deadlines,
    HttpTransport,
    Interrupted,
    Request,
    Response,
    Unreachable,
    _translate,
    fetch_time,
    proxy_for,
)
from agent.tracker.model import Project
from agent_devtools.apistub import ApiStub
from tests.fixtures.mosquitto import free_port


def refused() -> NewConnectionError:
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError as cause:
        try:
            raise NewConnectionError(None, "Failed to establish a new connection") from cause  # type: ignore[arg-type]
        except NewConnectionError as exc:
            return exc


def test_a_refused_connection_is_not_called_a_timeout() -> None:
    error = _translate(refused(), 30.0, None)
    assert isinstance(error, Unreachable)
    assert error.reason == "cannot connect: connection refused"
    assert isinstance(refused(), ConnectTimeoutError)  # why the order of checks matters


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (ConnectTimeoutError(None, "x"), Unreachable, "connect timed out after 30 s"),
        (ReadTimeoutError(None, None, "x"), Interrupted, "no answer within 30 s"),  # type: ignore[arg-type]
        (ProtocolError("x", ConnectionResetError()), Interrupted, "the connection was lost"),
        (TimeoutError(), Interrupted, "no answer within 30 s"),
        (OSError(104, "Connection reset by peer"), Interrupted, "network error: connection reset"),
    ],
)
def test_failures_are_named(exc: BaseException, kind: type, reason: str) -> None:
    error = _translate(exc, 30.0, None)
    assert isinstance(error, kind) and error.reason.startswith(reason)


def test_dns_failure_is_unreachable() -> None:
    exc = NameResolutionError("api.invalid", None, socket.gaierror(-2, "Name unknown"))  # type: ignore[arg-type]
    assert _translate(exc, 30.0, None).reason == "cannot resolve the API's host name"


def test_proxy_errors_name_the_proxy_without_its_credentials() -> None:
    error = _translate(
        ProxyError("Unable to connect to proxy", refused()), 5.0, "http://u:pw@p:3128"
    )
    assert isinstance(error, Unreachable)
    assert error.reason == "proxy p:3128: cannot connect: connection refused"
    assert "pw" not in error.reason


def test_a_proxy_hanging_up_unanswered_is_unreachable() -> None:
    """A proxy that cannot reach the API answers and closes before reading our body; the
    reset loses its answer. That is the network's fault (probe schedule), not the API's."""
    lost = ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    error = _translate(lost, 5.0, "http://u:pw@p:3128")
    assert isinstance(error, Unreachable)
    assert error.reason == "proxy p:3128: closed the connection unanswered"
    assert isinstance(_translate(lost, 5.0, None), Interrupted)


ENV_HTTPS = {"HTTPS_PROXY": "http://corp:3128", "NO_PROXY": "internal.example,.lan"}


@pytest.mark.parametrize(
    ("url", "configured", "environ", "expected"),
    [
        ("https://api.exponea.com", "", {}, None),
        ("https://api.exponea.com", "", ENV_HTTPS, "http://corp:3128"),
        (
            "https://api.exponea.com",
            "",
            {"https_proxy": "lower:1", "HTTPS_PROXY": "http://up:2"},
            "http://lower:1",
        ),
        ("http://api.local", "", ENV_HTTPS, None),  # HTTPS_PROXY is for https URLs only
        ("http://api.local", "", {"HTTP_PROXY": "http://p:1"}, "http://p:1"),
        ("http://api.local", "", {"ALL_PROXY": "http://all:1"}, "http://all:1"),
        ("https://x.internal.example", "", ENV_HTTPS, None),
        ("https://internal.example:8443", "", ENV_HTTPS, None),
        ("https://box.lan", "", ENV_HTTPS, None),
        ("https://notinternal.example", "", ENV_HTTPS, "http://corp:3128"),
        ("https://a.b", "", {"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, None),
        ("http://127.0.0.1:9", "", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1:9"}, None),
        (
            "http://127.0.0.1:8",
            "",
            {"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1:9"},
            "http://p:1",
        ),
        # sync.proxy wins over the environment, NO_PROXY included
        ("https://x.internal.example", "http://cfg:8080", ENV_HTTPS, "http://cfg:8080"),
    ],
)
def test_proxy_choice(
    url: str, configured: str, environ: dict[str, str], expected: str | None
) -> None:
    assert proxy_for(url, configured, environ) == expected


def test_response_date_is_parsed() -> None:
    response = Response(200, b"", {"date": "Sun, 06 Dec 2026 04:46:31 GMT"})
    assert response.date == 1796532391.0
    assert Response(200, b"", {"date": "garbage"}).date is None


@pytest.fixture
def deadlines() -> Iterator[Deadlines]:
    d = Deadlines()
    try:
        yield d
    finally:
        d.close()


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[socket.socket, int]]:
    """A listening socket that accepts connections (the kernel does) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server, server.getsockname()[1]


def test_a_whole_request_deadline_cuts_a_silent_peer(deadlines: Deadlines) -> None:
    """A peer that accepts and never answers: the request ends at its budget."""
    with silent_server() as (_server, port):
        transport = HttpTransport(deadlines)
        with pytest.raises(Interrupted):
            transport.send(Request("GET", f"http://127.0.0.1:{port}/", {}, timeout=0.5))
        transport.close()


def test_abort_ends_a_request_in_flight(deadlines: Deadlines) -> None:
    with silent_server() as (server, port):
        transport = HttpTransport(deadlines)
        errors: list[BaseException] = []

        def call() -> None:
            try:
                transport.send(Request("GET", f"http://127.0.0.1:{port}/", {}, timeout=30))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        conn, _ = server.accept()
        assert conn.recv(100).startswith(b"GET /")  # the request is on the wire
        transport.abort()
        thread.join(10)
        conn.close()
        assert errors and type(errors[0]).__name__ == "Aborted"


def test_fetch_time_reads_the_apis_clock_and_date(deadlines: Deadlines) -> None:
    with ApiStub("127.0.0.1", 0, {"proj-a": "key-a"}, clock_offset=3600.0) as stub:
        transport = HttpTransport(deadlines)
        sample = fetch_time(transport, Project("proj-a", "key-a", stub.url), 5.0)
        assert abs(sample.time - sample.local - 3600.0) < 5
        assert sample.date is not None and abs(sample.date - sample.time) < 5
        assert sample.round_trip >= 0
        with pytest.raises(Exception, match="HTTP 401"):
            fetch_time(transport, Project("proj-a", "wrong", stub.url), 5.0)
        transport.close()


def test_a_closed_port_is_unreachable(deadlines: Deadlines) -> None:
    transport = HttpTransport(deadlines)
    with pytest.raises(Unreachable, match="connection refused"):
        transport.send(Request("GET", f"http://127.0.0.1:{free_port()}/", {}, timeout=5))
