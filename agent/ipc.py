"""The local Unix socket: newline-delimited JSON, pipelined, one reply line per request, in order.

Built on `asyncio.Protocol` rather than streams: it is ~2.5× faster on this hardware and lets
us refuse an oversized line without ever buffering it. Every resource a client can make us
hold is bounded: the partial line (≤ `limits.max_command_bytes`), requests in flight per
connection (reading pauses past `MAX_IN_FLIGHT`), the bytes of requests in flight across all
connections (every connection pauses past `MAX_PENDING_BYTES` until half of it is answered),
unread replies (reading pauses while the transport's write buffer is full) and the number of
connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.errors import AgentError, TooLarge, Unavailable
from agent.intake import Origin, Reply, reply_for_unreadable

log = logging.getLogger("engagement_agent.ipc")

MAX_IN_FLIGHT = 1024
MAX_PENDING_BYTES = 32 * 1024 * 1024
_PEERCRED = struct.Struct("3i")

Handler = Callable[[bytes, Origin], Awaitable[Reply]]


def peer_uid(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    try:
        _pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return None
    return int(uid)


class _Connection(asyncio.Protocol):
    def __init__(self, server: SocketServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._origin = Origin("socket")
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized line, dropping bytes until its newline
        # Replies in request order, each with the size of its request line.
        self._replies: collections.deque[tuple[asyncio.Future[Reply], int]] = collections.deque()
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._origin = Origin("socket", uid=peer_uid(transport.get_extra_info("socket")))
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)
        self._server.waiting_for_budget.discard(self)
        # In-flight commands still complete (they are committed or not on their own); only
        # their replies have nowhere to go.

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        limit = self._server.max_line_bytes()
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            chunk = data[start:end]
            if self._discarding:
                pass
            elif len(self._buffer) + len(chunk) > limit:
                self._buffer.clear()
                self._discarding = True
                self._push_reply(
                    _done(
                        reply_for_unreadable(
                            TooLarge(
                                f"command line is longer than {limit} bytes "
                                "(limits.max_command_bytes); it was discarded"
                            )
                        )
                    )
                )
            else:
                self._buffer += chunk
            if newline < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                line = bytes(self._buffer).rstrip(b"\r")
                self._buffer.clear()
                if line.strip():
                    self._submit(line)
            start = newline + 1

    def eof_received(self) -> bool | None:
        # A final line without a newline is still a request.
        if self._buffer and not self._discarding and bytes(self._buffer).strip():
            self._submit(bytes(self._buffer))
        self._buffer.clear()
        self.close_when_done()
        return True  # keep the write side open until every reply is out

    # -- requests and ordered replies -------------------------------------------------------
    def _submit(self, line: bytes) -> None:
        if not self._server.accepting:
            self._push_reply(_done(reply_for_unreadable(Unavailable("the agent is shutting down"))))
            return
        # The task starts in creation order and submits to the writer before its first await,
        # so pipelined commands keep their order all the way into the database.
        task = asyncio.ensure_future(self._server.handler(line, self._origin))
        self._server.pending_bytes += len(line)
        self._push_reply(task, len(line))

    def _push_reply(self, future: asyncio.Future[Reply], size: int = 0) -> None:
        self._replies.append((future, size))
        future.add_done_callback(self._flush_replies)
        self.update_reading()

    def _flush_replies(self, _future: asyncio.Future[Reply] | None = None) -> None:
        while self._replies and self._replies[0][0].done():
            future, size = self._replies.popleft()
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(future.result().encode() + b"\n")
            self._server.release(size)
        self.update_reading()
        if self._closing and not self._replies and self._transport is not None:
            self._transport.close()

    def update_reading(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        over_budget = self._server.pending_bytes > MAX_PENDING_BYTES
        if over_budget:
            self._server.waiting_for_budget.add(self)
        should_pause = self._writing_paused or len(self._replies) >= MAX_IN_FLIGHT or over_budget
        if should_pause and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        elif not should_pause and self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False

    def close_when_done(self) -> None:
        self._closing = True
        self._flush_replies()

    def in_flight(self) -> int:
        return sum(1 for future, _size in self._replies if not future.done())


def _done(reply: Reply) -> asyncio.Future[Reply]:
    future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future


class SocketServer:
    """Owns the listening socket file and every connection made to it."""

    def __init__(
        self,
        path: Path,
        mode: str,
        handler: Handler,
        max_line_bytes: Callable[[], int],
        max_connections: int,
    ) -> None:
        self.path = path
        self.mode = int(mode, 8)
        self.handler = handler
        self.max_line_bytes = max_line_bytes
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.pending_bytes = 0  # request bytes whose replies are not written yet
        self.waiting_for_budget: set[_Connection] = set()
        self.accepting = True
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_socket()
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bind under a restrictive umask and chmod after: the socket never exists with
            # looser permissions than configured, even for an instant.
            old_umask = os.umask(0o177)
            try:
                listener.bind(str(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, self.mode)
            listener.listen(256)
        except OSError:
            listener.close()
            raise
        self._server = await loop.create_unix_server(self._accept, sock=listener)

    def _accept(self) -> asyncio.Protocol:
        if len(self.connections) >= self.max_connections:
            return _Refused(self.max_connections)
        return _Connection(self)

    def _remove_stale_socket(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # nobody listens: left over from a crash
        else:
            raise OSError(f"another agent is already listening on {self.path}")
        finally:
            probe.close()

    def release(self, size: int) -> None:
        """A request's reply went out; resume paused connections once half the budget is free."""
        self.pending_bytes -= size
        if self.waiting_for_budget and self.pending_bytes <= MAX_PENDING_BYTES // 2:
            waiting, self.waiting_for_budget = self.waiting_for_budget, set()
            for connection in waiting:
                connection.update_reading()

    def stop_accepting(self) -> None:
        """Stop taking new commands: new lines get `unavailable`, the listener closes."""
        self.accepting = False
        if self._server is not None:
            self._server.close()

    def in_flight(self) -> int:
        return sum(connection.in_flight() for connection in self.connections)

    async def close(self) -> None:
        self.stop_accepting()
        for connection in list(self.connections):
            connection.close_when_done()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Refused(asyncio.Protocol):
    """Answers one `unavailable` line and hangs up: the connection cap is reached."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        error: AgentError = Unavailable(f"too many connections (limit {self._limit})")
        transport.write(reply_for_unreadable(error).encode() + b"\n")
        transport.close()
