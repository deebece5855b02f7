"""Sync benchmark: drain rate of a backlog to the API stand-in.

    python3 bench/bench_sync.py                      # 100,000 items, durability full
    python3 bench/bench_sync.py --items 20000 --durability normal

Fills a fresh queue (not timed), then starts the real `Syncer` with pacing off and times
until the store reports zero items: every item was POSTed in batches of 50, answered, and
its deletion committed. The stand-in runs in a separate process (`engagement-api-stub`) so
its CPU does not share our GIL, as with a real API. Results go in docs/benchmarks.md,
"## Sync".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import AgentConfig
from agent.store import Store, Txn
from agent.sync import Syncer
from agent.tracker.model import OutboundItem, Project

TOKEN, KEY = "bench-project", "bench-key"
STUB_COMMAND = (sys.executable, "-m", "agent_devtools.apistub")


def make_item(project: Project, n: int) -> OutboundItem:
    """A realistic ~400-byte event."""
    return OutboundItem(
        project,
        "track_event",
        {
            "name": "customers/events",
            "data": {
                "customer_ids": {
                    "cookie": f"0b3c9b5e-4d0f-4e58-9d83-2f3c7a1e5b{n % 100:02d}",
                    "registered": f"user{n % 1000}@example.com",
                },
                "event_type": "purchase_item",
                "timestamp": 1_700_000_000.0 + n / 1000,
                "properties": {
                    "seq": n,
                    "product_id": f"sku-{n % 5000:05d}",
                    "price": 19.99,
                    "currency": "EUR",
                    "application_id": "default-application",
                    "device_id": "5f9d7c3e-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
                    "screen": "checkout",
                },
            },
        },
    )


def enqueue(items: list[OutboundItem], txn: Txn) -> None:
    txn.enqueue(items, time.time())


def start_stub() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*STUB_COMMAND, "--port", "0", "--project", f"{TOKEN}:{KEY}"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def run(items: int, durability: str, batch_size: int) -> dict[str, Any]:
    stub, url = start_stub()
    tmp = tempfile.mkdtemp(prefix="bench-sync-")
    try:
        project = Project(TOKEN, KEY, url)
        config = AgentConfig.model_validate(
            {
                "project": {"project_token": TOKEN, "authorization_token": KEY, "base_url": url},
                "queue": {
                    "path": os.path.join(tmp, "queue.db"),
                    "durability": durability,
                    "max_bytes": 1 << 30,
                },
                "sync": {"max_requests_per_second": 0, "batch_size": batch_size},
            }
        )
        store = Store(config.queue)
        store.open()
        chunk = 1000
        for start in range(0, items, chunk):
            batch = [make_item(project, n) for n in range(start, min(items, start + chunk))]
            store.submit(partial(enqueue, batch)).result()
        queued_bytes = store.stats().bytes
        syncer = Syncer(store, config, rng=random.Random(1))
        done = threading.Event()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        syncer.start()
        while store.stats().items:
            done.wait(0.01)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        syncer.stop(5)  # settles the last commits' bookkeeping before `sent` is read
        sent = syncer.status()["projects"][0]["sent"]
        commits = store.commit_count
        store.close()
        return {
            "items": items,
            "sent": sent,
            "seconds": elapsed,
            "rate": items / elapsed,
            "requests_per_s": items / batch_size / elapsed,
            "mb_per_s": queued_bytes / elapsed / 1e6,
            "agent_cpu_s": cpu,
            "commits": commits,
        }
    finally:
        stub.terminate()
        stub.wait(10)
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write raw results here")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"{'run':>3} {'items':>8} {'seconds':>8} {'items/s':>9} {'POST/s':>7} {'MB/s':>6} "
        f"{'cpu s':>6} {'commits':>8}"
    )
    rates = []
    results = []
    for i in range(args.runs):
        r = run(args.items, args.durability, args.batch_size)
        assert r["sent"] == args.items, r
        rates.append(r["rate"])
        results.append(r)
        print(
            f"{i + 1:>3} {r['items']:>8} {r['seconds']:>8.2f} {r['rate']:>9.0f} "
            f"{r['requests_per_s']:>7.0f} {r['mb_per_s']:>6.2f} {r['agent_cpu_s']:>6.2f} "
            f"{r['commits']:>8}"
        )
    rates.sort()
    print(f"median drain rate: {rates[len(rates) // 2]:.0f} items/s (durability {args.durability})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"durability": args.durability, "runs": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
