"""What sync tells the journal about one project (docs/sync.md, "Logging").

The wording and the rate limits live here, apart from the thread that decides: the worker
feeds its schedule and passes on the `Change` it got back. A new state or reason is logged at
once; repeats of a transient failure at most once per `LOG_INTERVAL`, with a count; recoveries
at INFO. Tokens and payloads never reach the logs: projects are named by host and a token
prefix (`label`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from urllib3.util import parse_url

from agent.logs import RateLimitedLog
from agent.sync.schedule import Change, Kind, Outcome

log = logging.getLogger("engagement_agent.sync")

#: Repeated failures are logged at most this often (the first one always is).
LOG_INTERVAL = 60.0


def label(base_url: str, token: str) -> str:
    """How logs name a project: enough for an operator to tell which, never the whole token."""
    host = parse_url(base_url).host or base_url
    return f"{host} project {token[:4]}…" if token else f"{host} (unconfigured project)"


class Journal:
    """The log lines of one project's sync. Called from its worker's thread only; `clock`
    (monotonic seconds) times the rate limits."""

    def __init__(self, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self._failures = RateLimitedLog(log, LOG_INTERVAL, clock)
        self._store = RateLimitedLog(log, LOG_INTERVAL, clock)

    def failed(self, outcome: Outcome, change: Change, attempts: int, max_backoff: float) -> None:
        """A failing outcome the schedule recorded as `change`; `attempts` in a row so far."""
        kind = outcome.kind
        if kind is Kind.UNCONFIGURED:
            if change.news:
                log.warning(
                    "sync for %s: the project is not in the config (%s); its items are kept "
                    "and sent once the config names it again",
                    self.label,
                    outcome.reason,
                )
            return
        if kind is Kind.REFUSED:
            if change.news:
                log.warning(
                    "sync for %s paused: %s; its items are kept, retrying every %g s and after "
                    "a config reload",
                    self.label,
                    # A refused batch's reason is status's `last_error`, which says "paused: ".
                    outcome.reason.removeprefix("paused: "),
                    max_backoff,
                )
            return
        what = "cannot reach the API" if kind is Kind.UNREACHABLE else "failed"
        when = "" if change.delay is None else f"; retrying in {change.delay:.1f} s"
        key = ("failure", kind)
        if change.news:
            self._failures.limiter.clear(key)
        self._failures.warning(
            key,
            "sync for %s %s (%s, %d attempt(s) in a row)%s",
            self.label,
            what,
            outcome.reason,
            attempts,
            when,
        )

    def delivered(self, change: Change) -> None:
        """The API judged a request on its merits: a run of failures or a pause ended."""
        for kind in (Kind.API_TROUBLE, Kind.UNREACHABLE):
            self._failures.limiter.clear(("failure", kind))
        if change.resumed:
            log.info("sync for %s resumed: the API accepts the credentials", self.label)
        elif change.recovered:
            log.info(
                "sync for %s recovered after %d failed attempt(s)", self.label, change.recovered
            )

    def store_failed(self, reason: str, delay: float, attempts: int) -> None:
        self._store.error(
            "store",
            "sync for %s: %s; the items stay queued and are sent again in %.1f s "
            "(%d attempt(s) in a row)",
            self.label,
            reason,
            delay,
            attempts,
        )

    def store_recovered(self, attempts: int) -> None:
        self._store.resolved(
            "store",
            "sync for %s: the API's answers are recorded again after %d failed attempt(s)",
            self.label,
            attempts,
        )

    def dead_lettered(self, count: int, reason: str) -> None:
        log.warning(
            "sync for %s: the API refused %d item(s); moved to dead letters (%s)",
            self.label,
            count,
            reason[:200],
        )

    def splitting(self, size: int, reason: str) -> None:
        log.warning(
            "sync for %s: the API refused a batch of %d (%s); splitting it to find the refused "
            "item(s)",
            self.label,
            size,
            reason,
        )

    def unexpected(self) -> None:
        """A bug in the drain; the worker goes on (call from an `except` block)."""
        log.exception("sync for %s failed unexpectedly; retrying later", self.label)


__all__ = ["LOG_INTERVAL", "Journal", "label"]
