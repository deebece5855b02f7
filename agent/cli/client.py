"""The CLI's side of the socket protocol (SPEC §3): NDJSON requests, one reply line each, in order.

Plain blocking sockets with a timeout: the CLI does one thing at a time, and a hung agent must
turn into a clear error, not a hung shell script.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from agent.cli.context import EX_REJECTED, EX_UNAVAILABLE, PROG, CliError

#: stdin is forwarded in pieces of this size, so one enormous line never sits in memory.
SEND_CHUNK = 64 * 1024
_HINT = f"is it running? systemctl status {PROG}"


class AgentUnreachable(CliError):
    """No agent answered. `offline` is True when none is listening at all (socket missing or
    refused), which is when the queue verbs may open the database themselves."""

    def __init__(self, message: str, *, offline: bool) -> None:
        super().__init__(message, EX_UNAVAILABLE)
        self.offline = offline


def _unreachable(path: Path, exc: OSError) -> AgentUnreachable:
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return AgentUnreachable(
            f"cannot reach the agent at {path}: {reason} ({_HINT})", offline=True
        )
    if isinstance(exc, PermissionError):
        return AgentUnreachable(
            f"cannot reach the agent at {path}: {reason} "
            f"(is your user in the socket's group? ls -l {path})",
            offline=False,
        )
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    return AgentUnreachable(f"cannot reach the agent at {path}: {reason}", offline=False)


@dataclass(frozen=True)
class Reply:
    """One reply line: `raw` is printed as is for `--json`, `data` is its parsed form."""

    raw: str
    data: Mapping[str, Any]

    @classmethod
    def parse(cls, line: bytes, path: Path) -> Reply:
        raw = line.decode("utf-8", "replace").rstrip("\r\n")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
            raise CliError(f"the agent at {path} sent an unreadable reply", EX_UNAVAILABLE)
        return cls(raw, data)

    @property
    def ok(self) -> bool:
        return bool(self.data["ok"])

    @property
    def result(self) -> Mapping[str, Any]:
        result = self.data.get("result")
        return result if isinstance(result, dict) else {}

    @property
    def error(self) -> Mapping[str, Any]:
        error = self.data.get("error")
        return error if isinstance(error, dict) else {}

    def exit_code(self) -> int:
        """0, or 1 for a rejection — except `unavailable` (shutting down, disk full), which is
        69 like an agent that is not there: a script should retry it later, not drop it."""
        if self.ok:
            return 0
        return EX_UNAVAILABLE if self.error.get("code") == "unavailable" else EX_REJECTED

    def error_line(self) -> str:
        code = self.error.get("code", "error")
        message = self.error.get("message", "")
        return f"rejected ({code}): {message}" if message else f"rejected ({code})"


class Connection:
    """One connection to the agent; use as a context manager (connects on enter)."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def __enter__(self) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _unreachable(self.path, exc) from None
        self._sock = sock
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            self._sock.close()

    @property
    def sock(self) -> socket.socket:
        assert self._sock is not None, "use Connection as a context manager"
        return self._sock

    def peer_pid(self) -> int:
        """The agent's pid, from the kernel (SO_PEERCRED): no pid file to go stale."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", creds)[0]
        return pid

    def request(self, command: Mapping[str, Any]) -> Reply:
        line = json.dumps(command, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        try:
            self.sock.sendall(line)
        except OSError as exc:
            raise self.lost(exc) from None
        return self.read_reply()

    def readline(self) -> bytes:
        """The next line with its newline, or what was left (possibly b"") at end of stream.

        Hand-rolled rather than `socket.makefile()`, whose buffer is undefined after a timeout;
        here a timeout (`TimeoutError`) loses nothing and the call can simply be repeated.
        """
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            data = self.sock.recv(65536)
            if not data:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += data

    def read_reply(self) -> Reply:
        try:
            line = self.readline()
        except OSError as exc:
            raise self.lost(exc) from None
        if not line.endswith(b"\n"):
            raise AgentUnreachable(
                f"the agent at {self.path} closed the connection without replying",
                offline=False,
            )
        return Reply.parse(line, self.path)

    def lost(self, exc: OSError) -> AgentUnreachable:
        if isinstance(exc, TimeoutError):
            return AgentUnreachable(
                f"the agent at {self.path} did not reply within {self.timeout:g} s "
                "(raise it with --timeout)",
                offline=False,
            )
        return AgentUnreachable(
            f"lost the connection to the agent at {self.path}: {exc.strerror or exc}",
            offline=False,
        )


class _Forwarder(threading.Thread):
    """Copies stdin's non-blank lines to the socket while the main thread reads replies.

    Writing and reading at the same time is what makes pipelining safe: the agent stops reading
    when its unsent replies pile up, so a client that wrote everything before reading would
    deadlock on a large input. Blank lines are skipped here because the agent skips them too
    and they must not be counted as requests awaiting a reply.
    """

    def __init__(self, source: BinaryIO, sock: socket.socket) -> None:
        super().__init__(name="send-stdin", daemon=True)
        self.source = source
        self.sock = sock
        self.sent = 0
        self.done = threading.Event()
        self.error: OSError | None = None  # while copying: some input was not sent

    def run(self) -> None:
        try:
            self._copy()
        except OSError as exc:
            self.error = exc
        finally:
            # Before the half-close: the agent's EOF that follows must find us done.
            self.done.set()
        if self.error is None:
            # The agent answers everything, then closes. If it has closed already, there is
            # nothing left to tell it: every line was sent, and the replies decide the outcome.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def _copy(self) -> None:
        while True:
            chunk = self.source.readline(SEND_CHUNK)
            if not chunk:
                return
            if chunk.endswith(b"\n") and not chunk.strip():
                continue
            self.sock.sendall(chunk)
            while not chunk.endswith(b"\n"):  # the rest of a line longer than one chunk
                chunk = self.source.readline(SEND_CHUNK)
                if not chunk:
                    chunk = b"\n"  # a last line without a newline is still a request
                self.sock.sendall(chunk)
            self.sent += 1


def send_stream(conn: Connection, source: BinaryIO, sink: BinaryIO) -> tuple[int, int]:
    """Pipe NDJSON commands from `source` to the agent and the replies to `sink`.

    Returns `(replies, rejected)`. Output is flushed whenever the replies have caught up with
    the input, so an interactive session sees each answer at once while a bulk load is not
    slowed down by a flush per line.
    """
    forwarder = _Forwarder(source, conn.sock)
    forwarder.start()
    replies = rejected = 0
    while not (forwarder.done.is_set() and replies >= forwarder.sent):
        # Only a wait that began while a reply was owed counts against the agent: one that
        # began while waiting for stdin may have seen the request arrive near its end.
        owed = replies < forwarder.sent
        try:
            line = conn.readline()
        except TimeoutError as exc:
            if owed:
                raise conn.lost(exc) from None
            continue
        except ConnectionResetError:
            break  # closed with our requests unread: reported below like an early EOF
        except OSError as exc:
            raise conn.lost(exc) from None
        if not line:
            break
        reply = Reply.parse(line, conn.path)
        replies += 1
        rejected += not reply.ok
        sink.write(line if line.endswith(b"\n") else line + b"\n")
        if forwarder.done.is_set() or replies >= forwarder.sent:
            sink.flush()
    sink.flush()
    # After an early EOF from the agent: if stdin is about to end anyway (everything was
    # answered), that is success; if more input is still coming (a terminal), it never can be.
    forwarder.done.wait(conn.timeout if conn.timeout is not None else 1.0)
    hung_up = isinstance(forwarder.error, (BrokenPipeError, ConnectionResetError))
    if not forwarder.done.is_set() or replies < forwarder.sent or hung_up:
        # Not joined: the thread may be blocked on a terminal's stdin; it is a daemon thread.
        raise AgentUnreachable(
            f"the agent at {conn.path} closed the connection after {replies} replies",
            offline=False,
        )
    forwarder.join()
    if forwarder.error is not None:
        raise conn.lost(forwarder.error)
    return replies, rejected
