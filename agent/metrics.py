"""The status document as Prometheus metrics (docs/operations.md#metrics).

`render(status)` turns the agent's status object into the Prometheus text format;
`engagement-agent metrics` prints it, and with `metrics.textfile` the agent writes it every
`metrics.interval` seconds for node_exporter's textfile collector — no listening port of our own.

prometheus_client is imported only here, inside the functions that need it: an agent without
`metrics.textfile` never loads it (it costs a few MiB of memory and ~50 ms of start-up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.logs import RateLimitedLog

if TYPE_CHECKING:
    import asyncio

    from prometheus_client.metrics_core import Metric

    from agent.config import MetricsConfig

log = logging.getLogger("engagement_agent.metrics")
_errors = RateLimitedLog(log)

PREFIX = "engagement_agent_"
#: Every sync state, worst first: `engagement_agent_sync_state` has a 0 for each state a
#: project is not in, and `engagement-agent fleet` shows a device's worst.
SYNC_STATES = ("paused", "backoff", "unconfigured", "ok", "idle")
#: node_exporter runs as its own user and must be able to read the file; it holds no secrets.
TEXTFILE_MODE = 0o644

Status = Mapping[str, Any]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def _section(status: Status, key: str) -> Mapping[str, Any]:
    value = status.get(key)
    return value if isinstance(value, Mapping) else {}


def _families(status: Status) -> Iterator[Metric]:
    """One metric family per name; a value the status lacks (an older agent, MQTT disabled,
    nothing ever sent) is left out rather than reported as a misleading 0."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, value: Any) -> Iterator[Metric]:
        number = _number(value)
        if number is not None:
            yield GaugeMetricFamily(PREFIX + name, doc, value=number)

    def counter(name: str, doc: str, value: Any) -> Iterator[Metric]:
        number = _number(value)
        if number is not None:
            # prometheus_client appends the `_total` of a counter's samples itself.
            yield CounterMetricFamily(PREFIX + name.removesuffix("_total"), doc, value=number)

    queue = _section(status, "queue")
    yield from gauge("queue_items", "Items waiting to be sent.", queue.get("items"))
    yield from gauge("queue_bytes", "Payload bytes waiting to be sent.", queue.get("bytes"))
    yield from gauge("queue_max_bytes", "The queue's cap.", queue.get("max_bytes"))
    oldest = queue.get("oldest_age")
    if oldest is None and queue.get("items") == 0:
        oldest = 0.0  # an empty queue is not behind
    yield from gauge(
        "queue_oldest_age_seconds", "Age of the oldest item waiting to be sent.", oldest
    )
    yield from counter(
        "dropped_total", "Items evicted by the queue's cap (drop_oldest).", queue.get("dropped")
    )
    yield from counter(
        "rejected_total", "Commands refused because the queue was full.", queue.get("rejected")
    )
    yield from gauge(
        "dead_letters", "Items the API refused for good, kept for inspection.",
        queue.get("dead_letters"),
    )  # fmt: skip
    yield from _project_families(status)

    mqtt = _section(status, "mqtt")
    if mqtt.get("enabled", True) is not False:
        yield from gauge("mqtt_connected", "1 while connected.", mqtt.get("connected"))

    commands = status.get("commands")
    if isinstance(commands, Mapping):
        family = CounterMetricFamily(
            PREFIX + "commands",
            "Commands answered, by transport and result (ok or the error code).",
            labels=("transport", "result"),
        )
        for transport, results in sorted(commands.items()):
            if isinstance(results, Mapping):
                for result, count in sorted(results.items()):
                    if (number := _number(count)) is not None:
                        family.add_metric((str(transport), str(result)), number)
        yield family

    clock = _section(status, "clock")
    yield from gauge(
        "clock_synchronized", "1 while the kernel reports the clock synchronized.",
        clock.get("synchronized"),
    )  # fmt: skip


@dataclass
class _Project:
    sent: float | None = None
    state: str | None = None
    last_success: float | None = None


def _projects(status: Status) -> dict[str, _Project]:
    """Per project token. Two entries with one token (the same project at two URLs) are
    combined — sent summed, the worse state, the later success — as one label set may appear
    only once."""
    projects = _section(status, "sync").get("projects")
    merged: dict[str, _Project] = {}
    for project in projects if isinstance(projects, list) else []:
        if not isinstance(project, Mapping):
            continue
        token = project.get("project_token")
        entry = merged.setdefault(token if isinstance(token, str) else "", _Project())
        if (sent := _number(project.get("sent"))) is not None:
            entry.sent = (entry.sent or 0.0) + sent
        state = project.get("state")
        if isinstance(state, str) and (
            entry.state is None or sync_rank(state) < sync_rank(entry.state)
        ):
            entry.state = state
        if (last := _number(project.get("last_success"))) is not None:
            entry.last_success = max(last, entry.last_success or last)
    return merged


def _project_families(status: Status) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    sent = CounterMetricFamily(
        PREFIX + "sent", "Items the API accepted, per project.", labels=("project",)
    )
    states = GaugeMetricFamily(
        PREFIX + "sync_state",
        "1 for the project's current sync state, 0 for the others.",
        labels=("project", "state"),
    )
    last = GaugeMetricFamily(
        PREFIX + "last_success_timestamp_seconds",
        "When the API last accepted a batch for the project (Unix time).",
        labels=("project",),
    )
    for token, project in sorted(_projects(status).items()):
        if project.sent is not None:
            sent.add_metric((token,), project.sent)
        if project.state is not None:
            names = SYNC_STATES if project.state in SYNC_STATES else (*SYNC_STATES, project.state)
            for name in names:
                states.add_metric((token, name), 1.0 if name == project.state else 0.0)
        if project.last_success is not None:
            last.add_metric((token,), project.last_success)
    yield from (sent, states, last)


def sync_rank(state: str) -> int:
    """Position in `SYNC_STATES`, worst first; a state this version does not know is worst."""
    return SYNC_STATES.index(state) if state in SYNC_STATES else 0


class _StatusCollector:
    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        return _families(self.status)


def render(status: Status) -> bytes:
    """The status as Prometheus text exposition format (version 0.0.4)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)


def write_textfile(path: Path, text: bytes) -> None:
    """Replace `path` atomically: node_exporter must never read a half-written file.

    A temporary file in the same directory (hidden, and not `*.prom`, so the collector skips
    it), readable by node_exporter's user, renamed over the old one.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), TEXTFILE_MODE)
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class TextfileWriter:
    """Writes the metrics every `metrics.interval` seconds while `metrics.textfile` is set.

    The settings are read on every tick, so a reload that sets, moves or removes the file
    takes effect at the next one. The status is taken on the event loop (where it lives);
    rendering and writing run in a daemon thread of their own, so a slow or frozen disk never
    stalls the loop nor the agent's exit — a tick that finds the previous write still running
    skips its turn.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Callable[[], MetricsConfig],
        status: Callable[[], Status],
    ) -> None:
        self._loop = loop
        self._settings = settings
        self._status = status
        self._handle: asyncio.Handle | None = None
        self._writer: threading.Thread | None = None

    def start(self) -> None:
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        settings = self._settings()
        self._handle = self._loop.call_later(settings.interval, self._tick)
        path = settings.textfile
        if path is None or (self._writer is not None and self._writer.is_alive()):
            return
        try:
            status = self._status()
        except Exception:
            log.exception("metrics: the status could not be taken")
            return
        self._writer = threading.Thread(
            target=self._write, args=(path, status), name="metrics", daemon=True
        )
        self._writer.start()

    @staticmethod
    def _write(path: Path, status: Status) -> None:
        try:
            write_textfile(path, render(status))
        except OSError as exc:
            _errors.warning(("textfile", path), "metrics: cannot write %s: %s", path, exc)
        else:
            _errors.resolved(("textfile", path), "metrics: writing %s works again", path)
