"""The CLI against a stand-in agent: a real Unix socket speaking NDJSON, answering canned replies.

The stand-in records every request, so each test checks the exact command a verb sends, and
the exit code and output the CLI makes of the reply. End-to-end runs against the real daemon
are in tests/integration.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.cli.verbs import property_pair, timestamp

Responder = Callable[[dict[str, Any]], dict[str, Any]]
REPO = Path(__file__).resolve().parents[2]

STATUS = {
    "online": True,
    "version": "0.1.0",
    "device_id": "kiosk-042",
    "uptime": 3725.2,
    "queue": {
        "items": 12,
        "bytes": 5120,
        "max_bytes": 104857600,
        "dropped": 1,
        "rejected": 2,
        "dead_letters": 3,
        "oldest_age": 305.0,
        "recovered": [{"file": "/q.db.corrupt-20240501T120000Z", "at": 1714564800.0,
                       "reason": "quick_check failed"}],
    },
    "sync": {"projects": [{
        "project_token": "tok-1", "base_url": "https://api.example.com", "state": "backoff",
        "last_success": None, "last_error": "HTTP 503", "next_attempt": 4102444000.0,
        "sent": 40,
    }]},
    "mqtt": {"enabled": True, "connected": False},
    "apps": {"kiosk-ui": {"session": "active", "push_token_tracked_at": None}},
}


def ok(result: dict[str, Any] | None = None) -> Responder:
    return lambda request: {"ok": True, "request_id": request.get("request_id"),
                            "result": result or {}}


def rejected(code: str, message: str) -> Responder:
    return lambda request: {"ok": False, "request_id": request.get("request_id"),
                            "error": {"code": code, "message": message}}


class FakeAgent:
    """Accepts connections, answers each line with `responder(request)`, in order, and closes
    a connection once its client half-closes and every reply is written (like the daemon)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.responder: Responder = ok()
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(8)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except ValueError:
                    request = {"unparsable": line.decode("utf-8", "replace")}
                self.requests.append(request)
                reply = self.responder(request)
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._server.close()

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is long."""
    path = Path(tempfile.mkdtemp(prefix="ea-cli-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(short_dir: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(short_dir / "agent.sock")
    yield fake
    fake.close()


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> None:
    """Keep the machine's /etc config and environment out of the tests."""
    monkeypatch.setattr("agent.config.load.DEFAULT_CONFIG_PATH", short_dir / "absent.toml")
    for name in list(os.environ):
        if name.startswith("ENGAGEMENT_AGENT_"):
            monkeypatch.delenv(name)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], agent: FakeAgent) -> Run:
    """`cli("track", "x", ...)` → (exit code, stdout, stderr), with --socket pointing at the
    stand-in unless `socket=False`."""

    def run(*argv: str, socket: bool = True) -> tuple[int, str, str]:
        args = [*argv, "--socket", str(agent.path)] if socket else list(argv)
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


# -- commands built by each verb ------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["track", "door_opened"], {"command": "track_event", "name": "door_opened",
                                    "properties": {}}),
        (["track", "buy", "-p", "price=12.5", "-p", "gift=true", "-p", "code=007",
          "-p", "name=Jane Doe", "-p", 'quoted="5"', "-p", "tags=[1,2]", "-p", "none=null",
          "-p", "expr=a=b", "--timestamp", "1714564800.5", "--app", "kiosk-ui"],
         {"command": "track_event", "name": "buy", "app": "kiosk-ui", "timestamp": 1714564800.5,
          "properties": {"price": 12.5, "gift": True, "code": "007", "name": "Jane Doe",
                         "quoted": "5", "tags": [1, 2], "none": None, "expr": "a=b"}}),
        (["track", "x", "--json-properties", '{"a": 1, "b": {"c": [true]}}', "-p", "a=2"],
         {"command": "track_event", "name": "x", "properties": {"a": 2, "b": {"c": [True]}}}),
        (["track", "x", "--timestamp", "2024-05-01T12:00:00Z"],
         {"command": "track_event", "name": "x", "properties": {}, "timestamp": 1714564800.0}),
        (["identify", "--id", "registered=jane@example.com", "--id", "crm=42", "-p", "age=30"],
         {"command": "identify_customer", "ids": {"registered": "jane@example.com", "crm": "42"},
          "properties": {"age": 30}}),
        (["anonymize", "--app", "a1"], {"command": "anonymize", "app": "a1"}),
        (["anonymize", "--project", "eu-shop", "--mapping", '{"payment": ["payments"]}'],
         {"command": "anonymize", "project": "eu-shop", "mapping": {"payment": ["payments"]}}),
        (["anonymize", "--project", '{"project_token": "t", "authorization_token": "k"}',
          "--mapping", '{"payment": []}'],
         {"command": "anonymize", "project": {"project_token": "t", "authorization_token": "k"},
          "mapping": {"payment": []}}),
        (["session", "start"], {"command": "track_session_start"}),
        (["session", "end", "--timestamp", "5"], {"command": "track_session_end",
                                                  "timestamp": 5.0}),
        (["foreground", "--app-version", "2.4.1"], {"command": "app_foreground",
                                                     "app_version": "2.4.1"}),
        (["background"], {"command": "app_background"}),
        (["push-token", "tok"], {"command": "track_push_token", "token": "tok"}),
        (["push-token", "tok", "--hms"], {"command": "track_hms_push_token", "token": "tok"}),
        (["verify-push-token"], {"command": "verify_push_token"}),
        (["payment", "--value", "12.34", "--currency", "EUR", "--payment-system", "Virtual",
          "--product-id", "handbag", "--product-title", "Red handbag"],
         {"command": "track_payment", "item": {
             "value": 12.34, "currency": "EUR", "payment_system": "Virtual",
             "product_id": "handbag", "product_title": "Red handbag"}}),
        (["payment", "--value", "1", "--currency", "EUR", "--payment-system", "V",
          "--product-id", "p", "--product-title", "t", "--receipt", "R-1", "--timestamp", "9"],
         {"command": "track_payment", "timestamp": 9.0, "item": {
             "value": 1.0, "currency": "EUR", "payment_system": "V", "product_id": "p",
             "product_title": "t", "receipt": "R-1"}}),
        (["default-properties", "-p", "store=berlin-3", "-p", "floor=2"],
         {"command": "set_default_properties", "properties": {"store": "berlin-3", "floor": 2}}),
        (["default-properties"], {"command": "set_default_properties", "properties": {}}),
        (["flush"], {"command": "flush", "wait": False}),
        (["flush", "--wait"], {"command": "flush", "wait": True}),
        (["customer", "--app", "kiosk-ui"], {"command": "get_customer", "app": "kiosk-ui"}),
        (["status"], {"command": "status"}),
    ],
)
def test_each_verb_sends_the_right_command(
    cli: Run, agent: FakeAgent, argv: list[str], expected: dict[str, Any]
) -> None:
    code, _out, err = cli(*argv)
    assert (code, err) == (0, "")
    assert agent.requests == [expected]


def test_property_values_follow_the_json_else_string_rule() -> None:
    assert property_pair("n=5") == ("n", 5)
    assert property_pair("s=") == ("s", "")
    assert property_pair("nan=NaN") == ("nan", "NaN")  # not strict JSON: a string
    assert property_pair("big=1e999") == ("big", "1e999")  # overflows: kept as text
    assert property_pair("o={\"k\": 1}") == ("o", {"k": 1})


def test_naive_iso_timestamps_are_local_time() -> None:
    from datetime import datetime

    assert timestamp("2024-05-01T12:00:00") == datetime(2024, 5, 1, 12).timestamp()


@pytest.mark.parametrize(
    "argv",
    [
        ["track"],
        ["track", "x", "-p", "novalue"],
        ["track", "x", "-p", "=1"],
        ["track", "x", "--json-properties", "[1]"],
        ["track", "x", "--json-properties", "{bad"],
        ["track", "x", "--timestamp", "yesterday"],
        ["identify"],
        ["identify", "--id", "registered"],
        ["session", "middle"],
        ["payment", "--value", "12.34"],
        ["payment", "--value", "abc", "--currency", "EUR", "--payment-system", "V",
         "--product-id", "p", "--product-title", "t"],
        ["queue", "show"],
        ["queue", "show", "0"],
        ["queue", "list", "--limit", "-1"],
        ["status", "--timeout", "0"],
        ["no-such-verb"],
        [],
    ],
)
def test_usage_errors_exit_64_with_one_line(cli: Run, agent: FakeAgent, argv: list[str]) -> None:
    code, out, err = cli(*argv, socket=False)
    assert code == 64
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("engagement-agent")
    assert agent.requests == []


def test_help_for_every_verb_has_examples(cli: Run) -> None:
    verbs = ["run", "check-config", "track", "identify", "anonymize", "session", "foreground",
             "background", "push-token", "verify-push-token", "payment", "default-properties",
             "flush", "customer", "status", "send", "queue", "fleet", "metrics", "reload"]
    for verb in verbs:
        code, out, _ = cli(verb, "--help", socket=False)
        assert code == 0
        assert "examples:" in out and f"engagement-agent {verb}" in out, verb
    for action in ["list", "show", "dead-letters", "retry-dead", "purge"]:
        code, out, _ = cli("queue", action, "--help", socket=False)
        assert code == 0 and "examples:" in out, action


# -- global options before and after the verb -------------------------------------------------

def test_global_options_work_before_and_after_the_verb(
    cli: Run, agent: FakeAgent, short_dir: Path
) -> None:
    for argv in (
        ["--socket", str(agent.path), "--json", "track", "x", "--app", "a1"],
        ["track", "--app", "a1", "x", "--socket", str(agent.path), "--json"],
        ["--json", "track", "x", "--socket", str(agent.path), "--app", "a1"],
    ):
        code, out, _ = cli(*argv, socket=False)
        assert (code, json.loads(out)) == (0, {})
        assert agent.last == {"command": "track_event", "name": "x", "app": "a1",
                              "properties": {}}


def test_an_option_before_the_verb_is_not_reset_by_the_subparser(
    cli: Run, agent: FakeAgent, short_dir: Path
) -> None:
    agent.responder = ok(STATUS)
    code, out, _ = cli("--socket", str(agent.path), "--json", "status", socket=False)
    assert code == 0 and json.loads(out)["queue"]["items"] == 12


def test_the_socket_comes_from_the_config(cli: Run, agent: FakeAgent, short_dir: Path) -> None:
    config = short_dir / "agent.toml"
    config.write_text(f'[socket]\npath = "{agent.path}"\n[queue]\npath = "{short_dir}/q.db"\n')
    code, _, err = cli("--config", str(config), "flush", socket=False)
    assert (code, err) == (0, "")
    code, _, err = cli("flush", "--config", str(config), socket=False)
    assert (code, err) == (0, "")
    assert len(agent.requests) == 2


def test_the_socket_comes_from_the_environment(
    cli: Run, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGAGEMENT_AGENT_SOCKET__PATH", str(agent.path))
    code, _, err = cli("status", socket=False)
    assert (code, err) == (0, "")


# -- output and exit codes -----------------------------------------------------------------

def test_tracking_success_prints_ok(cli: Run, agent: FakeAgent) -> None:
    assert cli("track", "x") == (0, "ok\n", "")


def test_json_prints_the_result(cli: Run, agent: FakeAgent) -> None:
    agent.responder = ok({"flushed": 3, "remaining": 0})
    code, out, err = cli("flush", "--wait", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"flushed": 3, "remaining": 0}


def test_status_json_pipes_into_jq(agent: FakeAgent) -> None:
    """What the docs promise: `engagement-agent status --json | jq .queue.items`."""
    jq = shutil.which("jq")
    if jq is None:
        pytest.fail("jq is not installed (apt-get install jq)")
    agent.responder = ok(STATUS)
    cli = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "status", "--json", "--socket", str(agent.path)],
        stdout=subprocess.PIPE, env=_env(),
    )
    done = subprocess.run([jq, ".queue.items"], stdin=cli.stdout, capture_output=True,
                          text=True, timeout=30)
    assert cli.wait(timeout=30) == 0
    assert done.stdout == "12\n"


def test_rejection_exits_1_with_one_line_on_stderr(cli: Run, agent: FakeAgent) -> None:
    agent.responder = rejected("invalid_command", "invalid command: name: too long\nsecond")
    code, out, err = cli("track", "x")
    assert (code, out) == (1, "")
    assert err == ("engagement-agent: rejected (invalid_command): "
                   "invalid command: name: too long second\n")


def test_rejection_with_json_leaves_stdout_empty(cli: Run, agent: FakeAgent) -> None:
    """A pipeline reading stdout never mistakes an error for data; stderr has the reply."""
    agent.responder = rejected("invalid_state", "no open session")
    code, out, err = cli("session", "end", "--json")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert json.loads(err) == {"ok": False, "request_id": None, "error": {
        "code": "invalid_state", "message": "no open session"}}


def test_unavailable_with_json_exits_69(cli: Run, agent: FakeAgent) -> None:
    agent.responder = rejected("unavailable", "the agent is shutting down")
    code, out, err = cli("status", "--json")
    assert (code, out) == (69, "")
    assert json.loads(err)["error"]["code"] == "unavailable"


def test_unavailable_exits_69_so_scripts_retry(cli: Run, agent: FakeAgent) -> None:
    agent.responder = rejected("unavailable", "the agent is shutting down")
    code, _, err = cli("track", "x")
    assert code == 69
    assert "shutting down" in err


def test_missing_socket_exits_69_with_a_hint(cli: Run, short_dir: Path) -> None:
    missing = short_dir / "nope.sock"
    code, out, err = cli("status", "--socket", str(missing), socket=False)
    assert (code, out) == (69, "")
    assert err == (f"engagement-agent: cannot reach the agent at {missing}: No such file or "
                   "directory (is it running? systemctl status engagement-agent)\n")


def test_refused_socket_exits_69(cli: Run, short_dir: Path) -> None:
    stale = short_dir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # the file stays, nobody listens
    code, _, err = cli("track", "x", "--socket", str(stale), socket=False)
    assert code == 69
    assert "Connection refused" in err and err.count("\n") == 1


def test_a_silent_agent_times_out_with_69(cli: Run, short_dir: Path) -> None:
    mute = short_dir / "mute.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(mute))
    server.listen(1)  # accepts (in the backlog) but never answers
    try:
        code, _, err = cli("status", "--socket", str(mute), "--timeout", "0.2", socket=False)
    finally:
        server.close()
    assert code == 69
    assert err.endswith("did not reply within 0.2 s (raise it with --timeout)\n")


def test_invalid_config_exits_78_in_one_line(cli: Run, short_dir: Path) -> None:
    config = short_dir / "bad.toml"
    config.write_text('[sync]\nflush_mode = "sometimes"\nbatch_size = 99\n')
    code, out, err = cli("status", "--config", str(config), socket=False)
    assert (code, out) == (78, "")
    assert err.count("\n") == 1
    assert "sync.flush_mode" in err and "sync.batch_size" in err and "check-config" in err


def test_status_is_readable_at_a_glance(cli: Run, agent: FakeAgent) -> None:
    agent.responder = ok(STATUS)
    code, out, _ = cli("status")
    assert code == 0
    assert out.startswith("engagement-agent 0.1.0: online, up 1h 2m, device kiosk-042\n")
    for fragment in (
        "12 items, 5.0 KiB of 100.0 MiB (0%), oldest 5m 5s",
        "dropped 1, rejected 2, dead letters 3",
        "mqtt:     not connected",
        "tok-1 @ https://api.example.com: backoff, sent 40, last success never",
        "last error: HTTP 503",
        "next attempt in",
        "kiosk-ui: session active, no push token",
        "/q.db.corrupt-20240501T120000Z at",
        "quick_check failed",
    ):
        assert fragment in out, fragment


def test_status_shows_the_clock_and_mqtt_protocol_when_reported(
    cli: Run, agent: FakeAgent
) -> None:
    mqtt = {"enabled": True, "connected": True, "protocol": "3.1.1"}
    clock = {"synchronized": False, "source": "none", "held": 4}
    agent.responder = ok({**STATUS, "mqtt": mqtt, "clock": clock})
    code, out, _ = cli("status")
    assert code == 0
    assert "mqtt:     connected (MQTT 3.1.1)\n" in out
    assert "clock:    NOT synchronized, source none, 4 items held until the time is known\n" in out


def test_status_survives_a_sparse_reply(cli: Run, agent: FakeAgent) -> None:
    agent.responder = ok({"online": True})
    code, out, _ = cli("status")
    assert code == 0 and "projects: none yet" in out


def test_customer_and_flush_output(cli: Run, agent: FakeAgent) -> None:
    agent.responder = ok({"app": "kiosk-ui", "project_token": "tok-1",
                          "ids": {"cookie": "c0ffee", "registered": "jane@example.com"}})
    code, out, _ = cli("customer", "--app", "kiosk-ui")
    assert code == 0
    assert out.splitlines() == ["app:        kiosk-ui", "project:    tok-1",
                                "cookie:     c0ffee", "registered: jane@example.com"]
    agent.responder = ok({"flushed": 7, "remaining": 2})
    assert cli("flush", "--wait")[1] == "sent 7 items; 2 remaining\n"


def test_unreadable_reply_exits_69(cli: Run, agent: FakeAgent) -> None:
    agent.responder = lambda request: {"nonsense": True}
    code, _, err = cli("status")
    assert code == 69 and "unreadable reply" in err


# -- check-config --------------------------------------------------------------------------

def test_check_config_ok(cli: Run, short_dir: Path) -> None:
    config = short_dir / "agent.toml"
    config.write_text('device_id = "kiosk-1"\n')
    assert cli("check-config", "--config", str(config), socket=False) == (
        0, f"configuration OK: {config}\n", "")
    code, out, _ = cli("check-config", "--config", str(config), "--json", socket=False)
    assert (code, json.loads(out)) == (0, {"ok": True, "source": str(config)})


def test_check_config_defaults(cli: Run) -> None:
    assert cli("check-config", socket=False) == (0, "configuration OK: built-in defaults\n", "")


def test_check_config_lists_every_problem(cli: Run, short_dir: Path) -> None:
    config = short_dir / "bad.toml"
    config.write_text('[sync]\nflush_mode = "sometimes"\nbatch_size = 99\n')
    code, out, err = cli("check-config", "--config", str(config), socket=False)
    assert (code, out) == (78, "")
    lines = err.splitlines()
    assert lines[0] == f"engagement-agent: invalid configuration in {config}:"
    assert any(line.startswith("  sync.flush_mode:") for line in lines)
    assert any(line.startswith("  sync.batch_size:") for line in lines)
    code, out, _ = cli("check-config", "--config", str(config), "--json", socket=False)
    keys = {p["key"] for p in json.loads(out)["problems"]}
    assert code == 78 and {"sync.flush_mode", "sync.batch_size"} <= keys


def test_check_config_missing_file(cli: Run, short_dir: Path) -> None:
    code, _, err = cli("check-config", "--config", str(short_dir / "none.toml"), socket=False)
    assert code == 78 and "does not exist" in err


# -- as a process --------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGAGEMENT_AGENT_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_as_a_process_exit_codes_and_no_heavy_imports(agent: FakeAgent) -> None:
    code = (
        "import sys, runpy; sys.argv = ['engagement-agent'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('agent.cli', run_name='__main__')\n"
        "finally:\n    print(sorted(m for m in ('paho', 'urllib3', 'agent.daemon', 'agent.store')"
        " if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "track", "x", "--socket", str(agent.path)],
        capture_output=True, text=True, env=_env(), timeout=30,
    )
    assert (done.returncode, done.stdout) == (0, "ok\n")
    assert done.stderr.strip() == "[]"
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "track"],
        capture_output=True, text=True, env=_env(), timeout=30,
    )
    assert done.returncode == 64 and done.stderr.count("\n") == 1
