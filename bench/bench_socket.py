"""Socket ingest: the real daemon as a subprocess, commands over its Unix socket.

    python3 bench/bench_socket.py                  # ~1.5 minutes
    python3 bench/bench_socket.py --quick          # smaller sizes, one round
    python3 bench/bench_socket.py --json out.json  # also write the rows for bench/run.py

Every number is end to end: a command counts when its reply line arrived, i.e. it was read,
validated, tracked, committed with `queue.durability = "full"` (fsync) and acknowledged.
The daemon runs with MQTT off; sync is `manual` (no upload) except in the "while draining"
run, where it uploads to the API stand-in (`engagement-api-stub`, its own process) with
pacing off. Results go in docs/benchmarks.md, "## Socket ingest".

Rows:
- pipelined: C connections (1, 4, 16) each write their commands in large chunks (64 KiB)
  while a thread reads the replies; the daemon keeps up to 1024 commands in flight per
  connection. With it, the daemon's CPU time per command (user + system, /proc/<pid>/stat).
- persist-queue: its `SQLiteAckQueue` (auto_commit, `synchronous=FULL`) fed by as many threads
  as the pipelined row has connections, each putting one item at a time (bench/bench_queue.py),
  in the same run: the peer of the 4- and 16-connection rows.
- latency: one connection, one request at a time, p50/p99 of the round trip.
- while draining: pipelined ingest with sync uploading the same queue concurrently; both
  the ingest rate and the drain rate (items POSTed and deleted per second until empty).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_queue import bench_persist_queue  # noqa: E402

from tests.fixtures.daemon import AgentProcess  # noqa: E402

TOKEN, KEY = "bench-project", "bench-key"
STUB_COMMAND = (sys.executable, "-m", "agent_devtools.apistub")
CHUNK_BYTES = 64 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

Row = dict[str, Any]


# -- the daemon and the stand-in ---------------------------------------------------------------
def daemon_config(
    workdir: Path, api_url: str | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Durable queue, MQTT off, no upload unless `api_url` is given (then pacing off)."""
    config: dict[str, Any] = {
        "device_id": "bench-device",
        "log_level": "warning",
        "queue": {"durability": "full", "max_bytes": 8 * 2**30},
        "mqtt": {"enabled": False},
        "sync": {"flush_mode": "manual"},
    }
    if api_url is not None:
        config["project"] = {
            "project_token": TOKEN,
            "authorization_token": KEY,
            "base_url": api_url,
        }
        config["sync"] = {"flush_mode": "immediate", "max_requests_per_second": 0}
    for section, values in (extra or {}).items():
        if isinstance(values, Mapping) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


@contextmanager
def running_daemon(
    api_url: str | None = None,
    extra: Mapping[str, Any] | None = None,
    workdir: Path | None = None,
) -> Iterator[AgentProcess]:
    """A started daemon in a temp directory (or `workdir`); killed and removed on exit."""
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        directory = workdir or Path(tmp)
        agent = AgentProcess(directory, daemon_config(directory, api_url, extra))
        try:
            agent.start()
            yield agent
        finally:
            agent.close()


@contextmanager
def api_stub() -> Iterator[str]:
    """`engagement-api-stub` in its own process (its CPU does not share the daemon's GIL)."""
    proc = subprocess.Popen(
        [*STUB_COMMAND, "--port", "0", "--project", f"{TOKEN}:{KEY}"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError("engagement-api-stub did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def stub_reset(url: str) -> None:
    """Forget what the stand-in recorded, so a long drain does not grow its memory."""
    import urllib.request

    request = urllib.request.Request(f"{url}/_stub/reset", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def agent_pid(agent: AgentProcess) -> int:
    assert agent.process is not None
    return agent.process.pid


# -- clients -----------------------------------------------------------------------------------
def command_lines(count: int, conn: int) -> list[bytes]:
    """`count` distinct track_event lines with ~200 bytes of properties each."""
    lines = []
    for i in range(count):
        command = {
            "command": "track_event",
            "name": "purchase_item",
            "properties": {
                "seq": i,
                "connection": conn,
                "product_id": f"sku-{i % 5000:05d}",
                "title": "Handbag, leather, brown, medium",
                "price": 129.9,
                "currency": "EUR",
                "screen": "checkout/confirm",
                "kiosk_zone": "entrance-left",
                "campaign": "spring-sale-2024",
            },
        }
        lines.append(json.dumps(command, separators=(",", ":")).encode() + b"\n")
    return lines


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(str(path))
    return sock


class PipelinedClient:
    """One connection: a thread writes `payload` in chunks, `run()` counts reply lines."""

    def __init__(self, path: Path, payload: bytes, count: int) -> None:
        self.sock = connect(path)
        self.payload = payload
        self.count = count
        self.errors = 0
        self.error_sample = b""
        self.finished_at = 0.0
        self.failure: BaseException | None = None

    def _write(self) -> None:
        view = memoryview(self.payload)
        try:
            for start in range(0, len(view), CHUNK_BYTES):
                self.sock.sendall(view[start : start + CHUNK_BYTES])
        except OSError as exc:
            self.failure = self.failure or exc

    def run(self) -> None:
        try:
            self._read()
        except BaseException as exc:  # reported by pipelined(), not lost in a thread
            self.failure = self.failure or exc

    def _read(self) -> None:
        writer = threading.Thread(target=self._write, daemon=True)
        writer.start()
        seen = 0
        tail = b""
        while seen < self.count:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError(f"the agent closed the connection after {seen} replies")
            seen += data.count(b"\n")
            # A reply is small; failures are rare: only look closer when one is there.
            window = tail + data
            if b'"ok":false' in window:
                self.errors += window.count(b'"ok":false')
                self.error_sample = self.error_sample or window[:400]
            tail = data[-16:]
        self.finished_at = time.perf_counter()
        writer.join()
        self.sock.close()


def pipelined(agent: AgentProcess, connections: int, per_connection: int) -> Row:
    payloads = [b"".join(command_lines(per_connection, c)) for c in range(connections)]
    clients = [PipelinedClient(agent.socket_path, p, per_connection) for p in payloads]
    pid = agent_pid(agent)
    threads = [threading.Thread(target=c.run) for c in clients]
    cpu0 = cpu_seconds(pid)
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failures = [c.failure for c in clients if c.failure is not None]
    if failures:
        raise RuntimeError(f"{len(failures)} client(s) failed: {failures[0]!r}") from failures[0]
    elapsed = max(c.finished_at for c in clients) - start
    cpu = cpu_seconds(pid) - cpu0
    errors = sum(c.errors for c in clients)
    if errors:
        sample = next(c.error_sample for c in clients if c.errors)
        raise RuntimeError(f"{errors} commands were refused, e.g. {sample[:300]!r}")
    total = connections * per_connection
    return {"rate": total / elapsed, "seconds": elapsed, "cpu_us": cpu / total * 1e6}


def latency(agent: AgentProcess, count: int, warmup: int = 200) -> dict[str, float]:
    lines = command_lines(count + warmup, 0)
    sock = connect(agent.socket_path)
    reader = sock.makefile("rb")
    samples = []
    try:
        for i, line in enumerate(lines):
            t0 = time.perf_counter()
            sock.sendall(line)
            reply = reader.readline()
            elapsed = time.perf_counter() - t0
            if not reply.startswith(b'{"ok":true'):
                raise RuntimeError(f"refused: {reply[:300]!r}")
            if i >= warmup:
                samples.append(elapsed)
    finally:
        reader.close()
        sock.close()
    samples.sort()
    return {
        "p50_ms": samples[len(samples) // 2] * 1e3,
        "p99_ms": samples[int(len(samples) * 0.99)] * 1e3,
        "max_ms": samples[-1] * 1e3,
    }


def warm_up(agent: AgentProcess) -> None:
    """The first command of an app also tracks `installation`: get it out of the way."""
    reply = agent.request({"command": "track_event", "name": "warm_up"})
    if not reply.get("ok"):
        raise RuntimeError(f"warm-up refused: {reply}")


def while_draining(count: int) -> dict[str, float]:
    """Pipelined ingest (1 connection) while sync uploads the same queue to the stand-in.

    `ingest_rate`: acks/s of the ingest itself. `drain_during`: items the stand-in accepted
    (and the daemon deleted) per second while the ingest ran. `in_out`: items per second from
    the first command sent to the queue seen empty again — the sustained "in = out" rate.
    """
    with api_stub() as url, running_daemon(api_url=url) as agent:
        warm_up(agent)
        wait_empty(agent, url, 30)
        sent0 = sent_total(agent)
        start = time.perf_counter()
        ingest = pipelined(agent, 1, count)
        sent_mid = sent_total(agent) - sent0
        empty_at = wait_empty(agent, url, 600)
        sent = sent_total(agent) - sent0
        if sent < count:
            raise RuntimeError(f"only {sent} of {count} items were reported sent")
        return {
            "ingest_rate": ingest["rate"],
            "drain_during": sent_mid / ingest["seconds"],
            "in_out": count / (empty_at - start),
        }


def sent_total(agent: AgentProcess) -> int:
    projects = agent.status()["sync"].get("projects", [])
    return sum(int(p.get("sent", 0)) for p in projects)


def wait_empty(agent: AgentProcess, url: str, timeout: float) -> float:
    """Poll status until the queue is empty; returns the perf_counter time it was seen empty."""
    deadline = time.monotonic() + timeout
    last_reset = time.monotonic()
    while True:
        items = agent.status()["queue"]["items"]
        now = time.perf_counter()
        if items == 0:
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"the queue did not drain within {timeout} s ({items} left)")
        if time.monotonic() - last_reset > 2:
            stub_reset(url)
            last_reset = time.monotonic()
        time.sleep(0.02)


# -- rows --------------------------------------------------------------------------------------
def make_row(
    metric: str,
    samples: list[float],
    unit: str,
    *,
    target: float | None = None,
    better: str = "higher",
    baseline: float | None = None,
    baseline_label: str = "",
    note: str = "",
    digits: int = 0,
) -> Row:
    """One result row, as bench/run.py reads it from `--json` (value = median of samples)."""
    return {
        "metric": metric,
        "value": statistics.median(samples),
        "samples": samples,
        "unit": unit,
        "target": target,
        "better": better,
        "baseline": baseline,
        "baseline_label": baseline_label,
        "note": note,
        "digits": digits,
    }


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n")
    print(f"{'metric':<58} {'median':>12} {'unit':<10} {'target':>10}  runs")
    for row in rows:
        fmt = f",.{row['digits']}f"
        sign = "≥" if row["better"] == "higher" else "≤"
        target = f"{sign} {row['target']:{fmt}}" if row["target"] is not None else "—"
        runs = " / ".join(f"{v:{fmt}}" for v in row["samples"])
        print(f"{row['metric']:<58} {row['value']:>12{fmt}} {row['unit']:<10} {target:>10}  {runs}")


def write_json(path: str | None, rows: list[Row], **extra: Any) -> None:
    if path:
        Path(path).write_text(json.dumps({"rows": rows, **extra}, indent=1))


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per row (default 3)")
    parser.add_argument("--count", type=int, default=None, help="commands per pipelined round")
    parser.add_argument("--latency-count", type=int, default=5000)
    parser.add_argument("--pq-items", type=int, default=None, help="items per persist-queue run")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    count = args.count or (20_000 if args.quick else 100_000)
    latency_count = 1000 if args.quick else args.latency_count
    pq_items = args.pq_items or (4_000 if args.quick else 12_800)

    piped: dict[int, list[dict[str, float]]] = {1: [], 4: [], 16: []}
    peers: dict[int, list[float]] = {4: [], 16: []}
    lat: list[dict[str, float]] = []
    with running_daemon() as agent:
        warm_up(agent)
        for _ in range(rounds):
            for conns in piped:
                piped[conns].append(pipelined(agent, conns, count // conns))
            lat.append(latency(agent, latency_count))
            for threads, rates in peers.items():
                with tempfile.TemporaryDirectory(prefix="bench-pq-") as workdir:
                    rates.append(bench_persist_queue(workdir, "full", threads, pq_items)["rate"])
    drain = [while_draining(count) for _ in range(rounds)]

    rows = []
    for conns, results in piped.items():
        peer = statistics.median(peers[conns]) if conns in peers else None
        rows.append(
            make_row(
                f"socket pipelined, {conns} connection{'s' if conns > 1 else ''}",
                [r["rate"] for r in results],
                "cmd/s",
                target=30_000,
                baseline=peer,
                baseline_label=(
                    f"persist-queue SQLiteAckQueue, {conns} threads, same run" if peer else ""
                ),
                note=f"daemon CPU {statistics.median(r['cpu_us'] for r in results):.0f} µs/cmd",
            )
        )
        rows.append(
            make_row(
                f"socket daemon CPU per command, {conns} connection{'s' if conns > 1 else ''}",
                [r["cpu_us"] for r in results],
                "µs/cmd",
                target=30,
                better="lower",
                digits=1,
            )
        )
        if peer is not None:
            rows.append(
                make_row(
                    f"ratio socket ({conns} connections) / persist-queue ({conns} threads)",
                    [r["rate"] / p for r, p in zip(results, peers[conns], strict=True)],
                    "×",
                    target=6.0,
                    digits=1,
                )
            )
    rows.append(
        make_row(
            "socket ack latency p50, 1 client, no pipelining",
            [r["p50_ms"] for r in lat],
            "ms",
            better="lower",
            digits=2,
        )
    )
    rows.append(
        make_row(
            "socket ack latency p99, 1 client, no pipelining",
            [r["p99_ms"] for r in lat],
            "ms",
            target=2.0,
            better="lower",
            digits=2,
            note=f"max {statistics.median(r['max_ms'] for r in lat):.1f} ms",
        )
    )
    rows.append(
        make_row(
            "socket ingest while sync drains to the stand-in",
            [r["ingest_rate"] for r in drain],
            "cmd/s",
            baseline=20_000,
            baseline_label="prototype in = out, design-time measurement",
        )
    )
    rows.append(
        make_row(
            "sync drain rate during that ingest",
            [r["drain_during"] for r in drain],
            "items/s",
        )
    )
    rows.append(
        make_row(
            "in = out: first command sent to queue empty again",
            [r["in_out"] for r in drain],
            "items/s",
            baseline=20_000,
            baseline_label="prototype in = out, design-time measurement",
        )
    )
    print_rows(
        f"Socket ingest: {count:,} track_event commands per round, {rounds} round(s), "
        f"latency over {latency_count:,} requests",
        rows,
    )
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
