"""The local Unix socket: newline-delimited JSON, pipelined, one reply line per request, in order.

Built on `asyncio.Protocol` rather than streams: it is ~2.5× faster on this hardware and lets
us refuse an oversized line without ever buffering it. Per-command overhead is what limits
pipelined ingest, so the work is done per chunk, not per command: the lines of each chunk read
are checked synchronously, the accepted ones go to the writer as one group (one hand-off back
to the loop when it is committed), and the replies that are ready go out in one write.

Every resource a client can make us hold is bounded: the partial line
(≤ `limits.max_command_bytes`), requests in flight per connection (reading pauses past
`MAX_IN_FLIGHT`), the bytes of requests in flight across all connections (every connection
pauses past `MAX_PENDING_BYTES` until half of it is answered), unread replies (reading pauses
while the transport's write buffer is full) and the number of connections.
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
from collections.abc import Callable
from pathlib import Path

from agent.dispatch import Accepted, Dispatcher, Origin, Reply
from agent.errors import AgentError, InternalError, TooLarge, Unavailable

log = logging.getLogger("engagement_agent.ipc")

MAX_IN_FLIGHT = 1024
MAX_PENDING_BYTES = 32 * 1024 * 1024
#: How long an accepted connection may take to be set up before its slot is freed again.
RESERVATION_SECONDS = 5.0
_PEERCRED = struct.Struct("3i")


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


def _line_of(reply: Reply) -> bytes:
    return reply.encode() + b"\n"


class _Slot:
    """One request's place in its connection's reply order.

    `line` is the encoded reply once known. `turn` belongs to a command that is neither
    refused nor batched (status, flush, queue maintenance): it runs at once but waits for
    `turn`, which is set when every earlier reply of the connection is out, so `flush` after
    `track_event` in one pipeline sees it committed. `size` is the request's bytes, counted
    against `MAX_PENDING_BYTES` until the reply is out.
    """

    __slots__ = ("line", "size", "turn")

    def __init__(self, size: int, line: bytes | None = None) -> None:
        self.size = size
        self.line = line
        self.turn: asyncio.Future[None] | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: SocketServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._origin = Origin("socket")
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized line, dropping bytes until its newline
        self._replies: collections.deque[_Slot] = collections.deque()  # in request order
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._origin = Origin("socket", uid=peer_uid(transport.get_extra_info("socket")))
        self._server.connections.add(self)
        self._server.unreserve(self)

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
        # Every complete line of the chunk is checked here and now; the accepted commands
        # that go to the writer are submitted together, as one group, when the chunk is done.
        limit = self._server.max_line_bytes()
        batch: list[Accepted] = []
        slots: list[_Slot] = []
        buffer = self._buffer
        start = 0
        end = len(data)
        while start < end:
            newline = data.find(b"\n", start)
            if newline < 0:
                if not self._discarding:
                    if len(buffer) + end - start > limit:
                        buffer.clear()
                        self._discarding = True
                        self._too_large(limit)
                    else:
                        buffer += data[start:]
                break
            if self._discarding:
                self._discarding = False
            elif len(buffer) + newline - start > limit:
                buffer.clear()
                self._too_large(limit)
            else:
                if buffer:
                    buffer += data[start:newline]
                    line = bytes(buffer)
                    buffer.clear()
                else:
                    line = data[start:newline]
                if line.endswith(b"\r"):
                    line = line.rstrip(b"\r")
                if line and not line.isspace():
                    self._request(line, batch, slots)
            start = newline + 1
        if batch:
            self._run_batch(batch, slots)
        self._flush_replies()

    def eof_received(self) -> bool | None:
        # A final line without a newline is still a request.
        if self._buffer and not self._discarding and not bytes(self._buffer).isspace():
            batch: list[Accepted] = []
            slots: list[_Slot] = []
            self._request(bytes(self._buffer), batch, slots)
            if batch:
                self._run_batch(batch, slots)
        self._buffer.clear()
        self.close_when_done()
        return True  # keep the write side open until every reply is out

    # -- requests and ordered replies -------------------------------------------------------
    def _too_large(self, limit: int) -> None:
        error = TooLarge(
            f"command line is longer than {limit} bytes (limits.max_command_bytes); "
            "it was discarded"
        )
        reply = self._server.dispatcher.refuse(error, self._origin)
        self._replies.append(_Slot(0, _line_of(reply)))

    def _request(self, line: bytes, batch: list[Accepted], slots: list[_Slot]) -> None:
        server = self._server
        size = len(line)
        server.pending_bytes += size
        dispatcher = server.dispatcher
        prepared = dispatcher.prepare(line, self._origin)
        if isinstance(prepared, Reply):
            slot = _Slot(size, _line_of(prepared))
        elif prepared.grouped:
            slot = _Slot(size)
            batch.append(prepared)
            slots.append(slot)
        else:
            slot = _Slot(size)
            turn = slot.turn = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._query_in_turn(prepared, turn))
            task.add_done_callback(lambda task: self._query_done(slot, task))
        self._replies.append(slot)

    def _run_batch(self, batch: list[Accepted], slots: list[_Slot]) -> None:
        # Batches are submitted in the order their lines arrived, and the writer runs them in
        # submission order: pipelined commands keep their order all the way into the database.
        def done(replies: list[Reply]) -> None:
            for slot, reply in zip(slots, replies, strict=True):
                slot.line = _line_of(reply)
            self._server.schedule_flush(self)

        self._server.dispatcher.submit(batch, done)

    async def _query_in_turn(self, command: Accepted, turn: asyncio.Future[None]) -> Reply:
        await turn
        return await self._server.dispatcher.query(command)

    def _query_done(self, slot: _Slot, task: asyncio.Future[Reply]) -> None:
        if task.cancelled() or task.exception() is not None:
            error = InternalError("internal error; see the log")
            if not task.cancelled():
                log.error("a socket query failed", exc_info=task.exception())
            slot.line = _line_of(self._server.dispatcher.refuse(error, self._origin))
        else:
            slot.line = _line_of(task.result())
        self._flush_replies()

    def _flush_replies(self) -> None:
        """Write every reply that is ready at the head, in one write; a query that reached the
        head may now run."""
        replies = self._replies
        parts: list[bytes] = []
        released = 0
        while replies:
            slot = replies[0]
            if slot.line is None:
                if slot.turn is not None and not slot.turn.done():
                    slot.turn.set_result(None)
                break
            replies.popleft()
            parts.append(slot.line)
            released += slot.size
        transport = self._transport
        if parts:
            if transport is not None and not transport.is_closing():
                transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
            self._server.release(released)
        self.update_reading()
        if self._closing and not replies and transport is not None:
            transport.close()

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
        return sum(1 for slot in self._replies if slot.line is None)


class SocketServer:
    """Owns the listening socket file and every connection made to it."""

    def __init__(
        self,
        path: Path,
        mode: str,
        dispatcher: Dispatcher,
        max_line_bytes: Callable[[], int],
        max_connections: int,
    ) -> None:
        self.path = path
        self.mode = int(mode, 8)
        self.dispatcher = dispatcher
        self.max_line_bytes = max_line_bytes
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self._reserved: set[_Connection] = set()  # accepted, connection_made still to come
        self.pending_bytes = 0  # request bytes whose replies are not written yet
        self.waiting_for_budget: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._to_flush: dict[_Connection, None] = {}  # connections with replies to write

    def schedule_flush(self, connection: _Connection) -> None:
        """Write `connection`'s ready replies in this loop pass's last step: replies of every
        batch that completed meanwhile go out in one write per connection."""
        if not self._to_flush:
            asyncio.get_running_loop().call_soon(self._flush)
        self._to_flush[connection] = None

    def _flush(self) -> None:
        connections, self._to_flush = self._to_flush, {}
        for connection in connections:
            connection._flush_replies()

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
        # asyncio creates the protocol now and calls connection_made later, so a burst of
        # connects must be counted here, not there: reserve the slot at once.
        if len(self.connections) + len(self._reserved) >= self.max_connections:
            return _Refused(self.max_connections, self.dispatcher)
        connection = _Connection(self)
        self._reserved.add(connection)
        # A connection whose setup fails never reaches connection_made: free its slot.
        asyncio.get_running_loop().call_later(
            RESERVATION_SECONDS, self._reserved.discard, connection
        )
        return connection

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

    def unreserve(self, connection: _Connection) -> None:
        self._reserved.discard(connection)

    def stop_accepting(self) -> None:
        """Stop taking new connections (the dispatcher refuses new commands)."""
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

    def __init__(self, limit: int, dispatcher: Dispatcher) -> None:
        self._limit = limit
        self._dispatcher = dispatcher

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        error: AgentError = Unavailable(f"too many connections (limit {self._limit})")
        reply = self._dispatcher.refuse(error, Origin("socket"))
        transport.write(reply.encode() + b"\n")
        transport.close()
