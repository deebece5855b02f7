"""A local stand-in for the Engagement Tracking API: a development tool and the tests' double.

It implements what the agent uses (docs/sync.md): the batch endpoint with token auth, body
and per-command validation and the API's answer shapes, `GET .../system/time` (also as the
`system/time` batch command) and a `Date` header on every response. On top it records every
accepted command and can be told to misbehave (5xx, 429 with `Retry-After`, hangs, connection
resets, a black hole that never answers, a response trickling one byte at a time, per-command
refusals, a whole-batch 400 for "poison" items, a clock that is off by a given offset, a
per-client rate limit), both from Python and over HTTP control endpoints, so a test can drive
it while the daemon under test runs as a separate process:

    POST /_stub/faults    {"faults": [...], "command_failures": [...], "poison": [...],
                           "projects": {"TOKEN": "KEY"}, "clock_offset": 3600.0,
                           "rate_limit": {"per_second": 10, "by": "ip"}}
                          (every key optional; lists are appended, settings replaced)
    GET  /_stub/received  {"commands": [...], "requests": [...]}
    POST /_stub/reset     forget faults and recordings (projects stay)

Run it with `engagement-api-stub --port 8080 --project TOKEN:KEY`; see docs/sync.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

#: The real API refuses batches above this (docs/sync.md).
MAX_COMMANDS = 50
#: Bodies above this are refused with 413 so a runaway client cannot exhaust memory.
MAX_BODY_BYTES = 16 * 1024 * 1024

_BATCH_RE = re.compile(r"^/track/v2/projects/([^/]+)/batch/?$")
_TIME_RE = re.compile(r"^/track/v2/projects/([^/]+)/system/time/?$")
_NO_VALUE: Any = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(raw: bytes) -> Any:
    """Strict JSON, like the API: NaN and Infinity are refused."""
    return json.loads(raw, parse_constant=_reject_constant)


@dataclass(frozen=True)
class Match:
    """Selects commands; every criterion given must hold (an empty Match selects all).

    `property`/`value`: the command's `data.properties[property]` equals `value` (any value
    when `value` is not given). `text`: a substring of the command's JSON. `predicate`:
    arbitrary Python, for tests that run the stub in-process (not available over HTTP).
    """

    event_type: str | None = None
    property: str | None = None
    value: Any = _NO_VALUE
    text: str | None = None
    project: str | None = None
    predicate: Callable[[Mapping[str, Any]], bool] | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Match:
        allowed = {"event_type", "property", "value", "text", "project"}
        unknown = set(obj) - allowed
        if unknown:
            raise ValueError(f"unknown match keys: {sorted(unknown)}")
        return cls(**{key: obj[key] for key in allowed if key in obj})

    def matches(self, project: str, command: Mapping[str, Any]) -> bool:
        if self.project is not None and project != self.project:
            return False
        data = command.get("data")
        data = data if isinstance(data, Mapping) else {}
        if self.event_type is not None and data.get("event_type") != self.event_type:
            return False
        if self.property is not None:
            properties = data.get("properties")
            if not isinstance(properties, Mapping) or self.property not in properties:
                return False
            if self.value is not _NO_VALUE and properties[self.property] != self.value:
                return False
        if self.text is not None and self.text not in json.dumps(command):
            return False
        return self.predicate is None or self.predicate(command)


@dataclass
class Fault:
    """Misbehaviour for the next `count` batch requests (None: until reset).

    Order of effects: `hang` seconds of silence, then either `reset` (the connection is
    aborted with a TCP RST, no response), `black_hole` (silence until the stub stops or
    `release_hangs()`, then the connection is closed without an answer), or a response with
    `status` (and `retry_after`, `body`), or, with none of these, the normal answer; `trickle`
    sends that answer one byte every `trickle` seconds. `accept` processes and records the
    batch before misbehaving, which is how a response lost on the way back looks to the
    client. `project` limits the fault to one project token.
    """

    status: int | None = None
    count: int | None = 1
    retry_after: str | None = None
    hang: float = 0.0
    reset: bool = False
    accept: bool = False
    body: Any = None
    project: str | None = None
    black_hole: bool = False
    trickle: float = 0.0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Fault:
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = set(obj) - allowed
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        fault = cls(**obj)
        if fault.retry_after is not None:
            fault.retry_after = str(fault.retry_after)
        return fault


@dataclass(frozen=True)
class CommandFailure:
    """Commands matching `match` get `{"success": false, "errors": errors}` in a 200."""

    match: Match
    errors: tuple[str, ...] = ("refused by the stand-in",)


@dataclass(frozen=True)
class Received:
    """One command the stub accepted (its result was `success: true`)."""

    project: str
    name: str
    data: Mapping[str, Any]
    request: int  # sequence number of the request that carried it
    at: float  # time.monotonic() when it was accepted


@dataclass(frozen=True)
class RequestRecord:
    """One request to a tracking endpoint, whatever its outcome (`status` 0: reset)."""

    seq: int
    project: str
    path: str
    status: int
    commands: int
    at: float  # time.monotonic() when the request line was read
    user_agent: str
    content_type: str
    authorization_ok: bool
    via: str = ""  # the `Via` header a proxy on the way added


@dataclass
class _Outcome:
    """What the handler learnt about one request, for its `RequestRecord`."""

    status: int = 0
    commands: int = -1
    authorized: bool = False
    accepted: list[Received] = field(default_factory=list)
    recorded: bool = False


@dataclass
class _State:
    projects: dict[str, str]
    faults: list[Fault] = field(default_factory=list)
    command_failures: list[CommandFailure] = field(default_factory=list)
    poison: list[Match] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    seq: int = 0
    active: int = 0


@dataclass
class RateLimit:
    """At most `per_second` tracking requests per second per client, `by` its IP address
    ("ip", as the API counts) or by project token ("project": one client per project, for
    benchmarks whose agents all connect from 127.0.0.1). Above it: 429 with `Retry-After`."""

    per_second: float
    by: str = "ip"

    def __post_init__(self) -> None:
        if not self.per_second > 0:
            raise ValueError("rate_limit.per_second must be > 0")
        if self.by not in ("ip", "project"):
            raise ValueError('rate_limit.by must be "ip" or "project"')


class ApiStub:
    """The stand-in server. Construct, `start()`, use `url`, `stop()` (or use `with`).

    With no projects registered every token is accepted with any key ("open" mode, handy as a
    dev tool); once any project is registered, tokens and keys are checked like the API does.
    Thread-safe: tests call it from their own thread while handler threads serve requests.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        projects: Mapping[str, str] | None = None,
        *,
        verbose: bool = False,
        clock_offset: float = 0.0,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self._address = (host, port)
        self._verbose = verbose
        self._clock_offset = clock_offset
        self._rate_limit = rate_limit
        #: client key -> (tokens, monotonic time of the last refill): a token bucket each.
        self._buckets: dict[str, tuple[float, float]] = {}
        self._cond = threading.Condition()
        self._state = _State(projects=dict(projects or {}))
        self._release = threading.Event()
        self._server: _Server | None = None
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._release.clear()
        server = _Server(self._address, _Handler)
        server.stub = self
        self._server = server
        self._bound_port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="api-stub",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, end hung handlers and drop keep-alive connections."""
        self._release.set()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ApiStub:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port; still known after `stop()`, so a test can bring "the API" back on
        the same address."""
        if self._bound_port is None:
            raise RuntimeError("the stub has not been started")
        return self._bound_port

    @property
    def url(self) -> str:
        """The base URL to configure as a project's `base_url`."""
        host = self._address[0]
        return f"http://{host}:{self.port}"

    # -- configuration ---------------------------------------------------------------------

    def add_project(self, token: str, key: str) -> None:
        with self._cond:
            self._state.projects[token] = key

    def set_clock_offset(self, seconds: float) -> None:
        """Make the stub's clock (`system/time`, `Date`) run `seconds` ahead of this host's."""
        with self._cond:
            self._clock_offset = seconds

    def set_rate_limit(self, limit: RateLimit | None) -> None:
        """Answer 429 with `Retry-After` above `limit` (None: no limit, the default)."""
        with self._cond:
            self._rate_limit = limit
            self._buckets.clear()

    def now(self) -> float:
        """The stub's wall clock: this host's plus the configured offset."""
        with self._cond:
            return time.time() + self._clock_offset

    def black_hole_next(self, count: int | None, *, project: str | None = None) -> None:
        """Accept the next `count` batch requests and never answer them."""
        self.add_fault(Fault(black_hole=True, count=count, project=project))

    def trickle_next(
        self, count: int | None, seconds_per_byte: float = 1.0, *, project: str | None = None
    ) -> None:
        """Send the answer to the next `count` batch requests one byte at a time."""
        self.add_fault(Fault(trickle=seconds_per_byte, count=count, project=project))

    def add_fault(self, fault: Fault) -> None:
        with self._cond:
            self._state.faults.append(fault)

    def fail_next(
        self,
        count: int | None,
        status: int,
        *,
        retry_after: str | float | None = None,
        project: str | None = None,
        accept: bool = False,
    ) -> None:
        """Answer the next `count` batch requests with `status` (None: until reset)."""
        self.add_fault(
            Fault(
                status=status,
                count=count,
                retry_after=None if retry_after is None else str(retry_after),
                project=project,
                accept=accept,
            )
        )

    def hang_next(self, count: int | None, seconds: float, *, project: str | None = None) -> None:
        """Say nothing for `seconds` on the next `count` batch requests, then answer normally."""
        self.add_fault(Fault(hang=seconds, count=count, project=project))

    def reset_next(
        self, count: int | None, *, project: str | None = None, accept: bool = False
    ) -> None:
        """Abort the connection (TCP RST) instead of answering the next `count` requests."""
        self.add_fault(Fault(reset=True, count=count, project=project, accept=accept))

    def fail_commands(self, match: Match, *errors: str) -> None:
        """Refuse matching commands inside a 200 (`success: false` with `errors`)."""
        failure = CommandFailure(match, tuple(errors) or ("refused by the stand-in",))
        with self._cond:
            self._state.command_failures.append(failure)

    def poison(self, match: Match) -> None:
        """Refuse any batch that contains a matching command with a whole-batch 400."""
        with self._cond:
            self._state.poison.append(match)

    def reset(self) -> None:
        """Forget faults, rules and recordings; registered projects stay."""
        with self._cond:
            old = self._state
            self._state = _State(projects=old.projects, seq=old.seq, active=old.active)
            self._cond.notify_all()

    def release_hangs(self) -> None:
        """End every hang now (the hung requests then get their normal answer)."""
        self._release.set()

    # -- observation -----------------------------------------------------------------------

    def received(self, project: str | None = None) -> list[Received]:
        with self._cond:
            return [r for r in self._state.received if project is None or r.project == project]

    def requests(self, project: str | None = None) -> list[RequestRecord]:
        with self._cond:
            return [r for r in self._state.requests if project is None or r.project == project]

    @property
    def active_requests(self) -> int:
        """Batch requests being handled right now (e.g. hung ones)."""
        with self._cond:
            return self._state.active

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until `predicate()` holds (re-checked after every request) or `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_received(self, count: int, timeout: float, project: str | None = None) -> bool:
        """Block until at least `count` commands (for `project`) were accepted."""
        return self.wait_for(lambda: len(self.received(project)) >= count, timeout)

    # -- control over HTTP -----------------------------------------------------------------

    def apply_control(self, obj: Mapping[str, Any]) -> None:
        """The `POST /_stub/faults` document; raises ValueError on a malformed one."""
        if not isinstance(obj, Mapping):
            raise ValueError("expected a JSON object")
        unknown = set(obj) - {
            "faults",
            "command_failures",
            "poison",
            "projects",
            "clock_offset",
            "rate_limit",
        }
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        faults = [Fault.from_json(f) for f in obj.get("faults", [])]
        failures = [
            CommandFailure(
                Match.from_json(f.get("match", {})),
                tuple(f.get("errors", ["refused by the stand-in"])),
            )
            for f in obj.get("command_failures", [])
        ]
        poison = [Match.from_json(m) for m in obj.get("poison", [])]
        projects = obj.get("projects", {})
        if not isinstance(projects, Mapping):
            raise ValueError("projects must be an object of token: key")
        offset = obj.get("clock_offset")
        if offset is not None and (
            isinstance(offset, bool) or not isinstance(offset, (int, float))
        ):
            raise ValueError("clock_offset must be a number of seconds")
        if "rate_limit" in obj:
            limit = obj["rate_limit"]
            self.set_rate_limit(None if limit is None else RateLimit(**limit))
        if offset is not None:
            self.set_clock_offset(float(offset))
        with self._cond:
            self._state.faults.extend(faults)
            self._state.command_failures.extend(failures)
            self._state.poison.extend(poison)
            self._state.projects.update({str(k): str(v) for k, v in projects.items()})

    def recordings_json(self) -> dict[str, Any]:
        with self._cond:
            return {
                "commands": [asdict(r) for r in self._state.received],
                "requests": [asdict(r) for r in self._state.requests],
            }

    # -- request handling (called from handler threads) -----------------------------------

    def _over_rate(self, client: str, project: str) -> float | None:
        """None if this request is within the rate limit, else the seconds until it would be
        (a token bucket per client holding one second's worth of requests)."""
        with self._cond:
            limit = self._rate_limit
            if limit is None:
                return None
            key = client if limit.by == "ip" else project
            now = time.monotonic()
            tokens, at = self._buckets.get(key, (limit.per_second, now))
            tokens = min(limit.per_second, tokens + (now - at) * limit.per_second)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / limit.per_second

    def _take_fault(self, project: str) -> Fault | None:
        with self._cond:
            for fault in self._state.faults:
                if fault.project is not None and fault.project != project:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._state.faults.remove(fault)
                return fault
            return None

    def _authorize(self, project: str, authorization: str) -> tuple[int, dict[str, Any]] | None:
        with self._cond:
            projects = dict(self._state.projects)
        if not projects:
            return None
        if project not in projects:
            return 400, {"success": False, "error": "Invalid project id"}
        if authorization != f"Token {projects[project]}":
            return 401, {"success": False, "error": "Could not authenticate"}
        return None

    def _process_batch(
        self, project: str, seq: int, raw: bytes, outcome: _Outcome
    ) -> tuple[int, dict[str, Any]]:
        try:
            body = _loads(raw)
        except (ValueError, UnicodeDecodeError):
            return 400, {"success": False, "message": "Invalid JSON"}
        commands = body.get("commands") if isinstance(body, dict) else None
        if isinstance(commands, list):
            outcome.commands = len(commands)
        if not isinstance(commands, list) or not commands:
            return 400, {"success": False, "message": "No commands"}
        if len(commands) > MAX_COMMANDS:
            return 400, {
                "success": False,
                "message": f"Too many commands ({len(commands)} > {MAX_COMMANDS})",
            }
        start = self.now()
        with self._cond:
            poison = list(self._state.poison)
            failures = list(self._state.command_failures)
        if any(m.matches(project, c) for m in poison for c in commands if isinstance(c, dict)):
            return 400, {"success": False, "errors": ["batch refused: it contains a poison item"]}
        results: list[dict[str, Any]] = []
        accepted: list[Received] = []
        now = time.monotonic()
        for command in commands:
            errors = _command_errors(command)
            if not errors:
                for failure in failures:
                    if failure.match.matches(project, command):
                        errors = list(failure.errors)
                        break
            if errors:
                results.append({"success": False, "errors": errors})
                continue
            if command["name"] == "system/time":
                results.append({"success": True, "time": self.now()})
            else:
                results.append({"success": True})
            accepted.append(Received(project, command["name"], command["data"], seq, now))
        outcome.accepted = accepted
        return 200, {
            "success": True,
            "start_time": start,
            "end_time": self.now(),
            "results": results,
        }

    def _record(self, record: RequestRecord, accepted: list[Received]) -> None:
        """Log the request and what it delivered together, before the client can see the
        answer: a test that saw the client finish then finds both."""
        with self._cond:
            self._state.active -= 1
            self._state.requests.append(record)
            self._state.received.extend(accepted)
            self._cond.notify_all()

    def _begin(self) -> int:
        with self._cond:
            self._state.seq += 1
            self._state.active += 1
            self._cond.notify_all()
            return self._state.seq

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _command_errors(command: Any) -> list[str]:
    """Why the API would refuse one batch command (empty: acceptable)."""
    if not isinstance(command, dict):
        return ["command must be an object"]
    name = command.get("name")
    data = command.get("data")
    if name not in ("customers/events", "customers", "system/time"):
        return [f"unknown command name {name!r}"]
    if name == "system/time":
        return []
    if not isinstance(data, dict):
        return ["data must be an object"]
    errors: list[str] = []
    ids = data.get("customer_ids")
    if not isinstance(ids, dict) or not ids:
        errors.append("customer_ids must be a non-empty object")
    elif not all(isinstance(v, str) for v in ids.values()):
        errors.append("customer_ids values must be strings")
    properties = data.get("properties", {})
    if not isinstance(properties, dict):
        errors.append("properties must be an object")
    if name == "customers/events":
        event_type = data.get("event_type")
        if not isinstance(event_type, str) or not event_type:
            errors.append("event_type must be a non-empty string")
        if "timestamp" in data and not _is_number(data["timestamp"]):
            errors.append("timestamp must be a number")
        allowed = {"customer_ids", "event_type", "timestamp", "properties"}
    else:
        if "update_timestamp" in data and not _is_number(data["update_timestamp"]):
            errors.append("update_timestamp must be a number")
        allowed = {"customer_ids", "properties", "update_timestamp"}
    unknown = set(data) - allowed
    if unknown:
        errors.append(f"unknown fields: {sorted(unknown)}")
    return errors


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    stub: ApiStub


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive like the real API, Nagle off so small responses are not delayed
    ~40 ms."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server
    server_version = "engagement-api-stub"

    def setup(self) -> None:
        super().setup()
        self.server.stub._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.stub._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.stub._verbose:
            super().log_message(format, *args)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header, from the stub's (possibly offset) clock."""
        return super().date_time_string(self.server.stub.now() if timestamp is None else timestamp)

    def _send_json(
        self,
        status: int,
        obj: Any,
        headers: Iterable[tuple[str, str]] = (),
        *,
        trickle: float = 0.0,
    ) -> None:
        payload = json.dumps(obj).encode()
        extra = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        extra.extend(headers)
        if trickle > 0:
            self._trickle(status, extra, payload, trickle)
            return
        self.send_response(status)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _trickle(
        self, status: int, headers: list[tuple[str, str]], payload: bytes, interval: float
    ) -> None:
        """Write the whole response, status line included, one byte every `interval` seconds:
        a link that delivers, but too slowly to be of use. Ends early when the stub stops."""
        lines = [
            f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            *(f"{name}: {value}" for name, value in headers),
        ]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        release = self.server.stub._release
        for i in range(len(raw)):
            self.wfile.write(raw[i : i + 1])
            self.wfile.flush()
            if release.wait(interval):
                self.close_connection = True
                return

    def _read_body(self) -> bytes | None:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            self._send_json(411, {"success": False, "message": "Content-Length required"})
            return None
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, {"success": False, "message": "Request too large"})
            return None
        return self.rfile.read(length)

    def _reset(self) -> None:
        """Abort with a TCP RST: what a crashed proxy or a dropped NAT mapping looks like."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def do_GET(self) -> None:
        stub = self.server.stub
        if self.path.split("?")[0] == "/_stub/received":
            self._send_json(200, stub.recordings_json())
            return
        match = _TIME_RE.match(self.path.split("?")[0])
        if match is None:
            self._send_json(404, {"success": False, "error": "Not found"})
            return
        project = unquote(match.group(1))
        wait = stub._over_rate(str(self.client_address[0]), project)
        if wait is not None:
            self._send_too_many(wait)
            return
        refusal = stub._authorize(project, self.headers.get("Authorization", ""))
        if refusal is not None:
            self._send_json(*refusal)
            return
        self._send_json(200, {"success": True, "time": stub.now()})

    def _send_too_many(self, wait: float) -> None:
        """429 with `Retry-After` in whole seconds (at least 1), as rate limiters send it."""
        self._send_json(
            429,
            {"success": False, "error": "Too many requests"},
            [("Retry-After", str(max(1, math.ceil(wait))))],
        )

    def do_POST(self) -> None:
        stub = self.server.stub
        at = time.monotonic()
        path = self.path.split("?")[0]
        raw = self._read_body()
        if raw is None:
            return
        if path.startswith("/_stub/"):
            self._control(path, raw)
            return
        match = _BATCH_RE.match(path)
        if match is None:
            self._send_json(404, {"success": False, "error": "Not found"})
            return
        project = unquote(match.group(1))
        seq = stub._begin()
        outcome = _Outcome()
        try:
            self._batch(project, seq, raw, outcome, at)
        finally:
            self._record(project, seq, raw, outcome, at)

    def _record(self, project: str, seq: int, raw: bytes, outcome: _Outcome, at: float) -> None:
        if outcome.recorded:
            return
        outcome.recorded = True
        if outcome.commands < 0:  # refused before the body was looked at
            try:
                parsed = _loads(raw)
                commands = parsed.get("commands") if isinstance(parsed, dict) else None
                outcome.commands = len(commands) if isinstance(commands, list) else 0
            except (ValueError, UnicodeDecodeError):
                outcome.commands = 0
        record = RequestRecord(
            seq=seq,
            project=project,
            path=self.path.split("?")[0],
            status=outcome.status,
            commands=outcome.commands,
            at=at,
            user_agent=self.headers.get("User-Agent", ""),
            content_type=self.headers.get("Content-Type", ""),
            authorization_ok=outcome.authorized,
            via=self.headers.get("Via", ""),
        )
        self.server.stub._record(record, outcome.accepted)

    def _batch(self, project: str, seq: int, raw: bytes, outcome: _Outcome, at: float) -> None:
        """Faults first (a failing load balancer answers before auth), then the API's rules."""
        stub = self.server.stub
        refusal = stub._authorize(project, self.headers.get("Authorization", ""))
        outcome.authorized = refusal is None
        wait = stub._over_rate(str(self.client_address[0]), project)
        if wait is not None:
            outcome.status = 429
            self._record(project, seq, raw, outcome, at)
            self._send_too_many(wait)
            return
        fault = stub._take_fault(project)
        response: tuple[int, Any] | None = None
        if fault is not None and fault.accept and refusal is None:
            response = stub._process_batch(project, seq, raw, outcome)
        if fault is not None:
            if fault.hang > 0:
                stub._release.wait(fault.hang)
            if fault.reset:
                outcome.status = 0
                self._record(project, seq, raw, outcome, at)
                self._reset()
                return
            if fault.black_hole:
                outcome.status = 0
                self._record(project, seq, raw, outcome, at)
                stub._release.wait()
                self.close_connection = True
                return
            if fault.status is not None:
                body = fault.body
                if body is None:
                    body = {"success": False, "error": f"stand-in fault {fault.status}"}
                response = (fault.status, body)
        if response is None:
            response = refusal or stub._process_batch(project, seq, raw, outcome)
        outcome.status = response[0]
        self._record(project, seq, raw, outcome, at)
        headers = []
        if fault is not None and fault.retry_after is not None:
            headers.append(("Retry-After", fault.retry_after))
        try:
            self._send_json(
                response[0], response[1], headers, trickle=fault.trickle if fault else 0.0
            )
        except OSError:
            self.close_connection = True

    def _control(self, path: str, raw: bytes) -> None:
        stub = self.server.stub
        if path == "/_stub/reset":
            stub.reset()
            self._send_json(200, {"success": True})
            return
        if path == "/_stub/faults":
            try:
                stub.apply_control(_loads(raw) if raw.strip() else {})
            except (ValueError, TypeError, AttributeError) as exc:
                self._send_json(400, {"success": False, "message": str(exc)})
                return
            self._send_json(200, {"success": True})
            return
        self._send_json(404, {"success": False, "error": "Not found"})


def _parse_project(text: str) -> tuple[str, str]:
    token, sep, key = text.partition(":")
    if not sep or not token or not key:
        raise argparse.ArgumentTypeError("expected TOKEN:KEY")
    return token, key


def main(argv: list[str] | None = None) -> int:
    """`engagement-api-stub`: serve until SIGINT/SIGTERM; prints the base URL on stdout."""
    parser = argparse.ArgumentParser(
        prog="engagement-api-stub",
        description="Local stand-in for the Engagement Tracking API (development and tests).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--project",
        action="append",
        type=_parse_project,
        default=[],
        metavar="TOKEN:KEY",
        help="accept this project with this key (repeatable); none: accept any token and key",
    )
    parser.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run the API's clock (system/time, Date) this far ahead of the host's",
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="N",
        help="answer 429 with Retry-After above N requests/s per client (default: no limit)",
    )
    parser.add_argument(
        "--rate-limit-by",
        choices=("ip", "project"),
        default="ip",
        help="what a client is for --rate-limit: its IP address (as the API) or its project",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    limit = RateLimit(args.rate_limit, args.rate_limit_by) if args.rate_limit > 0 else None
    stub = ApiStub(
        args.host,
        args.port,
        dict(args.project),
        verbose=args.verbose,
        clock_offset=args.clock_offset,
        rate_limit=limit,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    stub.start()
    print(stub.url, flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        stub.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
