"""The SDK's tracking logic for one app, as pure functions (docs/tracking.md is the rulebook).

Everything here is sans-I/O in the h11 sense: a command and the app's current `AppState` go in,
an `Outcome` (next state, items to queue, reply result, timer wish) comes out. The caller owns
the clock, the UUID source, the database and the timers. Because nothing is written until the
caller commits the outcome, a raised `InvalidState` leaves no trace by construction.

How to read this module: `handle()` is the only dispatcher. Each command has one small
function (`_on_<command>`), and each SDK rule lives in exactly one helper that those functions
call (`_install_once`, `_start_session`, `_close_session`, `_verify_push_token`, ...). Items
are produced by `_Run.event()` / `_Run.customer_update()`, which alone decide wire shape,
customer ids and project fan-out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.commands import (
    Anonymize,
    AppBackground,
    AppForeground,
    GetCustomer,
    IdentifyCustomer,
    SetDefaultProperties,
    TrackEvent,
    TrackHmsPushToken,
    TrackPayment,
    TrackPushToken,
    TrackSessionEnd,
    TrackSessionStart,
    VerifyPushToken,
)
from agent.errors import InvalidState, TooLarge
from agent.tracker.model import (
    AppSettings,
    AppState,
    Context,
    DeviceInfo,
    OutboundItem,
    Outcome,
    ProjectSwitch,
    TokenType,
)
from agent.tracker.routing import current_state, projects_for, routing, switch_for

#: `token_track_frequency = "daily"` re-tracks when the last track is at least this old.
DAILY_SECONDS = 24 * 3600.0
#: An app's remembered hard ids go into its stored state and into every item it queues, so
#: `identify_customer` merges may not grow them without end (docs/tracking.md, "Customer ids").
MAX_CUSTOMER_IDS = 32
MAX_CUSTOMER_IDS_BYTES = 8192

_PLATFORM: Mapping[TokenType, str] = {"fcm": "android", "hms": "huawei"}
_TOKEN_PROPERTY: Mapping[TokenType, str] = {
    "fcm": "google_push_notification_id",
    "hms": "huawei_push_notification_id",
}

HandledCommand = (
    TrackEvent
    | IdentifyCustomer
    | Anonymize
    | TrackSessionStart
    | TrackSessionEnd
    | AppForeground
    | AppBackground
    | TrackPushToken
    | TrackHmsPushToken
    | VerifyPushToken
    | TrackPayment
    | SetDefaultProperties
    | GetCustomer
)


# --------------------------------------------------------------------------------------------
# Public API


def handle(
    command: HandledCommand,
    state: AppState | None,
    settings: AppSettings,
    device: DeviceInfo,
    ctx: Context,
) -> Outcome:
    """Apply one accepted command to an app; `state=None` means the app was never seen.

    Raises `InvalidState` (a manual session command in the wrong mode), `Forbidden` (an
    anonymize naming a project the app may not use) and `TooLarge` (an identify_customer that
    would remember too many ids) before anything is decided; the caller then commits nothing.
    Any other command type is a programming error (`TypeError`): `status` and `flush` are the
    daemon's, not the tracker's.
    """
    # Exact types, not isinstance: a pydantic model's isinstance goes through ABCMeta, slow
    # enough to show per command, and commands are never subclassed (agent/commands.py).
    kind = type(command)
    _check_allowed(command, state, settings)
    run = _Run(settings, device, ctx, current_state(state, settings))
    if type(command) is IdentifyCustomer:
        _check_ids({**run.state.ids, **command.ids})
    if kind is GetCustomer:
        return _on_get_customer(run)
    switch = switch_for(command, run.state, settings) if type(command) is Anonymize else None
    # The command's time, for its items and its state; the relaunch rule of this very command
    # reads the previous one, so it is remembered only after it.
    command_at = _timestamp_of(command, ctx)

    if kind is not Anonymize and kind is not SetDefaultProperties:
        # The first tracking command of an app installs it, before its own items. Anonymize
        # installs its new customer itself (an app whose very first command is anonymize
        # sends one installation); set_default_properties installs after setting them.
        _install_once(run, command_at)

    match command:
        case TrackEvent():
            _on_track_event(run, command, command_at)
        case IdentifyCustomer():
            _on_identify_customer(run, command)
        case Anonymize():
            _on_anonymize(run, switch)
        case TrackSessionStart():
            _on_track_session_start(run, command_at)
        case TrackSessionEnd():
            _on_track_session_end(run, command_at)
        case AppForeground():
            _on_app_foreground(run, command, command_at)
        case AppBackground():
            _on_app_background(run, command, command_at)
        case TrackPushToken():
            _on_track_push_token(run, command.token, "fcm")
        case TrackHmsPushToken():
            _on_track_push_token(run, command.token, "hms")
        case VerifyPushToken():
            _verify_push_token(run, ctx.now)
        case TrackPayment():
            _on_track_payment(run, command, command_at)
        case SetDefaultProperties():
            _on_set_default_properties(run, command)
        case _:  # pragma: no cover - guarded by the type checker
            raise TypeError(f"not a tracking command: {type(command).__name__}")
    if run.state.in_foreground:
        # Only the relaunch rule reads it, and only for an app in the foreground: apps that
        # never report their lifecycle are spared a state write per command.
        run.update(last_command_at=command_at)
    return run.outcome()


def expire_session(
    state: AppState | None,
    settings: AppSettings,
    device: DeviceInfo,
    ctx: Context,
    background_at: float,
) -> Outcome:
    """The session timeout elapsed after `app_background`: track the session's end.

    The daemon's timer may fire late or for a background that is no longer current (the app
    came back, or went to background again, or anonymize ended the session); only a session
    still in background since exactly `background_at` is ended, anything else is a no-op.
    """
    run = _Run(settings, device, ctx, current_state(state, settings))
    current = run.state
    if (
        current.session == "background"
        and current.background_at == background_at
        and not current.in_foreground
    ):
        _close_session(run, background_at)
    return run.outcome()


def pending_timer(state: AppState | None, settings: AppSettings, now: float) -> float | None:
    """Seconds until a backgrounded session should expire, e.g. after a restart; None if none.

    Measured on the wall clock from the background timestamp, clamped to
    [0, session_timeout]: a clock that went backwards must neither make the session live
    forever nor end it at once, so it waits at most one full timeout.
    """
    if state is None or state.session != "background" or state.background_at is None:
        return None
    remaining = settings.session_timeout - (now - state.background_at)
    return min(max(remaining, 0.0), settings.session_timeout)


# --------------------------------------------------------------------------------------------
# One command's work in progress


@dataclass
class _Run:
    """The state and items of one command as they are being decided.

    Items are emitted in order; each snapshots the customer ids and the project routing of the
    moment it is emitted, which is what lets anonymize send its first items as the old customer
    to the old project and the rest as the new customer to the new one.
    """

    settings: AppSettings
    device: DeviceInfo
    ctx: Context
    state: AppState
    items: list[OutboundItem] = field(default_factory=list)

    def update(self, **changes: Any) -> None:
        self.state = self.state.model_copy(update=changes)

    def cookie(self) -> str:
        """The app's cookie, created on first use (lowercase UUID4, like Android)."""
        # Read once: an attribute read on a pydantic model costs ~4 times a plain object's.
        cookie = self.state.cookie
        if cookie is None:
            cookie = self.ctx.new_uuid().lower()
            self.update(cookie=cookie)
        return cookie

    def customer_ids(self) -> dict[str, str]:
        return {"cookie": self.cookie(), **self.state.ids}

    def event(
        self, category: str, event_type: str, timestamp: float, properties: Mapping[str, Any]
    ) -> None:
        data = {
            "customer_ids": self.customer_ids(),
            "event_type": event_type,
            "timestamp": float(timestamp),
            "properties": dict(properties),
        }
        self._emit(category, {"name": "customers/events", "data": data})

    def customer_update(
        self, category: str, timestamp: float, properties: Mapping[str, Any]
    ) -> None:
        data = {
            "customer_ids": self.customer_ids(),
            "properties": dict(properties),
            "update_timestamp": float(timestamp),
        }
        self._emit(category, {"name": "customers", "data": data})

    def _emit(self, category: str, payload: Mapping[str, Any]) -> None:
        for project in projects_for(category, self.state, self.settings):
            self.items.append(OutboundItem(project, category, payload))

    def outcome(self, result: Mapping[str, Any] | None = None) -> Outcome:
        # Every outcome restates the timer: the daemon cancels a timer on `None`, and an event
        # tracked while the app is in background must not cancel that session's expiry.
        return Outcome(
            state=self.state,
            items=tuple(self.items),
            result=result,
            timer=pending_timer(self.state, self.settings, self.ctx.now),
        )


def _timestamp_of(command: object, ctx: Context) -> float:
    """The command's own timestamp, else its accept time (not the send time: docs/tracking.md)."""
    timestamp = getattr(command, "timestamp", None)
    return float(timestamp) if timestamp is not None else ctx.now


def _check_allowed(command: object, state: AppState | None, settings: AppSettings) -> None:
    """The invalid_state cases (docs/protocol.md), checked before anything else is decided."""
    kind = type(command)
    if kind is not TrackSessionStart and kind is not TrackSessionEnd:
        return
    name = "track_session_start" if kind is TrackSessionStart else "track_session_end"
    if settings.automatic_session_tracking:
        raise InvalidState(
            f"{name} is refused while automatic session tracking is on for this app; "
            "set automatic_session_tracking = false in its config to track sessions manually"
        )
    if kind is TrackSessionEnd and (state is None or state.session == "none"):
        raise InvalidState("track_session_end without an open session")


def _check_ids(ids: Mapping[str, str]) -> None:
    """The bound on remembered ids, checked before anything is decided (a refused merge
    leaves the stored ids as they were)."""
    size = len(json.dumps(ids, ensure_ascii=False, separators=(",", ":")).encode())
    if len(ids) > MAX_CUSTOMER_IDS or size > MAX_CUSTOMER_IDS_BYTES:
        raise TooLarge(
            f"customer ids too large: with this identify_customer the app would remember "
            f"{len(ids)} ids in {size} bytes; at most {MAX_CUSTOMER_IDS} ids in "
            f"{MAX_CUSTOMER_IDS_BYTES} bytes (anonymize starts a new customer)"
        )


# --------------------------------------------------------------------------------------------
# Commands


def _on_get_customer(run: _Run) -> Outcome:
    # Creates (and so persists) the cookie, but tracks nothing: installation waits for the
    # app's first tracking command (docs/tracking.md).
    ids = run.customer_ids()
    project, _ = routing(run.state, run.settings)
    return run.outcome({"ids": ids, "project_token": project.project_token})


def _on_set_default_properties(run: _Run, command: SetDefaultProperties) -> None:
    # An app that starts by setting its defaults (store, kiosk location) means them for
    # everything it tracks, its installation included.
    run.update(runtime_default_properties=dict(command.properties))
    _install_once(run, run.ctx.now)


def _on_track_event(run: _Run, command: TrackEvent, timestamp: float) -> None:
    name = command.name
    category = "banner" if name == "banner" else "track_event"
    run.event(category, name, timestamp, _event_properties(run, command.properties))


def _on_identify_customer(run: _Run, command: IdentifyCustomer) -> None:
    run.update(ids={**run.state.ids, **command.ids})
    properties = _customer_properties(run, command.properties)
    run.customer_update("track_customer", run.ctx.now, properties)


def _on_track_payment(run: _Run, command: TrackPayment, timestamp: float) -> None:
    item = command.item
    payment: dict[str, Any] = {
        "brutto": item.value,
        "currency": item.currency,
        "payment_system": item.payment_system,
        "item_id": item.product_id,
        "product_title": item.product_title,
    }
    if item.receipt is not None:
        payment["receipt"] = item.receipt
    properties = _event_properties(run, payment, with_device=True)
    run.event("payment", "payment", timestamp, properties)


def _on_track_session_start(run: _Run, timestamp: float) -> None:
    # Manual mode (automatic mode was refused by `_check_allowed`): an open session is closed
    # first, stamped with the new start, like the SDK's manualSessionAutoClose.
    if run.state.session != "none":
        _close_session(run, _session_end_time(run.state, timestamp))
    _start_session(run, timestamp)


def _on_track_session_end(run: _Run, timestamp: float) -> None:
    _close_session(run, _session_end_time(run.state, timestamp))


def _on_app_foreground(run: _Run, command: AppForeground, timestamp: float) -> None:
    state = run.state
    if run.settings.automatic_session_tracking:
        if state.session == "background" and _timed_out(state, timestamp, run.settings):
            # The timer did not fire in time (agent restarted): end the old session as it
            # would have been ended, with the app version it ran under, then start anew.
            _close_session(run, _session_end_time(run.state, timestamp))
        elif state.session == "background":
            run.update(session="active", background_at=None)
        elif state.session == "active" and _relaunched(state, timestamp, run.settings):
            # The app restarted without saying goodbye (crash, kill) and was silent for a
            # timeout: its session ended with its last command. Android never ends such a
            # session and iOS ends it "now"; the agent saw the app's last command.
            assert state.last_command_at is not None
            _close_session(run, state.last_command_at)
    version_changed = _remember_app_version(run, command.app_version)
    run.update(in_foreground=True)
    if run.settings.automatic_session_tracking and run.state.session == "none":
        _start_session(run, timestamp)
    if version_changed and run.state.push_token is not None:
        # A new app version re-tracks the token whatever the frequency (Android 4.10).
        _send_push_token(run, timestamp)
    else:
        # The SDK verifies the push token each time the app becomes active, in either mode.
        _verify_push_token(run, timestamp)


def _on_app_background(run: _Run, command: AppBackground, timestamp: float) -> None:
    _remember_app_version(run, command.app_version)
    run.update(in_foreground=False)
    if run.settings.automatic_session_tracking and run.state.session == "active":
        # Nothing is tracked yet: the session ends only if no foreground comes within the
        # timeout. `Outcome.timer` asks the daemon to call `expire_session` then.
        run.update(session="background", background_at=timestamp)


def _on_track_push_token(run: _Run, token: str, token_type: TokenType) -> None:
    """Explicit token tracking always sends; a different token replaces (invalidates) the old."""
    state = run.state
    replaced = state.push_token is not None and (
        state.push_token != token or state.push_token_type != token_type
    )
    if replaced and state.push_token_tracked is not None:
        _invalidate_push_token(run, replacing=token_type)
    run.update(push_token=token, push_token_type=token_type)
    _send_push_token(run, run.ctx.now)


def _on_anonymize(run: _Run, switch: ProjectSwitch | None) -> None:
    """The SDK's anonymize sequence, in the SDK's order (docs/tracking.md, "Anonymize").
    `switch` is the routing `switch_for()` chose (and allowed) for the new customer."""
    now = run.ctx.now
    automatic = run.settings.automatic_session_tracking
    before = run.state

    # 1. The old customer's open session ends (automatic mode; manual sessions are the app's).
    if automatic and before.session != "none":
        _close_session(run, _session_end_time(before, now))
    # 2. The push token stops being the old customer's.
    if before.push_token_tracked is not None:
        _invalidate_push_token(run, replacing=None)
    # 3. Forget the customer (runtime default properties stay: the SDKs never clear them).
    # Items already emitted keep their ids and project.
    run.update(
        cookie=None,
        ids={},
        installed=False,
        session="none",
        session_started_at=None,
        background_at=None,
        push_token_tracked=None,
        push_token_tracked_at=None,
        # 4. Switch project and mapping (None: the config's).
        project_switch=switch,
    )
    # 5-6. A new cookie (created by the first item) and its installation.
    _install_once(run, now)
    # 7. The new customer's session, if the app is on screen.
    if automatic and before.in_foreground:
        _start_session(run, now)
    # 8. The device's push token now belongs to the new customer.
    if run.state.push_token is not None:
        _send_push_token(run, now)


# --------------------------------------------------------------------------------------------
# Rules


def _install_once(run: _Run, timestamp: float) -> None:
    """Installation is tracked once per customer: at first use and after every anonymize."""
    if run.state.installed:
        return
    run.update(installed=True)
    properties = _event_properties(run, {}, with_device=True)
    run.event("install", "installation", timestamp, properties)


def _start_session(run: _Run, timestamp: float) -> None:
    run.update(session="active", session_started_at=timestamp, background_at=None)
    properties = _event_properties(run, {}, with_device=True)
    run.event("session_start", "session_start", timestamp, properties)


def _close_session(run: _Run, end: float) -> None:
    """Track `session_end` for the open session and forget it.

    An end can never precede its start (out-of-order timestamps, a clock set back): it is
    moved up to the start, so `duration` is never negative.
    """
    state = run.state
    start = state.session_started_at if state.session_started_at is not None else end
    end = max(end, start)
    properties = _event_properties(run, {"duration": end - start}, with_device=True)
    run.event("session_end", "session_end", end, properties)
    run.update(session="none", session_started_at=None, background_at=None)


def _session_end_time(state: AppState, now: float) -> float:
    """A session in background ended when the app left the screen, not when we notice."""
    if state.session == "background" and state.background_at is not None:
        return state.background_at
    return now


def _timed_out(state: AppState, foreground_at: float, settings: AppSettings) -> bool:
    """Did the background last `session_timeout` or longer? A clock that went backwards
    (foreground before background) counts as a quick return: the session continues."""
    if state.background_at is None:
        return False
    return foreground_at - state.background_at >= settings.session_timeout


def _remember_app_version(run: _Run, app_version: str | None) -> bool:
    """Store the version the app reports; True when it replaces a different stored one (the
    first version ever seen is no change)."""
    if not app_version:
        return False
    previous = run.state.app_version
    run.update(app_version=app_version)
    return previous is not None and previous != app_version


def _relaunched(state: AppState, foreground_at: float, settings: AppSettings) -> bool:
    """A foreground while already in the foreground, after the app was silent for a session
    timeout or longer, means the app restarted without `app_background`."""
    if not state.in_foreground or state.last_command_at is None:
        return False
    return foreground_at - state.last_command_at >= settings.session_timeout


def _verify_push_token(run: _Run, timestamp: float) -> None:
    """Re-track the stored token if `token_track_frequency` says it is due."""
    state = run.state
    if state.push_token is None:
        return
    frequency = run.settings.token_track_frequency
    changed = state.push_token != state.push_token_tracked
    if frequency == "every_launch":
        due = True
    elif frequency == "daily":
        due = changed or _day_passed(state.push_token_tracked_at, timestamp)
    else:
        due = changed
    if due:
        _send_push_token(run, timestamp)


def _day_passed(tracked_at: float | None, now: float) -> bool:
    """Daily frequency: due after 24 h, and also when the clock went backwards past the last
    track (a device that once ran with a clock years ahead must not wait years)."""
    if tracked_at is None:
        return True
    elapsed = now - tracked_at
    return elapsed >= DAILY_SECONDS or elapsed < 0


def _send_push_token(run: _Run, timestamp: float) -> None:
    """Track the stored token as valid for the current customer and remember that we did."""
    state = run.state
    assert state.push_token is not None and state.push_token_type is not None
    _push_token_item(run, state.push_token, state.push_token_type, True, timestamp)
    run.update(push_token_tracked=state.push_token, push_token_tracked_at=timestamp)


def _invalidate_push_token(run: _Run, replacing: TokenType | None) -> None:
    """Tell the current customer that the stored token is no longer theirs.

    In the legacy `customer_property` format the invalidation is the property set to "". It is
    skipped when a token of the same type replaces it: the new value overwrites the property
    anyway, and two updates of one property with the same timestamp may be applied by the API
    in any order.
    """
    state = run.state
    assert state.push_token is not None and state.push_token_type is not None
    token_type = state.push_token_type
    if run.settings.push_token_format == "customer_property" and replacing == token_type:
        return
    _push_token_item(run, state.push_token, token_type, False, run.ctx.now)


def _push_token_item(
    run: _Run, token: str, token_type: TokenType, valid: bool, timestamp: float
) -> None:
    """One push-token item in the app's format. Never with default properties."""
    if run.settings.push_token_format == "customer_property":
        run.customer_update(
            "push_token", timestamp, {_TOKEN_PROPERTY[token_type]: token if valid else ""}
        )
        return
    properties = {
        "push_notification_token": token,
        "platform": _PLATFORM[token_type],
        "valid": valid,
        "description": "Permission granted" if valid else "Invalidated",
        **_automatic_properties(run),
    }
    run.event("push_token", "notification_state", timestamp, properties)


# --------------------------------------------------------------------------------------------
# Properties


def _default_properties(run: _Run) -> dict[str, Any]:
    """Config defaults < runtime defaults (`set_default_properties`)."""
    return {**run.settings.default_properties, **run.state.runtime_default_properties}


def _automatic_properties(run: _Run) -> dict[str, Any]:
    return {"application_id": run.settings.application_id, "device_id": run.device.device_uuid}


def _device_properties(run: _Run) -> dict[str, Any]:
    """Session, installation and payment events describe the device. A value the agent does
    not know (empty) is left out rather than sent as ""."""
    device = run.device
    values = {
        "os_name": device.os_name,
        "os_version": device.os_version,
        "sdk": device.sdk,
        "sdk_version": device.sdk_version,
        "device_model": device.device_model,
        "device_type": device.device_type,
        "app_version": run.state.app_version or run.settings.app_version,
    }
    return {key: value for key, value in values.items() if value}


def _event_properties(
    run: _Run, own: Mapping[str, Any], *, with_device: bool = False
) -> dict[str, Any]:
    """defaults < automatic (application_id, device_id, device props) < the event's own.

    The event's own properties win over everything, as docs/tracking.md says of defaults; automatic
    properties win over defaults so a default cannot silently relabel the app or device.
    """
    automatic = _automatic_properties(run)
    if with_device:
        automatic.update(_device_properties(run))
    return {**_default_properties(run), **automatic, **own}


def _customer_properties(run: _Run, own: Mapping[str, Any]) -> dict[str, Any]:
    if not run.settings.allow_default_customer_properties:
        return dict(own)
    return {**_default_properties(run), **own}
