"""Property tests: random command sequences (sessions x relaunches x anonymize x project
choices x token frequency x app versions x restarts x clock jumps x config changes) driven
through the core like the daemon would, checking the invariants a user relies on after every
step and over the whole stream of items."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.commands import validate_command
from agent.errors import Forbidden, InvalidState
from agent.tracker import (
    AppSettings,
    AppState,
    Context,
    DeviceInfo,
    OutboundItem,
    Outcome,
    config_fingerprint,
    expire_session,
    handle,
    pending_timer,
)
from agent.tracker.routing import current_state, routing
from tests.unit.test_tracker import CATALOG, EU, MAIN, NEW, PAY, T0

DEVICE = DeviceInfo(device_uuid="device-uuid", os_version="12", sdk_version="0.1.0")
DEFAULT_KEYS = {"config_default", "runtime_default"}

Action = tuple[Any, ...]

foreground = st.builds(
    lambda version, offset: {
        "command": "app_foreground",
        **({"app_version": version} if version is not None else {}),
        **({"timestamp_offset": offset} if offset is not None else {}),
    },
    st.sampled_from([None, "", "1.0", "2.0"]),
    st.sampled_from([None, -5.0, 0.0]),
)
background = st.builds(
    lambda offset: {
        "command": "app_background",
        **({"timestamp_offset": offset} if offset is not None else {}),
    },
    st.sampled_from([None, -30.0, -5.0, 0.0]),
)
push_token = st.builds(
    lambda name, token: {"command": name, "token": token},
    st.sampled_from(["track_push_token", "track_hms_push_token"]),
    st.sampled_from(["tok-a", "tok-b"]),
)
#: A hostile app's redirect: a configured token, its own server.
REDIRECT = {"project_token": "main-token", "base_url": "https://attacker.example"}
anonymize: st.SearchStrategy[dict[str, Any]] = st.sampled_from(
    [
        {"command": "anonymize"},
        {
            "command": "anonymize",
            "project": {"project_token": "new-token", "authorization_token": "a"},
        },
        {"command": "anonymize", "project": "eu"},
        {"command": "anonymize", "project": "default"},
        {"command": "anonymize", "mapping": {"install": ["pay", {"project_token": "eu-token"}]}},
        {"command": "anonymize", "mapping": {}},
        {"command": "anonymize", "project": "new", "mapping": {"track_event": ["pay"]}},
        # Forbidden: not configured at all, or not among the app's projects when narrowed.
        {"command": "anonymize", "project": REDIRECT},
        {"command": "anonymize", "project": "unknown"},
        {"command": "anonymize", "mapping": {"session_end": ["pay", REDIRECT]}},
    ]
)
others = st.one_of(
    st.builds(
        lambda name: {"command": "track_event", "name": name, "properties": {"p": 1}},
        st.sampled_from(["screen", "banner"]),
    ),
    st.builds(
        lambda value: {"command": "identify_customer", "ids": {"registered": value}},
        st.sampled_from(["jane", "joe"]),
    ),
    st.just(
        {
            "command": "track_payment",
            "item": {
                "value": 1.5,
                "currency": "EUR",
                "payment_system": "s",
                "product_id": "p",
                "product_title": "P",
            },
        }
    ),
    st.builds(
        lambda props: {"command": "set_default_properties", "properties": props},
        st.sampled_from([{}, {"runtime_default": 1}]),
    ),
    st.sampled_from(
        [
            {"command": "verify_push_token"},
            {"command": "track_session_start"},
            {"command": "track_session_end"},
            {"command": "get_customer"},
        ]
    ),
)


def _command(strategy: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Action]:
    return strategy.map(lambda document: ("command", document))


# Weighted towards what makes rules interact: the screen coming and going, tokens, anonymize
# and time passing (including the clock jumping back), with restarts and config reloads.
actions: st.SearchStrategy[Action] = st.one_of(
    _command(foreground),
    _command(background),
    _command(foreground),
    _command(background),
    _command(push_token),
    _command(anonymize),
    _command(others),
    _command(others),
    st.sampled_from([0.5, 5.0, 19.9, 20.0, 25.0, 3600.0, 86400.0, 90000.0, -30.0, -172800.0]).map(
        lambda seconds: ("advance", seconds)
    ),
    st.sampled_from([5.0, 25.0, 86400.0, -172800.0]).map(lambda seconds: ("advance", seconds)),
    st.just(("fire_timer",)),
    st.sampled_from([-1.0, 0.0, 1.0]).map(lambda delta: ("stray_timer", delta)),
    st.just(("restart",)),
    st.just(("reconfigure",)),
    # The app comes back after a crash (maybe updated): time passes, then a foreground that
    # may find it still in the foreground.
    st.tuples(
        st.just("relaunch"),
        st.sampled_from([0.5, 19.9, 20.0, 21.0, 3600.0]),
        st.sampled_from([None, "1.0", "3.0"]),
    ),
)

app_settings = st.builds(
    lambda automatic, frequency, token_format, timeout, mapped, allow, narrowed: AppSettings(
        project=MAIN,
        mapping={"session_end": (PAY,), "push_token": (PAY, MAIN)} if mapped else {},
        # apps.<app>.projects = ["new", "pay"] when narrowed.
        catalog=replace(CATALOG, allowed=frozenset({NEW.key, PAY.key}) if narrowed else None),
        session_timeout=timeout,
        automatic_session_tracking=automatic,
        token_track_frequency=frequency,
        push_token_format=token_format,
        allow_default_customer_properties=allow,
        default_properties={"config_default": 1},
    ),
    st.booleans(),
    st.sampled_from(["on_token_change", "every_launch", "daily"]),
    st.sampled_from(["notification_state", "customer_property"]),
    st.sampled_from([1.0, 20.0]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)


@dataclass
class Daemon:
    """Just enough of the daemon: carries state, the clock and the one armed timer."""

    settings: AppSettings
    now: float = T0
    state: AppState | None = None
    timer: tuple[float, float] | None = None  # (deadline, background_at)
    log: list[tuple[str, OutboundItem]] = field(default_factory=list)  # (command, item)
    uuids: count[int] = field(default_factory=lambda: count(1))
    #: The app's last tracking command's time, kept here independently of the core.
    last_command_at: float | None = None

    def ctx(self) -> Context:
        return Context(now=self.now, new_uuid=lambda: f"{next(self.uuids):08X}-AAAA-4AAA-8AAA-A")

    def apply(self, label: str, outcome: Outcome) -> None:
        self.state = outcome.state
        self.log.extend((label, item) for item in outcome.items)
        check_outcome(self, outcome)
        if outcome.timer is None:
            self.timer = None
        else:
            assert outcome.state.background_at is not None
            self.timer = (self.now + outcome.timer, outcome.state.background_at)


def data(item: OutboundItem) -> dict[str, Any]:
    return dict(item.payload["data"])


def kind(item: OutboundItem) -> str:
    return str(data(item).get("event_type", "customers"))


def unique(items: tuple[OutboundItem, ...]) -> list[OutboundItem]:
    return [item for i, item in enumerate(items) if i == 0 or item.payload != items[i - 1].payload]


def check_state(state: AppState, app: AppSettings) -> None:
    assert (state.session == "none") == (state.session_started_at is None)
    assert (state.session == "background") == (state.background_at is not None)
    if not app.automatic_session_tracking:
        assert state.session != "background"
    assert state.cookie is None or state.cookie == state.cookie.lower()
    assert (state.push_token is None) == (state.push_token_type is None)


def check_outcome(daemon: Daemon, outcome: Outcome) -> None:
    app = daemon.settings
    state = outcome.state
    check_state(state, app)
    # The timer is wanted exactly while a session waits in background, and is never negative
    # or longer than one timeout, whatever the clock did.
    if state.session == "background":
        assert outcome.timer is not None and 0.0 <= outcome.timer <= app.session_timeout
    else:
        assert outcome.timer is None
    for item in outcome.items:
        payload = data(item)
        assert "cookie" in payload["customer_ids"]
        if item.event_type == "push_token":
            assert not DEFAULT_KEYS & set(payload["properties"])
        if item.payload["name"] == "customers/events":
            assert payload["timestamp"] > 0
            assert payload["properties"]["device_id"] == DEVICE.device_uuid
            assert "application_id" in payload["properties"]
        elif item.event_type == "track_customer" and not app.allow_default_customer_properties:
            assert not DEFAULT_KEYS & set(payload["properties"])
    # Fan-out: one copy per project, never twice to the same project.
    for payload_items in _group(outcome.items):
        keys = [i.project.key for i in payload_items]
        assert len(keys) == len(set(keys))


def _group(items: tuple[OutboundItem, ...]) -> list[list[OutboundItem]]:
    groups: list[list[OutboundItem]] = []
    for item in items:
        if groups and groups[-1][0].payload == item.payload:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def run_command(daemon: Daemon, document: dict[str, Any]) -> None:
    document = dict(document)
    offset = document.pop("timestamp_offset", None)
    if offset is not None:
        document["timestamp"] = daemon.now + offset
    command = validate_command(document)
    before = daemon.state
    dumped = before.model_dump_json() if before is not None else None
    app = daemon.settings
    try:
        outcome = handle(command, before, app, DEVICE, daemon.ctx())
    except InvalidState:
        # A refused command changes nothing (and may only be a manual session command).
        assert document["command"] in ("track_session_start", "track_session_end")
        assert (before.model_dump_json() if before is not None else None) == dumped
        return
    except Forbidden:
        # Only a project the app may not use is refused, and nothing changes.
        assert document["command"] == "anonymize" and not may_use(document, app)
        assert (before.model_dump_json() if before is not None else None) == dumped
        event("anonymize forbidden")
        return
    if document["command"] == "anonymize":
        assert may_use(document, app)
    name = document["command"]
    if name in ("track_session_start", "track_session_end"):
        assert not app.automatic_session_tracking
    items = unique(outcome.items)
    cookie_after = outcome.state.cookie
    if name == "anonymize":
        # Old customer's items first, then everything as the new customer.
        install = [kind(i) for i in items].index("installation")
        assert all(data(i)["customer_ids"]["cookie"] == cookie_after for i in items[install:])
        old = before.cookie if before is not None else None
        assert all(data(i)["customer_ids"]["cookie"] == old for i in items[:install])
        assert cookie_after != old
        assert outcome.state.ids == {}
        # Runtime defaults survive anonymize, as in the SDKs.
        kept = before.runtime_default_properties if before is not None else {}
        assert outcome.state.runtime_default_properties == kept
        check_anonymize_routing(before, outcome, app, document)
    else:
        assert all(data(i)["customer_ids"]["cookie"] == cookie_after for i in items)
    # Routing: every payload goes first to the app's project, which is the config's unless a
    # switch made under the current config is in force.
    switch = outcome.state.project_switch
    if switch is not None:
        assert switch.config_fingerprint == config_fingerprint(app)
        # Every project of a switch is one this app may use.
        targets = [switch, *(t for entries in switch.mapping.values() for t in entries)]
        assert all(usable((t.base_url, t.project_token), app) for t in targets)
    if name != "anonymize":
        main = switch.project_token if switch is not None else app.project.project_token
        assert all(group[0].project.project_token == main for group in _group(outcome.items))
    if name == "get_customer":
        assert outcome.items == ()
        assert outcome.result is not None and outcome.result["ids"]["cookie"] == cookie_after
    if name in ("verify_push_token", "app_foreground"):
        check_token_frequency(before, outcome, app, daemon.now, document)
    if name == "anonymize" and before is not None:
        event(f"anonymize: session {before.session}, token {before.push_token is not None}")
    if name == "app_foreground" and before is not None and before.session == "background":
        ended = any(kind(i) == "session_end" for i in items)
        event(f"foreground from background: {'timed out' if ended else 'resumed'}")
    if before is not None and before.project_switch is not None and switch is None:
        event("switch ended by a config change")
    if name in ("app_foreground", "app_background") and not app.automatic_session_tracking:
        assert not {"session_start", "session_end"} & {kind(i) for i in items}
    if app.automatic_session_tracking:
        # Automatic sessions follow the screen: a foreground leaves a running session, and a
        # session only ever starts for an app that is on screen.
        if name == "app_foreground":
            assert outcome.state.session == "active" and outcome.state.in_foreground
        if "session_start" in {kind(i) for i in items}:
            assert outcome.state.in_foreground
        if name == "anonymize" and before is not None and before.session != "none":
            assert kind(items[0]) == "session_end"
            assert data(items[0])["customer_ids"]["cookie"] == before.cookie
        if name == "app_foreground" and before is not None and before.session == "background":
            assert before.background_at is not None
            if document.get("timestamp", daemon.now) - before.background_at < app.session_timeout:
                # Back within the timeout, or the clock went backwards: the session goes on.
                assert not [i for i in items if kind(i).startswith("session_")]
    if name == "app_foreground" and app.automatic_session_tracking and before is not None:
        check_relaunch(before, items, app, daemon, document.get("timestamp", daemon.now))
    if name == "anonymize" and before is not None and before.push_token is not None:
        # The token leaves the old customer (invalidated) and follows the new one.
        tokens = [i for i in items if i.event_type == "push_token"]
        assert [data(i)["customer_ids"]["cookie"] for i in tokens] == [before.cookie, cookie_after]
        assert [token_value(i) for i in tokens] == [None, before.push_token]
    daemon.apply(name, outcome)
    if name != "get_customer":
        daemon.last_command_at = document.get("timestamp", daemon.now)


def token_value(item: OutboundItem) -> str | None:
    """The token an item gives the customer; None for an invalidation."""
    properties = data(item)["properties"]
    if "push_notification_token" in properties:
        return properties["push_notification_token"] if properties["valid"] else None
    (value,) = properties.values()
    return str(value) or None


def key_of(ref: Any) -> tuple[str, str] | None:
    """The configured project a reference names, by key; None when it names none."""
    if isinstance(ref, str):
        named = CATALOG.named.get(ref)
        return named.key if named is not None else None
    key = (ref.get("base_url", "https://api.exponea.com").rstrip("/"), ref["project_token"])
    return key if key in CATALOG.configured else None


def may_use(document: dict[str, Any], app: AppSettings) -> bool:
    """The rule written out independently of the core: configured, and allowed for this app
    (the projects its config sends to always)."""
    refs = [document["project"]] if "project" in document else []
    for entries in document.get("mapping", {}).values():
        refs.extend(entries)
    return all(usable(key_of(ref), app) for ref in refs)


def usable(key: tuple[str, str] | None, app: AppSettings) -> bool:
    own = {app.project.key, *(p.key for projects in app.mapping.values() for p in projects)}
    if key in own:
        return True
    allowed = app.catalog.allowed
    return key in CATALOG.configured and (allowed is None or key in allowed)


def mapping_keys(mapping: Any) -> dict[str, list[tuple[str, str]]]:
    return {c: [p.key for p in projects] for c, projects in mapping.items() if projects}


def check_anonymize_routing(
    before: AppState | None, outcome: Outcome, app: AppSettings, document: dict[str, Any]
) -> None:
    """No project keeps the current project, no mapping the current mapping (a switch made
    earlier included); a given one replaces it; the old customer's items used the old ones."""
    old_project, old_mapping = routing(current_state(before, app), app)
    new_project, new_mapping = routing(outcome.state, app)
    if "project" in document:
        assert new_project.key == key_of(document["project"])
    else:
        assert new_project.key == old_project.key
    if "mapping" in document:
        expected = {
            category: [key_of(ref) for ref in refs]
            for category, refs in document["mapping"].items()
            if refs
        }
        assert mapping_keys(new_mapping) == expected
    else:
        assert mapping_keys(new_mapping) == mapping_keys(old_mapping)
    groups = _group(outcome.items)
    install = [kind(group[0]) for group in groups].index("installation")
    assert all(group[0].project.key == old_project.key for group in groups[:install])
    assert all(group[0].project.key == new_project.key for group in groups[install:])


def check_relaunch(
    before: AppState, items: list[OutboundItem], app: AppSettings, daemon: Daemon, at: float
) -> None:
    """A foreground while already in the foreground: after a silent timeout the old session
    ends at the app's last tracking command and a new one starts; otherwise it continues."""
    if not (before.in_foreground and before.session == "active"):
        return
    sessions = [i for i in items if kind(i).startswith("session_")]
    last = daemon.last_command_at
    assert last is not None
    if at - last >= app.session_timeout:
        assert [kind(i) for i in sessions] == ["session_end", "session_start"]
        assert before.session_started_at is not None
        end = max(last, before.session_started_at)
        assert data(sessions[0])["timestamp"] == end
        assert data(sessions[1])["timestamp"] == at
        event("relaunch: stale session ended")
    else:
        assert sessions == []
        event("relaunch: session continues")


def check_token_frequency(
    before: AppState | None,
    outcome: Outcome,
    app: AppSettings,
    now: float,
    document: dict[str, Any],
) -> None:
    tokens = [i for i in unique(outcome.items) if i.event_type == "push_token"]
    if before is None or before.push_token is None:
        assert tokens == []
        return
    version = document.get("app_version")
    foreground = document["command"] == "app_foreground"
    if foreground and before.app_version and version and version != before.app_version:
        # A new app version re-tracks the token once, whatever the frequency.
        assert [token_value(i) for i in tokens] == [before.push_token]
        event("app version changed: token re-tracked")
        return
    if app.token_track_frequency == "on_token_change":
        assert tokens == []
    elif app.token_track_frequency == "every_launch":
        assert len(tokens) == 1
    else:
        at = document.get("timestamp", now)
        assert before.push_token_tracked_at is not None
        elapsed = at - before.push_token_tracked_at
        event(f"daily: {'due' if elapsed >= 86400 else 'clock back' if elapsed < 0 else 'not due'}")
        assert len(tokens) == (1 if elapsed >= 86400 or elapsed < 0 else 0)


def check_stream(
    log: list[tuple[str, OutboundItem]], current_cookie: str | None, automatic: bool
) -> None:
    """Over everything queued: one installation per customer, first; sessions well formed;
    in automatic mode a customer replaced by anonymize has no session left open."""
    seen: dict[str, list[OutboundItem]] = defaultdict(list)
    previous: OutboundItem | None = None
    for _, item in log:
        if previous is not None and item.payload == previous.payload:
            continue  # another project's copy
        previous = item
        seen[data(item)["customer_ids"]["cookie"]].append(item)
    for cookie, items in seen.items():
        kinds = [kind(i) for i in items]
        if kinds:
            assert kinds[0] == "installation"
            assert kinds.count("installation") == 1
        open_start: float | None = None
        for item in items:
            if kind(item) == "session_start":
                assert open_start is None, "a session started while one was open"
                open_start = data(item)["timestamp"]
            elif kind(item) == "session_end":
                assert open_start is not None, "session_end without session_start"
                end = data(item)["timestamp"]
                duration = data(item)["properties"]["duration"]
                assert duration >= 0 and end >= open_start
                assert math.isclose(duration, end - open_start, abs_tol=1e-6)
                open_start = None
        if automatic and cookie != current_cookie:
            assert open_start is None, "anonymize left the old customer's session open"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(app=app_settings, steps=st.lists(actions, min_size=25, max_size=80))
def test_random_sequences_keep_the_invariants(app: AppSettings, steps: list[Action]) -> None:
    daemon = Daemon(settings=app)
    for step in steps:
        if step[0] == "command":
            run_command(daemon, step[1])
        elif step[0] == "advance":
            daemon.now = max(daemon.now + step[1], 1.0)
        elif step[0] == "fire_timer" and daemon.timer is not None and daemon.state is not None:
            deadline, background_at = daemon.timer
            daemon.now = max(daemon.now, deadline)
            outcome = expire_session(daemon.state, app, DEVICE, daemon.ctx(), background_at)
            assert [kind(i) for i in unique(outcome.items)] == ["session_end"]
            assert data(outcome.items[0])["timestamp"] >= 0
            daemon.apply("expire", outcome)
        elif step[0] == "stray_timer" and daemon.state is not None:
            at = (daemon.state.background_at or daemon.now) + step[1]
            current = daemon.state.background_at
            outcome = expire_session(daemon.state, app, DEVICE, daemon.ctx(), at)
            if at != current:
                assert outcome.items == ()
            daemon.apply("expire", outcome)
        elif step[0] == "restart" and daemon.state is not None:
            daemon.state = AppState.model_validate_json(daemon.state.model_dump_json())
            delay = pending_timer(daemon.state, app, daemon.now)
            if delay is None:
                daemon.timer = None
            else:
                assert 0.0 <= delay <= app.session_timeout
                assert daemon.state.background_at is not None
                daemon.timer = (daemon.now + delay, daemon.state.background_at)
        elif step[0] == "relaunch":
            daemon.now += step[1]
            version = {"app_version": step[2]} if step[2] is not None else {}
            run_command(daemon, {"command": "app_foreground", **version})
        elif step[0] == "reconfigure":
            app = daemon.settings = replace(app, project=EU if app.project == MAIN else MAIN)
    check_stream(
        daemon.log,
        daemon.state.cookie if daemon.state is not None else None,
        app.automatic_session_tracking,
    )
