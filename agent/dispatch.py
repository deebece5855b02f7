"""One path for every command, whatever its transport: bytes in, one `Reply` out.

Transports (the socket in `agent/ipc.py`, MQTT in `agent/mqtt/`) frame messages and own the
order and delivery of replies; everything else happens here, once per command:

1. `prepare()` — size, JSON, schema, app name, authorization (socket uids, `apps.<app>.mqtt`),
   the shutdown refusal; then the accept time. It returns the error `Reply` of a refused
   command or an `Accepted` command.
2. `submit()` — the accepted commands that go through the store's writer (tracking commands and
   `get_customer`), a transport's whole hand-off at once: the socket hands over each chunk of
   pipelined lines, MQTT everything that arrived since its last pass. They run in order, each
   all-or-nothing, in one writer transaction where they fit (group commit), and
   `done(replies)` runs once on the event loop after the commit. A reply (and so a PUBACK)
   never precedes the commit.
3. `query()` — `status`, `flush` and queue maintenance: not part of a group (queue
   maintenance goes to the writer as ops of its own).

Every reply is counted by transport and result for status (`commands`) and the metric
`engagement_agent_commands_total{transport,result}`; commands between acceptance and reply are
counted in `in_flight` for the shutdown. The protocol itself is in docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent.commands import (
    GetCustomer,
    is_admin,
    is_app_scoped,
    is_tracking,
    parse_json,
    parse_valid_command,
    request_id_of,
    validate_command,
)
from agent.config import AgentConfig
from agent.errors import (
    AgentError,
    Forbidden,
    InternalError,
    InvalidCommand,
    TooLarge,
    Unavailable,
    UnknownApp,
)
from agent.logs import RateLimitedLog, escape

log = logging.getLogger("engagement_agent.dispatch")

DEFAULT_APP = "default"
Transport = Literal["socket", "mqtt"]
TRANSPORTS: tuple[Transport, ...] = ("socket", "mqtt")

#: Compact JSON, built once (json.dumps with options builds an encoder per call).
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


#: Origins remembered as allowed to command an app (`Dispatcher._authorize`): far more than a
#: device has apps and local users, few enough that unknown app names cannot grow it.
MAX_AUTHORIZED = 1024

#: The reply to most tracking commands sent without a request id.
_OK_WITHOUT_REQUEST_ID = b'{"ok":true,"request_id":null,"result":{}}'
_OK_WITHOUT_REQUEST_ID_LINE = _OK_WITHOUT_REQUEST_ID + b"\n"


@dataclass(frozen=True)
class Origin:
    """Where a command came from: decides the app name and which permission checks apply."""

    transport: Transport
    topic_app: str | None = None  # MQTT: the app named by the topic
    uid: int | None = None  # socket: the peer's uid from SO_PEERCRED


@dataclass(slots=True)
class Reply:
    """One command's answer. Read-only by convention, not `frozen`: a frozen dataclass's
    `__init__` sets each field through `object.__setattr__`: 2.0 µs per reply against 0.4 µs
    with slots, on the event loop, for every command."""

    request_id: str | None
    app: str | None = None
    command: str | None = None
    result: Mapping[str, Any] | None = None
    error: AgentError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": self.ok, "request_id": self.request_id}
        if self.error is None:
            reply["result"] = dict(self.result or {})
        else:
            reply["error"] = self.error.to_reply_error()
        return reply

    def encode(self) -> bytes:
        """Compact JSON without a trailing newline."""
        if self.error is None and not self.result:  # most tracking commands: spelled out
            if self.request_id is None:
                return _OK_WITHOUT_REQUEST_ID
            request_id = _encode_json(self.request_id)
            return f'{{"ok":true,"request_id":{request_id},"result":{{}}}}'.encode()
        return _encode_json(self.to_dict()).encode()

    def line(self) -> bytes:
        """The reply as a line of the socket protocol (`encode()` and a newline)."""
        data = self.encode()
        return _OK_WITHOUT_REQUEST_ID_LINE if data is _OK_WITHOUT_REQUEST_ID else data + b"\n"


class Accepted:
    """A command that passed every check in `Dispatcher.prepare()`, with its accept time.

    `grouped` commands run on the store's writer (`Dispatcher.submit`); the others are queries
    (`Dispatcher.query`)."""

    __slots__ = ("app", "command", "command_name", "grouped", "now", "origin", "request_id")

    def __init__(
        self,
        request_id: str | None,
        app: str,
        command_name: str,
        command: Any,
        now: float,
        origin: Origin,
    ) -> None:
        self.request_id = request_id
        self.app = app
        self.command_name = command_name
        self.command = command
        self.now = now
        self.origin = origin
        # get_customer reads the app's state on the writer: grouped, it keeps its order
        # after the tracking commands sent before it.
        self.grouped = is_tracking(command) or type(command) is GetCustomer


#: What the writer hands back per command: the reply's result, or the exception refusing it.
Result = Mapping[str, Any] | None | BaseException


class Writer(Protocol):
    """The store side (`agent.engine.Runner` in the daemon)."""

    def commit(self, commands: Sequence[Accepted], done: Callable[[list[Result]], None]) -> None:
        """Run `commands` in order on the writer, each all-or-nothing, in one transaction
        where they fit; call `done(results)` once, on the event loop, after the commit."""
        ...


class Queries(Protocol):
    """`status`, `flush` and queue maintenance (`agent.daemon` provides them)."""

    def query(self, command: Accepted) -> Awaitable[Mapping[str, Any]]: ...


class Dispatcher:
    """Construct on the event loop's thread; every method runs there."""

    def __init__(
        self,
        config: AgentConfig,
        writer: Writer,
        queries: Queries,
        *,
        clock: Callable[[], float] = time.time,
        own_uid: int | None = None,
    ) -> None:
        self.reload(config)
        self._writer = writer
        self._queries = queries
        self._clock = clock
        self._privileged = {0, os.getuid() if own_uid is None else own_uid}
        self._accepting = True
        self.in_flight = 0
        self._counts: dict[str, dict[str, int]] = {transport: {} for transport in TRANSPORTS}
        # A misbehaving app can send thousands of bad commands a second; the journal gets one
        # line per error code and peer per minute, with the count of the rest.
        self._rejections = RateLimitedLog(log)

    def reload(self, config: AgentConfig) -> None:
        """Use `config` from the next command on (also what the constructor does with its
        own)."""
        self._config = config
        self._max_command_bytes: int = config.limits.max_command_bytes
        # (app, transport, uid) allowed to command the app under this config: the checks
        # read pydantic models, whose every attribute read costs ~4 times a plain object's
        # instructions (their `__getattr__` keeps CPython from specialising it), with two
        # calls (~5k instructions in all), and they are the same for every command of an app
        # from one peer. Emptied with each reload.
        self._authorized: set[tuple[str, Transport, int | None]] = set()

    def stop_accepting(self) -> None:
        """From now on every command is refused with `unavailable` (SIGTERM): commands already
        accepted still finish, and `in_flight` tells when they have."""
        self._accepting = False

    def counts(self) -> dict[str, dict[str, int]]:
        """Replies so far by transport and result (`ok` or the error code), for status."""
        return {transport: dict(sorted(c.items())) for transport, c in self._counts.items()}

    # -- the path ------------------------------------------------------------------------------
    def refuse(self, error: AgentError, origin: Origin, request_id: str | None = None) -> Reply:
        """The reply for input refused before `prepare()` could read it (an over-long socket
        line, a retained MQTT message, a full connection table); counted like any reply."""
        reply = Reply(request_id, origin.topic_app, None, error=error)
        self._log_rejection(error, origin.topic_app, None, origin)
        self._count(origin, reply)
        return reply

    def prepare(self, data: bytes, origin: Origin) -> Reply | Accepted:
        """Every check that decides acceptance, synchronously; then the accept time."""
        request_id: str | None = None
        app: str | None = origin.topic_app
        command_name: str | None = None
        try:
            if not self._accepting:
                raise Unavailable("the agent is shutting down")
            if len(data) > self._max_command_bytes:
                raise TooLarge(
                    f"command is {len(data)} bytes; the limit is "
                    f"{self._max_command_bytes} (limits.max_command_bytes)"
                )
            command = parse_valid_command(data)
            if command is None:  # refused: read it again step by step for the exact error
                document = parse_json(data)
                request_id = request_id_of(document)
                command = validate_command(document)
            request_id = command.request_id
            command_name = command.command
            app = self._app_for(command, origin)
            self._authorize(app, command, origin)
            # The accept time is taken here, before any waiting: an absent timestamp means
            # "when the agent accepted the command", not when it was committed or sent.
            return Accepted(request_id, app, command_name, command, self._clock(), origin)
        except AgentError as exc:
            self._log_rejection(exc, app, command_name, origin)
            reply = Reply(request_id, app, command_name, error=exc.as_answer())
        except Exception:
            log.exception(
                "internal error while handling %s for app %s", command_name, escape(app or "?")
            )
            reply = Reply(
                request_id, app, command_name, error=InternalError("internal error; see the log")
            )
        self._count(origin, reply)
        return reply

    def submit(self, commands: Sequence[Accepted], done: Callable[[list[Reply]], None]) -> None:
        """Run `grouped` commands as one group on the writer; `done(replies)` on the loop once
        every one of them is committed or refused (one refused command fails only itself).

        The commands of a group come from one transport (a socket connection's chunk, or one
        MQTT pass): their replies are counted for it together."""
        if not commands:
            return
        self.in_flight += len(commands)

        def committed(results: list[Result]) -> None:
            self.in_flight -= len(commands)
            replies = [self._reply(c, r) for c, r in zip(commands, results, strict=True)]
            self._count_all(commands[0].origin.transport, replies)
            done(replies)

        try:
            self._writer.commit(commands, committed)
        except Exception as exc:  # nothing was submitted: every command gets the error
            committed([exc] * len(commands))

    async def query(self, command: Accepted) -> Reply:
        """Run a query (a command that is not `grouped`)."""
        self.in_flight += 1
        try:
            result: Result = await self._queries.query(command)
        except Exception as exc:
            result = exc
        finally:
            self.in_flight -= 1
        reply = self._reply(command, result)
        self._count(command.origin, reply)
        return reply

    # -- the parts -----------------------------------------------------------------------------
    def _reply(self, accepted: Accepted, result: Result) -> Reply:
        """The reply for an accepted command given its result, or the exception that refused
        it (an `AgentError` is the client's answer; anything else is logged as internal)."""
        if not isinstance(result, BaseException):
            reply = Reply(accepted.request_id, accepted.app, accepted.command_name, result)
        else:
            error = result
            if isinstance(error, AgentError):
                self._log_rejection(error, accepted.app, accepted.command_name, accepted.origin)
            else:
                log.error(
                    "internal error while handling %s for app %s",
                    accepted.command_name,
                    accepted.app,
                    exc_info=error,
                )
                error = InternalError("internal error; see the log")
            reply = Reply(accepted.request_id, accepted.app, accepted.command_name, error=error)
        return reply

    def _count(self, origin: Origin, reply: Reply) -> None:
        self._count_all(origin.transport, (reply,))

    def _count_all(self, transport: Transport, replies: Iterable[Reply]) -> None:
        """Count replies by result for status; a group's many oks with one update."""
        counts = self._counts[transport]
        ok = 0
        for reply in replies:
            if reply.error is None:
                ok += 1
            else:
                key = reply.error.code.value
                counts[key] = counts.get(key, 0) + 1
        if ok:
            counts["ok"] = counts.get("ok", 0) + ok

    def _app_for(self, command: Any, origin: Origin) -> str:
        if origin.transport == "mqtt":
            if command.app is not None and command.app != origin.topic_app:
                raise InvalidCommand(
                    f"invalid command: app {command.app!r} differs from the topic's app "
                    f"{origin.topic_app!r}",
                    [{"field": "app", "reason": "differs from the app in the topic"}],
                )
            return origin.topic_app or DEFAULT_APP
        return command.app or DEFAULT_APP

    def _authorize(self, app: str, command: Any, origin: Origin) -> None:
        if is_admin(command):
            if origin.transport != "socket":
                raise InvalidCommand(
                    f"invalid command: {command.command} is only accepted on the local socket",
                    [{"field": "command", "reason": "only accepted on the local socket"}],
                )
            if origin.uid not in self._privileged:
                raise Forbidden("queue maintenance needs root or the agent's own user")
            return
        if not is_app_scoped(command):
            return  # status and flush concern the whole agent, not one app
        key = (app, origin.transport, origin.uid)
        if key in self._authorized:
            return
        self._check_app_access(app, origin)
        if len(self._authorized) < MAX_AUTHORIZED:
            self._authorized.add(key)

    def _check_app_access(self, app: str, origin: Origin) -> None:
        """Whether `origin` may command `app` under the current config (an app-scoped
        command: tracking or `get_customer`); raises the refusal."""
        app_config = self._config.app_config(app)
        if app_config is None:
            raise UnknownApp(
                f"unknown app {app!r}: it has no [apps.{app}] section and "
                "apps.allow_unknown is false"
            )
        if origin.transport == "mqtt":
            # The broker, not the agent, knows who published; an app restricted to some uids
            # on the socket would be open to anyone on MQTT (docs/mqtt.md, "Who may command").
            if not app_config.mqtt_allowed:
                raise Forbidden(
                    f"app {app!r} does not accept MQTT commands: it has allowed_uids; set "
                    f"apps.{app}.mqtt = true once the broker's ACL restricts its topic"
                )
            return
        allowed = app_config.allowed_uids
        if allowed is not None and origin.uid not in self._privileged and origin.uid not in allowed:
            raise Forbidden(f"uid {origin.uid} may not send commands for app {app!r}")

    def _log_rejection(
        self, error: AgentError, app: str | None, command: str | None, origin: Origin
    ) -> None:
        peer = f"uid {origin.uid}" if origin.transport == "socket" else "mqtt"
        self._rejections.info(
            (error.code, peer),
            "rejected %s for app %s from %s: %s",
            command or "command",
            escape(app or "?"),
            peer,
            error.code.value,
        )


__all__ = [
    "DEFAULT_APP",
    "MAX_AUTHORIZED",
    "Accepted",
    "Dispatcher",
    "Origin",
    "Queries",
    "Reply",
    "Result",
    "Writer",
]
