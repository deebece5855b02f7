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


#: What a reply carries of an error: a command of `limits.max_command_bytes` with thousands of
#: unknown fields would otherwise be answered with a reply several times its size, and replies
#: a client does not read are memory the agent holds (docs/protocol.md, "Replies").
MAX_DETAILS = 20
MAX_MESSAGE_CHARS = 1024
MAX_DETAIL_CHARS = 256


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AgentError(Exception):
    """An error with a protocol error code (docs/protocol.md); `details` lists field paths and
    reasons, never values."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def to_reply_error(self) -> dict[str, Any]:
        """The reply's `error`: the message and the first `MAX_DETAILS` details, texts clipped
        (the message of a schema error counts every problem)."""
        error: dict[str, Any] = {
            "code": self.code.value,
            "message": _clip(self.message, MAX_MESSAGE_CHARS),
        }
        if self.details:
            error["details"] = [
                {
                    key: _clip(value, MAX_DETAIL_CHARS) if isinstance(value, str) else value
                    for key, value in detail.items()
                }
                for detail in self.details[:MAX_DETAILS]
            ]
        return error

    def as_answer(self) -> AgentError:
        """This error, its traceback and chained exceptions dropped (in place), to be kept
        as a reply.

        A caught error's traceback holds the frames it passed through, and those frames hold
        whatever keeps the error (the reply, the list of refusals): a reference cycle that
        reference counting never frees, only the cyclic GC, which the daemon runs rarely
        (`agent.daemon.tune_gc`). An answer to a client needs only the message and details.
        """
        self.__traceback__ = None
        self.__context__ = None
        self.__cause__ = None
        return self


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
