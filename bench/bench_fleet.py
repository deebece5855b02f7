"""Fleet benchmark: N agents, one broker, one rate-limited API; a regional outage and its recovery.

    python3 bench/bench_fleet.py                          # 50 agents, 120 s outage (~8 min)
    python3 bench/bench_fleet.py --agents 10 --outage 30 --steady 30     # a quick run (~3 min)
    python3 bench/bench_fleet.py --json out.json

What an operator of a fleet would measure (docs/fleet.md):

- N real daemons (`python3 -m agent.cli run`), each with its own device id, database, socket,
  MQTT session (client id `engagement-agent-<device>`) and project token, every setting at its
  default except the broker and API addresses.
- One private Mosquitto (connection messages in its log) and one API stand-in in its own
  process that answers 429 with `Retry-After` above `--api-rate` requests/s per client (a
  client is a project token by default: on 127.0.0.1 every agent has the same IP, so
  `--api-rate-by ip` makes the whole fleet one store behind one NAT, as the API counts).
- Steady load: every device's app tracks `--rate` events/s (default 5) over the agent's socket;
  every `ok` reply is an acknowledged command that must reach the API.
- Then the broker and the API go away for `--outage` seconds (default 120; the apps keep
  tracking, the queues grow) and come back on the same ports.

Reported: peak broker connects per second after the return and how far the reconnects spread
(first to last, from Mosquitto's log); API requests/s and the share of 429s during recovery
(from the API's return until the backlog is delivered, at least 60 s); time from the API's
return until every event acknowledged before it is at the API (the backlog of every queue
delivered; load continues meanwhile); acknowledged commands lost; agent RSS; requests per
event in steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_socket import Row, make_row, print_rows, write_json

from agent_devtools.apistub import ApiStub, RateLimit, Received, RequestRecord
from tests.fixtures.daemon import AgentProcess, SocketClient
from tests.fixtures.mosquitto import MosquittoBroker, free_port

REPO = Path(__file__).resolve().parents[1]
#: Targets from docs/fleet.md.
TARGET_429_SHARE = 1.0  # percent of recovery requests
TARGET_SPREAD = 30.0  # seconds over which the reconnects spread
TARGET_DRAINED = 60.0  # seconds from the API's return to every backlog delivered
TARGET_REQUESTS_PER_EVENT = 0.25
#: The shortest recovery window requests/s and the 429 share are taken over.
MIN_RECOVERY_WINDOW = 60.0


def device_name(i: int) -> str:
    return f"fleet-{i:04d}"


# -- the API stand-in with a per-client rate limit (its own process) ----------------------------
class RateLimitedApi(ApiStub):
    """The stand-in with its per-client rate limit (429 + `Retry-After` above `rate`
    requests/s), a client being a project token. It keeps compact recordings (a long run would
    otherwise hold every command) and hands them out as `/_stub/received`."""

    def __init__(self, port: int, projects: dict[str, str], limit: RateLimit) -> None:
        super().__init__("127.0.0.1", port, projects, rate_limit=limit)
        self.log: list[tuple[float, int, int]] = []  # (monotonic at, status, commands)
        self.seqs: dict[str, list[int]] = defaultdict(list)

    def _record(self, record: RequestRecord, accepted: list[Received]) -> None:
        with self._cond:
            self._state.active -= 1
            self.log.append((record.at, record.status, record.commands))
            for item in accepted:
                properties = item.data.get("properties") or {}
                if isinstance(properties.get("seq"), int):
                    self.seqs[item.project].append(properties["seq"])
            self._cond.notify_all()

    def recordings_json(self) -> dict[str, Any]:
        with self._cond:
            return {"log": list(self.log), "seqs": dict(self.seqs)}


def serve_api(port: int, clients: int, limit: RateLimit, stats: Path) -> int:
    """`bench_fleet.py --serve-api`: serve until SIGTERM, then write the recordings to `stats`."""
    projects = {device_name(i): f"key-{device_name(i)}" for i in range(clients)}
    api = RateLimitedApi(port, projects, limit)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    api.start()
    print(api.url, flush=True)
    while not stop.wait(3600):
        pass
    api.stop()
    stats.write_text(json.dumps(api.recordings_json()))
    return 0


class ApiProcess:
    """The rate-limited stand-in as a subprocess that can go away and come back on one port."""

    def __init__(self, directory: Path, clients: int, limit: RateLimit) -> None:
        self.directory = directory
        self.clients = clients
        self.limit = limit
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.process = subprocess.Popen(
            [
                sys.executable, str(Path(__file__).resolve()), "--serve-api",
                "--port", str(self.port), "--agents", str(self.clients),
                "--api-rate", str(self.limit.per_second), "--api-rate-by", self.limit.by,
                "--stats", str(self.directory / f"api-{self.runs}.json"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        if not self.process.stdout.readline().startswith("http"):
            raise RuntimeError("the API stand-in did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(60)
            self.process = None

    def recordings(self) -> tuple[list[tuple[float, int, int]], dict[str, set[int]]]:
        """Every incarnation's request log and delivered sequence numbers, merged."""
        log: list[tuple[float, int, int]] = []
        seqs: dict[str, set[int]] = defaultdict(set)
        for path in sorted(self.directory.glob("api-*.json")):
            data = json.loads(path.read_text())
            log += [(float(at), int(status), int(n)) for at, status, n in data["log"]]
            for project, numbers in data["seqs"].items():
                seqs[project].update(numbers)
        log.sort()
        return log, seqs


# -- the devices ---------------------------------------------------------------------------------
@dataclass
class Device:
    name: str
    agent: AgentProcess
    client: SocketClient | None = None
    seq: int = 0
    acked: list[tuple[int, float]] = field(default_factory=list)  # (seq, monotonic ack time)
    failed: int = 0


def agent_config(name: str, broker: MosquittoBroker, api: ApiProcess) -> dict[str, Any]:
    """Defaults everywhere except the addresses (the fixture's test-sized backoff undone)."""
    return {
        "device_id": name,
        "log_level": "warning",
        "project": {
            "project_token": name,
            "authorization_token": f"key-{name}",
            "base_url": api.url,
        },
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port},
        "sync": {"max_backoff": 300.0},
    }


class Load:
    """Every device's app tracks `rate` events/s over the socket, pipelined across devices:
    each tick sends one command to every device, then reads every reply."""

    def __init__(self, devices: list[Device], rate: float) -> None:
        self.devices = devices
        self.interval = 1.0 / rate
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        tick = time.monotonic()
        while not self.stop.is_set():
            sent: list[Device] = []
            for device in self.devices:
                try:
                    if device.client is None:
                        device.client = device.agent.client()
                    device.seq += 1
                    command = {
                        "command": "track_event",
                        "name": "fleet_event",
                        "properties": {"seq": device.seq},
                    }
                    device.client.send_line(json.dumps(command).encode())
                    sent.append(device)
                except OSError:
                    device.failed += 1
                    device.client = None
            for device in sent:
                assert device.client is not None
                try:
                    reply = device.client.read_reply()
                except (OSError, ConnectionError, ValueError):
                    device.failed += 1
                    device.client = None
                    continue
                if reply.get("ok"):
                    device.acked.append((device.seq, time.monotonic()))
                else:
                    device.failed += 1
            tick += self.interval
            delay = tick - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                tick = time.monotonic()  # behind: do not burst to catch up

    def events(self, start: float, end: float) -> int:
        return sum(1 for d in self.devices for _, at in d.acked if start <= at < end)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def broker_connects(broker: MosquittoBroker, since_wall: float) -> list[int]:
    """Unix seconds of every agent's connect in Mosquitto's log since `since_wall`."""
    pattern = re.compile(r"^(\d+): New client connected from \S+ as engagement-agent-")
    return [
        int(m.group(1))
        for line in broker.log_text().splitlines()
        if (m := pattern.match(line)) and int(m.group(1)) >= int(since_wall)
    ]


def wait_until(condition: Any, timeout: float, poll: float = 0.5) -> float | None:
    """Monotonic time at which `condition()` first held, or None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(poll)


@contextmanager
def fleet(
    n: int, workdir: Path, api_limit: RateLimit
) -> Iterator[tuple[MosquittoBroker, ApiProcess, list[Device]]]:
    with ExitStack() as stack:
        broker = MosquittoBroker(workdir / "mosquitto", ["max_queued_messages 100000"])
        broker.directory.mkdir(parents=True)
        broker.start()
        stack.callback(broker.stop)
        api = ApiProcess(workdir, n, api_limit)
        api.start()
        stack.callback(api.stop)
        devices = []
        for i in range(n):
            name = device_name(i)
            (workdir / name).mkdir()
            agent = AgentProcess(workdir / name, agent_config(name, broker, api))
            stack.callback(agent.close)
            agent.start(wait_ready=False)
            devices.append(Device(name, agent))
        for device in devices:
            device.agent.wait_notification("READY=1", timeout=300)
        yield broker, api, devices


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    limit = RateLimit(args.api_rate, args.api_rate_by)
    with (
        tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp,
        fleet(args.agents, Path(tmp), limit) as (broker, api, devices),
    ):
        print(f"{args.agents} agents ready", flush=True)
        wait_until(
            lambda: all(d.agent.status()["mqtt"]["connected"] for d in devices), 120, poll=1.0
        )
        load = Load(devices, args.rate)
        load.thread.start()
        time.sleep(args.warmup)

        steady_start = time.monotonic()
        time.sleep(args.steady)
        steady_end = time.monotonic()
        print(f"steady state measured over {args.steady:g} s; outage begins", flush=True)

        broker.stop()
        api.stop()
        time.sleep(args.outage)
        back_wall, back = time.time(), time.monotonic()
        broker.start()
        api.start()
        print("broker and API are back", flush=True)

        # The backlog: everything acknowledged before the API's return.
        backlog = {d.name: {s for s, at in d.acked if at < back} for d in devices}

        def backlog_delivered() -> bool:
            got = delivered_snapshot(api)
            return all(backlog[d.name] <= got.get(d.name, set()) for d in devices)

        drained_at = wait_until(backlog_delivered, args.recovery, poll=1.0)
        window_end = max(drained_at or time.monotonic(), back + MIN_RECOVERY_WINDOW)
        if time.monotonic() < window_end:
            time.sleep(window_end - time.monotonic())
        # Reconnect spread: give the agents still backing off their full MQTT delay (≤ 120 s).
        wait_until(
            lambda: all(d.agent.status()["mqtt"]["connected"] for d in devices),
            max(0.0, back + 130 - time.monotonic()),
            poll=1.0,
        )
        rss = [rss_mib(d.agent.process.pid) for d in devices if d.agent.process is not None]
        load.stop.set()
        load.thread.join(30)

        # Settle: every acknowledged command must arrive; what does not within the bound is lost.
        acked = {d.name: {s for s, _ in d.acked} for d in devices}
        wait_until(
            lambda: all(
                acked[d.name] <= delivered_snapshot(api).get(d.name, set()) for d in devices
            ),
            args.settle,
            poll=1.0,
        )
        connects = broker_connects(broker, back_wall)
        api.stop()  # writes the final recordings
        log, seqs = api.recordings()
        lost = sum(len(acked[d.name] - seqs.get(d.name, set())) for d in devices)
        failed = sum(d.failed for d in devices)

    steady_requests = sum(1 for at, status, _ in log if steady_start <= at < steady_end)
    steady_events = load.events(steady_start, steady_end)
    recovery = [(at, status) for at, status, _ in log if back <= at < window_end]
    throttled = sum(1 for _, status in recovery if status == 429)
    per_second = Counter(connects)
    result = {
        "agents": args.agents,
        "rate": args.rate,
        "outage": args.outage,
        "api_limit": f"{args.api_rate:g}/s per {args.api_rate_by}",
        "steady_events_per_s": steady_events / (steady_end - steady_start),
        "requests_per_event": steady_requests / max(1, steady_events),
        "peak_connects_per_s": max(per_second.values(), default=0),
        "reconnects": len(connects),
        "reconnect_spread_s": (max(connects) - min(connects)) if connects else 0,
        "recovery_window_s": window_end - back,
        "recovery_requests_per_s": len(recovery) / (window_end - back),
        "recovery_429_percent": 100.0 * throttled / max(1, len(recovery)),
        "drained_after_s": None if drained_at is None else drained_at - back,
        "backlog_items": sum(len(s) for s in backlog.values()),
        "acked": sum(len(s) for s in acked.values()),
        "lost": lost,
        "not_acked": failed,
        "rss_mib_median": statistics.median(rss) if rss else 0.0,
        "rss_mib_max": max(rss, default=0.0),
    }
    return rows(result), result


def delivered_snapshot(api: ApiProcess) -> dict[str, set[int]]:
    """What the running stand-in has delivered so far, plus its earlier incarnations."""
    _, seqs = api.recordings()
    try:
        with urllib.request.urlopen(f"{api.url}/_stub/received", timeout=30) as response:
            live = json.loads(response.read())
    except OSError:
        return seqs  # momentarily unreachable (restarting, overloaded): ask again next poll
    for project, numbers in live["seqs"].items():
        seqs[project].update(numbers)
    return seqs


def rows(r: dict[str, Any]) -> list[Row]:
    n = r["agents"]
    drained = r["drained_after_s"]
    return [
        make_row(
            f"fleet: requests per event, steady state ({n} agents × {r['rate']:g} events/s)",
            [r["requests_per_event"]],
            "req/event",
            target=TARGET_REQUESTS_PER_EVENT,
            better="lower",
            digits=2,
            note=f"{r['steady_events_per_s']:.0f} events/s reached",
        ),
        make_row(
            f"fleet: peak broker connects/s after a {r['outage']:g} s outage",
            [r["peak_connects_per_s"]],
            "conn/s",
            better="lower",
            note=f"{r['reconnects']} connects after the broker's return",
        ),
        make_row(
            "fleet: reconnects spread over (first to last)",
            [r["reconnect_spread_s"]],
            "s",
            target=TARGET_SPREAD,
        ),
        make_row(
            "fleet: API requests/s during recovery",
            [r["recovery_requests_per_s"]],
            "req/s",
            better="lower",
            digits=1,
            note=f"over {r['recovery_window_s']:.0f} s from the API's return",
        ),
        make_row(
            "fleet: share of 429s during recovery",
            [r["recovery_429_percent"]],
            "%",
            target=TARGET_429_SHARE,
            better="lower",
            digits=2,
        ),
        make_row(
            "fleet: every backlog delivered, after the API's return",
            [drained if drained is not None else float("inf")],
            "s",
            target=TARGET_DRAINED,
            better="lower",
            digits=1,
            note=f"{r['backlog_items']} items queued at the return",
        ),
        make_row(
            "fleet: acknowledged commands lost",
            [r["lost"]],
            "",
            target=0,
            better="lower",
            note=f"of {r['acked']} acknowledged",
        ),
        make_row(
            "fleet: agent RSS at the end (median of agents)",
            [r["rss_mib_median"]],
            "MiB",
            better="lower",
            digits=1,
            note=f"max {r['rss_mib_max']:.1f} MiB",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50, help="devices (default 50)")
    parser.add_argument("--rate", type=float, default=5.0, help="events/s per device")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--steady", type=float, default=60.0, help="steady-state window, s")
    parser.add_argument("--outage", type=float, default=120.0, help="broker and API away, s")
    parser.add_argument("--recovery", type=float, default=600.0, help="bound for the drain, s")
    parser.add_argument("--settle", type=float, default=300.0, help="bound for the last items")
    parser.add_argument("--api-rate", type=float, default=20.0, help="API requests/s per client")
    parser.add_argument(
        "--api-rate-by",
        choices=("project", "ip"),
        default="project",
        help="a client is an agent (its project token; default) or the source IP: every agent "
        "here is 127.0.0.1, so `ip` makes the fleet one store behind one NAT",
    )
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--serve-api", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_api:
        return serve_api(
            args.port, args.agents, RateLimit(args.api_rate, args.api_rate_by), args.stats
        )
    started = time.monotonic()
    result_rows, result = run(args)
    print_rows(f"Fleet: {args.agents} agents, {args.outage:g} s outage", result_rows)
    print(json.dumps(result, indent=1))
    print(f"({(time.monotonic() - started) / 60:.1f} minutes; load average {os.getloadavg()})")
    write_json(args.json, result_rows, result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
