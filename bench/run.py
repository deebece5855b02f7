"""Every benchmark, one table: runs each one, takes medians, writes docs/benchmarks.md.

    python3 bench/run.py              # everything, ~21 minutes on 2 cores (fleet: ~8)
    python3 bench/run.py --quick      # 1 run each, small sizes: a smoke check (~6 minutes)
    python3 bench/run.py --million    # plus the 1,000,000-item backlog runs (~+5 minutes)
    python3 bench/run.py --no-write   # print only, leave docs/benchmarks.md alone
    python3 bench/run.py --only flash # one of: queue sync mqtt socket daemon hostile flash fleet

Each benchmark runs as its own process (a crash or hang of one is reported as a failed row
and the rest still run), writes its results as JSON, and its own table goes to the terminal
as it runs. The summary table (metric, median, target, peer/baseline, ratio) replaces the
block between the `summary` markers at the top of docs/benchmarks.md, with the date, the
machine and the exact commands.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DOC = REPO / "docs" / "benchmarks.md"
START_MARK = "<!-- summary:start (written by bench/run.py) -->"
END_MARK = "<!-- summary:end -->"
#: A benchmark process that runs longer than this is killed and reported failed.
TIMEOUT = 20 * 60


@dataclass
class Row:
    metric: str
    samples: list[float] = field(default_factory=list)
    unit: str = ""
    target: float | None = None
    better: str = "higher"
    baseline: float | None = None
    baseline_label: str = ""
    note: str = ""
    digits: int = 0
    error: str = ""

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        return self.value >= self.target if self.better == "higher" else self.value <= self.target


@dataclass
class Bench:
    """One benchmark script: how to run it and how to turn its output into rows."""

    name: str
    script: str
    args: list[str]
    to_rows: Callable[[Any], list[Row]]
    repeats: int = 1
    #: "json": the script writes JSON to the path after --json; "stdout": parse its output.
    output: str = "json"

    def command(self) -> list[str]:
        return ["python3", f"bench/{self.script}", *self.args]


# -- turning each benchmark's output into rows ---------------------------------------------------
def queue_rows(result: dict[str, Any]) -> list[Row]:
    rows = [
        Row(
            "queue: store ingest, 1 thread, 1024 ops in flight (the daemon's shape)",
            [result["single"]["rate"]],
            "items/s",
            target=25_000,
        ),
        Row(
            "queue: store ingest, 64 threads, 16 ops in flight each",
            [result["piped"]["rate"]],
            "items/s",
            target=25_000,
        ),
        Row(
            "queue: store ingest, 64 threads, each waits for its commit",
            [result["closed"]["rate"]],
            "items/s",
            baseline=result["pq"]["rate"],
            baseline_label="persist-queue SQLiteAckQueue, 64 threads, same run",
        ),
        Row(
            "queue: ratio store (waiting threads) / persist-queue",
            [result["ratio"]],
            "×",
            target=5.0,
            digits=1,
        ),
        Row(
            "queue: bytes on disk per item / payload bytes",
            [result["disk"]["ratio"]],
            "×",
            target=1.5,
            better="lower",
            digits=2,
        ),
    ]
    churn = result["churn"]
    rows.append(
        Row(
            f"queue: file after {len(churn)} fill-past-cap/drain rounds (cap 16 MiB)",
            [churn[-1]["db_drained"] / 2**20],
            "MiB",
            better="lower",
            digits=2,
            note=f"after round 1: {churn[0]['db_drained'] / 2**20:.2f} MiB",
        )
    )
    if "million" in result:
        m = result["million"]
        rows.append(
            Row(
                "queue: store RSS holding / draining 1,000,000 items (peak)",
                [m["rss_peak_mib"]],
                "MiB",
                better="lower",
                digits=1,
                note=f"start {m['rss_start_mib']:.1f}, holding {m['rss_held_mib']:.1f} MiB",
            )
        )
    return rows


def sync_rows(result: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"sync: drain rate to the stand-in, durability {result['durability']}",
            [r["rate"] for r in result["runs"]],
            "items/s",
            target=20_000,
            note="real Syncer, 50 per POST, pacing off",
        )
    ]


def mqtt_rows(stdout: str) -> list[Row]:
    """bench_mqtt.py prints a markdown table: | consumer | median | CPU µs/command | rounds |."""
    found: dict[str, tuple[list[float], str]] = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[\d,.]+", cells[1]):
            samples = [float(x.replace(",", "")) for x in cells[3].split(", ") if x]
            found[cells[0]] = (samples, cells[2])
    baseline = next((v for k, (v, _) in found.items() if "mosquitto_sub" in k), None)
    base = statistics.median(baseline) if baseline else None
    rows = []
    for name, (samples, cpu) in found.items():
        if "mosquitto_sub" in name:
            continue
        rows.append(
            Row(
                f"mqtt: QoS 1 ingest, {name}",
                samples,
                "cmd/s",
                target=10_000,
                baseline=base,
                baseline_label="mosquitto_sub -q 1 (C), same broker, same run",
                note=f"agent CPU {cpu} µs/cmd; target also ≥ 0.5× the baseline",
            )
        )
    if not rows:
        raise ValueError("no result table in bench_mqtt.py's output")
    return rows


def flash_rows(result: dict[str, Any]) -> list[Row]:
    """bench_flash.py: bytes written per event, beside the append+fdatasync floor."""
    rows = []
    for r in result["ingest"]:
        full_20 = r["durability"] == "full" and r["rate"] == 20 and not r.get("uploaded")
        rows.append(
            Row(
                f"storage writes per event, durability {r['durability']}, "
                f"{r['rate']:g} commands/s one at a time"
                + (", each uploaded and deleted as it comes" if r.get("uploaded") else ""),
                [r["bytes_per_event"]],
                "B",
                target=8192 if full_20 else None,
                better="lower",
                baseline=r["floor_per_event"],
                baseline_label="append + fdatasync per line, same run",
                note=f"{r['events']} events of {r['line_bytes']} B",
            )
        )
        if full_20:
            rows.append(
                Row(
                    "storage writes per event / floor, durability full, 20/s",
                    [r["vs_floor"]],
                    "×",
                    target=2.0,
                    better="lower",
                    digits=2,
                )
            )
    for r in result["drain"]:
        rows.append(
            Row(
                f"storage writes per event uploaded and deleted, durability {r['durability']}",
                [r["bytes_per_event"]],
                "B",
                target=2048 if r["durability"] == "full" else None,
                better="lower",
                note=f"drain of {r['events']} events to the stand-in",
            )
        )
    return rows


def json_rows(result: dict[str, Any]) -> list[Row]:
    """bench_socket.py / bench_daemon.py / bench_hostile.py write rows already."""
    rows = []
    for r in result["rows"]:
        rows.append(
            Row(
                r["metric"],
                list(r["samples"]),
                r["unit"],
                target=r["target"],
                better=r["better"],
                baseline=r["baseline"],
                baseline_label=r["baseline_label"],
                note=r["note"],
                digits=r["digits"],
            )
        )
    return rows


def benches(quick: bool, million: bool) -> list[Bench]:
    queue_args = ["--items", "32000", "--pq-items", "3200", "--churn-rounds", "2"] if quick else []
    sync_args = ["--items", "20000", "--runs", "1"] if quick else []
    mqtt_args = ["--count", "10000", "--rounds", "1"] if quick else []
    socket_args = ["--quick"] if quick else []
    fleet_args = ["--agents", "10", "--steady", "30", "--outage", "30"] if quick else []
    # The idle-RSS target is the .deb's virtualenv's (what a device runs): built here, ~30 s.
    daemon_args = ["--build-deb", *(["--quick"] if quick else [])]
    flash_args = ["--quick"] if quick else []
    if million:
        queue_args.append("--million")
        daemon_args.append("--million")
    result = [
        Bench("queue", "bench_queue.py", queue_args, queue_rows, repeats=1 if quick else 3),
        Bench("sync", "bench_sync.py", sync_args, sync_rows),
    ]
    if (BENCH / "bench_mqtt.py").exists():
        result.append(Bench("mqtt", "bench_mqtt.py", mqtt_args, mqtt_rows, output="stdout"))
    result += [
        Bench("socket", "bench_socket.py", socket_args, json_rows),
        Bench("instructions", "bench_instructions.py", ["--quick"] if quick else [], json_rows),
        Bench("daemon", "bench_daemon.py", daemon_args, json_rows),
        Bench("hostile", "bench_hostile.py", ["--quick"] if quick else [], json_rows),
        Bench("flash", "bench_flash.py", flash_args, flash_rows),
        Bench("fleet", "bench_fleet.py", fleet_args, json_rows),
    ]
    return result


# -- running -----------------------------------------------------------------------------------
def run_once(bench: Bench) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix=f"bench-run-{bench.name}-") as tmp:
        out = Path(tmp) / "result.json"
        command = bench.command() + (["--json", str(out)] if bench.output == "json" else [])
        command[0] = sys.executable
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        assert proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        for line in proc.stdout:  # echo as it runs: a long benchmark shows progress
            print(f"  {line}", end="", flush=True)
            lines.append(line)
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"killed after {TIMEOUT} s")
        code = proc.wait()
        if code != 0:
            tail = "".join(lines[-3:]).strip().splitlines()
            raise RuntimeError(f"exit {code}: {tail[-1] if tail else 'no output'}")
        if bench.output == "json":
            return bench.to_rows(json.loads(out.read_text()))
        return bench.to_rows("".join(lines))


def run_bench(bench: Bench) -> list[Row]:
    """`repeats` runs; rows are merged by metric (their samples pooled, the median reported).
    A failed run is a failed row unless another run of the same benchmark succeeded."""
    merged: dict[str, Row] = {}
    errors = []
    for i in range(bench.repeats):
        print(f"\n== {bench.name} ({i + 1}/{bench.repeats}): {' '.join(bench.command())}")
        try:
            rows = run_once(bench)
        except Exception as exc:  # any failure becomes a row; the other benchmarks still run
            errors.append(f"{type(exc).__name__}: {exc}")
            print(f"  FAILED: {errors[-1]}")
            continue
        for row in rows:
            if row.metric in merged:
                merged[row.metric].samples += row.samples
            else:
                merged[row.metric] = row
    if not merged:
        return [Row(f"{bench.name}: (benchmark failed)", error="; ".join(errors)[:300])]
    if errors:
        for row in merged.values():
            row.note = f"{row.note}; {len(errors)} failed run(s)".lstrip("; ")
    return list(merged.values())


# -- the table ---------------------------------------------------------------------------------
def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| metric | median | target | peer / baseline | ratio | runs | notes |",
        "|---|---:|---|---|---:|---|---|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.metric} | **failed** | | | | | {row.error} |")
            continue
        sign = "≥" if row.better == "higher" else "≤"
        target = "—" if row.target is None else f"{sign} {fmt(row.target, row.digits)}"
        if row.met is False:
            target += " **missed**"
        elif row.met:
            target += " ✓"
        peer = (
            f"{fmt(row.baseline, row.digits)} ({row.baseline_label})"
            if row.baseline is not None
            else "—"
        )
        ratio = (
            f"{row.value / row.baseline:.2f}×" if row.baseline and row.value is not None else "—"
        )
        runs = " / ".join(fmt(v, row.digits) for v in row.samples) if len(row.samples) > 1 else ""
        value = f"{fmt(row.value, row.digits)} {row.unit}".strip()
        lines.append(
            f"| {row.metric} | {value} | {target} | {peer} | {ratio} | {runs} | {row.note} |"
        )
    return "\n".join(lines)


def python_speed() -> float:
    """Seconds for a fixed pure-Python loop (10 million additions), best of 3.

    Shared VMs differ, and the same VM differs from day to day, by a factor of two or more in
    what one core does; the CPU-bound rows (commands per second, µs per command) move with
    it. Recorded at the start and the end of every run so that runs on different machines
    (and a run whose machine changed speed half-way) can be told apart."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best


def machine() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}; "
        f"load average at the end {load}"
    )


def summary(
    rows: list[Row],
    benches_run: list[Bench],
    argv: list[str],
    minutes: float,
    speed: tuple[float, float],
) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    commands = "\n".join(
        f"    {' '.join(b.command())}" + (f"    # × {b.repeats}" if b.repeats > 1 else "")
        for b in benches_run
    )
    missed = [r.metric for r in rows if r.met is False]
    failed = [r.metric for r in rows if r.error]
    verdict = f"{len([r for r in rows if r.met])} targets met, {len(missed)} missed" + (
        f", {len(failed)} benchmark(s) failed" if failed else ""
    )
    return "\n".join(
        [
            START_MARK,
            "## Summary",
            "",
            f"`python3 bench/run.py{' ' if argv else ''}{' '.join(argv)}` on {now}, "
            f"{minutes:.1f} minutes; {verdict}.",
            "",
            f"Machine: {machine()}.",
            "",
            f"Python speed (bench/run.py `python_speed`: a 10-million-iteration loop, best of 3): "
            f"{speed[0]:.2f} s at the start, {speed[1]:.2f} s at the end. CPU-bound rows scale "
            "with it: compare runs on different days by this figure first.",
            "",
            "Commands it ran (each benchmark in its own process; medians over the runs shown):",
            "",
            commands,
            "",
            table(rows),
            "",
            END_MARK,
        ]
    )


def write_doc(text: str) -> None:
    """Replace the summary block, or insert it after the doc's introduction."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if START_MARK in doc and END_MARK in doc:
        head, rest = doc.split(START_MARK, 1)
        _, tail = rest.split(END_MARK, 1)
        doc = head + text + tail
    else:
        first_section = doc.find("\n## ")
        cut = len(doc) if first_section < 0 else first_section + 1
        doc = doc[:cut].rstrip("\n") + "\n\n" + text + "\n\n" + doc[cut:]
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run each, small sizes")
    parser.add_argument("--million", action="store_true", help="add the 1,000,000-item runs")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names to run")
    args = parser.parse_args(argv)
    started = time.monotonic()
    speed_at_start = python_speed()
    todo = benches(args.quick, args.million)
    if args.only is not None:
        todo = [b for b in todo if b.name in args.only]
    rows: list[Row] = []
    for bench in todo:
        rows += run_bench(bench)
    speed = (speed_at_start, python_speed())
    minutes = (time.monotonic() - started) / 60
    flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"]
    text = summary(rows, todo, flags, minutes, speed)
    print("\n" + table(rows))
    print(f"\n{minutes:.1f} minutes; machine: {machine()}")
    print(f"python speed: {speed[0]:.2f} s at the start, {speed[1]:.2f} s at the end")
    if not args.no_write:
        write_doc(text)
        print(f"summary written to {DOC.relative_to(REPO)}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
