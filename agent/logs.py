"""Logging: journald-friendly output under systemd, readable output on a terminal, and a rate
limiter so an outage (broker down, API down) is one log line a minute, not one per retry.

Modules log through `logging.getLogger("engagement_agent.<module>")`.
`setup_logging()` installs one stderr handler on the root logger: our namespace logs at the
configured level, third-party libraries (paho, urllib3) only from WARNING up.

Under journald (stderr is the stream named by `$JOURNAL_STREAM`) every line starts with a
`<N>` syslog priority, which journald turns into the entry's priority (`journalctl -p err`
works) and strips; the journal adds its own timestamps, so we add none.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

NAMESPACE = "engagement_agent"
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: logging level -> syslog priority, checked from the most severe down.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7
_HANDLER_MARK = "_engagement_agent_handler"


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


def _short_name(name: str) -> str:
    return name.removeprefix(f"{NAMESPACE}.") if name != NAMESPACE else "agent"


class JournalFormatter(logging.Formatter):
    """`<6>sync: message`; every line of a multi-line message (a traceback, a config error
    listing) carries the prefix, because journald parses the priority per line."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = f"{_short_name(record.name)}: {super().format(record)}"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class TerminalFormatter(logging.Formatter):
    """`2024-05-01 12:00:00 WARNING sync: message` for people running the agent by hand."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        original = record.msg, record.args
        record.msg = f"{_short_name(record.name)}: {record.getMessage()}"
        record.args = None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = original


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """systemd sets `$JOURNAL_STREAM=<dev>:<inode>` of the stream it connected; comparing with
    the stream's fstat tells a journal stream from a redirect set up by someone else."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def _level(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(LEVELS)}") from None


def setup_logging(
    level: str, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """Send logs to stderr (or `stream`) in the format that suits where it goes.

    Safe to call again: the handler installed by an earlier call is replaced, not doubled.
    """
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter = (
        JournalFormatter() if stream_is_journal(stream, environ) else TerminalFormatter()
    )
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Change the agent's log level (SIGHUP reload). Other libraries stay at WARNING unless
    the agent itself is quieter than that."""
    value = _level(level)
    logging.getLogger(NAMESPACE).setLevel(value)
    logging.getLogger().setLevel(max(value, logging.WARNING))


# -- client-controlled text ------------------------------------------------------------------

#: Control characters (C0, DEL, C1) and Unicode line/paragraph separators: a client could use
#: them to forge journal lines or terminal escapes. The backslash is doubled so that an escape
#: in the log always means we escaped something.
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    ord("\\"): "\\\\",
}
#: Client text longer than this is cut in log lines (a topic may be 64 KiB).
MAX_LOGGED_CHARS = 200


def escape(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` (a topic, an app or event name, anything a client sent) made safe for one log
    line: control characters escaped as `\\xNN`, cut to `limit` characters with a marker.
    Every log line that carries client text passes it through here."""
    value = str(text)
    if len(value) > limit:
        return value[:limit].translate(_ESCAPES) + f"...({len(value) - limit} more)"
    return value.translate(_ESCAPES)


class EscapeMessages(logging.Filter):
    """For a library's logger that passes client text along as it came (paho logs every topic
    as received): its whole message is escaped, as `escape()` does for our own lines."""

    #: Longer than `MAX_LOGGED_CHARS`: the message is a whole line, not one client value.
    LIMIT = 1000

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = escape(record.getMessage(), self.LIMIT)
        record.args = None
        return True


# -- rate limiting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether to log now, and how many occurrences were held back since the last line."""

    allow: bool
    suppressed: int = 0
    #: Seconds the suppressed occurrences span (the window they were counted in).
    window: float = 0.0

    def suffix(self) -> str:
        """Text to append to the allowed line: " (repeated 41 times in the last 60 s)"."""
        if not self.allow or not self.suppressed:
            return ""
        times = "time" if self.suppressed == 1 else "times"
        return f" (repeated {self.suppressed} {times} in the last {self.window:.0f} s)"


class _Entry:
    __slots__ = ("last", "suppressed")

    def __init__(self, last: float) -> None:
        self.last = last
        self.suppressed = 0


class RateLimiter:
    """At most one line per `interval` seconds per key; the rest are counted.

        limiter = RateLimiter(interval=60.0)
        decision = limiter.check(("broker", host))
        if decision.allow:
            log.warning("MQTT broker %s unreachable: %s%s", host, exc, decision.suffix())
        ...
        gone = limiter.clear(("broker", host))   # on recovery; returns the held-back count

    `allow(key)` is the boolean shortcut when the count is not wanted. Keys are any hashable
    values. Thread-safe; the clock (monotonic seconds) is injectable for tests.
    """

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._clock = clock
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()

    def check(self, key: Hashable) -> Decision:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(now)
                return Decision(True)
            if now - entry.last >= self.interval:
                decision = Decision(True, entry.suppressed, now - entry.last)
                entry.last = now
                entry.suppressed = 0
                return decision
            entry.suppressed += 1
            return Decision(False, entry.suppressed)

    def allow(self, key: Hashable) -> bool:
        return self.check(key).allow

    def active(self, key: Hashable) -> bool:
        """Whether `key` has been logged and not cleared since."""
        with self._lock:
            return key in self._entries

    def suppressed(self, key: Hashable) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return entry.suppressed if entry else 0

    def clear(self, key: Hashable) -> int:
        """Forget `key` (the condition is over): the next occurrence logs at once. Returns the
        occurrences held back since the last line, for a "recovered" message."""
        with self._lock:
            entry = self._entries.pop(key, None)
            return entry.suppressed if entry else 0


class RateLimitedLog:
    """A logger front that applies a `RateLimiter`: the first occurrence of a key is logged,
    repeats within the interval are counted, and the next line after the interval says how
    many were held back.

        errors = RateLimitedLog(logging.getLogger("engagement_agent.sync"))
        errors.warning(("api", token), "upload to %s failed: %s", url, exc)
        ...
        errors.resolved(("api", token), "upload to %s works again", url)
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.limiter = RateLimiter(interval, clock)

    def log(self, level: int, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log unless rate-limited; returns whether a line was written."""
        decision = self.limiter.check(key)
        if decision.allow:
            self.logger.log(level, msg + decision.suffix().replace("%", "%%"), *args, **kwargs)
        return decision.allow

    def debug(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.DEBUG, key, msg, *args, **kwargs)

    def info(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args, **kwargs)

    def warning(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kwargs)

    def error(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args, **kwargs)

    def resolved(self, key: Hashable, msg: str | None = None, *args: Any) -> None:
        """The condition behind `key` is over. Logs `msg` at INFO (with the count of held-back
        repeats) only if `key` had been logged, so recoveries of unseen problems stay quiet."""
        known = self.limiter.active(key)
        held_back = self.limiter.clear(key)
        if known and msg is not None:
            extra = f" ({held_back} more failures were not logged)" if held_back else ""
            self.logger.info(msg + extra, *args)
