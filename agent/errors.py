"""Every error a client can see, as exception classes mapped to the protocol's codes in one place
(docs/protocol.md, "Replies").

Adapters (socket, MQTT, CLI) never invent codes: they catch `AgentError` and turn it into a
reply with `to_reply_error()`. Anything else that escapes is reported as `internal`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    INVALID_JSON = "invalid_json"
    INVALID_COMMAND = "invalid_command"
    TOO_LARGE = "too_large"
    UNKNOWN_APP = "unknown_app"
    FORBIDDEN = "forbidden"
    INVALID_STATE = "invalid_state"
    QUEUE_FULL = "queue_full"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


#: Codes that will never succeed if the same command is sent again. On MQTT these are acked
#: (never redelivered); `unavailable` and `internal` are not permanent.
PERMANENT_CODES = frozenset(
    {
        ErrorCode.INVALID_JSON,
        ErrorCode.INVALID_COMMAND,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNKNOWN_APP,
        ErrorCode.FORBIDDEN,
        ErrorCode.INVALID_STATE,
        ErrorCode.QUEUE_FULL,
    }
)


class AgentError(Exception):
    """An error with a protocol error code (docs/protocol.md); `details` lists field paths and
    reasons, never values."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def to_reply_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details:
            error["details"] = self.details
        return error


class InvalidJson(AgentError):
    code = ErrorCode.INVALID_JSON


class InvalidCommand(AgentError):
    code = ErrorCode.INVALID_COMMAND


class TooLarge(AgentError):
    code = ErrorCode.TOO_LARGE


class UnknownApp(AgentError):
    code = ErrorCode.UNKNOWN_APP


class Forbidden(AgentError):
    code = ErrorCode.FORBIDDEN


class InvalidState(AgentError):
    code = ErrorCode.INVALID_STATE


class QueueFull(AgentError):
    code = ErrorCode.QUEUE_FULL


class Unavailable(AgentError):
    code = ErrorCode.UNAVAILABLE


class InternalError(AgentError):
    code = ErrorCode.INTERNAL
