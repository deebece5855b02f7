"""Python client for the agent's Unix socket: what a Python app on the device imports.

    from agent.client import Client

    with Client(app="kiosk-ui") as agent:
        agent.track_event("door_opened", {"door": 2})

The methods are the commands of docs/protocol.md, with the SDKs' names; each returns the reply's
`result` or raises `CommandError` (the agent refused it: `.code`, `.message`, `.details`) or
`AgentUnavailable` (no agent answered). `pipeline()` and `send_many()` send many commands
without waiting for each reply (one reply per command, in order), which is how a backlog goes
through at full speed. The `engagement-agent` CLI is built on this module.

Plain blocking sockets with a timeout: an app's tracking call must turn a hung agent into a
clear error, not a hung app. Only the standard library is imported here (the agent's config,
and with it pydantic, only when the socket path has to be read from it), so importing the
client costs an app almost nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Generic, TypeVar

__all__ = [
    "AgentUnavailable",
    "Client",
    "CommandError",
    "Pipeline",
    "Reply",
    "default_socket_path",
]

#: Replies normally come within milliseconds; this only bounds a hung agent.
DEFAULT_TIMEOUT = 30.0
#: `flush(wait=True)` uploads the whole backlog before answering.
FLUSH_WAIT_TIMEOUT = 600.0
#: Where the packaged agent listens, used when the system config exists but the caller may not
#: read it (it holds secrets; app users usually only share the socket's group).
PACKAGED_SOCKET_PATH = Path("/run/engagement-agent/agent.sock")
SOCKET_PATH_ENV = "ENGAGEMENT_AGENT_SOCKET__PATH"
#: Streamed input is forwarded in pieces of this size, so one enormous line never sits in memory.
SEND_CHUNK = 64 * 1024
_HINT = "is it running? systemctl status engagement-agent"

Json = dict[str, Any]


# -- errors ---------------------------------------------------------------------------------


class AgentUnavailable(Exception):
    """No agent answered: socket missing, connection refused or lost, no reply in time.

    `offline` is True when nothing listens at all (socket missing or refused): the agent is
    stopped, as opposed to running but unreachable (permissions) or hung. Tracking data is not
    lost by the agent in either case, but the command was not accepted: try again later.
    """

    def __init__(self, message: str, *, offline: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.offline = offline
        #: The agent is there but did not answer within the client's timeout.
        self.timed_out = timed_out


class CommandError(Exception):
    """The agent refused the command; nothing of it was recorded.

    `code` is one of docs/protocol.md's error codes (`invalid_command`, `invalid_state`,
    `queue_full`, `forbidden`, ...), `details` lists field paths and reasons for schema errors,
    `reply` is the whole reply object.
    """

    def __init__(self, reply: Mapping[str, Any]) -> None:
        error = reply.get("error")
        error = error if isinstance(error, dict) else {}
        self.reply = dict(reply)
        self.code = str(error.get("code", "internal"))
        self.message = str(error.get("message", ""))
        details = error.get("details")
        self.details: list[Any] = list(details) if isinstance(details, list) else []
        self.request_id = reply.get("request_id")
        #: In `send_many`/`pipeline` results: the position of the refused command.
        self.index: int | None = None
        super().__init__(f"{self.code}: {self.message}" if self.message else self.code)


class AgentShuttingDown(CommandError, AgentUnavailable):
    """The agent answered `unavailable` (shutting down, or its disk is failing).

    It is both: a refusal with a code, and "try again later" like an agent that is not there,
    so `except AgentUnavailable` alone is enough for an app that retries.
    """

    def __init__(self, reply: Mapping[str, Any]) -> None:
        CommandError.__init__(self, reply)
        self.offline = self.timed_out = False


# -- replies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One reply line: `raw` is the line as the agent sent it, `data` its parsed form."""

    raw: str
    data: Mapping[str, Any]

    @classmethod
    def parse(cls, line: bytes, where: str) -> Reply:
        raw = line.decode("utf-8", "replace").rstrip("\r\n")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
            raise AgentUnavailable(f"the agent at {where} sent an unreadable reply")
        return cls(raw, data)

    @property
    def ok(self) -> bool:
        return bool(self.data["ok"])

    @property
    def result(self) -> Json:
        result = self.data.get("result")
        return dict(result) if isinstance(result, dict) else {}

    @property
    def error(self) -> Json:
        error = self.data.get("error")
        return dict(error) if isinstance(error, dict) else {}

    def exception(self) -> CommandError | None:
        """The error to raise for this reply, or None if it was accepted."""
        if self.ok:
            return None
        if self.error.get("code") == "unavailable":
            return AgentShuttingDown(self.data)
        return CommandError(self.data)

    def unwrap(self) -> Json:
        """The result, or raise the `CommandError` the reply stands for."""
        error = self.exception()
        if error is not None:
            raise error
        return self.result


# -- where the agent listens -------------------------------------------------------------------


def default_socket_path(config_path: str | os.PathLike[str] | None = None) -> Path:
    """The socket the agent listens on, found as the `engagement-agent` CLI finds it.

    `$ENGAGEMENT_AGENT_SOCKET__PATH` or `socket.path` of the config (`config_path`, else
    /etc/engagement-agent/agent.toml if it exists, else the built-in default, which for a
    user other than root is under `$XDG_RUNTIME_DIR`). If the system config exists but cannot
    be read by this user, the packaged path /run/engagement-agent/agent.sock. Raises
    `agent.config.ConfigError` when the config has to be read and is invalid.
    """
    from agent.config import load

    if config_path is None:
        unreadable = load.DEFAULT_CONFIG_PATH.exists() and not os.access(
            load.DEFAULT_CONFIG_PATH, os.R_OK
        )
        if unreadable:
            return Path(os.environ.get(SOCKET_PATH_ENV) or PACKAGED_SOCKET_PATH)
        path = load.default_config_path()
    else:
        path = Path(config_path)
    return load.load_config(path).socket.path


# -- the SDK's methods ----------------------------------------------------------------------

T = TypeVar("T")


def _fields(**fields: Any) -> Json:
    """The command's fields that were given (None means "not given": the agent's default)."""
    return {key: value for key, value in fields.items() if value is not None}


class _Commands(Generic[T]):
    """The commands as methods, shared by `Client` (runs each now, returns its result) and
    `Pipeline` (collects them, returns None). Argument names are the command's fields."""

    default_app: str | None = None

    def _submit(self, command: Json, *, timeout: float | None = None) -> T:
        raise NotImplementedError

    def _app(self, command: str, app: str | None, /, **fields: Any) -> T:
        return self._submit({"command": command, **_fields(app=app or self.default_app, **fields)})

    def track_event(
        self,
        name: str,
        properties: Mapping[str, Any] | None = None,
        timestamp: float | None = None,
        app: str | None = None,
    ) -> T:
        """A custom event of type `name`; `timestamp` in Unix seconds (default: now)."""
        return self._app(
            "track_event", app, name=name, properties=_dict(properties), timestamp=timestamp
        )

    def identify_customer(
        self,
        ids: Mapping[str, str],
        properties: Mapping[str, Any] | None = None,
        app: str | None = None,
    ) -> T:
        """Identify the app's customer by hard ids (`{"registered": "jane@example.com"}`)."""
        return self._app("identify_customer", app, ids=dict(ids), properties=_dict(properties))

    def anonymize(
        self,
        project: str | Mapping[str, Any] | None = None,
        mapping: Mapping[str, Any] | None = None,
        app: str | None = None,
    ) -> T:
        """Forget the customer and start a new anonymous one (optionally switching projects)."""
        return self._app(
            "anonymize",
            app,
            project=project if project is None or isinstance(project, str) else dict(project),
            mapping=_dict(mapping),
        )

    def track_session_start(self, timestamp: float | None = None, app: str | None = None) -> T:
        """Open a manual session (apps with automatic session tracking off)."""
        return self._app("track_session_start", app, timestamp=timestamp)

    def track_session_end(self, timestamp: float | None = None, app: str | None = None) -> T:
        """Close the manual session."""
        return self._app("track_session_end", app, timestamp=timestamp)

    def app_foreground(
        self,
        timestamp: float | None = None,
        app_version: str | None = None,
        app: str | None = None,
    ) -> T:
        """The app came to the foreground: starts or continues an automatic session."""
        return self._app("app_foreground", app, timestamp=timestamp, app_version=app_version)

    def app_background(
        self,
        timestamp: float | None = None,
        app_version: str | None = None,
        app: str | None = None,
    ) -> T:
        """The app went to the background: the session ends after the app's session timeout."""
        return self._app("app_background", app, timestamp=timestamp, app_version=app_version)

    def track_push_token(self, token: str, app: str | None = None) -> T:
        """A Firebase push token, tracked now."""
        return self._app("track_push_token", app, token=token)

    def track_hms_push_token(self, token: str, app: str | None = None) -> T:
        """A Huawei (HMS) push token, tracked now."""
        return self._app("track_hms_push_token", app, token=token)

    def verify_push_token(self, app: str | None = None) -> T:
        """Re-track the stored token if the app's token frequency says so."""
        return self._app("verify_push_token", app)

    def track_payment(
        self,
        value: float,
        currency: str,
        payment_system: str,
        product_id: str,
        product_title: str,
        receipt: str | None = None,
        timestamp: float | None = None,
        app: str | None = None,
    ) -> T:
        """A `payment` event for one purchased item."""
        item = _fields(
            value=value,
            currency=currency,
            payment_system=payment_system,
            product_id=product_id,
            product_title=product_title,
            receipt=receipt,
        )
        return self._app("track_payment", app, item=item, timestamp=timestamp)

    def set_default_properties(self, properties: Mapping[str, Any], app: str | None = None) -> T:
        """Replace the app's runtime default properties (added to every event it tracks)."""
        return self._app("set_default_properties", app, properties=dict(properties))

    def get_customer(self, app: str | None = None) -> T:
        """The app's customer ids and project: `{"app", "ids", "project_token"}`."""
        return self._app("get_customer", app)

    def status(self) -> T:
        """The agent's status object (queue, sync per project, MQTT, apps)."""
        return self._submit({"command": "status"})

    def flush(self, wait: bool = False, timeout: float | None = None) -> T:
        """Send the queue now; with `wait`, answer after one upload attempt
        (`{"flushed": n, "remaining": n}`), waiting up to `timeout` (default 600 s)."""
        if wait and timeout is None:
            timeout = FLUSH_WAIT_TIMEOUT
        return self._submit({"command": "flush", "wait": wait}, timeout=timeout)


def _dict(value: Mapping[str, Any] | None) -> Json | None:
    return None if value is None else dict(value)


# -- the connection -------------------------------------------------------------------------


class Client(_Commands[Json]):
    """A connection to the agent. Connects on first use (or on `with`), reconnects on the next
    call after the agent went away; safe to share between threads (one request at a time).

    `socket_path`: default as the CLI finds it (`default_socket_path()`); `app`: the app every
    command is for unless a call names another (default: the agent's `default` app);
    `timeout`: how long to wait for a reply, in seconds (None waits forever).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        app: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._path = Path(socket_path) if socket_path is not None else None
        self.default_app = app
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._lock = threading.RLock()

    @property
    def socket_path(self) -> Path:
        if self._path is None:
            self._path = default_socket_path()
        return self._path

    # -- lifecycle ------------------------------------------------------------------------------
    def connect(self) -> Client:
        """Connect now (otherwise the first call does); raises `AgentUnavailable`."""
        with self._lock:
            if self._sock is None:
                self._sock = self._open()
        return self

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._buffer.clear()

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> socket.socket:
        path = self.socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise _unreachable(path, exc) from None
        return sock

    @property
    def _connected(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._open()
        return self._sock

    def peer_pid(self) -> int:
        """The agent's pid, from the kernel (SO_PEERCRED): no pid file to go stale."""
        with self._lock:
            creds = self._connected.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
        pid: int = struct.unpack("3i", creds)[0]
        return pid

    # -- one command ----------------------------------------------------------------------------
    def request(self, command: Mapping[str, Any], *, timeout: float | None = None) -> Reply:
        """Send one command object and return its reply, accepted or not."""
        line = _encode(command)
        wait = timeout if timeout is not None else self.timeout
        with self._lock, self._failing_closes():
            sock = self._connected
            sock.settimeout(wait)
            try:
                sock.sendall(line)
                return self._read_reply()
            except TimeoutError:
                raise self._timed_out(wait) from None
            finally:
                sock.settimeout(self.timeout)

    def call(self, command: Mapping[str, Any], *, timeout: float | None = None) -> Json:
        """Send one command object; its `result`, or `CommandError`/`AgentUnavailable`."""
        return self.request(command, timeout=timeout).unwrap()

    def _submit(self, command: Json, *, timeout: float | None = None) -> Json:
        return self.call(command, timeout=timeout)

    # -- many commands --------------------------------------------------------------------------
    def pipeline(self, *, raise_on_error: bool = True) -> Pipeline:
        """Collect commands and send them together when the `with` block ends:

            with client.pipeline() as batch:
                for reading in readings:
                    batch.track_event("reading", reading)
            batch.results   # one result per command, in order

        A rejected command raises `CommandError` after every command was answered (the others
        were recorded); with `raise_on_error=False` the errors are kept in `results` instead.
        """
        return Pipeline(self, raise_on_error=raise_on_error)

    def send_many(
        self, commands: Iterable[Mapping[str, Any]], *, raise_on_error: bool = True
    ) -> list[Json | CommandError]:
        """Send command objects pipelined; one result per command, in order.

        Every command gets its answer before anything is raised: with `raise_on_error` the
        first `CommandError` is raised at the end (its `.index` says which command), otherwise
        a rejected command's place in the list holds its `CommandError`.
        """
        lines = [_encode(command) for command in commands]
        results: list[Json | CommandError] = []
        first_error: CommandError | None = None
        for index, (reply, _) in enumerate(self.exchange(lines, expected=len(lines))):
            error = reply.exception()
            if error is not None:
                error.index = index
                first_error = first_error or error
                results.append(error)
            else:
                results.append(reply.result)
        if raise_on_error and first_error is not None:
            raise first_error
        return results

    def exchange(
        self, requests: Iterable[bytes], *, expected: int | None = None
    ) -> Iterator[tuple[Reply, bool]]:
        """The pipelining engine: write request bytes while reading replies, one reply per line.

        Writing and reading at the same time is what makes pipelining safe: the agent stops
        reading when its unsent replies pile up, so a client that wrote everything before
        reading would deadlock on a large input. `requests` are chunks of NDJSON; a chunk
        ending in a newline completes a request (a long line may come in several chunks).
        With `expected` (the number of requests) the connection stays open for more; without
        it the input may be endless (a terminal), so the write side is closed at its end and
        the connection is used up. Yields `(reply, caught_up)`: `caught_up` is True when every
        request written so far has its reply (the moment to flush output for a reader waiting).
        """
        with self._lock, self._failing_closes():
            sock = self._connected
            forwarder = _Forwarder(requests, sock, close_after=expected is None)
            forwarder.start()
            replies = 0
            while True:
                if expected is not None and replies >= expected:
                    break
                if expected is None and forwarder.done.is_set() and replies >= forwarder.sent:
                    break
                # Only a wait that began while a reply was owed counts against the agent: one
                # that began while waiting for the input may have seen the request arrive late.
                owed = replies < forwarder.sent
                try:
                    line = self._readline()
                except TimeoutError as exc:
                    if owed:
                        raise self._lost(exc) from None
                    continue
                except ConnectionResetError:
                    break  # closed with our requests unread: reported below like an early EOF
                if not line:
                    break
                if not line.endswith(b"\n"):
                    break
                replies += 1
                reply = Reply.parse(line, str(self.socket_path))
                yield reply, forwarder.done.is_set() or replies >= forwarder.sent
            # After an early EOF from the agent: if the input is about to end anyway
            # (everything was answered), that is success; if more is still coming, it never can be.
            forwarder.done.wait(self.timeout if self.timeout is not None else 1.0)
            hung_up = isinstance(forwarder.error, (BrokenPipeError, ConnectionResetError))
            short = replies < (expected if expected is not None else forwarder.sent)
            if not forwarder.done.is_set() or short or hung_up:
                # Not joined: the thread may be blocked reading a terminal; it is a daemon thread.
                raise AgentUnavailable(
                    f"the agent at {self.socket_path} closed the connection after {replies} replies"
                )
            forwarder.join()
            if forwarder.error is not None:
                raise self._lost(forwarder.error)
            if expected is None:
                self.close()  # the write side is shut: this connection cannot take more

    # -- the wire -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _failing_closes(self) -> Iterator[None]:
        """Any failure mid-exchange leaves the stream out of step: drop the connection, so the
        next call starts on a fresh one instead of reading an earlier command's reply."""
        try:
            yield
        except OSError as exc:
            self.close()
            raise self._lost(exc) from None
        except BaseException:
            self.close()
            raise

    def _readline(self) -> bytes:
        """The next line with its newline, or what was left (possibly b"") at end of stream.

        Hand-rolled rather than `socket.makefile()`, whose buffer is undefined after a timeout;
        here a timeout (`TimeoutError`) loses nothing and the call can simply be repeated.
        """
        sock = self._connected
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            data = sock.recv(65536)
            if not data:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += data

    def _read_reply(self) -> Reply:
        line = self._readline()
        if not line.endswith(b"\n"):
            raise AgentUnavailable(
                f"the agent at {self.socket_path} closed the connection without replying"
            )
        return Reply.parse(line, str(self.socket_path))

    def _timed_out(self, seconds: float | None) -> AgentUnavailable:
        return AgentUnavailable(
            f"the agent at {self.socket_path} did not reply within {seconds:g} s", timed_out=True
        )

    def _lost(self, exc: OSError) -> AgentUnavailable:
        if isinstance(exc, TimeoutError):
            return self._timed_out(self.timeout)
        return AgentUnavailable(
            f"lost the connection to the agent at {self.socket_path}: {exc.strerror or exc}"
        )


class Pipeline(_Commands[None]):
    """Commands collected by `Client.pipeline()`; sent together when the `with` block ends
    (or by `execute()`), their results then in `results`, in order."""

    def __init__(self, client: Client, *, raise_on_error: bool = True) -> None:
        self.client = client
        self.default_app = client.default_app
        self.raise_on_error = raise_on_error
        self.commands: list[Json] = []
        self.results: list[Json | CommandError] = []

    def _submit(self, command: Json, *, timeout: float | None = None) -> None:
        self.commands.append(command)

    def execute(self) -> list[Json | CommandError]:
        commands, self.commands = self.commands, []
        self.results = self.client.send_many(commands, raise_on_error=self.raise_on_error)
        return self.results

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.execute()


def _encode(command: Mapping[str, Any]) -> bytes:
    return json.dumps(command, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _unreachable(path: Path, exc: OSError) -> AgentUnavailable:
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return AgentUnavailable(
            f"cannot reach the agent at {path}: {reason} ({_HINT})", offline=True
        )
    if isinstance(exc, PermissionError):
        return AgentUnavailable(
            f"cannot reach the agent at {path}: {reason} "
            f"(is your user in the socket's group? ls -l {path})"
        )
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    return AgentUnavailable(f"cannot reach the agent at {path}: {reason}")


class _Forwarder(threading.Thread):
    """Writes request chunks to the socket while the caller reads replies; counts requests."""

    def __init__(
        self, requests: Iterable[bytes], sock: socket.socket, *, close_after: bool
    ) -> None:
        super().__init__(name="agent-client-send", daemon=True)
        self.requests = requests
        self.sock = sock
        self.close_after = close_after
        self.sent = 0
        self.done = threading.Event()
        self.error: OSError | None = None  # while writing: some input was not sent

    def run(self) -> None:
        try:
            for chunk in self.requests:
                self.sock.sendall(chunk)
                self.sent += chunk.endswith(b"\n")
        except OSError as exc:
            self.error = exc
        finally:
            # Before the half-close: the agent's EOF that follows must find us done.
            self.done.set()
        if self.error is None and self.close_after:
            # The agent answers everything, then closes. If it has closed already, there is
            # nothing left to tell it: every line was sent, and the replies decide the outcome.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)


def stream_requests(source: BinaryIO) -> Iterator[bytes]:
    """NDJSON from a file or pipe as request chunks for `Client.exchange`.

    Blank lines are skipped (the agent skips them too, and they must not be counted as requests
    awaiting a reply); a last line without a newline is still a request.
    """
    while True:
        chunk = source.readline(SEND_CHUNK)
        if not chunk:
            return
        if chunk.endswith(b"\n") and not chunk.strip():
            continue
        yield chunk
        while not chunk.endswith(b"\n"):  # the rest of a line longer than one chunk
            chunk = source.readline(SEND_CHUNK) or b"\n"
            yield chunk
