"""The tracking core, rule by rule: exact items (payload, project, order) and state.

Each test drives one app the way the daemon does: commands are built from the JSON an app would
send, the state is carried from one outcome to the next, and the clock is explicit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from agent.commands import validate_command
from agent.errors import Forbidden, InvalidState, TooLarge
from agent.tracker import (
    AppSettings,
    AppState,
    Context,
    DeviceInfo,
    OutboundItem,
    Outcome,
    Project,
    ProjectCatalog,
    ProjectSwitch,
    config_fingerprint,
    expire_session,
    handle,
    pending_timer,
)
from agent.tracker.core import MAX_CUSTOMER_IDS, MAX_CUSTOMER_IDS_BYTES

T0 = 1_700_000_000.0
MAIN = Project("main-token", "main-auth")
PAY = Project("pay-token", "pay-auth")
EU = Project("eu-token", "eu-auth", "https://api.eu1.exponea.com")
NEW = Project("new-token", "new-auth")
#: What the config names: `[project]` (MAIN), `[projects.pay]`, `[projects.eu]`, `[projects.new]`.
CATALOG = ProjectCatalog(
    named={"default": MAIN, "pay": PAY, "eu": EU, "new": NEW},
    configured={project.key: project for project in (MAIN, PAY, EU, NEW)},
)
DEVICE = DeviceInfo(
    device_uuid="7d3c1a52-1111-4222-8333-444455556666",
    os_version="12",
    sdk_version="0.1.0",
    device_model="Raspberry Pi 4 Model B Rev 1.4",
    device_type="kiosk",
)
DEVICE_PROPS = {
    "os_name": "Linux",
    "os_version": "12",
    "sdk": "engagement-agent",
    "sdk_version": "0.1.0",
    "device_model": "Raspberry Pi 4 Model B Rev 1.4",
    "device_type": "kiosk",
}
AUTO = {"application_id": "default-application", "device_id": DEVICE.device_uuid}


def cookie(n: int) -> str:
    """The n-th cookie the test UUID source hands out, as the core must store it (lowercase)."""
    return f"{n:08x}-abcd-4ef0-8123-456789abcdef"


def uuids() -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield cookie(n).upper()


class App:
    """One app as the daemon sees it: state carried over, clock and timer explicit."""

    def __init__(self, settings: AppSettings | None = None, device: DeviceInfo = DEVICE) -> None:
        self.settings = settings or AppSettings(project=MAIN, catalog=CATALOG)
        self.device = device
        self.state: AppState | None = None
        self.now = T0
        self.timer: float | None = None
        self._uuids = uuids()

    def ctx(self) -> Context:
        return Context(now=self.now, new_uuid=lambda: next(self._uuids))

    def send(self, command_name: str, /, **fields: Any) -> Outcome:
        command = validate_command({"command": command_name, **fields})
        outcome = handle(command, self.state, self.settings, self.device, self.ctx())
        return self._take(outcome)

    def expire(self, background_at: float | None = None) -> Outcome:
        assert self.state is not None
        at = self.state.background_at if background_at is None else background_at
        assert at is not None
        outcome = expire_session(self.state, self.settings, self.device, self.ctx(), at)
        return self._take(outcome)

    def restart(self) -> None:
        """What a restart keeps: the state as the store persisted it (JSON)."""
        assert self.state is not None
        self.state = AppState.model_validate_json(self.state.model_dump_json())

    def _take(self, outcome: Outcome) -> Outcome:
        self.state = outcome.state
        self.timer = outcome.timer
        return outcome


def unique(items: tuple[OutboundItem, ...]) -> list[OutboundItem]:
    """One item per payload: project copies of one payload are adjacent."""
    return [item for i, item in enumerate(items) if i == 0 or item.payload != items[i - 1].payload]


def kinds(outcome: Outcome) -> list[str]:
    """What a user would read off the wire: event types, or "customers" for updates."""
    return [item.payload["data"].get("event_type", "customers") for item in unique(outcome.items)]


def data(item: OutboundItem) -> dict[str, Any]:
    return dict(item.payload["data"])


def props(outcome: Outcome, kind: str) -> dict[str, Any]:
    (match,) = [
        item
        for item in unique(outcome.items)
        if item.payload["data"].get("event_type", "customers") == kind
    ]
    return dict(match.payload["data"]["properties"])


def installed_app(settings: AppSettings | None = None) -> App:
    app = App(settings)
    app.send("get_customer")
    app.send("set_default_properties")  # installs
    return app


# --------------------------------------------------------------------------------------------
# Wire format, ids, installation


def test_first_event_installs_then_tracks_with_exact_payloads() -> None:
    app = App()
    outcome = app.send("track_event", name="purchase_screen", properties={"step": 2})
    assert outcome.items == (
        OutboundItem(
            MAIN,
            "install",
            {
                "name": "customers/events",
                "data": {
                    "customer_ids": {"cookie": cookie(1)},
                    "event_type": "installation",
                    "timestamp": T0,
                    "properties": {**AUTO, **DEVICE_PROPS},
                },
            },
        ),
        OutboundItem(
            MAIN,
            "track_event",
            {
                "name": "customers/events",
                "data": {
                    "customer_ids": {"cookie": cookie(1)},
                    "event_type": "purchase_screen",
                    "timestamp": T0,
                    "properties": {**AUTO, "step": 2},
                },
            },
        ),
    )
    assert outcome.result is None
    assert outcome.timer is None
    assert app.state is not None and app.state.cookie == cookie(1) and app.state.installed


def test_installation_only_once_and_cookie_is_stable() -> None:
    app = App()
    app.send("track_event", name="a")
    app.now += 5
    outcome = app.send("track_event", name="b")
    assert kinds(outcome) == ["b"]
    assert data(outcome.items[0])["customer_ids"] == {"cookie": cookie(1)}
    assert data(outcome.items[0])["timestamp"] == T0 + 5


def test_cookie_is_lowercase() -> None:
    app = App()
    app.send("track_event", name="a")
    assert app.state is not None and app.state.cookie is not None
    assert app.state.cookie == app.state.cookie.lower()


def test_given_timestamp_wins_over_accept_time() -> None:
    app = App()
    outcome = app.send("track_event", name="a", timestamp=T0 - 100)
    assert [data(i)["timestamp"] for i in outcome.items] == [T0 - 100, T0 - 100]
    outcome = app.send("track_event", name="b", timestamp=None)
    assert data(outcome.items[0])["timestamp"] == T0


def test_get_customer_creates_cookie_without_tracking() -> None:
    app = App()
    outcome = app.send("get_customer")
    assert outcome.items == ()
    assert outcome.result == {"ids": {"cookie": cookie(1)}, "project_token": "main-token"}
    assert app.state is not None and app.state.cookie == cookie(1) and not app.state.installed
    # The same cookie is reported again and used by the first tracking command, which installs.
    assert app.send("get_customer").result == outcome.result
    outcome = app.send("track_event", name="a")
    assert kinds(outcome) == ["installation", "a"]
    assert {data(i)["customer_ids"]["cookie"] for i in outcome.items} == {cookie(1)}


def test_get_customer_reports_hard_ids() -> None:
    app = App()
    app.send("identify_customer", ids={"registered": "jane@example.com"})
    assert app.send("get_customer").result == {
        "ids": {"cookie": cookie(1), "registered": "jane@example.com"},
        "project_token": "main-token",
    }


def test_every_tracking_command_installs_first() -> None:
    firsts: list[dict[str, Any]] = [
        {"command": "track_event", "name": "x"},
        {"command": "identify_customer", "ids": {"registered": "a"}},
        {"command": "app_foreground"},
        {"command": "app_background"},
        {"command": "track_push_token", "token": "t"},
        {"command": "track_hms_push_token", "token": "t"},
        {"command": "verify_push_token"},
        {
            "command": "track_payment",
            "item": {
                "value": 1.0,
                "currency": "EUR",
                "payment_system": "s",
                "product_id": "p",
                "product_title": "P",
            },
        },
        {"command": "set_default_properties", "properties": {"a": 1}},
        {"command": "anonymize"},
    ]
    for first in firsts:
        app = App()
        outcome = app.send(first.pop("command"), **first)
        assert kinds(outcome)[0] == "installation"
        assert kinds(outcome).count("installation") == 1


def test_manual_session_start_installs_first() -> None:
    app = App(AppSettings(project=MAIN, automatic_session_tracking=False))
    assert kinds(app.send("track_session_start")) == ["installation", "session_start"]


def test_set_default_properties_tracks_only_the_installation() -> None:
    app = App()
    outcome = app.send("set_default_properties", properties={"store": "Berlin-1"})
    assert kinds(outcome) == ["installation"]
    # The installation of this very command already carries the new defaults.
    assert props(outcome, "installation")["store"] == "Berlin-1"
    assert kinds(app.send("set_default_properties", properties={"store": "x"})) == []


# --------------------------------------------------------------------------------------------
# identify_customer


def test_identify_merges_ids_and_later_events_carry_them() -> None:
    app = installed_app()
    outcome = app.send(
        "identify_customer",
        ids={"registered": "jane@example.com", "crm": "1"},
        properties={"first_name": "Jane"},
    )
    assert outcome.items == (
        OutboundItem(
            MAIN,
            "track_customer",
            {
                "name": "customers",
                "data": {
                    "customer_ids": {
                        "cookie": cookie(1),
                        "registered": "jane@example.com",
                        "crm": "1",
                    },
                    "properties": {"first_name": "Jane"},
                    "update_timestamp": T0,
                },
            },
        ),
    )
    outcome = app.send("identify_customer", ids={"crm": "2", "loyalty": "L9"})
    assert data(outcome.items[0])["customer_ids"] == {
        "cookie": cookie(1),
        "registered": "jane@example.com",
        "crm": "2",
        "loyalty": "L9",
    }
    outcome = app.send("track_event", name="a")
    assert data(outcome.items[0])["customer_ids"]["registered"] == "jane@example.com"


def test_remembered_ids_are_bounded_and_a_refused_merge_changes_nothing() -> None:
    """Merged ids go into the app's state and every later item: a client cannot grow them
    without end (one app could otherwise fill the shared queue and the agent's memory)."""
    app = installed_app()
    app.send("identify_customer", ids={f"id{i}": "v" for i in range(MAX_CUSTOMER_IDS - 1)})
    state = app.state
    with pytest.raises(TooLarge, match="customer ids too large"):
        app.send("identify_customer", ids={"one": "v", "more": "v"})
    assert app.state == state
    app.send("identify_customer", ids={"id0": "replaced", "last": "v"})  # exactly the cap
    big = "x" * (MAX_CUSTOMER_IDS_BYTES // 2)
    with pytest.raises(TooLarge, match="customer ids too large"):
        app.send("identify_customer", ids={"id1": big, "id2": big})
    app.send("anonymize")  # a new customer starts with no ids
    app.send("identify_customer", ids={"registered": big})
    outcome = app.send("track_event", name="a")
    assert data(outcome.items[0])["customer_ids"]["registered"] == big


def test_customer_ids_are_a_snapshot() -> None:
    app = installed_app()
    first = app.send("track_event", name="before")
    app.send("identify_customer", ids={"registered": "jane"})
    assert data(first.items[0])["customer_ids"] == {"cookie": cookie(1)}


def test_customer_updates_have_defaults_but_no_automatic_properties() -> None:
    app = installed_app(AppSettings(project=MAIN, default_properties={"store": "S1", "a": 1}))
    app.send("set_default_properties", properties={"a": 2, "b": 2})
    outcome = app.send("identify_customer", ids={"registered": "x"}, properties={"b": 3})
    assert props(outcome, "customers") == {"store": "S1", "a": 2, "b": 3}


def test_customer_updates_without_defaults_when_disallowed() -> None:
    settings = AppSettings(
        project=MAIN, default_properties={"store": "S1"}, allow_default_customer_properties=False
    )
    app = installed_app(settings)
    app.send("set_default_properties", properties={"a": 2})
    outcome = app.send("identify_customer", ids={"registered": "x"}, properties={"b": 3})
    assert props(outcome, "customers") == {"b": 3}
    # Events still get them.
    assert props(app.send("track_event", name="e"), "e") == {"store": "S1", "a": 2, **AUTO}


# --------------------------------------------------------------------------------------------
# Properties


def test_default_properties_precedence() -> None:
    settings = AppSettings(project=MAIN, default_properties={"a": "config", "b": "config"})
    app = installed_app(settings)
    app.send("set_default_properties", properties={"b": "runtime", "c": "runtime"})
    outcome = app.send("track_event", name="e", properties={"c": "command", "d": "command"})
    assert props(outcome, "e") == {
        "a": "config",
        "b": "runtime",
        "c": "command",
        "d": "command",
        **AUTO,
    }


def test_set_default_properties_replaces_runtime_defaults() -> None:
    app = installed_app()
    app.send("set_default_properties", properties={"a": 1, "b": 1})
    app.send("set_default_properties", properties={"b": 2})
    assert props(app.send("track_event", name="e"), "e") == {"b": 2, **AUTO}
    app.send("set_default_properties", properties={})
    assert props(app.send("track_event", name="e"), "e") == AUTO


def test_runtime_defaults_survive_a_restart() -> None:
    app = installed_app()
    app.send("set_default_properties", properties={"shift": "night"})
    app.restart()
    assert props(app.send("track_event", name="e"), "e")["shift"] == "night"


def test_automatic_properties_win_over_defaults_command_wins_over_all() -> None:
    settings = AppSettings(project=MAIN, default_properties={"device_id": "from-default"})
    app = installed_app(settings)
    assert props(app.send("track_event", name="e"), "e")["device_id"] == DEVICE.device_uuid
    outcome = app.send("track_event", name="e", properties={"application_id": "mine"})
    assert props(outcome, "e")["application_id"] == "mine"


def test_configured_application_id() -> None:
    app = App(AppSettings(project=MAIN, application_id="kiosk-ui"))
    outcome = app.send("track_event", name="e")
    assert props(outcome, "e")["application_id"] == "kiosk-ui"
    assert props(outcome, "installation")["application_id"] == "kiosk-ui"


def test_device_properties_only_on_session_installation_payment() -> None:
    app = App(AppSettings(project=MAIN, app_version="2.0"))
    outcome = app.send("app_foreground")
    with_device = {**AUTO, **DEVICE_PROPS, "app_version": "2.0"}
    assert props(outcome, "installation") == with_device
    assert props(outcome, "session_start") == with_device
    assert props(app.send("track_event", name="e"), "e") == AUTO
    app.send("app_background")
    assert props(app.expire(), "session_end") == {**with_device, "duration": 0.0}


def test_app_version_from_foreground_overrides_config_and_persists() -> None:
    app = App(AppSettings(project=MAIN, app_version="1.0"))
    outcome = app.send("app_foreground", app_version="1.1")
    assert props(outcome, "session_start")["app_version"] == "1.1"
    app.restart()
    outcome = app.send("track_payment", item=payment_item())
    assert props(outcome, "payment")["app_version"] == "1.1"
    # A foreground without a version keeps the last one.
    app.send("app_foreground")
    assert app.state is not None and app.state.app_version == "1.1"


def test_app_version_from_background_is_used_for_the_session_end() -> None:
    app = installed_app()
    app.send("app_foreground", app_version="1.0")
    app.send("app_background", app_version="1.0.1")
    assert props(app.expire(), "session_end")["app_version"] == "1.0.1"


def test_app_version_omitted_when_unknown_or_empty() -> None:
    app = App()
    assert "app_version" not in props(app.send("app_foreground", app_version=""), "session_start")
    app = App(AppSettings(project=MAIN, app_version=""))
    assert "app_version" not in props(app.send("track_event", name="e"), "installation")


def test_unknown_device_values_are_omitted() -> None:
    app = App(device=DeviceInfo(device_uuid="d"))
    assert props(app.send("track_event", name="e"), "installation") == {
        "application_id": "default-application",
        "device_id": "d",
        "os_name": "Linux",
        "sdk": "engagement-agent",
        "device_type": "kiosk",
    }


# --------------------------------------------------------------------------------------------
# Events, payments, mapping


def payment_item(**overrides: Any) -> dict[str, Any]:
    return {
        "value": 12.34,
        "currency": "EUR",
        "payment_system": "Virtual",
        "product_id": "handbag",
        "product_title": "Awesome handbag",
        **overrides,
    }


def test_payment() -> None:
    app = installed_app(AppSettings(project=MAIN, default_properties={"store": "S1"}))
    outcome = app.send("track_payment", item=payment_item(), timestamp=T0 - 1)
    assert outcome.items == (
        OutboundItem(
            MAIN,
            "payment",
            {
                "name": "customers/events",
                "data": {
                    "customer_ids": {"cookie": cookie(1)},
                    "event_type": "payment",
                    "timestamp": T0 - 1,
                    "properties": {
                        "store": "S1",
                        **AUTO,
                        **DEVICE_PROPS,
                        "brutto": 12.34,
                        "currency": "EUR",
                        "payment_system": "Virtual",
                        "item_id": "handbag",
                        "product_title": "Awesome handbag",
                    },
                },
            },
        ),
    )
    outcome = app.send("track_payment", item=payment_item(receipt="R-1"))
    assert props(outcome, "payment")["receipt"] == "R-1"


def test_mapping_fans_out_per_category_without_duplicates() -> None:
    settings = AppSettings(
        project=MAIN,
        mapping={
            "payment": (PAY, EU, Project("main-token", "other-auth", "https://api.exponea.com/")),
            "banner": (EU,),
            "install": (PAY,),
        },
    )
    app = App(settings)
    outcome = app.send("track_event", name="banner", properties={"action": "show"})
    assert [(i.project, i.event_type) for i in outcome.items] == [
        (MAIN, "install"),
        (PAY, "install"),
        (MAIN, "banner"),
        (EU, "banner"),
    ]
    assert outcome.items[2].payload == outcome.items[3].payload
    outcome = app.send("track_payment", item=payment_item())
    # The mapped copy of the main project (same key: base URL without the slash) is dropped.
    assert [i.project for i in outcome.items] == [MAIN, PAY, EU]
    assert len({str(i.payload) for i in outcome.items}) == 1
    outcome = app.send("track_event", name="other")
    assert [(i.project, i.event_type) for i in outcome.items] == [(MAIN, "track_event")]


def test_every_category_name() -> None:
    every = {c: (PAY,) for c in ("install", "session_start", "session_end", "track_event")}
    every.update({c: (PAY,) for c in ("track_customer", "payment", "push_token", "banner")})
    app = App(AppSettings(project=MAIN, mapping=every))
    items = [
        *app.send("app_foreground").items,
        *app.send("track_event", name="e").items,
        *app.send("track_event", name="banner").items,
        *app.send("identify_customer", ids={"r": "1"}).items,
        *app.send("track_push_token", token="tok").items,
        *app.send("track_payment", item=payment_item()).items,
        *app.send("app_background").items,
        *app.expire().items,
    ]
    assert [i.event_type for i in items if i.project == PAY] == [
        "install",
        "session_start",
        "track_event",
        "banner",
        "track_customer",
        "push_token",
        "payment",
        "session_end",
    ]
    assert all(i.project in (MAIN, PAY) for i in items)


# --------------------------------------------------------------------------------------------
# Automatic sessions


def test_foreground_background_timeout_ends_session() -> None:
    app = installed_app(AppSettings(project=MAIN, session_timeout=20.0))
    outcome = app.send("app_foreground")
    assert kinds(outcome) == ["session_start"]
    assert app.state is not None and app.state.session == "active"
    assert outcome.timer is None
    app.now = T0 + 65.5
    outcome = app.send("app_background")
    assert outcome.items == ()
    assert outcome.timer == 20.0
    state = app.state  # a fresh name: the state object was replaced by the send
    assert state.session == "background" and state.background_at == T0 + 65.5
    app.now += 20
    outcome = app.expire()
    assert outcome.items == (
        OutboundItem(
            MAIN,
            "session_end",
            {
                "name": "customers/events",
                "data": {
                    "customer_ids": {"cookie": cookie(1)},
                    "event_type": "session_end",
                    "timestamp": T0 + 65.5,
                    "properties": {**AUTO, **DEVICE_PROPS, "duration": 65.5},
                },
            },
        ),
    )
    assert outcome.timer is None
    assert outcome.state.session == "none" and outcome.state.session_started_at is None


def test_return_within_timeout_continues_the_session() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.now += 10
    app.send("app_background")
    app.now += 19.9
    outcome = app.send("app_foreground")
    assert outcome.items == () and outcome.timer is None
    assert app.state is not None and app.state.session == "active"
    assert app.state.session_started_at == T0 and app.state.background_at is None
    # The stale timer then fires: nothing happens.
    assert app.expire(T0 + 10).items == ()
    app.now += 30
    app.send("app_background")
    app.now += 20
    assert props(app.expire(), "session_end")["duration"] == pytest.approx(59.9)


def test_foreground_exactly_at_timeout_starts_a_new_session() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.send("app_background", timestamp=T0 + 5)
    app.now = T0 + 25
    outcome = app.send("app_foreground")
    assert kinds(outcome) == ["session_end", "session_start"]
    assert data(outcome.items[0])["timestamp"] == T0 + 5
    assert data(outcome.items[1])["timestamp"] == T0 + 25


def test_timeout_passed_across_a_restart() -> None:
    """The agent was down when the timer should have fired: pending_timer re-arms it at 0, and
    a foreground that comes first ends the old session before starting the new one."""
    settings = AppSettings(project=MAIN, session_timeout=20.0)
    app = installed_app(settings)
    app.send("app_foreground", app_version="1.0")
    app.now = T0 + 30
    app.send("app_background")
    app.restart()
    assert app.state is not None
    assert pending_timer(app.state, settings, T0 + 35) == 15.0
    assert pending_timer(app.state, settings, T0 + 3600) == 0.0
    app.now = T0 + 3600
    outcome = app.send("app_foreground", app_version="1.1")
    assert kinds(outcome) == ["session_end", "session_start"]
    end, start = unique(outcome.items)
    assert data(end)["timestamp"] == T0 + 30
    assert data(end)["properties"]["duration"] == 30.0
    assert data(end)["properties"]["app_version"] == "1.0"  # the version it ran under
    assert data(start)["timestamp"] == T0 + 3600
    assert data(start)["properties"]["app_version"] == "1.1"
    # The timer armed after the restart fires late: no second session_end.
    assert app.expire(T0 + 30).items == ()


def test_session_open_at_restart_stays_open() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.restart()
    assert app.state is not None
    assert pending_timer(app.state, app.settings, T0 + 1000) is None
    app.now += 10
    assert app.send("app_foreground").items == ()  # within the timeout: the same session
    assert app.state.session == "active"


def test_clock_going_backwards_counts_as_within_timeout() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.now = T0 + 100
    app.send("app_background")
    app.now = T0 - 86400  # NTP corrected the clock by a day
    assert app.send("app_foreground").items == ()
    assert app.state is not None and app.state.session == "active"
    # The session still ends with a non-negative duration, never before it started.
    app.send("app_background")
    end = data(app.expire().items[0])
    assert end["timestamp"] == T0 and end["properties"]["duration"] == 0.0


def test_pending_timer_clamps() -> None:
    settings = AppSettings(project=MAIN, session_timeout=20.0)
    state = AppState(session="background", background_at=T0, session_started_at=T0 - 5)
    assert pending_timer(state, settings, T0) == 20.0
    assert pending_timer(state, settings, T0 + 5) == 15.0
    assert pending_timer(state, settings, T0 + 1e9) == 0.0
    assert pending_timer(state, settings, T0 - 1e9) == 20.0  # clock went backwards
    assert pending_timer(state, settings, 0.0) == 20.0  # booted in 1970 without an RTC
    assert pending_timer(AppState(), settings, T0) is None
    assert pending_timer(None, settings, T0) is None
    assert pending_timer(state.model_copy(update={"session": "active"}), settings, T0) is None


def test_late_background_message_shortens_the_timer() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.now = T0 + 100
    assert app.send("app_background", timestamp=T0 + 95).timer == 15.0
    app.now = T0 + 200
    app.send("app_foreground", timestamp=T0 + 99)
    assert app.state is not None and app.state.session == "active"


def test_events_in_background_keep_the_timer() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.send("app_background")
    app.now += 5
    outcome = app.send("track_event", name="background_sync")
    assert outcome.timer == 15.0
    assert app.state is not None and app.state.session == "background"


def test_expire_is_a_no_op_unless_still_in_the_same_background() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.send("app_background")
    assert app.expire(T0 - 1).items == ()  # not this background
    assert app.state is not None and app.state.session == "background"
    app.send("app_foreground")
    assert app.expire(T0).items == ()
    fresh = expire_session(None, app.settings, DEVICE, app.ctx(), T0)
    assert fresh.items == () and fresh.timer is None


def test_duplicate_foreground_and_background() -> None:
    app = installed_app()
    app.send("app_foreground")
    assert app.send("app_foreground").items == ()
    app.send("app_background")
    app.now += 10
    # A second background keeps the first background time and the remaining timer.
    assert app.send("app_background").timer == 10.0
    assert app.state is not None and app.state.background_at == T0


def test_background_without_session_tracks_nothing() -> None:
    app = installed_app()
    outcome = app.send("app_background")
    assert outcome.items == () and outcome.timer is None


def test_manual_session_commands_refused_in_automatic_mode() -> None:
    app = installed_app()
    app.send("app_foreground")
    before = app.state
    for name in ("track_session_start", "track_session_end"):
        with pytest.raises(InvalidState, match="automatic session tracking"):
            app.send(name)
    assert app.state is before


# --------------------------------------------------------------------------------------------
# Manual sessions


MANUAL = AppSettings(project=MAIN, automatic_session_tracking=False)


def test_manual_session_start_and_end() -> None:
    app = installed_app(MANUAL)
    assert kinds(app.send("track_session_start", timestamp=T0 + 1)) == ["session_start"]
    outcome = app.send("track_session_end", timestamp=T0 + 61)
    assert kinds(outcome) == ["session_end"]
    assert data(outcome.items[0])["timestamp"] == T0 + 61
    assert props(outcome, "session_end") == {**AUTO, **DEVICE_PROPS, "duration": 60.0}
    assert outcome.timer is None


def test_manual_start_auto_closes_an_open_session() -> None:
    app = installed_app(MANUAL)
    app.send("track_session_start")
    app.now += 7
    outcome = app.send("track_session_start")
    assert kinds(outcome) == ["session_end", "session_start"]
    end, start = unique(outcome.items)
    assert data(end)["timestamp"] == data(start)["timestamp"] == T0 + 7
    assert data(end)["properties"]["duration"] == 7.0


def test_manual_end_without_session_is_invalid_state_and_changes_nothing() -> None:
    app = App(MANUAL)
    with pytest.raises(InvalidState, match="without an open session"):
        app.send("track_session_end")
    assert app.state is None  # not even installed
    app.send("track_session_start")
    app.send("track_session_end")
    state = app.state
    with pytest.raises(InvalidState):
        app.send("track_session_end")
    assert app.state is state


def test_manual_end_before_start_has_zero_duration() -> None:
    app = installed_app(MANUAL)
    app.send("track_session_start", timestamp=T0)
    outcome = app.send("track_session_end", timestamp=T0 - 30)
    assert data(outcome.items[0])["timestamp"] == T0
    assert props(outcome, "session_end")["duration"] == 0.0


def test_lifecycle_does_not_drive_manual_sessions() -> None:
    app = installed_app(MANUAL)
    assert app.send("app_foreground").items == ()
    assert app.send("app_background").timer is None
    app.send("track_session_start")
    assert app.send("app_background").items == ()
    assert app.state is not None and app.state.session == "active"


# --------------------------------------------------------------------------------------------
# Push tokens


def token_event(token: str, valid: bool, platform: str = "android") -> dict[str, Any]:
    return {
        "push_notification_token": token,
        "platform": platform,
        "valid": valid,
        "description": "Permission granted" if valid else "Invalidated",
        **AUTO,
    }


def test_push_token_notification_state() -> None:
    app = installed_app(AppSettings(project=MAIN, default_properties={"store": "S1"}))
    app.send("set_default_properties", properties={"shift": "night"})
    outcome = app.send("track_push_token", token="fcm-1")
    assert outcome.items == (
        OutboundItem(
            MAIN,
            "push_token",
            {
                "name": "customers/events",
                "data": {
                    "customer_ids": {"cookie": cookie(1)},
                    "event_type": "notification_state",
                    "timestamp": T0,
                    "properties": token_event("fcm-1", True),
                },
            },
        ),
    )
    assert app.state is not None
    assert app.state.push_token_tracked_at == T0 and app.state.push_token_type == "fcm"
    outcome = app.send("track_hms_push_token", token="hms-1")
    assert kinds(outcome) == ["notification_state", "notification_state"]
    first, second = unique(outcome.items)
    assert data(first)["properties"] == token_event("fcm-1", False)
    assert data(second)["properties"] == token_event("hms-1", True, "huawei")


def test_replaced_token_is_invalidated_first_same_token_is_just_retracked() -> None:
    app = installed_app()
    app.send("track_push_token", token="a")
    outcome = app.send("track_push_token", token="b")
    assert [data(i)["properties"]["push_notification_token"] for i in outcome.items] == ["a", "b"]
    assert [data(i)["properties"]["valid"] for i in outcome.items] == [False, True]
    outcome = app.send("track_push_token", token="b")
    assert [data(i)["properties"] for i in outcome.items] == [token_event("b", True)]


@pytest.mark.parametrize("command", ["app_foreground", "verify_push_token"])
def test_on_token_change_does_not_retrack_the_same_token(command: str) -> None:
    app = installed_app()
    app.send("track_push_token", token="a")
    app.now += 3 * 86400
    assert "notification_state" not in kinds(app.send(command))


@pytest.mark.parametrize("automatic", [True, False])
def test_every_launch_retracks_on_foreground_and_verify(automatic: bool) -> None:
    settings = AppSettings(
        project=MAIN,
        token_track_frequency="every_launch",
        automatic_session_tracking=automatic,
    )
    app = installed_app(settings)
    app.send("track_push_token", token="a")
    app.now += 1
    outcome = app.send("app_foreground")
    assert kinds(outcome)[-1] == "notification_state"
    assert props(outcome, "notification_state") == token_event("a", True)
    assert data(outcome.items[-1])["timestamp"] == T0 + 1
    app.now += 1
    assert kinds(app.send("verify_push_token")) == ["notification_state"]
    assert app.state is not None and app.state.push_token_tracked_at == T0 + 2


def test_daily_retracks_after_24_hours() -> None:
    app = installed_app(AppSettings(project=MAIN, token_track_frequency="daily"))
    app.send("track_push_token", token="a")
    app.now = T0 + 86399
    assert kinds(app.send("verify_push_token")) == []
    app.now = T0 + 86400
    assert kinds(app.send("verify_push_token")) == ["notification_state"]
    app.now += 3600
    assert kinds(app.send("app_foreground")) == ["session_start"]
    app.now += 86400  # a foreground again without background: a relaunch
    assert kinds(app.send("app_foreground")) == [
        "session_end",
        "session_start",
        "notification_state",
    ]


def test_daily_retracks_when_the_clock_went_back_past_the_last_track() -> None:
    app = installed_app(AppSettings(project=MAIN, token_track_frequency="daily"))
    app.send("track_push_token", token="a")
    app.now = T0 - 365 * 86400
    assert kinds(app.send("verify_push_token")) == ["notification_state"]


def test_verify_without_token_tracks_nothing() -> None:
    app = installed_app(AppSettings(project=MAIN, token_track_frequency="every_launch"))
    assert app.send("verify_push_token").items == ()


def test_push_token_customer_property_format() -> None:
    settings = AppSettings(
        project=MAIN,
        push_token_format="customer_property",
        default_properties={"store": "S1"},
    )
    app = installed_app(settings)
    outcome = app.send("track_push_token", token="a")
    assert outcome.items == (
        OutboundItem(
            MAIN,
            "push_token",
            {
                "name": "customers",
                "data": {
                    "customer_ids": {"cookie": cookie(1)},
                    "properties": {"google_push_notification_id": "a"},
                    "update_timestamp": T0,
                },
            },
        ),
    )
    # Same type: the new value overwrites the property, no "" update that could race it.
    outcome = app.send("track_push_token", token="b")
    assert [data(i)["properties"] for i in outcome.items] == [{"google_push_notification_id": "b"}]
    # Another type: the old property is cleared.
    outcome = app.send("track_hms_push_token", token="h")
    assert [data(i)["properties"] for i in outcome.items] == [
        {"google_push_notification_id": ""},
        {"huawei_push_notification_id": "h"},
    ]


# --------------------------------------------------------------------------------------------
# Anonymize


def test_anonymize_during_open_session_with_token() -> None:
    settings = AppSettings(project=MAIN, default_properties={"store": "S1"})
    app = installed_app(settings)
    app.send("identify_customer", ids={"registered": "jane"})
    app.send("set_default_properties", properties={"shift": "night"})
    app.send("track_push_token", token="tok")
    app.send("app_foreground")
    app.now = T0 + 42
    outcome = app.send("anonymize")
    old = {"cookie": cookie(1), "registered": "jane"}
    new = {"cookie": cookie(2)}
    device = {**AUTO, **DEVICE_PROPS}
    assert [
        (i.event_type, data(i)["customer_ids"], data(i)["properties"], data(i)["timestamp"])
        for i in outcome.items
    ] == [
        (
            "session_end",
            old,
            {"store": "S1", "shift": "night", **device, "duration": 42.0},
            T0 + 42,
        ),
        ("push_token", old, token_event("tok", False), T0 + 42),
        # Runtime default properties survive anonymize, as in the SDKs.
        ("install", new, {"store": "S1", "shift": "night", **device}, T0 + 42),
        ("session_start", new, {"store": "S1", "shift": "night", **device}, T0 + 42),
        ("push_token", new, token_event("tok", True), T0 + 42),
    ]
    assert all(i.project == MAIN for i in outcome.items)
    state = app.state
    assert state is not None
    assert state.cookie == cookie(2) and state.ids == {}
    assert state.runtime_default_properties == {"shift": "night"}
    assert state.session == "active" and state.session_started_at == T0 + 42
    assert state.push_token == "tok" and state.push_token_tracked_at == T0 + 42
    assert app.send("get_customer").result == {"ids": new, "project_token": "main-token"}


def test_anonymize_in_background_ends_at_background_time_and_starts_nothing() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.send("app_background", timestamp=T0 + 10)
    app.now = T0 + 15
    outcome = app.send("anonymize")
    assert kinds(outcome) == ["session_end", "installation"]
    assert data(outcome.items[0])["timestamp"] == T0 + 10
    assert outcome.timer is None
    assert app.state is not None and app.state.session == "none"
    # The app comes back: a new session for the new customer.
    app.now = T0 + 16
    outcome = app.send("app_foreground")
    assert kinds(outcome) == ["session_start"]
    assert data(outcome.items[0])["customer_ids"] == {"cookie": cookie(2)}


def test_anonymize_without_session_or_token() -> None:
    app = installed_app()
    assert kinds(app.send("anonymize")) == ["installation"]


def test_anonymize_as_first_command_installs_once() -> None:
    app = App()
    outcome = app.send("anonymize")
    assert kinds(outcome) == ["installation"]
    assert data(outcome.items[0])["customer_ids"] == {"cookie": cookie(1)}


def test_anonymize_after_get_customer_gets_a_new_cookie() -> None:
    app = App()
    app.send("get_customer")
    outcome = app.send("anonymize")
    assert kinds(outcome) == ["installation"]
    assert data(outcome.items[0])["customer_ids"] == {"cookie": cookie(2)}


def test_anonymize_in_manual_mode_leaves_sessions_to_the_app() -> None:
    app = installed_app(MANUAL)
    app.send("app_foreground")
    app.send("track_session_start")
    assert kinds(app.send("anonymize")) == ["installation"]
    assert app.state is not None and app.state.session == "none"
    with pytest.raises(InvalidState):
        app.send("track_session_end")


def test_anonymize_customer_property_format_clears_old_sets_new() -> None:
    app = installed_app(AppSettings(project=MAIN, push_token_format="customer_property"))
    app.send("track_hms_push_token", token="h")
    outcome = app.send("anonymize")
    assert [(data(i)["customer_ids"], data(i)["properties"]) for i in outcome.items] == [
        ({"cookie": cookie(1)}, {"huawei_push_notification_id": ""}),
        ({"cookie": cookie(2)}, {**AUTO, **DEVICE_PROPS}),
        ({"cookie": cookie(2)}, {"huawei_push_notification_id": "h"}),
    ]


# --------------------------------------------------------------------------------------------
# Project switch


SWITCHED = {"project_token": "new-token", "authorization_token": "new-auth"}
#: The anonymize a hostile app sends: a configured token, its own server.
REDIRECT = {"project_token": "main-token", "base_url": "https://attacker.example"}


def switched(settings: AppSettings | None = None) -> App:
    app = installed_app(settings)
    app.send("anonymize", project="new")
    return app


def test_anonymize_with_project_switches_after_the_old_customers_items() -> None:
    settings = AppSettings(
        project=MAIN, mapping={"session_end": (PAY,), "install": (PAY,)}, catalog=CATALOG
    )
    app = installed_app(settings)
    app.send("track_push_token", token="tok")
    app.send("app_foreground")
    outcome = app.send("anonymize", project=SWITCHED)
    assert [(i.event_type, i.project) for i in outcome.items] == [
        ("session_end", MAIN),
        ("session_end", PAY),
        ("push_token", MAIN),
        ("install", NEW),  # a project alone keeps the current mapping
        ("install", PAY),
        ("session_start", NEW),
        ("push_token", NEW),
    ]
    assert app.send("get_customer").result == {
        "ids": {"cookie": cookie(2)},
        "project_token": "new-token",
    }


def test_anonymize_by_name() -> None:
    app = installed_app()
    outcome = app.send("anonymize", project="eu")
    assert [(i.event_type, i.project) for i in outcome.items] == [("install", EU)]


def test_anonymize_object_credentials_are_ignored() -> None:
    """An object selects a configured project by token and URL; the config's key is sent."""
    app = installed_app()
    outcome = app.send(
        "anonymize", project={"project_token": "new-token", "authorization_token": "other-key"}
    )
    assert [i.project for i in outcome.items] == [NEW]
    assert outcome.items[0].project.authorization_token == "new-auth"
    outcome = app.send("anonymize", project={"project_token": "pay-token"})  # no key at all
    assert [i.project for i in outcome.items] == [PAY]


def test_anonymize_with_project_and_mapping() -> None:
    app = installed_app()
    outcome = app.send(
        "anonymize",
        project=SWITCHED,
        mapping={
            "install": [
                "new",
                {"project_token": "eu-token", "base_url": "https://api.eu1.exponea.com/"},
            ]
        },
    )
    assert [(i.event_type, i.project) for i in outcome.items] == [
        ("install", NEW),
        ("install", EU),
    ]


def test_anonymize_with_mapping_only_keeps_the_current_project() -> None:
    app = installed_app(AppSettings(project=MAIN, mapping={"payment": (PAY,)}, catalog=CATALOG))
    outcome = app.send("anonymize", mapping={"install": ["eu"]})
    assert [i.project for i in outcome.items] == [MAIN, EU]
    assert [i.project for i in app.send("track_payment", item=payment_item()).items] == [MAIN]
    # The current project is the switched one once an anonymize chose it.
    app.send("anonymize", project="new")
    outcome = app.send("anonymize", mapping={"install": ["pay"]})
    assert [i.project for i in outcome.items] == [NEW, PAY]


def test_anonymize_without_arguments_stays_on_the_current_project_and_mapping() -> None:
    app = installed_app()
    app.send("anonymize", project="new", mapping={"track_event": ["eu"]})
    outcome = app.send("anonymize")
    assert [(i.event_type, i.project) for i in outcome.items] == [("install", NEW)]
    assert [i.project for i in app.send("track_event", name="e").items] == [NEW, EU]


def test_empty_mapping_clears_the_mapping() -> None:
    app = installed_app(AppSettings(project=MAIN, mapping={"payment": (PAY,)}, catalog=CATALOG))
    app.send("anonymize", mapping={})
    assert [i.project for i in app.send("track_payment", item=payment_item()).items] == [MAIN]
    assert app.state is not None and app.state.project_switch is not None
    assert app.state.project_switch.mapping == {}


def test_choosing_the_config_routing_is_no_switch() -> None:
    app = switched()
    app.send("anonymize", project="default")
    assert app.state is not None and app.state.project_switch is None
    assert [i.project for i in app.send("track_event", name="e").items] == [MAIN]


@pytest.mark.parametrize(
    "fields",
    [
        {"project": REDIRECT},
        {"project": {**REDIRECT, "authorization_token": "main-auth"}},
        {"project": {"project_token": "unknown-token"}},
        {"project": "unknown"},
        {"project": "main-token"},  # a token is not a name
        {"mapping": {"track_event": ["pay", REDIRECT]}},
        {"mapping": {"install": ["nobody"]}},
        {"project": "new", "mapping": {"payment": [REDIRECT]}},
    ],
)
def test_anonymize_to_an_unconfigured_project_is_forbidden_and_changes_nothing(
    fields: dict[str, Any],
) -> None:
    app = switched()
    app.send("identify_customer", ids={"registered": "jane"})
    app.send("track_push_token", token="tok")
    app.send("app_foreground")
    before = app.state
    with pytest.raises(Forbidden, match=r"^project not configured"):
        app.send("anonymize", **fields)
    assert app.state is before
    assert app.send("get_customer").result == {
        "ids": {"cookie": cookie(2), "registered": "jane"},
        "project_token": "new-token",
    }


def test_apps_projects_narrow_what_an_app_may_choose() -> None:
    narrowed = replace(CATALOG, allowed=frozenset({PAY.key}))
    app = installed_app(AppSettings(project=MAIN, catalog=narrowed))
    for fields in ({"project": "eu"}, {"mapping": {"install": ["new"]}}, {"project": SWITCHED}):
        before = app.state
        with pytest.raises(Forbidden, match=r"^project not allowed for this app"):
            app.send("anonymize", **fields)
        assert app.state is before
    assert [i.project for i in app.send("anonymize", project="pay").items] == [PAY]
    # The project the config gives the app is always allowed.
    outcome = app.send("anonymize", project="default", mapping={"install": ["pay"]})
    assert [i.project for i in outcome.items] == [MAIN, PAY]


def test_the_projects_the_config_sends_to_are_always_allowed() -> None:
    narrowed = replace(CATALOG, allowed=frozenset({NEW.key}))
    app = installed_app(AppSettings(project=MAIN, mapping={"payment": (EU,)}, catalog=narrowed))
    # A project alone keeps the config's mapping, whose project the list does not name.
    app.send("anonymize", project="new")
    assert [i.project for i in app.send("track_payment", item=payment_item()).items] == [NEW, EU]
    outcome = app.send("anonymize", mapping={"install": ["eu", "default"]})
    assert [i.project for i in outcome.items] == [NEW, EU, MAIN]
    with pytest.raises(Forbidden):
        app.send("anonymize", mapping={"install": ["pay"]})


def test_the_apps_own_project_is_allowed_without_a_catalog() -> None:
    app = installed_app(AppSettings(project=EU))
    outcome = app.send("anonymize", project={"project_token": "eu-token", "base_url": EU.base_url})
    assert [i.project for i in outcome.items] == [EU]
    with pytest.raises(Forbidden):
        app.send("anonymize", project="default")


def test_switch_persists_across_restart_until_next_anonymize() -> None:
    app = switched()
    app.restart()
    assert [i.project for i in app.send("track_event", name="e").items] == [NEW]
    outcome = app.send("anonymize", project="default")
    assert [(i.event_type, i.project) for i in outcome.items] == [("install", MAIN)]
    assert app.state is not None and app.state.project_switch is None


def test_switch_is_stored_without_credentials() -> None:
    app = installed_app()
    app.send("anonymize", project=SWITCHED, mapping={"payment": ["pay", "eu"]})
    stored = app.state.model_dump_json() if app.state is not None else ""
    for key in ("main-auth", "new-auth", "pay-auth", "eu-auth"):
        assert key not in stored
    # The credentials the items carry are always the current config's.
    app.settings = replace(
        app.settings,
        catalog=replace(
            CATALOG, configured={**CATALOG.configured, NEW.key: Project("new-token", "rotated")}
        ),
    )
    (item,) = app.send("track_event", name="e").items
    assert item.project.authorization_token == "rotated"


def test_a_switch_stored_with_a_credential_by_an_older_version_loses_it() -> None:
    old = {
        "cookie": cookie(1),
        "installed": True,
        "project_switch": {
            "project_token": "new-token",
            "authorization_token": "new-auth",
            "base_url": "https://api.exponea.com",
            "mapping": {
                "payment": [
                    {
                        "project_token": "pay-token",
                        "authorization_token": "pay-auth",
                        "base_url": "https://api.exponea.com",
                    }
                ]
            },
        },
    }
    app = installed_app()
    assert app.state is not None
    state = AppState.model_validate(old)
    app.state = state.model_copy(
        update={
            "project_switch": state.project_switch.model_copy(
                update={"config_fingerprint": config_fingerprint(app.settings)}
            )
            if state.project_switch is not None
            else None
        }
    )
    assert "auth" not in app.state.model_dump_json()
    items = app.send("track_payment", item=payment_item()).items
    assert [i.project for i in items] == [NEW, PAY]


@pytest.mark.parametrize(
    "catalog",
    [
        ProjectCatalog(named={"default": MAIN}, configured={MAIN.key: MAIN}),  # removed
        replace(CATALOG, allowed=frozenset({PAY.key})),  # left out of apps.<app>.projects
    ],
)
def test_a_switch_ends_when_the_config_no_longer_allows_its_projects(
    catalog: ProjectCatalog,
) -> None:
    app = installed_app()
    app.send("anonymize", mapping={"track_event": ["new"]})
    app.settings = replace(app.settings, catalog=catalog)
    assert [i.project for i in app.send("track_event", name="e").items] == [MAIN]
    assert app.state is not None and app.state.project_switch is None


def test_a_switch_an_older_version_made_to_any_project_is_void() -> None:
    app = installed_app()
    assert app.state is not None
    rogue = ProjectSwitch(
        project_token="main-token",
        base_url="https://attacker.example",
        config_fingerprint=config_fingerprint(app.settings),
    )
    app.state = app.state.model_copy(update={"project_switch": rogue})
    assert [i.project for i in app.send("track_event", name="e").items] == [MAIN]


def test_config_project_change_ends_the_switch() -> None:
    app = switched()
    # Credentials fixed for the same project: the switch stays.
    app.settings = AppSettings(project=Project("main-token", "fixed-auth"), catalog=CATALOG)
    assert [i.project for i in app.send("track_event", name="e").items] == [NEW]
    # The operator points the app at another project: the config wins from now on.
    app.settings = AppSettings(project=EU, catalog=CATALOG)
    assert [i.project for i in app.send("track_event", name="e").items] == [EU]
    assert app.state is not None and app.state.project_switch is None
    # Going back to the old config does not resurrect the switch.
    app.settings = AppSettings(project=MAIN, catalog=CATALOG)
    assert [i.project for i in app.send("track_event", name="e").items] == [MAIN]


def test_config_mapping_change_ends_the_switch() -> None:
    app = switched()
    app.settings = AppSettings(project=MAIN, mapping={"track_event": (PAY,)}, catalog=CATALOG)
    assert app.send("get_customer").result == {
        "ids": {"cookie": cookie(2)},
        "project_token": "main-token",
    }
    assert [i.project for i in app.send("track_event", name="e").items] == [MAIN, PAY]


def test_config_change_ends_the_switch_for_a_pending_session_end() -> None:
    app = switched()
    app.send("app_foreground")
    app.send("app_background")
    app.settings = AppSettings(project=EU, catalog=CATALOG)
    assert [i.project for i in app.expire().items] == [EU]


# --------------------------------------------------------------------------------------------
# Relaunch: a foreground while already in the foreground


def test_relaunch_after_a_silent_timeout_ends_the_session_at_the_last_command() -> None:
    app = installed_app(AppSettings(project=MAIN, session_timeout=20.0))
    app.send("app_foreground")
    app.now = T0 + 5
    app.send("track_event", name="tap", timestamp=T0 + 7)  # its own time counts
    app.now = T0 + 9
    app.send("get_customer")  # queries do not count
    app.restart()  # the agent may restart in between: the rule needs only the state
    app.now = T0 + 27
    outcome = app.send("app_foreground")
    assert kinds(outcome) == ["session_end", "session_start"]
    end, start = unique(outcome.items)
    assert data(end)["timestamp"] == T0 + 7
    assert data(end)["properties"]["duration"] == 7.0
    assert data(start)["timestamp"] == T0 + 27
    assert app.state is not None and app.state.session_started_at == T0 + 27


def test_relaunch_uses_the_accept_time_of_a_command_without_timestamp() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.now = T0 + 3
    app.send("identify_customer", ids={"registered": "jane"})
    app.now = T0 + 30
    outcome = app.send("app_foreground", timestamp=T0 + 23)  # measured to its own time
    end, start = unique(outcome.items)
    assert (data(end)["timestamp"], data(end)["properties"]["duration"]) == (T0 + 3, 3.0)
    assert data(start)["timestamp"] == T0 + 23


def test_relaunch_within_the_timeout_continues_the_session() -> None:
    app = installed_app()
    app.send("app_foreground")
    app.now = T0 + 15
    app.send("track_event", name="tap")
    app.now = T0 + 34.9  # 19.9 s after the last command, though 34.9 s after the start
    assert app.send("app_foreground").items == ()
    assert app.state is not None and app.state.session_started_at == T0


def test_relaunch_stamped_before_the_start_has_zero_duration() -> None:
    app = installed_app()
    app.send("app_foreground", timestamp=T0 + 50)
    app.send("track_event", name="late", timestamp=T0 + 10)
    app.now = T0 + 100
    end = unique(app.send("app_foreground").items)[0]
    assert data(end)["timestamp"] == T0 + 50 and data(end)["properties"]["duration"] == 0.0


def test_relaunch_does_not_touch_manual_sessions() -> None:
    app = installed_app(MANUAL)
    app.send("app_foreground")
    app.send("track_session_start")
    app.now = T0 + 1000
    assert app.send("app_foreground").items == ()
    assert app.state is not None and app.state.session == "active"


def test_relaunch_verifies_the_token_for_the_new_session() -> None:
    app = installed_app(AppSettings(project=MAIN, token_track_frequency="every_launch"))
    app.send("track_push_token", token="tok")
    app.send("app_foreground")
    app.now = T0 + 60
    assert kinds(app.send("app_foreground")) == [
        "session_end",
        "session_start",
        "notification_state",
    ]


def test_the_last_command_is_remembered_only_in_the_foreground() -> None:
    """An app that never reports its lifecycle costs no state write per event."""
    app = installed_app()
    before = app.state
    app.now = T0 + 5
    app.send("track_event", name="tap")
    assert app.state == before
    app.send("app_foreground")
    app.now = T0 + 9
    app.send("track_event", name="tap")
    assert app.state is not None and app.state.last_command_at == T0 + 9


# --------------------------------------------------------------------------------------------
# App version


def test_first_app_version_is_stored_without_retracking_the_token() -> None:
    app = installed_app()
    app.send("track_push_token", token="tok")
    assert kinds(app.send("app_foreground", app_version="1.0")) == ["session_start"]
    assert app.state is not None and app.state.app_version == "1.0"


@pytest.mark.parametrize("frequency", ["on_token_change", "daily", "every_launch"])
def test_a_new_app_version_retracks_the_token_whatever_the_frequency(frequency: str) -> None:
    settings = AppSettings(project=MAIN, token_track_frequency=frequency)  # type: ignore[arg-type]
    app = installed_app(settings)
    app.send("track_push_token", token="tok")
    app.send("app_foreground", app_version="1.0")
    app.send("app_background")
    app.now = T0 + 5
    outcome = app.send("app_foreground", app_version="1.1")
    assert kinds(outcome) == ["notification_state"]  # once, even for every_launch
    assert props(outcome, "notification_state") == token_event("tok", True)
    assert app.state is not None and app.state.push_token_tracked_at == T0 + 5
    app.send("app_background")
    # The same version again is no change.
    expected = ["notification_state"] if frequency == "every_launch" else []
    assert kinds(app.send("app_foreground", app_version="1.1")) == expected


def test_a_new_app_version_without_a_token_tracks_nothing() -> None:
    app = installed_app()
    app.send("app_foreground", app_version="1.0")
    app.send("app_background")
    assert app.send("app_foreground", app_version="2.0").items == ()


# --------------------------------------------------------------------------------------------
# Apps and errors


def test_apps_are_independent() -> None:
    kiosk = App(AppSettings(project=MAIN, session_timeout=5.0))
    ui = App(AppSettings(project=EU, automatic_session_tracking=False))
    kiosk.send("app_foreground")
    ui.send("identify_customer", ids={"registered": "x"})
    assert kiosk.state is not None and ui.state is not None
    assert kiosk.state.ids == {} and ui.state.ids == {"registered": "x"}
    assert ui.state.session == "none"
    assert kiosk.send("app_background").timer == 5.0
    assert ui.send("app_background").timer is None
    assert [i.project for i in ui.send("track_event", name="e").items] == [EU]


def test_query_commands_are_not_handled_here() -> None:
    with pytest.raises(TypeError):
        handle(
            validate_command({"command": "status"}),
            None,
            AppSettings(project=MAIN),
            DEVICE,
            Context(now=T0, new_uuid=lambda: "x"),
        )


def test_input_state_is_never_mutated() -> None:
    app = installed_app()
    app.send("identify_customer", ids={"a": "1"})
    app.send("set_default_properties", properties={"p": {"nested": [1]}})
    assert app.state is not None
    before = app.state.model_dump_json()
    state = app.state
    app.send("identify_customer", ids={"b": "2"})
    app.send("set_default_properties", properties={"q": 1})
    app.send("anonymize", project=SWITCHED)
    assert state.model_dump_json() == before
