"""The one command path, without transports: every check, grouping, counting, shutdown.

The writer and the queries are small stand-ins here (the engine and the store are tested in
test_store/test_tracker and through the daemon in tests/integration); what is under test is
what the dispatcher decides and how it reports it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.dispatch import MAX_AUTHORIZED, Accepted, Dispatcher, Origin, Reply, Result
from agent.errors import MAX_DETAIL_CHARS, MAX_DETAILS, MAX_MESSAGE_CHARS, QueueFull, TooLarge

OWN_UID = 4242
SOCKET = Origin("socket", uid=1000)
ROOT = Origin("socket", uid=0)


def mqtt(app: str = "kiosk") -> Origin:
    return Origin("mqtt", topic_app=app)


class Writer:
    """Records each group it is given; answers with `results` (default: committed, no result)."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.results: dict[str, Result] = {}
        self.raise_on_commit: Exception | None = None

    def commit(self, commands: Sequence[Accepted], done: Callable[[list[Result]], None]) -> None:
        if self.raise_on_commit is not None:
            raise self.raise_on_commit
        self.groups.append([c.command_name for c in commands])
        done([self.results.get(c.command_name) for c in commands])


class Queries:
    async def query(self, command: Accepted) -> Mapping[str, Any]:
        return {"asked": command.command_name}


def config(**apps: Any) -> AgentConfig:
    return AgentConfig.model_validate({"device_id": "d1", "apps": apps})


def make(cfg: AgentConfig | None = None) -> tuple[Dispatcher, Writer]:
    writer = Writer()
    return Dispatcher(cfg or config(), writer, Queries(), own_uid=OWN_UID), writer


def line(command: str = "track_event", **fields: Any) -> bytes:
    document: dict[str, Any] = {"command": command, **fields}
    if command == "track_event":
        document.setdefault("name", "viewed")
    return json.dumps(document).encode()


def code(prepared: Reply | Accepted) -> str | None:
    assert isinstance(prepared, Reply), "expected a refusal"
    return prepared.error.code.value if prepared.error else None


# ---------------------------------------------------------------------------- prepare


def test_accepted_commands_carry_app_accept_time_and_kind() -> None:
    dispatcher, _ = make()
    accepted = dispatcher.prepare(line(app="kiosk", request_id="r1"), SOCKET)
    assert isinstance(accepted, Accepted)
    assert (accepted.app, accepted.request_id, accepted.grouped) == ("kiosk", "r1", True)
    assert accepted.now > 0
    default = dispatcher.prepare(line(), SOCKET)
    assert isinstance(default, Accepted) and default.app == "default"
    get_customer = dispatcher.prepare(line("get_customer"), SOCKET)
    assert isinstance(get_customer, Accepted) and get_customer.grouped  # reads writer state
    status = dispatcher.prepare(line("status"), SOCKET)
    assert isinstance(status, Accepted) and not status.grouped


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"x" * 70_000, "too_large"),
        (b'{"command": "track_event", "name": ', "invalid_json"),
        (b'{"command": "track_event"}', "invalid_command"),
        (b'{"command": "nope"}', "invalid_command"),
    ],
)
def test_refusals_echo_the_request_id_when_readable(data: bytes, expected: str) -> None:
    dispatcher, writer = make()
    assert code(dispatcher.prepare(data, SOCKET)) == expected
    assert writer.groups == []


def test_refusals_leave_no_garbage_for_the_cyclic_gc() -> None:
    """A refusal's reply keeps its error without the traceback: its frames would hold the
    reply, and the refused bytes, in a cycle that only the cyclic GC frees, and the daemon
    runs it rarely (`agent.daemon.tune_gc`)."""
    dispatcher, _ = make(config(allow_unknown=False, kiosk={"allowed_uids": [7]}))
    refused = [
        b"x" * 70_000,
        b'{"command": "track_event", "name": ',
        b'{"command": "track_event", "name": "e", "properties": {"a": 1e999}}',
        b'{"command": "nope"}',
        line(app="other"),
        line(app="kiosk"),
        line("queue_purge"),
    ]
    for data in refused:  # first use: whatever is built once (log records, caches)
        dispatcher.prepare(data, SOCKET)
    gc.collect()
    gc.disable()
    try:
        replies = [dispatcher.prepare(data, SOCKET) for data in refused * 10]
        assert all(isinstance(r, Reply) and r.error is not None for r in replies)
        del replies
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_unknown_apps_are_refused_when_not_allowed() -> None:
    dispatcher, _ = make(config(allow_unknown=False, kiosk={}))
    assert isinstance(dispatcher.prepare(line(app="kiosk"), SOCKET), Accepted)
    refused = dispatcher.prepare(line(app="other", request_id="r9"), SOCKET)
    assert code(refused) == "unknown_app"
    assert isinstance(refused, Reply) and refused.request_id == "r9"


def test_socket_uids_are_checked_for_apps_with_allowed_uids() -> None:
    dispatcher, _ = make(config(kiosk={"allowed_uids": [1000]}, locked={"allowed_uids": [7]}))
    assert isinstance(dispatcher.prepare(line(app="kiosk"), SOCKET), Accepted)
    assert code(dispatcher.prepare(line(app="locked"), SOCKET)) == "forbidden"
    assert isinstance(dispatcher.prepare(line(app="locked"), ROOT), Accepted)
    own = Origin("socket", uid=OWN_UID)
    assert isinstance(dispatcher.prepare(line(app="locked"), own), Accepted)
    # status and flush are not an app's: no uid check.
    assert isinstance(dispatcher.prepare(line("status", app="locked"), SOCKET), Accepted)


def test_a_reload_decides_again_for_peers_already_allowed() -> None:
    """Allowed (app, transport, uid) are remembered per config: a reload that locks an app,
    or removes it, refuses the next command of a peer it allowed before."""
    dispatcher, _ = make(config(allow_unknown=False, kiosk={}, shop={}))
    for _ in range(2):
        assert isinstance(dispatcher.prepare(line(app="kiosk"), SOCKET), Accepted)
        assert isinstance(dispatcher.prepare(line(app="shop"), SOCKET), Accepted)
        assert isinstance(dispatcher.prepare(line(), mqtt("kiosk")), Accepted)
    dispatcher.reload(config(allow_unknown=False, kiosk={"allowed_uids": [7]}))
    assert code(dispatcher.prepare(line(app="kiosk"), SOCKET)) == "forbidden"
    assert code(dispatcher.prepare(line(), mqtt("kiosk"))) == "forbidden"
    assert code(dispatcher.prepare(line(app="shop"), SOCKET)) == "unknown_app"
    assert isinstance(dispatcher.prepare(line(app="kiosk"), Origin("socket", uid=7)), Accepted)


def test_many_unknown_app_names_do_not_grow_what_the_dispatcher_remembers() -> None:
    dispatcher, _ = make()
    for n in range(3 * MAX_AUTHORIZED):
        assert isinstance(dispatcher.prepare(line(app=f"app{n}"), SOCKET), Accepted)
    assert len(dispatcher._authorized) == MAX_AUTHORIZED
    assert isinstance(dispatcher.prepare(line(app="app9999"), SOCKET), Accepted)


def test_mqtt_is_off_for_apps_with_allowed_uids_unless_turned_on() -> None:
    dispatcher, _ = make(
        config(
            open={},
            locked={"allowed_uids": [1000]},
            shared={"allowed_uids": [1000], "mqtt": True},
            closed={"mqtt": False},
        )
    )
    assert isinstance(dispatcher.prepare(line(), mqtt("open")), Accepted)
    assert isinstance(dispatcher.prepare(line(), mqtt("shared")), Accepted)
    refused = dispatcher.prepare(line(request_id="r1"), mqtt("locked"))
    assert code(refused) == "forbidden"
    assert isinstance(refused, Reply) and "apps.locked.mqtt = true" in refused.error.message  # type: ignore[union-attr]
    assert code(dispatcher.prepare(line(), mqtt("closed"))) == "forbidden"
    assert code(dispatcher.prepare(line("get_customer"), mqtt("locked"))) == "forbidden"
    # The socket is unaffected by the MQTT switch.
    assert isinstance(dispatcher.prepare(line(app="closed"), SOCKET), Accepted)


def test_mqtt_app_comes_from_the_topic() -> None:
    dispatcher, _ = make()
    accepted = dispatcher.prepare(line(), mqtt("kiosk"))
    assert isinstance(accepted, Accepted) and accepted.app == "kiosk"
    assert code(dispatcher.prepare(line(app="other"), mqtt("kiosk"))) == "invalid_command"


def test_queue_maintenance_is_for_root_and_the_agent_on_the_socket_only() -> None:
    dispatcher, _ = make()
    assert isinstance(dispatcher.prepare(line("queue_list"), ROOT), Accepted)
    assert code(dispatcher.prepare(line("queue_list"), SOCKET)) == "forbidden"
    assert code(dispatcher.prepare(line("queue_list"), mqtt())) == "invalid_command"


def test_shutdown_refuses_every_new_command() -> None:
    dispatcher, _ = make()
    dispatcher.stop_accepting()
    assert code(dispatcher.prepare(line(), SOCKET)) == "unavailable"
    assert code(dispatcher.prepare(line("status"), mqtt())) == "unavailable"


# ---------------------------------------------------------------------------- submit and query


def test_a_hand_off_is_one_group_with_replies_in_order() -> None:
    dispatcher, writer = make()
    writer.results = {"get_customer": {"app": "kiosk", "ids": {}}, "anonymize": QueueFull("full")}
    commands = [
        dispatcher.prepare(line(request_id="a"), SOCKET),
        dispatcher.prepare(line("anonymize", request_id="b"), SOCKET),
        dispatcher.prepare(line("get_customer", request_id="c"), SOCKET),
    ]
    accepted = [c for c in commands if isinstance(c, Accepted)]
    replies: list[Reply] = []
    dispatcher.submit(accepted, replies.extend)
    assert writer.groups == [["track_event", "anonymize", "get_customer"]]
    assert [r.request_id for r in replies] == ["a", "b", "c"]
    assert [r.ok for r in replies] == [True, False, True]
    assert replies[1].error is not None and replies[1].error.code.value == "queue_full"
    assert replies[2].result == {"app": "kiosk", "ids": {}}
    assert dispatcher.in_flight == 0
    assert dispatcher.counts()["socket"] == {"ok": 2, "queue_full": 1}


def test_in_flight_counts_commands_until_their_group_is_committed() -> None:
    dispatcher, _ = make()
    held: list[Callable[[list[Result]], None]] = []

    class Held(Writer):
        def commit(
            self, commands: Sequence[Accepted], done: Callable[[list[Result]], None]
        ) -> None:
            held.append(done)

    dispatcher = Dispatcher(config(), Held(), Queries())
    accepted = [dispatcher.prepare(line(), mqtt()) for _ in range(3)]
    dispatcher.submit([a for a in accepted if isinstance(a, Accepted)], lambda replies: None)
    assert dispatcher.in_flight == 3
    held[0]([None, None, None])
    assert dispatcher.in_flight == 0


def test_a_writer_that_fails_to_take_the_group_fails_each_command() -> None:
    dispatcher, writer = make()
    writer.raise_on_commit = RuntimeError("boom")
    accepted = dispatcher.prepare(line(), SOCKET)
    assert isinstance(accepted, Accepted)
    replies: list[Reply] = []
    dispatcher.submit([accepted], replies.extend)
    assert [r.error.code.value for r in replies if r.error] == ["internal"]
    assert dispatcher.in_flight == 0


def test_queries_are_answered_and_counted() -> None:
    dispatcher, _ = make()
    accepted = dispatcher.prepare(line("flush", request_id="f"), mqtt())
    assert isinstance(accepted, Accepted)
    reply = asyncio.run(dispatcher.query(accepted))
    assert reply.result == {"asked": "flush"} and reply.request_id == "f"
    assert dispatcher.counts()["mqtt"] == {"ok": 1}


def test_counts_are_per_transport_and_result_including_refusals() -> None:
    dispatcher, _ = make()
    dispatcher.prepare(b"not json", SOCKET)
    dispatcher.prepare(b"not json", mqtt())
    dispatcher.refuse(TooLarge("line too long"), SOCKET)
    accepted = dispatcher.prepare(line(), mqtt())
    assert isinstance(accepted, Accepted)
    dispatcher.submit([accepted], lambda replies: None)
    assert dispatcher.counts() == {
        "socket": {"invalid_json": 1, "too_large": 1},
        "mqtt": {"invalid_json": 1, "ok": 1},
    }


def test_rejection_logs_escape_client_text(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="engagement_agent.dispatch")
    dispatcher, _ = make(config(allow_unknown=False))
    dispatcher.prepare(line(app="x"), Origin("mqtt", topic_app="evil\n<3>forged line"))
    messages = [r.getMessage() for r in caplog.records]
    assert any("evil\\x0a<3>forged line" in m for m in messages)
    assert not any("\n" in m for m in messages)


def test_an_error_reply_stays_small_whatever_the_command() -> None:
    # Thousands of unknown fields, the first with a long name: unclipped, the reply would be
    # several times the command (replies a client does not read are memory the agent holds).
    fields: dict[str, Any] = {"g" * 20000: 0, **{f"f{i}": 0 for i in range(3500)}}
    data = line(request_id="r1", **fields)
    assert len(data) < 65536
    reply = make()[0].prepare(data, SOCKET)
    assert isinstance(reply, Reply) and code(reply) == "invalid_command"
    error = reply.to_dict()["error"]
    assert len(error["details"]) == MAX_DETAILS
    assert error["details"][0] == {
        "field": "g" * (MAX_DETAIL_CHARS - 1) + "…",
        "reason": "unknown field",
    }
    assert error["details"][1] == {"field": "f0", "reason": "unknown field"}
    assert len(error["message"]) == MAX_MESSAGE_CHARS and error["message"].endswith("…")
    assert len(reply.encode()) < 8 * 1024
    # Short texts are untouched.
    small = make()[0].prepare(line(request_id="r2", extra=1), SOCKET)
    assert isinstance(small, Reply) and small.error is not None
    assert small.to_dict()["error"]["message"] == small.error.message


@pytest.mark.parametrize(
    "reply",
    [
        Reply(None, "kiosk", "track_event"),
        Reply("r-1", "kiosk", "track_event"),
        Reply(None, "kiosk", "get_customer", {"ids": {"cookie": "c"}}),
        Reply(None, "kiosk", "track_event", error=QueueFull("the queue is full")),
    ],
)
def test_a_replys_socket_line_is_its_json_and_a_newline(reply: Reply) -> None:
    line = reply.line()
    assert line == reply.encode() + b"\n"
    assert json.loads(line) == reply.to_dict()
