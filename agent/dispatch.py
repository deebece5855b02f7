"""Transport-independent command handling: bytes in, one `Reply` out.

The MQTT adapter calls `Intake.handle()`; the socket calls its two halves, `prepare()` (every
check, synchronous) and `finish()` (the reply for a result), so it can run a whole chunk of
pipelined commands as one batch. Everything that decides whether a command is accepted —
size, JSON, schema, app name, permissions — happens here, once. A command is acknowledged
only when the backend has committed it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent.commands import (
    is_admin,
    is_app_scoped,
    is_tracking,
    parse_json,
    request_id_of,
    validate_command,
)
from agent.config import AgentConfig
from agent.errors import AgentError, Forbidden, InternalError, InvalidCommand, TooLarge, UnknownApp
from agent.logs import RateLimitedLog

log = logging.getLogger("engagement_agent.intake")

DEFAULT_APP = "default"

#: Compact JSON, built once (json.dumps with options builds an encoder per call).
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class Origin:
    """Where a command came from: decides the app name and which permission checks apply."""

    transport: Literal["socket", "mqtt"]
    topic_app: str | None = None  # MQTT: the app named by the topic
    uid: int | None = None  # socket: the peer's uid from SO_PEERCRED


@dataclass(frozen=True)
class Reply:
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
            request_id = "null" if self.request_id is None else _encode_json(self.request_id)
            return f'{{"ok":true,"request_id":{request_id},"result":{{}}}}'.encode()
        return _encode_json(self.to_dict()).encode()


class Accepted:
    """A command that passed every check in `Intake.prepare()`, with its accept time."""

    __slots__ = ("app", "command", "command_name", "now", "origin", "request_id", "tracking")

    def __init__(
        self,
        request_id: str | None,
        app: str,
        command_name: str,
        command: Any,
        now: float,
        origin: Origin,
        tracking: bool,
    ) -> None:
        self.request_id = request_id
        self.app = app
        self.command_name = command_name
        self.command = command
        self.now = now
        self.origin = origin
        self.tracking = tracking  # changes state and queues items (SPEC §11)


class Backend(Protocol):
    """What the daemon provides: `track` returns only after the command is committed."""

    def track(self, app: str, command: Any, now: float) -> Awaitable[Mapping[str, Any] | None]: ...

    def query(self, app: str, command: Any) -> Awaitable[Mapping[str, Any]]: ...


class Intake:
    def __init__(
        self,
        config: AgentConfig,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        own_uid: int | None = None,
    ) -> None:
        self._config = config
        self._backend = backend
        self._clock = clock
        self._privileged = {0, os.getuid() if own_uid is None else own_uid}
        # A misbehaving app can send thousands of bad commands a second; the journal gets one
        # line per error code and peer per minute, with the count of the rest.
        self._rejections = RateLimitedLog(log)

    def reload(self, config: AgentConfig) -> None:
        self._config = config

    async def handle(self, data: bytes, origin: Origin) -> Reply:
        """One command from bytes to its reply; returns once the backend committed it."""
        prepared = self.prepare(data, origin)
        if isinstance(prepared, Reply):
            return prepared
        return await self.execute(prepared)

    def prepare(self, data: bytes, origin: Origin) -> Reply | Accepted:
        """Everything that decides acceptance, synchronously: size, JSON, schema, app name,
        permissions; then the accept time. Returns the error `Reply` of a refused command,
        else the `Accepted` command for `execute()` (or a transport's own batching, which must
        hand each result to `finish()`)."""
        request_id: str | None = None
        app: str | None = origin.topic_app
        command_name: str | None = None
        try:
            if len(data) > self._config.limits.max_command_bytes:
                raise TooLarge(
                    f"command is {len(data)} bytes; the limit is "
                    f"{self._config.limits.max_command_bytes} (limits.max_command_bytes)"
                )
            document = parse_json(data)
            request_id = request_id_of(document)
            command = validate_command(document)
            command_name = command.command
            app = self._app_for(command, origin)
            self._authorize(app, command, origin)
            # The accept time is taken here, before any waiting: an absent timestamp means
            # "when the agent accepted the command", not when it was committed or sent.
            return Accepted(
                request_id, app, command_name, command, self._clock(), origin, is_tracking(command)
            )
        except AgentError as error:
            self._log_rejection(error, app, command_name, origin)
            return Reply(request_id, app, command_name, error=error)
        except Exception:
            log.exception("internal error while handling %s for app %s", command_name, app)
            return Reply(
                request_id, app, command_name, error=InternalError("internal error; see the log")
            )

    async def execute(self, accepted: Accepted) -> Reply:
        """Run an accepted command on the backend; the reply once it is committed."""
        try:
            if accepted.tracking:
                result = await self._backend.track(accepted.app, accepted.command, accepted.now)
            else:
                result = await self._backend.query(accepted.app, accepted.command)
        except Exception as exc:
            return self.finish(accepted, exc)
        return self.finish(accepted, result)

    def finish(self, accepted: Accepted, result: Mapping[str, Any] | BaseException | None) -> Reply:
        """The reply for an accepted command given its result, or the exception that refused
        it (an `AgentError` is the client's answer; anything else is logged as internal)."""
        if not isinstance(result, BaseException):
            return Reply(accepted.request_id, accepted.app, accepted.command_name, result)
        if isinstance(result, AgentError):
            self._log_rejection(result, accepted.app, accepted.command_name, accepted.origin)
            return Reply(accepted.request_id, accepted.app, accepted.command_name, error=result)
        log.error(
            "internal error while handling %s for app %s",
            accepted.command_name,
            accepted.app,
            exc_info=result,
        )
        return Reply(
            accepted.request_id,
            accepted.app,
            accepted.command_name,
            error=InternalError("internal error; see the log"),
        )

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
        app_config = self._config.app_config(app)
        if app_config is None:
            raise UnknownApp(
                f"unknown app {app!r}: it has no [apps.{app}] section and "
                "apps.allow_unknown is false"
            )
        allowed = app_config.allowed_uids
        if (
            origin.transport == "socket"
            and allowed is not None
            and origin.uid not in self._privileged
            and origin.uid not in allowed
        ):
            raise Forbidden(f"uid {origin.uid} may not send commands for app {app!r}")

    def _log_rejection(
        self, error: AgentError, app: str | None, command: str | None, origin: Origin
    ) -> None:
        peer = f"uid {origin.uid}" if origin.transport == "socket" else "mqtt"
        self._rejections.info(
            (error.code, peer),
            "rejected %s for app %s from %s: %s",
            command or "command",
            app or "?",
            peer,
            error.code.value,
        )


def reply_for_unreadable(error: AgentError) -> Reply:
    """A reply for input that never reached `handle()` (e.g. a socket line over the limit)."""
    return Reply(None, error=error)


__all__ = [
    "DEFAULT_APP",
    "Accepted",
    "Backend",
    "Intake",
    "Origin",
    "Reply",
    "reply_for_unreadable",
]
