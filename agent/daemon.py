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
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from agent import __version__
from agent.commands import Flush, GetCustomer, Status
from agent.config import EX_CONFIG, AgentConfig, ConfigError, default_config_path, load_config
from agent.device import read_device_info
from agent.engine import Engine
from agent.errors import Unavailable
from agent.intake import Accepted, Intake, Origin, Reply
from agent.ipc import SocketServer
from agent.logs import set_level, setup_logging
from agent.metrics import TextfileWriter
from agent.notify import Notifier
from agent.queue_admin import run_admin
from agent.store import Store, StoreError
from agent.sync import Syncer
from agent.timekeeper import Timekeeper, settings_of
from agent.tracker.model import Outcome

log = logging.getLogger("engagement_agent.daemon")

#: How long SIGTERM waits for in-flight commands, and for the last flush.
SHUTDOWN_COMMAND_GRACE = 3.0
SHUTDOWN_FLUSH_SECONDS = 3.0
#: `flush --wait` and queue maintenance requests allowed to wait for a worker at once.
MAX_WAITING_QUERIES = 8
#: Without a systemd watchdog: how long work may wait on the writer before we call it stuck.
WRITER_STALL_SECONDS = 20.0
DEVICE_UUID_META = "device_uuid"
#: Allocations between two young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Keep the cyclic GC off the per-command path.

    Everything alive once the daemon is started (modules, pydantic schemas, config) is moved
    to the permanent generation, so full collections stop re-scanning it; and young
    collections run every GC_GEN0_THRESHOLD allocations instead of 700. Under pipelined
    ingest this was a third of the writer thread's CPU. Commands create almost no reference
    cycles, so garbage is still freed at once by reference counting.
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
        # app -> (token, handle): the token tells a fired timer whether it is still current.
        self._timers: dict[str, tuple[object, asyncio.TimerHandle]] = {}
        # Blocking work off the event loop, in pools that cannot starve each other: flush
        # --wait may take minutes and must never delay a reload or the shutdown.
        self._queries = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="query")
        self._queries_waiting = 0
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="control")
        self._in_flight = 0
        # Callbacks from the writer thread waiting for the loop: one wake-up carries them all.
        self._handoff: list[Callable[[], None]] = []
        self._handoff_lock = threading.Lock()
        # `engagement-agent reload` (ExecReload=) waits for `generation` to move on.
        self.config_generation = 1
        self.config_loaded_at = time.time()
        self.reload_error: str | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        # Assigned in run(), once the parts they need exist.
        self.engine: Engine
        self.clock: Timekeeper
        self.syncer: Syncer
        self.intake: Intake
        self.server: SocketServer
        self.mqtt: Any = None
        self._mqtt_up = False  # as last seen: a change to up is a network hint for sync
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
        self.clock = Timekeeper(self.store, settings_of(self.config.clock))
        self.clock.load()
        self.engine = Engine(self.store, self.config, device, clock=self.clock)
        self.engine.load()
        self.syncer = Syncer(self.store, self.config, clock=self.clock)
        self.store.on_enqueued = self.syncer.notify
        self.clock.on_settled(self.syncer.clock_changed)
        self.intake = Intake(self.config, self)
        self.server = SocketServer(
            self.config.socket.path,
            self.config.socket.mode,
            self,
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
        for app, delay, background_at in self.engine.pending_timers(time.time()):
            self._arm_timer(app, delay, background_at)
        self._start_mqtt()
        metrics = TextfileWriter(self._loop, lambda: self.config.metrics, self.status)
        metrics.start()
        self._install_signals()
        _tune_gc()
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
        from agent.mqtt import MqttAdapter

        self.mqtt = MqttAdapter(self.config, self.intake, self._loop, self._mqtt_status)
        self.mqtt.start()

    def _mqtt_status(self) -> dict[str, Any]:
        """Status for the MQTT adapter, which asks for it on every (re)connect (the retained
        status is published then). A link that came up since the watchdog last saw it down is
        the hint that the network is back: sync probes an unreachable API at once."""
        if not self._mqtt_up:
            self._mqtt_up = True
            self.syncer.network_hint()
        return self.status()

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
        log.info("stopping: no new commands; finishing %d in flight", self._in_flight)
        self.server.stop_accepting()
        deadline = time.monotonic() + SHUTDOWN_COMMAND_GRACE
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._cancel_timers()
        if self.mqtt is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.mqtt.stop(), 3.0)
        await self.server.close()
        self._queries.shutdown(wait=False, cancel_futures=True)
        await self._loop.run_in_executor(self._control, self.syncer.stop, SHUTDOWN_FLUSH_SECONDS)
        await self._loop.run_in_executor(self._control, self.clock.stop)
        self._control.shutdown(wait=False)
        log.info("stopped")

    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            config = await self._loop.run_in_executor(self._control, load_config, self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.reload_error = str(exc)
            self.config_generation += 1
            self.notifier.ready()
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
        self.intake.reload(config)
        self.syncer.reload(config)
        self.clock.reload(settings_of(config.clock))
        if self.mqtt is not None:
            self.mqtt.reload(config)
        elif config.mqtt.enabled:
            self._start_mqtt()
        # Session timeouts may have changed: re-arm every pending timer with the new settings.
        self._cancel_timers()
        for app, delay, background_at in self.engine.pending_timers(time.time()):
            self._arm_timer(app, delay, background_at)
        log.info("configuration reloaded from %s", self.config_path or "built-in defaults")
        self.reload_error = None
        self.config_loaded_at = time.time()
        self.config_generation += 1
        self.notifier.ready()
        self._publish_status()

    async def _watchdog(self) -> None:
        """Pets the systemd watchdog only while the loop runs and the writer makes progress."""
        interval = self.notifier.watchdog_interval()
        period = min(interval, 10.0) if interval else 10.0
        # A writer stuck for half of WatchdogSec (a hung fsync, a frozen disk) stops the pings,
        # so systemd restarts us before the other half is over.
        stall = interval if interval else WRITER_STALL_SECONDS
        status_line = ""
        while True:
            if self.store.writer_healthy(stall):
                self.notifier.watchdog()
            else:
                log.error("the database writer makes no progress; not petting the watchdog")
            self._mqtt_up = self._mqtt_up and self.mqtt is not None and self.mqtt.connected
            line = self._status_line()
            if line != status_line:
                self.notifier.status(line)
                status_line = line
            self._publish_status()
            await asyncio.sleep(period)

    # -- commands ------------------------------------------------------------------------------
    # The socket's Dispatcher: a chunk of pipelined commands is one group on the writer.
    def prepare(self, line: bytes, origin: Origin) -> Reply | Accepted:
        return self.intake.prepare(line, origin)

    def batchable(self, command: Accepted) -> bool:
        # get_customer reads the app's state on the writer too: batched, it keeps its order.
        return command.tracking or isinstance(command.command, GetCustomer)

    def run_batch(self, commands: list[Accepted], done: Callable[[list[Reply]], None]) -> None:
        replies: list[Reply | None] = [None] * len(commands)
        stopping = self._stop.is_set()
        items: list[tuple[str, Any, float]] = []
        index: list[int] = []
        for i, accepted in enumerate(commands):
            if stopping and accepted.tracking:
                replies[i] = self.intake.finish(accepted, Unavailable("the agent is shutting down"))
            else:
                items.append((accepted.app, accepted.command, accepted.now))
                index.append(i)
        if not items:
            done(cast(list[Reply], replies))
            return
        self._in_flight += len(items)

        def committed(results: list[Outcome | BaseException]) -> None:  # on the loop
            self._in_flight -= len(results)
            tracked = False
            for i, result in zip(index, results, strict=True):
                accepted = commands[i]
                replies[i] = self._reply(accepted, result)
                tracked = tracked or accepted.tracking
            if tracked and self.mqtt is not None:
                self.mqtt.status_changed()
            done(cast(list[Reply], replies))

        self.engine.track_many(
            items, lambda results: self._call_from_writer(lambda: committed(results))
        )

    def _reply(self, accepted: Accepted, result: Outcome | BaseException) -> Reply:
        if isinstance(result, BaseException):
            return self.intake.finish(accepted, result)
        try:
            if not accepted.tracking:  # get_customer
                return self.intake.finish(accepted, {"app": accepted.app, **(result.result or {})})
            self._after_outcome(accepted.app, result, status_hint=False)
        except Exception as exc:
            return self.intake.finish(accepted, exc)
        return self.intake.finish(accepted, result.result)

    async def run_one(self, command: Accepted, turn: asyncio.Future[None]) -> Reply:
        self._in_flight += 1
        try:
            await turn
            return await self.intake.execute(command)
        finally:
            self._in_flight -= 1

    def _call_from_writer(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop. Called on the writer thread after each commit; callbacks that
        pile up while the loop is busy share one wake-up (one self-pipe write)."""
        with self._handoff_lock:
            self._handoff.append(fn)
            if len(self._handoff) > 1:
                return
        # A closed loop means the daemon is gone and nobody waits for the replies.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._run_handoff)

    def _run_handoff(self) -> None:
        with self._handoff_lock:
            callbacks, self._handoff = self._handoff, []
        for fn in callbacks:
            try:
                fn()
            except Exception:
                log.exception("a commit callback failed")

    async def track(self, app: str, command: Any, now: float) -> Mapping[str, Any] | None:
        if self._stop.is_set():
            raise Unavailable("the agent is shutting down")
        outcome = await asyncio.wrap_future(self.engine.track(app, command, now))
        self._after_outcome(app, outcome)
        return outcome.result

    async def query(self, app: str, command: Any) -> Mapping[str, Any]:
        if isinstance(command, Status):
            return self.status()
        if isinstance(command, GetCustomer):
            outcome = await asyncio.wrap_future(self.engine.track(app, command, time.time()))
            return {"app": app, **(outcome.result or {})}
        if isinstance(command, Flush):
            return await self._run_query(self.syncer.flush, command.wait)
        return await self._run_query(run_admin, self.store, command)

    async def _run_query(
        self, fn: Callable[..., Mapping[str, Any]], *args: Any
    ) -> Mapping[str, Any]:
        """Blocking queries run in a small pool; past a few waiting, callers are told to retry
        rather than pile up threads (a flood of `flush --wait` would otherwise do that)."""
        if self._queries_waiting >= MAX_WAITING_QUERIES:
            raise Unavailable("too many flush/queue requests in progress; try again shortly")
        self._queries_waiting += 1
        try:
            return await self._loop.run_in_executor(self._queries, fn, *args)
        finally:
            self._queries_waiting -= 1

    def _after_outcome(self, app: str, outcome: Outcome, *, status_hint: bool = True) -> None:
        state = outcome.state
        if state.session != "background":
            entry = self._timers.pop(app, None)
            if entry is not None:
                entry[1].cancel()
        if outcome.timer is not None and state.background_at is not None:
            self._arm_timer(app, outcome.timer, state.background_at)
        if status_hint and self.mqtt is not None:
            self.mqtt.status_changed()

    def _arm_timer(self, app: str, delay: float, background_at: float) -> None:
        entry = self._timers.pop(app, None)
        if entry is not None:
            entry[1].cancel()
        token = object()
        handle = self._loop.call_later(
            max(0.0, delay),
            lambda: asyncio.ensure_future(self._expire(app, background_at, token)),
        )
        self._timers[app] = (token, handle)

    def _cancel_timers(self) -> None:
        for _token, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    async def _expire(self, app: str, background_at: float, token: object) -> None:
        entry = self._timers.get(app)
        if entry is not None and entry[0] is token:
            del self._timers[app]
        try:
            outcome = await asyncio.wrap_future(
                self.engine.expire_session(app, background_at, time.time())
            )
        except Unavailable as exc:  # disk full: try again shortly rather than lose the end
            log.warning("could not record the session end for app %s: %s; retrying", app, exc)
            self._arm_timer(app, 5.0, background_at)
            return
        except Exception as exc:  # e.g. the app was removed from the config meanwhile
            log.error("gave up recording the session end for app %s: %s", app, exc)
            return
        self._after_outcome(app, outcome)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "online": True,
            "version": __version__,
            "device_id": self.config.device_id,
            "uptime": round(time.monotonic() - self.started_monotonic, 3),
            "queue": {
                "items": stats.items,
                "bytes": stats.bytes,
                "max_bytes": stats.max_bytes,
                "dropped": stats.dropped,
                "rejected": stats.rejected,
                "dead_letters": stats.dead_letters,
                "oldest_age": stats.oldest_age,
                "recovered": list(self.store.recovered),
            },
            "sync": self.syncer.status(),
            "clock": self.clock.status(),
            "mqtt": {
                "enabled": self.config.mqtt.enabled,
                "connected": bool(self.mqtt is not None and self.mqtt.connected),
            },
            "config": {
                "path": str(self.config_path) if self.config_path else None,
                "generation": self.config_generation,
                "loaded_at": self.config_loaded_at,
                "reload_error": self.reload_error,
            },
            "apps": {
                app: {
                    # No customer ids: the status is retained on the broker for anyone who
                    # may subscribe; `get_customer` is each app's way to read its own.
                    "session": state.session,
                    "push_token_tracked_at": state.push_token_tracked_at,
                }
                for app, state in sorted(self.engine.states().items())
            },
        }

    def _status_line(self) -> str:
        stats = self.store.stats()
        states = [p["state"] for p in self.syncer.status().get("projects", [])]
        sync = ",".join(sorted(set(states))) or "idle"
        mqtt = "up" if self.mqtt is not None and self.mqtt.connected else "down"
        return f"queue {stats.items} items / {stats.bytes} bytes; sync {sync}; mqtt {mqtt}"

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
