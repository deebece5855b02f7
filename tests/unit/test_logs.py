"""Log output under journald vs a terminal, and the rate limiter for repeated errors."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.logs import Decision, RateLimitedLog, RateLimiter, set_level, syslog_priority

SCRIPT = """
import logging
from agent.logs import setup_logging, set_level
setup_logging("debug")
setup_logging("debug")  # a second call must not double the handler
log = logging.getLogger("engagement_agent.sync")
log.debug("dbg")
log.info("hello %s", "world")
log.warning("warn")
log.error("err")
log.critical("crit")
logging.getLogger("urllib3").info("library chatter")
logging.getLogger("urllib3").warning("library warning")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
set_level("error")
log.warning("hidden")
log.error("shown")
"""


def run_logging(tmp_path: Path, journal: bool) -> list[str]:
    """Run SCRIPT with stderr redirected to a file; under `journal`, JOURNAL_STREAM names that
    file's device and inode like systemd does for the stream it connects."""
    out = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    with out.open("w") as stderr:
        if journal:
            st = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT], env=env, stderr=stderr, check=True)
    return out.read_text().splitlines()


def test_journal_format(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journal=True)
    assert lines[:6] == [
        "<7>sync: dbg",
        "<6>sync: hello world",
        "<4>sync: warn",
        "<3>sync: err",
        "<2>sync: crit",
        "<4>urllib3: library warning",
    ]
    traceback = lines[6:-1]
    assert traceback[0] == "<3>sync: boom"
    assert all(line.startswith("<3>") for line in traceback)
    assert any("ZeroDivisionError" in line for line in traceback)
    assert lines[-1] == "<3>sync: shown"
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)


def test_journal_stream_of_another_file_is_not_the_journal(tmp_path: Path) -> None:
    out = tmp_path / "stderr.txt"
    env = {**os.environ, "JOURNAL_STREAM": "1:1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    with out.open("w") as stderr:
        subprocess.run([sys.executable, "-c", SCRIPT], env=env, stderr=stderr, check=True)
    assert not out.read_text().startswith("<")


def test_terminal_format(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journal=False)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d DEBUG sync: dbg", lines[0])
    assert lines[1].endswith(" INFO sync: hello world")
    assert not any("library chatter" in line for line in lines)
    assert any(line.endswith("WARNING urllib3: library warning") for line in lines)
    assert lines[-1].endswith("ERROR sync: shown")
    assert not any("hidden" in line for line in lines)


def test_priorities() -> None:
    assert [syslog_priority(n) for n in (10, 20, 30, 40, 50, 25, 5)] == [7, 6, 4, 3, 2, 6, 7]


def test_set_level_rejects_unknown() -> None:
    with pytest.raises(ValueError):
        set_level("verbose")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter() -> None:
    clock = FakeClock()
    limiter = RateLimiter(interval=60.0, clock=clock)
    assert limiter.check("broker") == Decision(True)
    for _ in range(5):
        clock.now += 1
        assert not limiter.allow("broker")
    assert limiter.allow("api")  # keys are independent
    assert limiter.suppressed("broker") == 5
    clock.now += 60
    decision = limiter.check("broker")
    assert decision.allow and decision.suppressed == 5
    assert decision.suffix() == " (repeated 5 times in the last 65 s)"
    assert limiter.check("broker").suffix() == ""
    assert limiter.clear("broker") == 1
    assert limiter.check("broker") == Decision(True)
    with pytest.raises(ValueError):
        RateLimiter(interval=0)


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    logger = logging.getLogger("engagement_agent.test")
    errors = RateLimitedLog(logger, interval=60.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="engagement_agent")
    assert errors.warning("api", "upload failed: %s", "HTTP 503 (100%)")
    for _ in range(3):
        assert not errors.warning("api", "upload failed: %s", "HTTP 503")
    clock.now += 61
    assert errors.error("api", "upload failed: %s", "timeout")
    errors.resolved("api", "upload works again")
    errors.resolved("never-failed", "nothing to say")
    assert [r.getMessage() for r in caplog.records] == [
        "upload failed: HTTP 503 (100%)",
        "upload failed: timeout (repeated 3 times in the last 61 s)",
        "upload works again",
    ]


def test_escape_makes_client_text_one_harmless_line() -> None:
    from agent.logs import escape

    assert escape("kiosk") == "kiosk"
    assert escape("a\nb\r\x1b[31m\x7f\x85\u2028") == "a\\x0ab\\x0d\\x1b[31m\\x7f\\x85\\u2028"
    assert escape("back\\slash") == "back\\\\slash"  # an escape in the log is always ours
    assert escape("ünïcödé") == "ünïcödé"
    long = escape("x" * 500)
    assert long.startswith("x" * 200) and long.endswith("...(300 more)")


def test_escape_messages_filter_escapes_a_librarys_whole_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from agent.logs import EscapeMessages

    library = logging.getLogger("engagement_agent.test.library")
    library.addFilter(EscapeMessages())
    try:
        with caplog.at_level(logging.DEBUG, logger="engagement_agent.test.library"):
            library.debug("Received PUBLISH %r on '%s'", 1, "a/evil\u2028\x1b[2J\nFORGED/command")
    finally:
        library.filters.clear()
    assert caplog.messages == ["Received PUBLISH 1 on 'a/evil\\u2028\\x1b[2J\\x0aFORGED/command'"]
