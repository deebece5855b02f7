"""Bytes written to storage per event: what an SD card or eMMC sees at kiosk rates.

    python3 bench/bench_flash.py                  # ~6 minutes (the 1/s runs are most of it)
    python3 bench/bench_flash.py --quick          # fewer events: a smoke check (~1 minute)
    python3 bench/bench_flash.py --json out.json  # also write the rows for bench/run.py
    python3 bench/bench_flash.py --dir /var/tmp   # where the daemon's files go (a real disk)

Measured from outside: `write_bytes` of the agent's `/proc/<pid>/io`, which covers all of its
threads, counts a page when the process dirties it (so a page rewritten after each fsync
counts each time) and includes SQLite's checkpoints, which run on the writer thread. The
window opens before the first command and closes after the last reply.

Ingest: `track_event` commands of ~420 bytes sent one at a time over the socket, each waiting
for its reply, paced at 1, 5 and 20 commands per second, with `queue.durability = "full"`
and `"normal"`; sync is manual (nothing is uploaded). The 1/s runs send fewer commands (60, or
20 with --quick) to keep the benchmark short; the others send 300 (100 with --quick).

Floor: in the same run, the same command lines appended to a file in the same directory with
one `fdatasync` each, measured on this process's own `/proc/self/io`: what any durable
one-at-a-time log must write.

Live upload: the 1/s runs again with sync uploading each event to the API stand-in as it comes
(`flush_mode = "immediate"`, the default) and deleting it: the whole life of an event on the
device, which is what an operator's daily write volume is made of.

Drain: a backlog of the same commands uploaded to the API stand-in (`engagement-api-stub`, its
own process) and deleted by a `flush`: bytes written per event uploaded.

`/proc/<pid>/io` counts page-cache writes of a real block device; on tmpfs it counts nothing,
so the directory given must be on a disk (the script refuses tmpfs). Results go in
docs/benchmarks.md, "## Storage writes".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_socket import KEY, TOKEN, api_stub, command_lines  # noqa: E402
from tests.fixtures.daemon import AgentProcess, wait_for  # noqa: E402

#: Added to bench_socket's commands: ~420 bytes on the wire, as the issue measured.
EXTRA = {"referrer": "home/banner/3", "session_step": 4, "language": "en-GB", "note": "x" * 60}


def command_list(count: int) -> list[bytes]:
    """`count` distinct track_event lines of ~405 bytes (without the newline), app `kiosk`."""
    lines = []
    for line in command_lines(count, 0):
        command = json.loads(line)
        command["app"] = "kiosk"
        command["properties"].update(EXTRA)
        lines.append(json.dumps(command, separators=(",", ":")).encode())
    return lines


def write_bytes(pid: int | str) -> int:
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def check_disk(directory: Path) -> str:
    """The filesystem type of `directory`; tmpfs is refused (it would count nothing)."""
    best, fstype = "", ""
    path = str(directory.resolve())
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount = fields[1]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                best
            ):
                best, fstype = mount, fields[2]
    if fstype in ("tmpfs", "ramfs"):
        raise SystemExit(f"{directory} is on {fstype}: write_bytes would be 0; use --dir")
    return fstype


def agent_config(
    durability: str, api_url: str | None, key: str = KEY, flush_mode: str = "manual"
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "device_id": "bench-device",
        "log_level": "warning",
        "queue": {"durability": durability, "max_bytes": 256 * 2**20},
        "mqtt": {"enabled": False},
        "sync": {"flush_mode": flush_mode, "max_requests_per_second": 0},
    }
    if api_url is not None:
        config["project"] = {
            "project_token": TOKEN,
            "authorization_token": key,
            "base_url": api_url,
        }
    return config


def floor(directory: Path, lines: list[bytes]) -> float:
    """Bytes written per line when each is appended to a file and fdatasync'ed."""
    path = directory / "floor.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        os.fsync(fd)
        before = write_bytes("self")
        for line in lines:
            os.write(fd, line + b"\n")
            os.fdatasync(fd)
        return (write_bytes("self") - before) / len(lines)
    finally:
        os.close(fd)
        path.unlink()


def ingest(
    directory: Path, durability: str, rate: float, count: int, api_url: str | None = None
) -> dict[str, Any]:
    """`count` commands at `rate` per second, one at a time; bytes written per event. With
    `api_url`, sync uploads each event as it comes (`flush_mode = "immediate"`, the default)
    and deletes it: the whole life of an event on the device."""
    workdir = Path(tempfile.mkdtemp(prefix=f"flash-{durability}-{rate:g}-", dir=directory))
    mode = "manual" if api_url is None else "immediate"
    agent = AgentProcess(workdir, agent_config(durability, api_url, flush_mode=mode))
    lines = command_list(count)
    try:
        agent.start()
        assert agent.process is not None
        pid = agent.process.pid
        with agent.client() as client:
            assert client.request({"command": "status"})["ok"]
            client.request({"command": "track_event", "app": "kiosk", "name": "warm_up"})
            time.sleep(1.0)  # the first command's session_start, installation and state
            before = write_bytes(pid)
            start = time.monotonic()
            for n, line in enumerate(lines):
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                client.send_line(line)
                reply = client.read_reply()
                if not reply.get("ok"):
                    raise RuntimeError(f"command refused: {reply}")
            if api_url is not None:
                wait_for(lambda: agent.status()["queue"]["items"] == 0, 60, "all uploaded")
            written = write_bytes(pid) - before
            elapsed = time.monotonic() - start
        queue = agent.status()["queue"]
        base = floor(workdir, lines)
    finally:
        agent.close()
        _remove(workdir)
    return {
        "durability": durability,
        "rate": rate,
        "uploaded": api_url is not None,
        "events": count,
        "seconds": round(elapsed, 1),
        "bytes_per_event": round(written / count),
        "floor_per_event": round(base),
        "vs_floor": round(written / count / base, 2),
        "line_bytes": round(sum(len(line) + 1 for line in lines) / count),
        # Payload bytes the queue holds per item (nothing is left when uploaded).
        "stored_payload_bytes": round(queue["bytes"] / queue["items"]) if queue["items"] else 0,
    }


def drain(directory: Path, durability: str, count: int) -> dict[str, Any]:
    """A backlog of `count` commands uploaded and deleted by one flush: bytes per event.

    The backlog is queued with a wrong key (the stand-in refuses it, nothing is uploaded),
    then the agent is stopped (a clean stop checkpoints the WAL into the database file) and
    started with the right key, so the window counts the drain's own writes and not the
    ingest's deferred checkpoint.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"flash-drain-{durability}-", dir=directory))
    with api_stub() as url:
        agent = AgentProcess(workdir, agent_config(durability, url, key="wrong-key"))
        try:
            agent.start()
            with agent.client() as client:
                payload = b"".join(line + b"\n" for line in command_list(count))
                client.sock.sendall(payload)
                for _ in range(count):
                    if not client.read_reply().get("ok"):
                        raise RuntimeError("command refused")
            if agent.terminate() != 0:
                raise RuntimeError(f"the agent did not stop cleanly:\n{agent.log()}")
            agent.write_config(agent_config(durability, url))
            agent.start()
            assert agent.process is not None
            pid = agent.process.pid
            queued = agent.status()["queue"]["items"]
            time.sleep(1.0)
            with agent.client() as client:
                before = write_bytes(pid)
                start = time.monotonic()
                reply = client.request({"command": "flush", "wait": True})
                if not reply.get("ok"):
                    raise RuntimeError(f"flush failed: {reply}")
                wait_for(lambda: agent.status()["queue"]["items"] == 0, 120, "drained")
                written = write_bytes(pid) - before
                elapsed = time.monotonic() - start
        finally:
            agent.close()
            _remove(workdir)
    return {
        "durability": durability,
        "events": queued,
        "seconds": round(elapsed, 1),
        "bytes_per_event": round(written / queued),
    }


def _remove(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    directory.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, default=REPO / ".bench-flash")
    parser.add_argument("--durability", nargs="*", default=["full", "normal"])
    parser.add_argument("--rates", nargs="*", type=float, default=[1.0, 5.0, 20.0])
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    fstype = check_disk(args.dir)
    print(f"directory {args.dir} ({fstype})")
    many = 100 if args.quick else 300
    few = 20 if args.quick else 60
    rows: list[dict[str, Any]] = []
    print(
        f"{'durability':>10} {'rate/s':>6} {'upload':>6} {'events':>6} {'B/event':>8} "
        f"{'floor B/event':>13} {'x floor':>7} {'line B':>6} {'stored B':>8}"
    )
    runs = [(d, rate, False) for d in args.durability for rate in args.rates]
    runs += [(d, 1.0, True) for d in args.durability]
    with api_stub() as url:
        for durability, rate, upload in runs:
            count = few if rate < 5 else many
            row = ingest(args.dir, durability, rate, count, url if upload else None)
            rows.append(row)
            print(
                f"{durability:>10} {rate:>6g} {'yes' if upload else 'no':>6} "
                f"{row['events']:>6} {row['bytes_per_event']:>8} {row['floor_per_event']:>13} "
                f"{row['vs_floor']:>7} {row['line_bytes']:>6} {row['stored_payload_bytes']:>8}",
                flush=True,
            )
    drains = []
    for durability in args.durability:
        result = drain(args.dir, durability, 300 if args.quick else 1000)
        drains.append(result)
        print(
            f"drain {durability:>6}: {result['bytes_per_event']} B written per event uploaded "
            f"({result['events']} events, {result['seconds']} s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"ingest": rows, "drain": drains}, indent=2))
    with contextlib.suppress(OSError):
        args.dir.rmdir()  # only if empty


if __name__ == "__main__":
    main()
