"""Daemon footprint: start time, idle memory, idle CPU and wake-ups, RSS under a backlog.

    python3 bench/bench_daemon.py              # ~2 minutes
    python3 bench/bench_daemon.py --quick      # 3 starts, 15 s idle window
    python3 bench/bench_daemon.py --million    # plus the 1,000,000-item backlog (~2 more minutes)
    python3 bench/bench_daemon.py --build-deb  # plus the .deb's own virtualenv (~30 s to build)
    python3 bench/bench_daemon.py --deb dist/engagement-agent_0.2.0_amd64.deb
    python3 bench/bench_daemon.py --json out.json

The real daemon as a subprocess (`python3 -m agent.cli run`), readiness from its own
`READY=1` on a notify socket, `WATCHDOG_USEC` set as systemd's `WatchdogSec=30` would.
Configuration: durable queue, a project pointing at the API stand-in (idle, nothing queued),
`sync.flush_mode = "immediate"` (the default); with MQTT off, and with MQTT on against a
private Mosquitto on a free port.

- start: wall time from `Popen` to `READY=1` (interpreter start and imports included), on an
  existing database (a restart); the first, creating start is reported separately.
- idle RSS: `VmRSS` from /proc/<pid>/status 10 s after READY. With `--deb PATH` (a package
  built by deploy/build-deb.sh for this machine's architecture) or `--build-deb` (build one
  first), also the daemon of that package: unpacked with `dpkg-deb -x` (no root needed) and run
  by its own virtualenv (`opt/engagement-agent/bin/python3` is Debian 12's
  /usr/bin/python3.11, which must exist here), with MQTT off and on. That is the memory a
  device sees; the development venv's interpreter and packages differ.
- idle RSS after traffic: the MQTT-on daemon (the package's, when measured) then takes 40,000
  pipelined `track_event`s over the socket, uploads them all to the stand-in, and is measured
  10 s later: what a device that has worked holds while idle.
- idle CPU and wake-ups: over a window (60 s) with nothing to do; wake-ups are the sum of
  voluntary + involuntary context switches of every thread (/proc/<pid>/task/*/status), per
  second; the per-thread split (named with `py-spy dump` when available) is printed.
- `--million`: the queue is pre-filled with 1,000,000 items through the store API before the
  daemon starts (not through the socket: 40 s instead of minutes), the daemon holds them with
  `flush_mode = "manual"`, then a reload switches to `immediate` (pacing off) and it drains
  them to the stand-in; RSS is sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_socket import (
    KEY,
    TOKEN,
    Row,
    api_stub,
    daemon_config,
    make_row,
    pipelined,
    print_rows,
    stub_reset,
    wait_empty,
    write_json,
)

from tests.fixtures.daemon import AgentProcess, wait_for
from tests.fixtures.debian import PREFIX, REPO, build_deb
from tests.fixtures.mosquitto import MosquittoBroker

#: What systemd passes for the unit's `WatchdogSec=30`.
WATCHDOG_ENV = {"WATCHDOG_USEC": "30000000"}
#: How the rows name the daemons run by the package's virtualenv.
DEB_VENV = "the .deb's virtualenv"
#: Commands (socket, pipelined, uploaded to the stand-in) before the "after traffic" RSS.
TRAFFIC_COMMANDS = 40_000
TRAFFIC_CONNECTIONS = 4


# -- /proc -------------------------------------------------------------------------------------
def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    values = {}
    with open(path) as status:
        for line in status:
            key, _, rest = line.partition(":")
            values[key] = rest.strip()
    return values


def rss_mib(pid: int) -> float:
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


def hwm_mib(pid: int) -> float:
    return int(proc_status(pid)["VmHWM"].split()[0]) / 1024


def thread_switches(pid: int) -> dict[int, int]:
    """tid -> voluntary + involuntary context switches so far."""
    result = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = proc_status(pid, int(tid))
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        result[int(tid)] = int(status["voluntary_ctxt_switches"]) + int(
            status["nonvoluntary_ctxt_switches"]
        )
    return result


def cpu_ns(pid: int) -> int:
    """CPU time of every thread in ns (/proc/<pid>/task/*/schedstat): finer than clock ticks,
    which an idle daemon does not fill in a minute."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (ptrace: call it after measuring)."""
    names: dict[int, str] = {}
    spy = shutil.which("py-spy")
    if spy:
        try:
            out = subprocess.run(
                [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for match in re.finditer(r'^Thread (?:0x[0-9A-Fa-f]+ )?\(?(\d+)\)?.*?"([^"]*)"', out, re.M):
            names[int(match.group(1))] = match.group(2)
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) not in names:
            with suppress(OSError):
                names[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    return names


# -- the .deb's own virtualenv ------------------------------------------------------------------
@contextmanager
def deb_command(deb: Path | None, build: bool) -> Iterator[list[str] | None]:
    """The command that runs the CLI of a built package's virtualenv, unpacked in a temp dir:
    `[its bin/python3, its bin/engagement-agent]`; None when neither option asks for it, or
    when the package cannot be built or run here (said on stdout: the other rows still run,
    and the development venv's idle-RSS row then carries the target)."""
    if deb is None and not build:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-deb-") as tmp:
        try:
            if deb is None:
                print("building the .deb with deploy/build-deb.sh ...", flush=True)
                deb = build_deb(REPO, Path(tmp) / "dist")
            root = Path(tmp) / "root"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            print(f"the .deb rows are left out: cannot build or unpack the package: {exc}")
            yield None
            return
        venv = root / PREFIX
        python = venv / "bin" / "python3"
        if not python.exists():  # a link to the target's interpreter, absent on this host
            print(
                f"the .deb rows are left out: {python} links to {os.readlink(python)}, "
                "which this host does not have (Debian 12's python3.11)"
            )
            yield None
            return
        yield [str(python), str(venv / "bin" / "engagement-agent")]


# -- measurements ------------------------------------------------------------------------------
@contextmanager
def agent_in(
    directory: Path, config: dict[str, Any], command: list[str] | None = None
) -> Iterator[AgentProcess]:
    directory.mkdir(parents=True, exist_ok=True)
    agent = AgentProcess(directory, config, command)
    try:
        yield agent
    finally:
        agent.close()


def start_times(url: str, runs: int) -> tuple[float, list[float]]:
    """(first start on a fresh database, [restarts]) in seconds from Popen to READY=1."""
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-start-")))
        agent = stack.enter_context(
            agent_in(directory, daemon_config(directory, url, {"sync": {}}))
        )
        times = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            agent.start(env=WATCHDOG_ENV)
            times.append(time.perf_counter() - start)
            if agent.terminate() != 0:
                raise RuntimeError(f"the agent did not exit cleanly:\n{agent.log()}")
    return times[0], times[1:]


def idle(
    url: str, broker_port: int, window: float, deb: list[str] | None
) -> dict[str, dict[str, Any]]:
    """Idle daemons side by side (MQTT off / on; with `deb`, also the package's): RSS at
    READY + 10 s, then CPU and context switches over `window` seconds in which nobody talks
    to them."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp, ExitStack() as stack:
        mqtt_on = {"enabled": True, "host": "127.0.0.1", "port": broker_port}
        variants: list[tuple[str, dict[str, Any], list[str] | None]] = [
            ("MQTT off", {"enabled": False}, None),
            ("MQTT on", mqtt_on, None),
        ]
        if deb is not None:
            variants += [
                (f"MQTT off, {DEB_VENV}", {"enabled": False}, deb),
                (f"MQTT on, {DEB_VENV}", {**mqtt_on, "client_id": "bench-deb"}, deb),
            ]
        agents = {}
        for name, mqtt, command in variants:
            directory = Path(tmp) / name.replace(" ", "-").replace(",", "").replace("'", "")
            config = daemon_config(directory, url, {"sync": {}, "mqtt": mqtt})
            agents[name] = stack.enter_context(agent_in(directory, config, command))
        ready_at = {}
        for name, agent in agents.items():
            agent.start(env=WATCHDOG_ENV)
            ready_at[name] = time.monotonic()
        wait_for(
            lambda: all(
                a.status()["mqtt"]["connected"] for n, a in agents.items() if "MQTT on" in n
            ),
            15,
            "the agents' connections to the broker",
        )
        time.sleep(max(0.0, max(ready_at.values()) + 10 - time.monotonic()))
        pids = {name: agent.process.pid for name, agent in agents.items()}  # type: ignore[union-attr]
        for name, pid in pids.items():
            results[name] = {"rss": rss_mib(pid)}
        before = {name: (thread_switches(pid), cpu_ns(pid)) for name, pid in pids.items()}
        start = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - start
        for name, pid in pids.items():
            switches, cpu = thread_switches(pid), cpu_ns(pid)
            old_switches, old_cpu = before[name]
            per_thread = {tid: n - old_switches.get(tid, 0) for tid, n in switches.items()}
            names = thread_names(pid)
            results[name].update(
                wakeups=sum(per_thread.values()) / elapsed,
                cpu_percent=(cpu - old_cpu) / 1e9 / elapsed * 100,
                rss_end=rss_mib(pid),
                threads={
                    f"{names.get(tid, '?')} ({tid})": n / elapsed
                    for tid, n in sorted(per_thread.items(), key=lambda kv: -kv[1])
                },
            )
        # The device's daemon once it has worked: commands in, all uploaded, idle again.
        worked = f"MQTT on, {DEB_VENV}" if deb is not None else "MQTT on"
        pipelined(agents[worked], TRAFFIC_CONNECTIONS, TRAFFIC_COMMANDS // TRAFFIC_CONNECTIONS)
        wait_empty(agents[worked], url, 300)
        time.sleep(10)
        results[worked]["rss_after_traffic"] = rss_mib(pids[worked])
    return results


def million(url: str, count: int) -> dict[str, float]:
    """Pre-fill `count` items, hold them (manual), then drain them (immediate, pacing off)."""
    from bench_sync import make_item  # the same ~400-byte event the sync benchmark uses

    from agent.config import QueueConfig
    from agent.store import Store, Txn
    from agent.tracker.model import Project

    def enqueue(items: list[Any], txn: Txn) -> None:
        txn.enqueue(items, time.time())

    with tempfile.TemporaryDirectory(prefix="bench-million-") as tmp:
        directory = Path(tmp)
        config = daemon_config(directory, url)
        config["sync"] = {"flush_mode": "manual", "max_requests_per_second": 0}
        store = Store(
            QueueConfig(path=directory / "queue.db", max_bytes=8 * 2**30, durability="full")
        )
        store.open()
        project = Project(TOKEN, KEY, url)
        start = time.perf_counter()
        for first in range(0, count, 1000):
            batch = [make_item(project, n) for n in range(first, min(count, first + 1000))]
            store.submit(partial(enqueue, batch)).result()
        fill_seconds = time.perf_counter() - start
        store.close()
        with agent_in(directory, config) as agent:
            start = time.perf_counter()
            agent.start(env=WATCHDOG_ENV)
            ready = time.perf_counter() - start
            pid = agent.process.pid  # type: ignore[union-attr]
            if agent.status()["queue"]["items"] != count:
                raise RuntimeError("the pre-filled backlog is not what the agent sees")
            time.sleep(10)
            held = rss_mib(pid)
            samples: list[float] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.5):
                    samples.append(rss_mib(pid))

            sampler = threading.Thread(target=sample, daemon=True)
            start = time.perf_counter()
            agent.reload({"sync": {"flush_mode": "immediate"}})
            sampler.start()
            last_reset = time.monotonic()
            try:
                while agent.status()["queue"]["items"]:
                    if time.monotonic() - last_reset > 2:
                        stub_reset(url)
                        last_reset = time.monotonic()
                    time.sleep(0.5)
            finally:
                stop.set()
                sampler.join()
            drain_seconds = time.perf_counter() - start
            return {
                "fill_rate": count / fill_seconds,
                "ready_s": ready,
                "rss_held": held,
                "rss_drain_max": max(samples, default=held),
                "rss_end": rss_mib(pid),
                "hwm": hwm_mib(pid),
                "drain_rate": count / drain_seconds,
            }


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 starts, 15 s idle window")
    parser.add_argument("--starts", type=int, default=None, help="restarts to time (default 7)")
    parser.add_argument("--window", type=float, default=None, help="idle seconds (default 60)")
    parser.add_argument("--million", action="store_true", help="the 1,000,000-item backlog run")
    parser.add_argument("--million-items", type=int, default=1_000_000)
    parser.add_argument(
        "--deb", type=Path, default=None, help="also measure this package's virtualenv"
    )
    parser.add_argument(
        "--build-deb",
        action="store_true",
        help="build the .deb (deploy/build-deb.sh) and measure its virtualenv",
    )
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    starts = args.starts or (3 if args.quick else 7)
    window = args.window or (15.0 if args.quick else 60.0)

    rows: list[Row] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        url = stack.enter_context(api_stub())
        broker = stack.enter_context(MosquittoBroker(Path(tmp)))
        deb = stack.enter_context(deb_command(args.deb, args.build_deb))

        cold, warm = start_times(url, starts)
        rows.append(
            make_row(
                "start to READY=1 (restart, existing database)",
                warm,
                "s",
                better="lower",
                digits=2,
                baseline=0.25,
                baseline_label="import time of the dependencies, design-time measurement",
                note=f"first start, creating the database: {cold:.2f} s",
            )
        )
        idle_results = idle(url, broker.port, window, deb)
        for name, result in idle_results.items():
            rows.append(
                make_row(
                    f"idle RSS 10 s after READY, {name}",
                    [result["rss"]],
                    "MiB",
                    # The target is the package's (what a device runs); without it, the tree's.
                    target=45 if deb is None or DEB_VENV in name else None,
                    better="lower",
                    digits=1,
                    baseline=33,
                    baseline_label="RSS after importing the deps, design-time measurement",
                    note=f"{result['rss_end']:.1f} MiB after the idle window",
                )
            )
            if "rss_after_traffic" in result:
                rows.append(
                    make_row(
                        f"idle RSS 10 s after {TRAFFIC_COMMANDS:,} commands uploaded, {name}",
                        [result["rss_after_traffic"]],
                        "MiB",
                        better="lower",
                        digits=1,
                        note="socket, pipelined; the target is measured at start, above",
                    )
                )
        for name, result in idle_results.items():
            if DEB_VENV in name:  # the same daemon as above; only its memory differs
                continue
            busiest = ", ".join(
                f"{thread} {rate:.2f}/s" for thread, rate in result["threads"].items() if rate
            )
            rows.append(
                make_row(
                    f"idle wake-ups (ctxt switches, all threads), {name}",
                    [result["wakeups"]],
                    "/s",
                    target=1.0,
                    better="lower",
                    digits=2,
                    note=f"over {window:.0f} s: {busiest or 'none'}",
                )
            )
            rows.append(
                make_row(
                    f"idle CPU, {name}",
                    [result["cpu_percent"]],
                    "% of a core",
                    better="lower",
                    digits=3,
                )
            )
        if args.million:
            m = million(url, args.million_items)
            note = (
                f"pre-filled through the store API at {m['fill_rate']:,.0f} items/s; "
                f"start to READY with the backlog {m['ready_s']:.2f} s"
            )
            rows.append(
                make_row(
                    "RSS holding 1,000,000 queued items",
                    [m["rss_held"]],
                    "MiB",
                    better="lower",
                    digits=1,
                    note=note,
                )
            )
            rows.append(
                make_row(
                    "RSS draining 1,000,000 items (max of 0.5 s samples)",
                    [m["rss_drain_max"]],
                    "MiB",
                    better="lower",
                    digits=1,
                    note=f"VmHWM {m['hwm']:.1f} MiB, {m['rss_end']:.1f} MiB when empty",
                )
            )
            rows.append(
                make_row(
                    "drain rate of that 1,000,000-item backlog",
                    [m["drain_rate"]],
                    "items/s",
                    target=20_000,
                    note="sync to the stand-in, pacing off",
                )
            )
    print_rows("Daemon footprint", rows)
    for row in rows:
        if row["note"]:
            print(f"  {row['metric']}: {row['note']}")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
