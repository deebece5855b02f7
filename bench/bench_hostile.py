"""Memory growth of the agent under the worst socket client we could write.

    python3 bench/bench_hostile.py                  # 3 rounds, ~1 minute
    python3 bench/bench_hostile.py --quick          # one round
    python3 bench/bench_hostile.py --mix tracking   # only the 60 KB events (30 s each)
    python3 bench/bench_hostile.py --accounts 8     # 8 local accounts at once (256 connections)
    python3 bench/bench_hostile.py --json out.json

The real daemon (`python3 -m agent.cli run`) with the default socket limits and 64 apps with
state (the largest status reply `apps.max_apps` allows). The hostile client is one local
account (`nobody` when run as root: the agent's own user and root are trusted and get reserved
slots), or `--accounts N` of them at once (uids 65534, 65533, ...; they need no passwd entry;
8 accounts take all 256 connections `socket.max_connections` allows): each opens 64
connections (32 get in, `socket.max_connections_per_uid`) and pipelines on each, never
reading a reply, a mix of `status` (the largest reply), tracking commands of
~60 KB with thousands of small properties (the most memory per parsed byte), invalid lines
(an error reply each) and finally a partial line, until the agent has stopped reading every
connection (nothing writable for 3 s) or `--seconds` (30) passed: tracking commands keep being
committed, so a connection sending only those stalls late. Growth = `VmHWM` (peak RSS) after
the attack − `VmRSS` before, from /proc/<pid>/status. Target: ≤ 64 MB in all, whatever the
number of accounts (docs/security.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_socket import daemon_config, make_row, print_rows, write_json

from tests.fixtures.daemon import AgentProcess

NOBODY = 65534
CONNECTIONS = 64
TARGET_MB = 64.0
MB = 1000 * 1000


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def _pipeline(mix: str) -> bytes:
    """One round of the hostile mix; repeated on every connection."""
    big = json.dumps(
        {"command": "track_event", "name": "x", "properties": {f"k{i}": i for i in range(4400)}}
    ).encode()
    status = b'{"command": "status"}\n'
    invalid = b'{"command": "track_event", "name": 1, "properties": [], "extra": true}\n'
    if mix == "tracking":
        return (big + b"\n") * 4
    return status * 200 + (big + b"\n") * 2 + invalid * 50


def client(path: str, uid: int | None, seconds: float, mix: str) -> None:
    """The hostile process: connect, push until the agent stops reading (or `seconds` pass:
    tracking commands keep being committed, so their connections never stall), hold, exit on
    EOF."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    held: list[socket.socket] = []
    for _ in range(CONNECTIONS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        held.append(sock)
    # Refused connections get one line and EOF; the admitted ones stay silent.
    time.sleep(1.0)
    admitted = []
    for sock in held:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            sock.close()
        else:
            sock.setblocking(False)
            admitted.append(sock)
    chunk = _pipeline(mix)
    offset = {sock: 0 for sock in admitted}
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _, writable, _ = select.select([], admitted, [], 3.0)
        if not writable:
            break
        for sock in writable:
            start = offset[sock] % len(chunk)
            try:
                n = sock.send(chunk[start:] + chunk[:start])
            except BlockingIOError:
                continue
            except OSError:  # closed by the agent (idle): it is no longer ours to hold
                admitted.remove(sock)
                continue
            offset[sock] += n
            sent += n
    partial = b'{"command": "track_event", "name": "' + b"y" * 60000
    for sock in admitted:
        with contextlib.suppress(OSError):
            sock.send(partial)
    print(json.dumps({"admitted": len(admitted), "sent": sent}), flush=True)
    sys.stdin.readline()


def attack(apps: int, seconds: float, mix: str, accounts: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # the hostile user must reach the socket
        # The default queue cap: the attack's events fill it, the oldest are dropped.
        extra = {"socket": {"mode": "0666"}, "queue": {"max_bytes": 104857600}}
        config = daemon_config(workdir, extra=extra)
        agent = AgentProcess(workdir, config)
        agent.start()
        try:
            assert agent.process is not None
            pid = agent.process.pid
            with agent.client() as setup:
                for i in range(apps):
                    command = {"command": "track_event", "name": "e"}
                    if i:  # the first is `default`, which counts toward apps.max_apps too
                        command["app"] = f"app-{i:02d}-" + "x" * 50
                    reply = setup.request(command)
                    assert reply["ok"], reply
            status_bytes = len(json.dumps(agent.status()))
            time.sleep(2.0)
            before = _memory_kib(pid, "VmRSS")
            as_root = os.geteuid() == 0
            if not as_root and accounts > 1:
                raise SystemExit("--accounts needs root (to connect as other users)")
            uids: list[int | None] = [NOBODY - i for i in range(accounts)] if as_root else [None]
            started = time.monotonic()
            hostile = [
                subprocess.Popen(
                    [sys.executable, __file__, "--client", str(agent.socket_path)]
                    + ["--seconds", str(seconds), "--mix", mix]
                    + (["--uid", str(uid)] if uid is not None else []),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for uid in uids
            ]
            reports = []
            for process in hostile:
                assert process.stdout is not None
                reports.append(json.loads(process.stdout.readline()))
            seconds = time.monotonic() - started
            served = agent.status()["online"]
            peak = _memory_kib(pid, "VmHWM")
            after = _memory_kib(pid, "VmRSS")
            for process in hostile:
                assert process.stdin is not None
                process.stdin.close()
                process.wait(30)
        finally:
            agent.close()
    return {
        "growth_mb": (peak - before) * 1024 / MB,
        "before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "after_mib": after / 1024,
        "admitted": sum(r["admitted"] for r in reports),
        "sent_mb": sum(r["sent"] for r in reports) / MB,
        "status_bytes": status_bytes,
        "seconds": seconds,
        "others_served": bool(served),
        "as_other_user": as_root,
        "accounts": len(uids),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--uid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--accounts", type=int, default=1, help="hostile local accounts at once (needs root)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="longest attack (30 s)")
    parser.add_argument(
        "--mix",
        choices=("all", "tracking"),
        default="all",
        help="all: status, 60 KB events, invalid lines; tracking: only the 60 KB events",
    )
    args = parser.parse_args(argv)
    if args.client:
        client(args.client, args.uid, args.seconds, args.mix)
        return
    rounds = args.rounds or (1 if args.quick else 3)
    results = [attack(64, args.seconds, args.mix, args.accounts) for _ in range(rounds)]
    for r in results:
        print(
            f"  before {r['before_mib']:.1f} MiB, peak {r['peak_mib']:.1f} MiB, after "
            f"{r['after_mib']:.1f} MiB; {r['admitted']} connections took {r['sent_mb']:.1f} MB "
            f"in {r['seconds']:.1f} s; status {r['status_bytes']} B; others served: "
            f"{r['others_served']}; as another user: {r['as_other_user']}"
        )
    first = results[0]
    who = (
        f"{args.accounts} users × 32 non-reading connections"
        if args.accounts > 1
        else "32 non-reading connections of one user"
    )
    rows = [
        make_row(
            f"hostile socket client: RSS growth ({who})"
            + (", only 60 KB events" if args.mix == "tracking" else ""),
            [r["growth_mb"] for r in results],
            "MB",
            target=TARGET_MB,
            better="lower",
            note=(
                f"{first['admitted']} connections admitted of {CONNECTIONS * args.accounts}; "
                f"pipelined status "
                f"({first['status_bytes']} B, 64 apps) + 60 KB track_event + invalid lines; "
                "VmHWM − VmRSS before"
            ),
            digits=1,
        )
    ]
    print_rows("Hostile socket client (the real daemon)", rows)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
