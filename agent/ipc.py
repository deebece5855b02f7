"""The local Unix socket: newline-delimited JSON, pipelined, one reply line per request, in order.

Built on `asyncio.Protocol` rather than streams: it is ~2.5× faster on this hardware and lets
us refuse an oversized line without ever buffering it. Per-command overhead is what limits
pipelined ingest, so the work is done per chunk, not per command: the lines of each chunk read
are checked synchronously, the accepted ones go to the writer as one group (one hand-off back
to the loop when it is committed), and the replies that are ready go out in one write.

No client can starve the others or grow the agent without bound (docs/security.md lists the
attacks; docs/protocol.md the rules a client sees):

- connections: at most `socket.max_connections`, and `socket.max_connections_per_uid` per peer
  uid; root and the agent's own user find `RESERVED_CONNECTIONS` more slots, so the CLI and
  `systemctl reload` work under a flood;
- time: a connection the agent owes no work for `socket.idle_timeout` is closed (a partly
  received line or unread replies are not work the agent owes);
- memory: a connection holds a partial line (≤ `limits.max_command_bytes`) or one read chunk
  not yet parsed (when a limit stopped parsing mid-chunk; a chunk is small, see
  `SocketServer.read_chunk`), `MAX_IN_FLIGHT` requests of which `MAX_QUERIES_IN_FLIGHT`
  queries, and replies it has not read: past `socket.max_pending_reply_bytes` of those it is
  not read from, and its next query does not run, until it reads. Across all connections of
  users other than root and the agent's own, unread replies share `MAX_UNREAD_REPLY_BYTES`:
  past it, a connection is read from (and its next query runs) only while it owes nothing
  more, so several hostile accounts together cost what the budget allows, not
  `socket.max_connections` times what one connection may. Requests being worked on by the
  writer count against `MAX_PENDING_BYTES` across all connections; past it, every
  connection stops reading.
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

from agent.config import MAX_SOCKET_INPUT_BYTES
from agent.dispatch import Accepted, Dispatcher, Origin, Reply
from agent.errors import InternalError, TooLarge, Unavailable
from agent.logs import RateLimitedLog

log = logging.getLogger("engagement_agent.ipc")

#: Requests awaiting their reply per connection; reading pauses at this many.
MAX_IN_FLIGHT = 1024
#: Queries (status, flush, queue maintenance) awaiting their reply per connection: each is a
#: task on the loop, and a status reply is the largest reply there is.
MAX_QUERIES_IN_FLIGHT = 16
#: Bytes of requests the writer is working on, across all connections; every connection
#: pauses past it until half of it is answered. A parsed command takes several times its
#: line's bytes, so this is small; it still holds thousands of typical commands.
MAX_PENDING_BYTES = 1024 * 1024
#: Replies the clients of other users than root and the agent's own have not read, across all
#: their connections: past it each of them must read what it was sent before it is read from
#: again (docs/security.md, "What hostile clients can cost, in all").
MAX_UNREAD_REPLY_BYTES = 8 * 1024 * 1024
#: How often the unread replies are counted again while they are over the budget (they shrink
#: as clients read, which the transport does not report).
BUDGET_CHECK_INTERVAL = 0.05
#: Largest read from a connection. Input read but not parsed when a limit stops parsing
#: mid-chunk waits with the connection, so the chunk is also at most the connection's share of
#: `MAX_SOCKET_INPUT_BYTES`.
READ_CHUNK = 64 * 1024
#: Slots beyond `socket.max_connections` that only root and the agent's own user may take.
RESERVED_CONNECTIONS = 8
#: Connects the kernel queues for us to accept; a burst of refused ones holds a descriptor each.
LISTEN_BACKLOG = 256
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


class _Slot:
    """One request's place in its connection's reply order.

    `line` is the encoded reply once known. `turn` belongs to a command that is neither
    refused nor batched (status, flush, queue maintenance): it runs at once but waits for
    `turn`, which is set when every earlier reply of the connection is out and the client is
    reading, so `flush` after `track_event` in one pipeline sees it committed and a client that
    does not read gets no new status replies to owe. `size` is the bytes of a batched request,
    counted against `MAX_PENDING_BYTES` until the writer is done with it.
    """

    __slots__ = ("line", "size", "turn")

    def __init__(self, size: int = 0, line: bytes | None = None) -> None:
        self.size = size
        self.line = line
        self.turn: asyncio.Future[None] | None = None


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: SocketServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.uid: int | None = None
        self.trusted = False  # root or the agent's own user: outside the shared reply budget
        self._counted = 0  # this connection's unread replies as last added to the server's sum
        self._gone = False
        self._origin = Origin("socket")
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized line, dropping bytes until its newline
        self._backlog = b""  # input read but not parsed: a limit stopped parsing mid-chunk
        self._consuming = False
        self._replies: collections.deque[_Slot] = collections.deque()  # in request order
        self._ready_bytes = 0  # replies known but not handed to the transport yet
        self._queries = 0  # queries awaiting their reply
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.uid = peer_uid(transport.get_extra_info("socket"))
        refusal = self._server.admit(self)
        if refusal is not None:
            self._closing = True
            reply = self._server.dispatcher.refuse(
                Unavailable(refusal), Origin("socket", uid=self.uid)
            )
            transport.write(reply.line())
            transport.close()
            return
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._origin = Origin("socket", uid=self.uid)
        self.trusted = self.uid in self._server.privileged_uids
        # Replies the client has not read count from the first byte the kernel refused:
        # past the limit the transport pauses us (pause_writing) and we stop reading.
        limit = self._server.max_pending_reply_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self._last_activity = self._loop.time()
        self._idle_timer = self._loop.call_later(self._server.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.unread_bytes -= self._counted
        self._counted = 0
        self._gone = True
        self._server.forget(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._backlog = b""
        self._buffer.clear()
        # In-flight commands still complete (they are committed or not on their own), queries
        # in their order; only their replies have nowhere to go.
        self._writing_paused = False
        self._write_ready()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._touch()  # the client reads
        self._flush_replies()

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for every connection: asyncio fills it and calls buffer_updated() in one
        # step, and whatever is kept is copied out of it. Idle connections hold no read buffer.
        return self._server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self._server.read_buffer[:nbytes].tobytes()
        if self._backlog:  # reading is paused while there is a backlog; keep the order anyway
            self._backlog += data
        else:
            self._consume(data)
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

    # -- reading ----------------------------------------------------------------------------
    def _consume(self, data: bytes) -> None:
        """Check every complete line of `data`; stop early (keeping the rest as the backlog)
        once a limit is reached, so one read chunk cannot exceed the limits."""
        # The accepted commands that go to the writer are submitted together, as one group.
        self._consuming = True
        limit = self._server.max_line_bytes()
        batch: list[Accepted] = []
        slots: list[_Slot] = []
        buffer = self._buffer
        start = 0
        end = len(data)
        requested = False
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
                    requested = True
                    if self._must_stop() and newline + 1 < end:
                        self._backlog = data[newline + 1 :]
                        break
            start = newline + 1
        if batch:
            self._run_batch(batch, slots)
        if requested:
            self._touch()
        self._consuming = False
        self._write_ready()

    def _owed(self) -> int:
        """Reply bytes the client has not read yet, as far as the agent holds them."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._ready_bytes + buffered

    def _must_stop(self) -> bool:
        owed = self._owed()
        return (
            self._writing_paused
            or len(self._replies) >= MAX_IN_FLIGHT
            or self._queries >= MAX_QUERIES_IN_FLIGHT
            or self._server.pending_bytes > MAX_PENDING_BYTES
            or owed > self._server.max_pending_reply_bytes
            or (owed > 0 and not self.trusted and self._server.over_budget(owed - self._counted))
        )

    def _client_blocks(self) -> bool:
        """Whether the client must read before the agent goes on with this connection: its
        transport holds more than `socket.max_pending_reply_bytes`, or the shared budget is
        spent and the transport holds anything at all (the kernel took less than was sent)."""
        if self._writing_paused:
            return True
        if self.trusted or not self._server.limited:
            return False
        transport = self._transport
        return transport is not None and transport.get_write_buffer_size() > 0

    def _account(self) -> None:
        """Bring this connection's share of the server's unread reply bytes up to date."""
        if self.trusted or self._gone:
            return
        owed = self._owed()
        self._server.unread_bytes += owed - self._counted
        self._counted = owed

    def update_reading(self) -> None:
        """Pause reading while a limit is reached; otherwise parse the backlog, then read."""
        transport = self._transport
        if transport is None or self._consuming:
            return
        while not transport.is_closing():
            if self._must_stop():
                if self._server.pending_bytes > MAX_PENDING_BYTES:
                    self._server.waiting_for_budget.add(self)
                if self._server.limited and not self.trusted:
                    self._server.held.add(self)
                if not self._reading_paused:
                    transport.pause_reading()
                    self._reading_paused = True
                return
            if not self._backlog:
                if self._reading_paused:
                    transport.resume_reading()
                    self._reading_paused = False
                return
            backlog, self._backlog = self._backlog, b""
            self._consume(backlog)

    # -- requests and ordered replies -------------------------------------------------------
    def _too_large(self, limit: int) -> None:
        error = TooLarge(
            f"command line is longer than {limit} bytes (limits.max_command_bytes); "
            "it was discarded"
        )
        self._ready(_Slot(line=self._server.dispatcher.refuse(error, self._origin).line()))

    def _ready(self, slot: _Slot) -> None:
        """Queue a slot whose reply is already known."""
        assert slot.line is not None
        self._ready_bytes += len(slot.line)
        self._replies.append(slot)

    def _request(self, line: bytes, batch: list[Accepted], slots: list[_Slot]) -> None:
        server = self._server
        dispatcher = server.dispatcher
        prepared = dispatcher.prepare(line, self._origin)
        if isinstance(prepared, Reply):
            self._ready(_Slot(line=prepared.line()))
            return
        if prepared.grouped:
            slot = _Slot(len(line))
            server.take(slot.size)
            batch.append(prepared)
            slots.append(slot)
        else:
            slot = _Slot()
            slot.turn = asyncio.get_running_loop().create_future()
            self._queries += 1
            task = asyncio.ensure_future(self._query_in_turn(prepared, slot.turn))
            task.add_done_callback(lambda task: self._query_done(slot, task))
        self._replies.append(slot)

    def _run_batch(self, batch: list[Accepted], slots: list[_Slot]) -> None:
        # Batches are submitted in the order their lines arrived, and the writer runs them in
        # submission order: pipelined commands keep their order all the way into the database.
        def done(replies: list[Reply]) -> None:
            released = 0
            for slot, reply in zip(slots, replies, strict=True):
                slot.line = reply.line()
                self._ready_bytes += len(slot.line)
                released += slot.size
            self._server.release(released)
            self._server.schedule_flush(self)

        self._server.dispatcher.submit(batch, done)

    async def _query_in_turn(self, command: Accepted, turn: asyncio.Future[None]) -> Reply:
        await turn
        return await self._server.dispatcher.query(command)

    def _query_done(self, slot: _Slot, task: asyncio.Future[Reply]) -> None:
        self._queries -= 1
        if task.cancelled() or task.exception() is not None:
            error = InternalError("internal error; see the log")
            if not task.cancelled():
                log.error("a socket query failed", exc_info=task.exception())
            slot.line = self._server.dispatcher.refuse(error, self._origin).line()
        else:
            slot.line = task.result().line()
        self._ready_bytes += len(slot.line)
        self._flush_replies()

    def _write_ready(self) -> None:
        """Write every reply that is ready at the head, in one write; a query that reached the
        head may now run, unless the client is not reading its replies."""
        replies = self._replies
        parts: list[bytes] = []
        while replies:
            line = replies[0].line
            if line is None:
                break
            replies.popleft()
            parts.append(line)
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._ready_bytes -= len(data)
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
                self._touch()
        if replies:
            turn = replies[0].turn
            if turn is not None and not turn.done():
                if not self._client_blocks() or not self._server.accepting:
                    turn.set_result(None)
                elif self._server.limited and not self.trusted:
                    self._server.held.add(self)
        self._account()

    def _flush_replies(self) -> None:
        self._write_ready()
        self.update_reading()
        if self._closing and not self._replies and self._transport is not None:
            self._transport.close()

    def close_when_done(self) -> None:
        self._closing = True
        self._flush_replies()

    # -- idleness ---------------------------------------------------------------------------
    def _touch(self) -> None:
        if self._loop is not None:
            self._last_activity = self._loop.time()

    def _owes_work(self) -> bool:
        """Whether the agent (not the client) is what this connection waits for: a request
        being worked on, or unparsed input held back only by the shared budget."""
        for slot in self._replies:
            if slot.line is None and (slot.turn is None or slot.turn.done()):
                return True
        return bool(self._backlog) and not (
            self._client_blocks() or self._owed() > self._server.max_pending_reply_bytes
        )

    def _check_idle(self) -> None:
        """Close the connection once the agent has owed it nothing for `idle_timeout`."""
        self._idle_timer = None
        transport, loop = self._transport, self._loop
        if transport is None or loop is None or transport.is_closing():
            return
        now = loop.time()
        timeout = self._server.idle_timeout
        if self._owes_work():
            due = now + timeout
        else:
            due = self._last_activity + timeout
            if due <= now:
                log.debug("closing an idle socket connection from uid %s", self.uid)
                # Replies it did not read go too: waiting for it to read them is what we stop.
                transport.abort()
                return
        self._idle_timer = loop.call_at(due, self._check_idle)


class SocketServer:
    """Owns the listening socket file and every connection made to it."""

    def __init__(
        self,
        path: Path,
        mode: int,
        dispatcher: Dispatcher,
        max_line_bytes: Callable[[], int],
        max_connections: int,
        *,
        max_connections_per_uid: int,
        idle_timeout: float,
        max_pending_reply_bytes: int,
    ) -> None:
        self.path = path
        self.mode = mode
        self.dispatcher = dispatcher
        self.max_line_bytes = max_line_bytes
        self.max_connections = max_connections
        self.max_connections_per_uid = max_connections_per_uid
        self.idle_timeout = idle_timeout
        self.max_pending_reply_bytes = max_pending_reply_bytes
        #: Always find a slot: root and the agent's own user (the CLI, `systemctl reload`).
        self.privileged_uids = frozenset({0, os.getuid()})
        self.connections: set[_Connection] = set()
        self._per_uid: collections.Counter[int | None] = collections.Counter()
        self.pending_bytes = 0  # bytes of batched requests the writer has not finished
        self.waiting_for_budget: set[_Connection] = set()
        self._release_turn = 0
        #: Reads are small so that input held unparsed stays small (docs/security.md).
        self.read_chunk = min(READ_CHUNK, MAX_SOCKET_INPUT_BYTES // max_connections)
        self.read_buffer = memoryview(bytearray(self.read_chunk))
        #: Unread replies of every connection outside root and the agent's own user, as last
        #: counted (`_Connection._account`); `limited` once past `MAX_UNREAD_REPLY_BYTES`.
        self.unread_bytes = 0
        self.limited = False
        self.held: set[_Connection] = set()  # stopped by the budget: looked at again each check
        self._budget_timer: asyncio.TimerHandle | None = None
        self.accepting = True
        self._server: asyncio.AbstractServer | None = None
        self._to_flush: dict[_Connection, None] = {}  # connections with replies to write
        self._refusals = RateLimitedLog(log)

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
            listener.listen(LISTEN_BACKLOG)
        except OSError:
            listener.close()
            raise
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=listener)

    def admit(self, connection: _Connection) -> str | None:
        """Count a new connection in, or say why it is refused. Decided when the peer's uid is
        known (connection_made runs one connection at a time, so the counts are exact)."""
        uid = connection.uid
        if uid in self.privileged_uids:
            limit = self.max_connections + RESERVED_CONNECTIONS
            full = len(self.connections) >= limit
            refusal = f"too many connections (limit {limit})" if full else None
        elif self._per_uid[uid] >= self.max_connections_per_uid:
            refusal = (
                f"too many connections from uid {uid} "
                f"(socket.max_connections_per_uid = {self.max_connections_per_uid})"
            )
        elif len(self.connections) >= self.max_connections:
            refusal = f"too many connections (socket.max_connections = {self.max_connections})"
        else:
            refusal = None
        if refusal is not None:
            self._refusals.warning(("refused", uid), "refused a socket connection: %s", refusal)
            return refusal
        self.connections.add(connection)
        self._per_uid[uid] += 1
        return None

    def forget(self, connection: _Connection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self._per_uid[connection.uid] -= 1
            if not self._per_uid[connection.uid]:
                del self._per_uid[connection.uid]
        self.waiting_for_budget.discard(connection)
        self.held.discard(connection)

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

    def over_budget(self, more: int) -> bool:
        """Whether the shared budget of unread replies is spent, counting `more` bytes that
        one connection owes beyond what it was last counted for."""
        if not self.limited and self.unread_bytes + more > MAX_UNREAD_REPLY_BYTES:
            self.limited = True
            self._refusals.warning(
                ("unread",),
                "socket clients have %d bytes of replies unread; until they read, a "
                "connection is read from only while it owes nothing",
                self.unread_bytes + more,
            )
            loop = asyncio.get_running_loop()
            self._budget_timer = loop.call_later(BUDGET_CHECK_INTERVAL, self._check_budget)
        return self.limited

    def _check_budget(self) -> None:
        """Count the unread replies again (clients read without the transport telling us):
        below half the budget every connection goes on; meanwhile each connection held back
        goes on once it has read everything it was sent."""
        self._budget_timer = None
        for connection in self.connections:
            connection._account()
        if self.unread_bytes <= MAX_UNREAD_REPLY_BYTES // 2:
            self.limited = False
        else:
            loop = asyncio.get_running_loop()
            self._budget_timer = loop.call_later(BUDGET_CHECK_INTERVAL, self._check_budget)
        held, self.held = self.held, set()
        for connection in held:
            connection._flush_replies()

    def take(self, size: int) -> None:
        """Count `size` bytes of a batched request in. Past `MAX_PENDING_BYTES` every
        connection stops reading at once, not only the one that crossed it: each read would
        parse at least one more command, and a parsed command takes several times its line."""
        below = self.pending_bytes <= MAX_PENDING_BYTES
        self.pending_bytes += size
        if below and self.pending_bytes > MAX_PENDING_BYTES:
            for connection in list(self.connections):
                if not connection.trusted:  # root's CLI reads on: its line is a query
                    connection.update_reading()

    def release(self, size: int) -> None:
        """The writer is done with batched requests; resume paused connections once half the
        budget is free."""
        self.pending_bytes -= size
        if self.waiting_for_budget and self.pending_bytes <= MAX_PENDING_BYTES // 2:
            waiting = list(self.waiting_for_budget)
            self.waiting_for_budget = set()
            # The first ones may take the whole budget again: start somewhere else each time,
            # so that every waiting connection gets its turn.
            self._release_turn = (self._release_turn + 1) % len(waiting)
            for connection in waiting[self._release_turn :] + waiting[: self._release_turn]:
                connection.update_reading()

    def stop_accepting(self) -> None:
        """Stop taking connections (the dispatcher refuses new commands): the listener closes,
        and queries held back for clients that do not read run now, so shutdown need not wait."""
        self.accepting = False
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection._flush_replies()

    async def close(self) -> None:
        self.stop_accepting()
        if self._budget_timer is not None:
            self._budget_timer.cancel()
            self._budget_timer = None
        for connection in list(self.connections):
            connection.close_when_done()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
