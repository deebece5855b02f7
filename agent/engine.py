"""Runs the pure tracker inside the store's writer transactions (`Engine`, writer side) and
hands the results back to the event loop (`Runner`, loop side).

App state has exactly one owner: the writer thread. A command's outcome (its items and the
app's next state) is written in the same transaction; the in-memory state the next command
sees advances only when that transaction commits, so a rolled-back batch (disk full) leaves
memory and disk agreeing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from agent import device as device_files
from agent import tracker
from agent.clock import boot_monotonic
from agent.commands import GetCustomer
from agent.config import AgentConfig
from agent.dispatch import Accepted, Result
from agent.errors import Unavailable, UnknownApp
from agent.logs import escape
from agent.store import Store, Txn
from agent.tracker.model import AppSettings, AppState, Context, DeviceInfo, Outcome

if TYPE_CHECKING:
    from agent.timekeeper import Timekeeper

log = logging.getLogger("engagement_agent.engine")


def _new_uuid() -> str:
    return str(uuid.uuid4())


class _Expiry:
    """The op that ends a session left in background (`Engine.expire_session`)."""

    __slots__ = ("background_at",)

    def __init__(self, background_at: float) -> None:
        self.background_at = background_at


class Engine:
    def __init__(
        self,
        store: Store,
        config: AgentConfig,
        device: DeviceInfo,
        *,
        new_uuid: Callable[[], str] = _new_uuid,
        boot_id: str | None = None,
        clock: Timekeeper | None = None,
    ) -> None:
        self._store = store
        self._device = device
        self._new_uuid = new_uuid
        self._clock = clock
        if clock is not None:
            boot_id = clock.boot_id
        self._boot_id = boot_id if boot_id is not None else device_files.boot_id()
        # The config and the settings derived from it travel together: a reload swaps both in
        # one assignment, so the writer can never cache old settings under a new config.
        self._settings: tuple[AgentConfig, dict[str, AppSettings]] = (config, {})
        self._states: dict[str, AppState] = {}
        # States produced by ops of the transaction in progress, not yet committed.
        self._pending: dict[str, AppState] = {}

    def load(self) -> None:
        """Read every app's persisted state; call once after the store is open."""
        self._states = self._store.load_app_states()

    def reload(self, config: AgentConfig) -> None:
        # Swapping the reference is atomic; the writer thread picks the new config up with its
        # next op, and settings are re-derived lazily from it.
        self._settings = (config, {})

    def states(self) -> dict[str, AppState]:
        """Committed states (a snapshot copy, safe to read from any thread)."""
        return dict(self._states)

    def track_many(
        self,
        commands: Sequence[tuple[str, Any, float]],
        on_done: Callable[[list[Outcome | BaseException]], object],
    ) -> None:
        """Track (app, command, accept time) triples in order, each its own all-or-nothing op,
        with one callback for all of them instead of a future each. `on_done(results)` runs on
        the writer thread once every command is committed or failed: `results[i]` is command
        i's `Outcome` or the exception that refused it."""
        # The triples are the ops' arguments as they are: the op is `_apply(app, command,
        # now, txn)`, with no closure built per pipelined command.
        self._store.submit_group(self._apply, commands, on_done)

    def expire_session(
        self, app: str, background_at: float, now: float
    ) -> concurrent.futures.Future[Outcome]:
        return self._store.submit(partial(self._apply, app, _Expiry(background_at), now))

    def pending_timers(self, now: float) -> list[tuple[str, float, float]]:
        """(app, delay, background_at) for sessions left in background by a previous run."""
        timers = []
        for app, state in self._states.items():
            settings = self._settings_for(app)
            if settings is None or state.background_at is None:
                continue
            delay = tracker.pending_timer(state, settings, now)
            if delay is not None:
                timers.append((app, delay, state.background_at))
        return timers

    def _settings_for(self, app: str) -> AppSettings | None:
        config, cache = self._settings
        settings = cache.get(app)
        if settings is None:
            settings = config.app_settings(app)
            if settings is not None:
                cache[app] = settings
        return settings

    def _apply(self, app: str, command: Any, now: float, txn: Txn) -> Outcome:
        """Run `command` (a tracking command, `get_customer`, or an `_Expiry`) for `app` in
        `txn`: the tracker decides, the items and the new state are written."""
        settings = self._settings_for(app)
        if settings is None:
            # The config was reloaded between the dispatcher's check and this op.
            raise UnknownApp(f"unknown app {app!r}")
        state = self._pending.get(app, self._states.get(app))
        if state is None:
            # Every command for an app creates its state; the number of apps a client can
            # make the agent remember is bounded (docs/configuration.md, apps.max_apps).
            max_apps = self._settings[0].apps.max_apps
            if len(self._states.keys() | self._pending.keys()) >= max_apps:
                raise UnknownApp(f"too many apps: at most {max_apps} (apps.max_apps) have state")
        ctx = Context(now, self._new_uuid)
        if type(command) is _Expiry:
            outcome = tracker.expire_session(
                state, settings, self._device, ctx, command.background_at
            )
        else:
            outcome = tracker.handle(command, state, settings, self._device, ctx)
        if self._clock is not None:
            # Held while the true time is unknown (docs/tracking.md); the monotonic time is
            # the moment of `now` on the boot's clock.
            boot_id: str | None
            boot_id, mono, held = self._clock.stamp(now)
        else:
            boot_id, mono, held = self._boot_id, boot_monotonic(), False
        txn.enqueue(outcome.items, now, app=app, boot_id=boot_id, mono=mono, held=held)
        # Identity first: most commands hand the state back unchanged, and comparing two
        # pydantic models field by field costs more than the rest of this bookkeeping.
        if outcome.state is not state and outcome.state != (state or AppState()):
            txn.save_app_state(app, outcome.state)
            self._pending[app] = outcome.state
            txn.after_commit(lambda: self._committed(app, outcome.state))
            txn.after_rollback(lambda: self._pending.pop(app, None))
        return outcome

    def _committed(self, app: str, state: AppState) -> None:
        self._states[app] = state
        if self._pending.get(app) is state:
            del self._pending[app]


class Runner:
    """The event loop's side of the engine: commits groups for `agent.dispatch` and keeps the
    session timers (a session left in background ends after `session_timeout`).

    Results cross from the writer thread to the loop in one wake-up for everything that
    committed meanwhile (one self-pipe write), not one per command or group. Construct and
    call on the loop's thread.
    """

    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._on_change = on_change  # app state or the queue changed (MQTT status hint)
        # app -> (token, handle): the token tells a fired timer whether it is still current.
        self._timers: dict[str, tuple[object, asyncio.TimerHandle]] = {}
        self._handoff: list[Callable[[], None]] = []
        self._handoff_lock = threading.Lock()

    def commit(self, commands: Sequence[Accepted], done: Callable[[list[Result]], None]) -> None:
        def committed(outcomes: list[Outcome | BaseException]) -> None:  # on the loop
            results: list[Result] = []
            tracked = False
            for accepted, outcome in zip(commands, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    results.append(outcome)
                elif type(accepted.command) is GetCustomer:  # isinstance: ABCMeta, slow
                    results.append({"app": accepted.app, **(outcome.result or {})})
                else:
                    tracked = True
                    try:
                        self._after_outcome(accepted.app, outcome)
                    except Exception as exc:
                        results.append(exc)
                    else:
                        results.append(outcome.result)
            if tracked:
                self._on_change()
            done(results)

        self._engine.track_many(
            [(c.app, c.command, c.now) for c in commands],
            lambda outcomes: self._call_from_writer(lambda: committed(outcomes)),
        )

    def _call_from_writer(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop. Called on the writer thread after each commit; callbacks that
        pile up while the loop is busy share one wake-up."""
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

    # -- session timers ------------------------------------------------------------------------
    def arm_pending_timers(self) -> None:
        """(Re-)arm the timers of sessions left in background, with the current settings: at
        start (sessions from a previous run) and after a reload (timeouts may have changed)."""
        self.cancel_timers()
        for app, delay, background_at in self._engine.pending_timers(time.time()):
            self._arm_timer(app, delay, background_at)

    def cancel_timers(self) -> None:
        for _token, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def _after_outcome(self, app: str, outcome: Outcome) -> None:
        if outcome.timer is None and not self._timers:
            return  # nothing to arm or cancel: most commands, without reading the app state
        state = outcome.state
        if state.session != "background":
            entry = self._timers.pop(app, None)
            if entry is not None:
                entry[1].cancel()
        if outcome.timer is not None and state.background_at is not None:
            self._arm_timer(app, outcome.timer, state.background_at)

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

    async def _expire(self, app: str, background_at: float, token: object) -> None:
        entry = self._timers.get(app)
        if entry is not None and entry[0] is token:
            del self._timers[app]
        try:
            outcome = await asyncio.wrap_future(
                self._engine.expire_session(app, background_at, time.time())
            )
        except Unavailable as exc:  # disk full: try again shortly rather than lose the end
            log.warning(
                "could not record the session end for app %s: %s; retrying", escape(app), exc
            )
            self._arm_timer(app, 5.0, background_at)
            return
        except Exception as exc:  # e.g. the app was removed from the config meanwhile
            log.error("gave up recording the session end for app %s: %s", escape(app), exc)
            return
        self._after_outcome(app, outcome)
        self._on_change()
