"""Runs the pure tracker inside the store's writer transactions.

App state has exactly one owner: the writer thread. A command's outcome (its items and the
app's next state) is written in the same transaction; the in-memory state the next command
sees advances only when that transaction commits, so a rolled-back batch (disk full) leaves
memory and disk agreeing.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent import device as device_files
from agent import tracker
from agent.clock import boot_monotonic
from agent.config import AgentConfig
from agent.errors import UnknownApp
from agent.store import Store, Txn
from agent.tracker.model import AppSettings, AppState, Context, DeviceInfo, Outcome

if TYPE_CHECKING:
    from agent.timekeeper import Timekeeper


def _new_uuid() -> str:
    return str(uuid.uuid4())


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

    def track(self, app: str, command: Any, now: float) -> concurrent.futures.Future[Outcome]:
        return self._store.submit(self._track_op(app, command, now))

    def track_many(
        self,
        commands: Sequence[tuple[str, Any, float]],
        on_done: Callable[[list[Outcome | BaseException]], object],
    ) -> None:
        """Track (app, command, accept time) triples in order, each exactly like `track()`
        (its own all-or-nothing op), with one callback for all of them instead of a future
        each. `on_done(results)` runs on the writer thread once every command is committed or
        failed: `results[i]` is command i's `Outcome` or the exception that refused it."""
        self._store.submit_group(
            [self._track_op(app, command, now) for app, command, now in commands], on_done
        )

    def _track_op(self, app: str, command: Any, now: float) -> Callable[[Txn], Outcome]:
        device = self._device

        def step(state: AppState | None, settings: AppSettings, ctx: Context) -> Outcome:
            return tracker.handle(command, state, settings, device, ctx)

        return lambda txn: self._apply(txn, app, now, step)

    def expire_session(
        self, app: str, background_at: float, now: float
    ) -> concurrent.futures.Future[Outcome]:
        return self._store.submit(
            lambda txn: self._apply(
                txn,
                app,
                now,
                lambda state, settings, ctx: tracker.expire_session(
                    state, settings, self._device, ctx, background_at
                ),
            )
        )

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

    def _apply(
        self,
        txn: Txn,
        app: str,
        now: float,
        step: Callable[[AppState | None, AppSettings, Context], Outcome],
    ) -> Outcome:
        settings = self._settings_for(app)
        if settings is None:
            # The config was reloaded between intake's check and this op.
            raise UnknownApp(f"unknown app {app!r}")
        max_apps = self._settings[0].apps.max_apps
        state = self._pending.get(app, self._states.get(app))
        if state is None and len(self._states.keys() | self._pending.keys()) >= max_apps:
            # Every command for an app creates its state; the number of apps a client can
            # make the agent remember is bounded (docs/configuration.md, apps.max_apps).
            raise UnknownApp(f"too many apps: at most {max_apps} (apps.max_apps) have state")
        outcome = step(state, settings, Context(now=now, new_uuid=self._new_uuid))
        if self._clock is not None:
            # Held while the true time is unknown (docs/tracking.md); the monotonic time is
            # the moment of `now` on the boot's clock.
            boot_id: str | None
            boot_id, mono, held = self._clock.stamp(now)
        else:
            boot_id, mono, held = self._boot_id, boot_monotonic(), False
        txn.enqueue(outcome.items, now, app=app, boot_id=boot_id, mono=mono, held=held)
        if outcome.state != (state or AppState()):
            txn.save_app_state(app, outcome.state)
            self._pending[app] = outcome.state
            txn.after_commit(lambda: self._committed(app, outcome.state))
            txn.after_rollback(lambda: self._pending.pop(app, None))
        return outcome

    def _committed(self, app: str, state: AppState) -> None:
        self._states[app] = state
        if self._pending.get(app) is state:
            del self._pending[app]
