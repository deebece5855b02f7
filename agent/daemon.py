"""Wiring and lifecycle: the one place that knows every part and in which order they start/stop.

Start: config → store (checked, recovered if corrupt) → engine state → sync → socket → MQTT →
READY=1. Stop (SIGTERM): STOPPING=1 → refuse new commands → finish in-flight ones → one last
flush bounded by a few seconds → close the store → exit 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import faulthandler
import gc
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import (
    EX_CONFIG,
    AgentConfig,
    ConfigError,
    default_config_path,
    load_config,
    socket_input_problem,
)
from agent.device import read_device_info
from agent.dispatch import Dispatcher
from agent.engine import Engine, Runner
from agent.ipc import SocketServer
from agent.logs import set_level, setup_logging
from agent.metrics import TextfileWriter
from agent.notify import Notifier
from agent.queries import QueryRunner
from agent.status import ConfigState, build_status, status_line
from agent.store import Store, StoreError
from agent.sync import Syncer
from agent.timekeeper import Timekeeper

log = logging.getLogger("engagement_agent.daemon")

#: How long SIGTERM waits for in-flight commands, and for the last flush.
SHUTDOWN_COMMAND_GRACE = 3.0
SHUTDOWN_FLUSH_SECONDS = 3.0
#: Without a systemd watchdog: how long work may wait on the writer before we call it stuck.
WRITER_STALL_SECONDS = 20.0
DEVICE_UUID_META = "device_uuid"
#: Allocations between two young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 100_000


def tune_gc() -> None:
    """Keep the cyclic GC off the per-command path.

    Everything alive once the daemon is started (modules, pydantic schemas, config) is moved
    to the permanent generation, so full collections stop re-scanning it; and young
    collections run every GC_GEN0_THRESHOLD allocations instead of 700. Under pipelined
    ingest this was a third of the writer thread's CPU (at 20,000 still ~1.5 % of a
    command's instructions). The threshold may be this high because commands create no
    reference cycles, accepted or refused, so garbage is freed at once by reference
    counting: a refusal's reply keeps its error without the traceback
    (`AgentError.as_answer`), whose frames would otherwise hold the reply, and the refused
    bytes, in a cycle (tests/unit/test_dispatch.py and test_store.py count what refusals leave
    to the cyclic GC: nothing). Public so that the
    benchmarks that build the agent's parts in-process (bench/bench_mqtt.py) measure what
    the daemon runs.
    """
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class Daemon:
    def __init__(self, config: AgentConfig, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = Notifier()
        self.store = Store(config.queue)
        self.started_monotonic = time.monotonic()
        self._stop = asyncio.Event()
        # Reloads and the last flush run here, never in the query pool: a `flush --wait` that
        # takes minutes must never delay a reload or the shutdown.
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="control")
        # `engagement-agent reload` (ExecReload=) waits for `generation` to move on.
        self.config_generation = 1
        self.config_loaded_at = time.time()
        self.reload_error: str | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        # Assigned in run(), once the parts they need exist.
        self.engine: Engine
        self.runner: Runner
        self.clock: Timekeeper
        self.syncer: Syncer
        self.queries: QueryRunner
        self.dispatcher: Dispatcher
        self.server: SocketServer
        self.mqtt: Any = None
        self._loop: asyncio.AbstractEventLoop

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        try:
            self.store.open()
        except StoreError as exc:
            log.error("cannot open the queue database: %s", exc)
            return 1
        try:
            return await self._serve()
        finally:
            self.store.close()

    async def _serve(self) -> int:
        device_uuid = self.config.device_uuid or await self._device_uuid()
        device = read_device_info(device_uuid, self.config.device_type, __version__)
        self.clock = Timekeeper(self.store, self.config.clock)
        self.clock.load()
        self.engine = Engine(self.store, self.config, device, clock=self.clock)
        self.engine.load()
        self.syncer = Syncer(self.store, self.config, clock=self.clock)
        self.store.on_enqueued = self.syncer.notify
        self.clock.on_settled(self.syncer.clock_changed)
        self.runner = Runner(self.engine, self._loop, self._publish_status)
        self.queries = QueryRunner(self.status, self.syncer, self.store)
        self.dispatcher = Dispatcher(self.config, self.runner, self.queries)
        self.server = SocketServer(
            self.config.socket.path,
            self.config.socket.mode_bits,
            self.dispatcher,
            lambda: self.config.limits.max_command_bytes,
            self.config.socket.max_connections,
            max_connections_per_uid=self.config.socket.max_connections_per_uid,
            idle_timeout=self.config.socket.idle_timeout,
            max_pending_reply_bytes=self.config.socket.max_pending_reply_bytes,
        )
        try:
            await self.server.start()
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.config.socket.path, exc)
            return 1
        self.syncer.start()
        self.clock.start()
        self.runner.arm_pending_timers()
        self._start_mqtt()
        metrics = TextfileWriter(self._loop, lambda: self.config.metrics, self.status)
        metrics.start()
        self._install_signals()
        tune_gc()
        self.notifier.ready()
        self._publish_status()
        log.info(
            "engagement-agent %s ready: socket %s, queue %s",
            __version__,
            self.config.socket.path,
            self.config.queue.path,
        )
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            metrics.stop()
            await self._shutdown()
        return 0

    async def _device_uuid(self) -> str:
        stored = self.store.get_meta(DEVICE_UUID_META)
        if stored:
            return stored
        value = str(uuid.uuid4())
        await asyncio.wrap_future(self.store.submit(lambda t: t.set_meta(DEVICE_UUID_META, value)))
        return value

    def _start_mqtt(self) -> None:
        if not self.config.mqtt.enabled:
            return
        from agent.mqtt.adapter import MqttAdapter

        # A link that (re)connects is the hint that the network is back: sync probes an
        # unreachable API at once instead of waiting for its probe schedule.
        self.mqtt = MqttAdapter(
            self.config,
            self.dispatcher,
            self._loop,
            self.status,
            on_connect=self.syncer.network_hint,
        )
        self.mqtt.start()

    def _install_signals(self) -> None:
        self._loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        self._loop.add_signal_handler(signal.SIGINT, self._stop.set)
        self._loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        # A SIGHUP during a reload may carry a newer file: reload once more afterwards.
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.ensure_future(self._reload_until_settled())

    async def _reload_until_settled(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        dispatcher = self.dispatcher
        log.info("stopping: no new commands; finishing %d in flight", dispatcher.in_flight)
        dispatcher.stop_accepting()
        self.server.stop_accepting()
        deadline = time.monotonic() + SHUTDOWN_COMMAND_GRACE
        while dispatcher.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.runner.cancel_timers()
        if self.mqtt is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.mqtt.stop(), 3.0)
        await self.server.close()
        self.queries.close()
        await self._loop.run_in_executor(self._control, self.syncer.stop, SHUTDOWN_FLUSH_SECONDS)
        await self._loop.run_in_executor(self._control, self.clock.stop)
        self._control.shutdown(wait=False)
        log.info("stopped")

    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            config = await self._loop.run_in_executor(self._control, load_config, self.config_path)
        except ConfigError as exc:
            self._refuse_reload(str(exc))
            return
        # Socket settings apply at restart: the new line limit must suit the running socket.
        problem = socket_input_problem(self.server.max_connections, config.limits.max_command_bytes)
        if problem is not None:
            self._refuse_reload(
                f"limits.max_command_bytes: with the running socket.max_connections: {problem} "
                "(socket.max_connections changes only with a restart)"
            )
            return
        needs_restart = [
            f"{section}.{key}"
            for section in ("queue", "socket")
            for key in type(getattr(config, section)).model_fields
            if getattr(getattr(self.config, section), key) != getattr(getattr(config, section), key)
        ]
        if needs_restart:
            log.warning(
                "%s changed; this takes effect after a restart "
                "(systemctl restart engagement-agent)",
                ", ".join(needs_restart),
            )
        set_level(config.log_level)
        self.config = config
        self.engine.reload(config)
        self.dispatcher.reload(config)
        self.syncer.reload(config)
        self.clock.reload(config.clock)
        if self.mqtt is not None:
            self.mqtt.reload(config)
        elif config.mqtt.enabled:
            self._start_mqtt()
        self.runner.arm_pending_timers()  # session timeouts may have changed
        log.info("configuration reloaded from %s", self.config_path or "built-in defaults")
        self.reload_error = None
        self.config_loaded_at = time.time()
        self.config_generation += 1
        self.notifier.ready()
        self._publish_status()

    def _refuse_reload(self, reason: str) -> None:
        log.error("reload refused, keeping the running configuration: %s", reason)
        self.reload_error = reason
        self.config_generation += 1
        self.notifier.ready()

    async def _watchdog(self) -> None:
        """Pets the systemd watchdog only while the loop runs and the writer makes progress."""
        interval = self.notifier.watchdog_interval()
        period = min(interval, 10.0) if interval else 10.0
        # A writer stuck for half of WatchdogSec (a hung fsync, a frozen disk) stops the pings,
        # so systemd restarts us before the other half is over.
        stall = interval if interval else WRITER_STALL_SECONDS
        shown = ""
        while True:
            if self.store.writer_healthy(stall):
                self.notifier.watchdog()
            else:
                log.error("the database writer makes no progress; not petting the watchdog")
            line = status_line(self.status())
            if line != shown:
                self.notifier.status(line)
                shown = line
            self._publish_status()
            await asyncio.sleep(period)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        mqtt: dict[str, Any] = {"enabled": self.config.mqtt.enabled, "connected": False}
        if self.mqtt is not None:
            mqtt.update(self.mqtt.status())
        return build_status(
            version=__version__,
            device_id=self.config.device_id,
            uptime=time.monotonic() - self.started_monotonic,
            as_of=time.time(),
            queue=self.store.stats(),
            recovered=self.store.recovered,
            sync=self.syncer.status(),
            clock=self.clock.status(),
            mqtt=mqtt,
            config=ConfigState(
                str(self.config_path) if self.config_path else None,
                self.config_generation,
                self.config_loaded_at,
                self.reload_error,
            ),
            apps=self.engine.states(),
            commands=self.dispatcher.counts(),
        )

    def _publish_status(self) -> None:
        if self.mqtt is not None:
            self.mqtt.status_changed()


def run(config_path: Path | None) -> int:
    """`engagement-agent run`: returns the process exit code."""
    faulthandler.enable()  # a watchdog abort (SIGABRT) dumps every thread's stack to the journal
    path = config_path if config_path is not None else default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        setup_logging("info")
        print(f"engagement-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.log_level)
    os.umask(0o007)
    daemon = Daemon(config, path)
    return asyncio.run(daemon.run())
