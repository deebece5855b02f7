"""The Engagement batch API on the wire (docs/sync.md), as pure functions.

Nothing here does I/O or reads a clock: the uploader (`agent.sync`) passes the response it got
and the wall time, and gets back a `Verdict` saying what to do with the batch. Keeping the
decision table in one place is what lets the unit tests cover every status code, body shape
and `Retry-After` form without a socket.
"""

from __future__ import annotations

import email.utils
import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timezone
from typing import Any
from urllib.parse import quote

from agent.logs import escape

#: The API refuses larger batches (docs/sync.md).
MAX_BATCH_COMMANDS = 50
#: `Retry-After` is honoured even above `sync.max_backoff`, but never longer than this
#: (docs/sync.md).
MAX_RETRY_AFTER = 900.0
#: Error texts are stored with dead letters and shown in status; a hostile or broken server
#: must not be able to make them arbitrarily large.
MAX_ERROR_TEXT = 1000

#: Whole-batch 400 bodies that mean "your credentials or project are wrong", not "a command is
#: bad" (docs/sync.md). Matched case-insensitively anywhere in the body.
AUTH_FAILURE_MARKERS = ("could not authenticate", "invalid project id")

#: Statuses after which the same batch may succeed later (docs/sync.md).
_RETRY_STATUSES = frozenset({408, 429})
#: Statuses meaning "this batch is too big or one of its commands is refused": bisect it.
_SPLIT_STATUSES = frozenset({400, 413, 422})


def batch_path(project_token: str) -> str:
    """The batch endpoint's path; the token is percent-encoded so it cannot escape the path."""
    return f"/track/v2/projects/{quote(project_token, safe='')}/batch"


def authorization_header(authorization_token: str) -> str:
    """The `Authorization` value for a configured key. The SDK documentation shows the key as
    the whole header value (`Token <key>`, iOS also `Bearer <key>`), so a key written that way
    is sent as it is rather than as `Token Token <key>`."""
    if authorization_token.startswith(("Token ", "Bearer ")):
        return authorization_token
    return f"Token {authorization_token}"


def batch_body(payloads: Sequence[bytes]) -> bytes:
    """The request body for stored payloads, without re-encoding them.

    The store keeps each command as compact JSON (`{"name": ..., "data": {...}}`), so the
    body is a byte concatenation: parsing and re-serialising 50 commands per request would
    cost more CPU than the HTTP exchange itself.
    """
    if not payloads:
        raise ValueError("a batch needs at least one command")
    if len(payloads) > MAX_BATCH_COMMANDS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_COMMANDS} commands")
    return b'{"commands":[' + b",".join(payloads) + b"]}"


class Action(enum.Enum):
    """What the uploader does with a batch after a response (or a failure to get one)."""

    #: The API answered per command: ack the successes, dead-letter the refusals.
    OK = "ok"
    #: Transient: keep the whole batch and send it again after a backoff.
    RETRY = "retry"
    #: The project's credentials or URL are wrong: stop sending to it until reload or cap.
    PAUSE = "pause"
    #: The API refused the batch as a whole for something in it: bisect to find the item(s).
    SPLIT = "split"


@dataclass(frozen=True)
class CommandResult:
    """One command's fate in a 200 response; `error` is the API's text when refused."""

    success: bool
    error: str = ""


@dataclass(frozen=True)
class Verdict:
    """The classification of one response.

    `results` is filled only for `Action.OK` (one per command sent, in order). `reason` is a
    short, secret-free description for status and logs. `retry_after` is the server's wish in
    seconds (already clamped), or None when it expressed none.
    """

    action: Action
    reason: str = ""
    results: tuple[CommandResult, ...] = ()
    retry_after: float | None = None

    @property
    def accepted(self) -> int:
        return sum(1 for result in self.results if result.success)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date (RFC 9110: `Date`, `Retry-After`) as epoch seconds; None if absent or
    unparseable. Dates without a zone (obsolete forms) are taken as GMT, as the RFC says."""
    if value is None or not value.strip():
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait according to a `Retry-After` header, clamped to 0-900; None if absent
    or unparseable (the caller then falls back to its own backoff).

    Both RFC 9110 forms are accepted: delta-seconds and an HTTP-date, which is compared with
    `now` (wall time, since the date is a wall-clock instant). Fractional seconds are tolerated
    because some proxies send them.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds: float | None = None
    try:
        seconds = float(text)
    except ValueError:
        when = parse_http_date(text)
        if when is None:
            return None
        seconds = when - now
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def request_headers(token: str, user_agent: str, *, body: bool) -> dict[str, str]:
    """Headers of a request to the tracking API (docs/sync.md)."""
    headers = {"Authorization": authorization_header(token), "User-Agent": user_agent}
    if body:
        headers["Content-Type"] = "application/json"
    return headers


def time_path(project_token: str) -> str:
    """The API clock's path (`GET`, authorized like tracking)."""
    return f"/track/v2/projects/{quote(project_token, safe='')}/system/time"


def parse_time(body: bytes) -> float | None:
    """The API's time from a `system/time` answer (`{"success": true, "time": <float>}`);
    None unless it is a finite number."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, Mapping) or parsed.get("success") is not True:
        return None
    value = parsed.get("time")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _error_text(value: Any) -> str:
    """Flatten the API's `errors` (strings or objects) into one bounded line. Control
    characters are escaped: the API may echo what a client sent (an event name), and this text
    goes into log lines and dead letters."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        text = "; ".join(
            item if isinstance(item, str) else json.dumps(item, sort_keys=True) for item in value
        )
    else:
        text = json.dumps(value, sort_keys=True)
    return escape(text[:MAX_ERROR_TEXT], MAX_ERROR_TEXT)


def _body_message(body: bytes) -> str:
    """The human part of an error body (`error`, `message` or `errors`), bounded."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return escape(body[:200].decode("utf-8", "replace").strip())
    if isinstance(parsed, Mapping):
        for key in ("error", "message", "errors"):
            if parsed.get(key):
                return _error_text(parsed[key])[:200]
    return ""


def _with_message(prefix: str, body: bytes) -> str:
    message = _body_message(body)
    return f"{prefix}: {message}" if message else prefix


def is_auth_failure(body: bytes) -> bool:
    """Whether a whole-batch 400 body says the credentials or the project are wrong."""
    text = body[:4096].decode("utf-8", "replace").lower()
    return any(marker in text for marker in AUTH_FAILURE_MARKERS)


def _parse_results(body: bytes, sent: int) -> Verdict:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        # A 200 that is not JSON is usually a captive portal or a misbehaving proxy: the API
        # has probably not seen the batch, so sending it again is the safe choice.
        return Verdict(Action.RETRY, "HTTP 200 with a body that is not JSON")
    if not isinstance(parsed, Mapping):
        return Verdict(Action.RETRY, "HTTP 200 with an unexpected body")
    if parsed.get("success") is False:
        # The batch was refused as a whole even though the status says otherwise.
        if is_auth_failure(body):
            return Verdict(Action.PAUSE, _with_message("HTTP 200", body))
        return Verdict(Action.SPLIT, _with_message("HTTP 200 success=false", body))
    results = parsed.get("results")
    if not isinstance(results, list) or len(results) != sent:
        count = len(results) if isinstance(results, list) else "no"
        return Verdict(Action.RETRY, f"HTTP 200 with {count} results for {sent} commands")
    out: list[CommandResult] = []
    for result in results:
        if isinstance(result, Mapping) and result.get("success") is True:
            out.append(CommandResult(True))
        else:
            errors: Any = None
            if isinstance(result, Mapping):
                errors = result.get("errors") or result.get("error") or result.get("message")
            out.append(CommandResult(False, _error_text(errors) or "refused by the API"))
    return Verdict(Action.OK, "", tuple(out))


def classify(
    status: int,
    body: bytes,
    sent: int,
    *,
    retry_after: str | None = None,
    now: float = 0.0,
) -> Verdict:
    """Decide what a response to a batch of `sent` commands means (docs/sync.md).

    - 2xx: per-command results (a broken results list is retried: never ack blindly).
    - 408, 429, 5xx: retry the whole batch, honouring `Retry-After` (wall time `now` is only
      needed for its HTTP-date form).
    - 401, 403, 404, other unexpected 4xx, 3xx: the project's credentials/URL are wrong: pause.
    - 400 saying "Could not authenticate"/"Invalid project id": pause as well.
    - Other 400, 413, 422: something in the batch is refused: split it.
    """
    wait = parse_retry_after(retry_after, now)
    if 200 <= status < 300:
        return _parse_results(body, sent)
    if status in _RETRY_STATUSES or 500 <= status < 600:
        return Verdict(Action.RETRY, _with_message(f"HTTP {status}", body), retry_after=wait)
    if status in _SPLIT_STATUSES:
        if is_auth_failure(body):
            return Verdict(Action.PAUSE, _with_message(f"HTTP {status}", body))
        return Verdict(Action.SPLIT, _with_message(f"HTTP {status}", body))
    if 300 <= status < 400:
        return Verdict(
            Action.PAUSE,
            f"HTTP {status} redirect: check the project's base_url (redirects "
            "are not followed for POST)",
        )
    if 400 <= status < 500:
        return Verdict(Action.PAUSE, _with_message(f"HTTP {status}", body))
    # 1xx leftovers or nonsense codes: nothing says the batch arrived; try again later.
    return Verdict(Action.RETRY, f"unexpected HTTP status {status}", retry_after=wait)


__all__ = [
    "AUTH_FAILURE_MARKERS",
    "MAX_BATCH_COMMANDS",
    "MAX_RETRY_AFTER",
    "Action",
    "CommandResult",
    "Verdict",
    "authorization_header",
    "batch_body",
    "batch_path",
    "classify",
    "is_auth_failure",
    "parse_http_date",
    "parse_retry_after",
    "parse_time",
    "request_headers",
    "time_path",
]
