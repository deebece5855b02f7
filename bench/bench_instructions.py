"""CPU work per command, counted in instructions under callgrind: the same on a busy machine.

    python3 bench/bench_instructions.py            # ~2.5 minutes (valgrind is ~50× slower)
    python3 bench/bench_instructions.py --quick    # 1 and 4 connections, fewer commands
    python3 bench/bench_instructions.py --json out.json

The timed rows of bench/bench_socket.py move by a factor of two with what else the shared VM
runs (other tenants' cache pressure included, which no load average shows). Instructions do
not: valgrind's callgrind counts every instruction the process executes in user space, so a
change in the agent's code shows as a change here whatever the machine does meanwhile
(system calls and time spent waiting on the disk are not counted).

The real daemon runs under `valgrind --tool=callgrind` with counting off; after a warm-up,
counting is switched on (`callgrind_control -i on`) for a pipelined run of `track_event`
commands exactly as in bench_socket.py (`queue.durability = "full"`, MQTT off), and off again.
Rows: instructions per command for 1, 4 and 16 connections, with the event loop's and the
store writer's shares. The peer, in the same run and the same way: persist-queue's
`SQLiteAckQueue.put` of items of the same shape and size (bench_queue.py's, `synchronous=FULL`,
one thread), instructions per item. Needs valgrind (Debian's `valgrind`). Results:
docs/benchmarks.md, "Instructions per command".
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_socket import Row, daemon_config, make_row, pipelined, print_rows, write_json  # noqa: E402

from tests.fixtures.daemon import AgentProcess  # noqa: E402

WARM_UP = 500  # commands per connection before counting starts


def callgrind_prefix(out_dir: Path) -> list[str]:
    """Counting off at start; one output file per thread."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        "-q",
        f"--callgrind-out-file={out_dir}/callgrind.out.%p",
    ]


def counting(pid: int, on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(pid)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def thread_totals(out_dir: Path) -> dict[int, int]:
    """Instructions counted per thread number (callgrind writes `totals:` at exit into one
    file per thread, `…-01` being the main thread, the daemon's event loop)."""
    totals: dict[int, int] = {}
    for path in out_dir.glob("callgrind.out.*"):
        thread = int(path.name.rsplit("-", 1)[1]) if "-" in path.name else 0
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                totals[thread] = totals.get(thread, 0) + int(line.split()[1])
    return totals


def agent_instructions(connections: int, per_connection: int) -> dict[str, float]:
    """Instructions per command of the daemon (all threads; loop and writer apart)."""
    with tempfile.TemporaryDirectory(prefix="bench-ir-") as tmp:
        workdir = Path(tmp)
        out_dir = workdir / "callgrind"
        out_dir.mkdir()
        command = [*callgrind_prefix(out_dir), sys.executable, "-m", "agent.cli"]
        agent = AgentProcess(workdir, daemon_config(workdir), command=command)
        try:
            agent.start(wait_ready=False)
            agent.wait_notification("READY=1", timeout=600)
            assert agent.process is not None
            pipelined(agent, connections, WARM_UP)
            counting(agent.process.pid, True)
            pipelined(agent, connections, per_connection)
            counting(agent.process.pid, False)
            agent.process.send_signal(signal.SIGTERM)  # callgrind writes its files at exit
            agent.process.wait(600)
        finally:
            agent.close()
        totals = thread_totals(out_dir)
    commands = connections * per_connection
    # The loop reads, validates and replies; the busiest other thread is the store writer,
    # which runs the tracker and SQLite.
    loop = totals.pop(1, 0)
    writer = max(totals.values(), default=0)
    return {
        "per_command": (loop + sum(totals.values())) / commands,
        "writer": writer / commands,
        "loop": loop / commands,
    }


_PEER_SCRIPT = """
import json, subprocess, sys
import persistqueue
sys.path.insert(0, {bench!r})
from bench_queue import make_item
path, count = sys.argv[1], int(sys.argv[2])
queue = persistqueue.SQLiteAckQueue(path, auto_commit=True, multithreading=True)
queue._putter.execute("PRAGMA synchronous = FULL")
payloads = [json.dumps(make_item(n).payload, separators=(",", ":")).encode() for n in range(1000)]
for n in range(200):
    queue.put(payloads[n % 1000])
subprocess.run(["callgrind_control", "-i", "on", str(__import__("os").getpid())], check=True,
               capture_output=True)
for n in range(count):
    queue.put(payloads[n % 1000])
subprocess.run(["callgrind_control", "-i", "off", str(__import__("os").getpid())], check=True,
               capture_output=True)
"""


def peer_instructions(count: int) -> float:
    """persist-queue's instructions per `put` (one thread, synchronous=FULL)."""
    with tempfile.TemporaryDirectory(prefix="bench-ir-pq-") as tmp:
        workdir = Path(tmp)
        out_dir = workdir / "callgrind"
        out_dir.mkdir()
        script = _PEER_SCRIPT.format(bench=str(REPO / "bench"))
        subprocess.run(
            [
                *callgrind_prefix(out_dir),
                sys.executable,
                "-c",
                script,
                str(workdir / "pq"),
                str(count),
            ],
            check=True,
            timeout=1800,
        )
        return sum(thread_totals(out_dir).values()) / count


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 connections, fewer commands")
    parser.add_argument("--count", type=int, default=None, help="commands counted per row")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench_instructions.py needs valgrind (apt-get install valgrind)")
    count = args.count or (4_000 if args.quick else 10_000)
    connection_counts = (1, 4) if args.quick else (1, 4, 16)
    peer = peer_instructions(max(500, count // 10))
    rows: list[Row] = []
    for connections in connection_counts:
        measured = agent_instructions(connections, count // connections)
        label = f"{connections} connection{'s' if connections > 1 else ''}"
        rows.append(
            make_row(
                f"instructions per command, socket pipelined, {label}",
                [measured["per_command"] / 1000],
                "k instr",
                better="lower",
                baseline=peer / 1000,
                baseline_label="persist-queue SQLiteAckQueue.put, same run (k instr per item)",
                digits=1,
                note=(
                    f"store writer {measured['writer'] / 1000:.1f}k, "
                    f"event loop {measured['loop'] / 1000:.1f}k"
                ),
            )
        )
    print_rows("CPU work per command (callgrind)", rows)
    print(f"\npersist-queue SQLiteAckQueue.put, same run: {peer / 1000:.1f}k instructions per item")
    write_json(args.json, rows, count=count)
    return rows


if __name__ == "__main__":
    main()
