"""Queue benchmark: durable group-commit ingest vs persist-queue, disk use, churn, RSS.

    python3 bench/bench_queue.py               # ingest, persist-queue, bytes/item, churn
    python3 bench/bench_queue.py --million     # plus the 1,000,000-item RSS hold + drain

Every number is "until committed": a producer counts an item only when its future resolved,
which happens after the transaction's fsync (durability "full" unless --durability normal).
Results go in docs/benchmarks.md, "## Queue".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import QueueConfig
from agent.store import Store
from agent.tracker.model import OutboundItem, Project

PROJECT = Project("bench-project-token", "bench-authorization")


def make_item(n: int) -> OutboundItem:
    """A realistic ~400-byte event (compact JSON, as stored)."""
    return OutboundItem(
        PROJECT,
        "track_event",
        {
            "name": "customers/events",
            "data": {
                "customer_ids": {"cookie": str(uuid.UUID(int=n))},
                "event_type": "purchase_item",
                "timestamp": 1700000000.0 + n,
                "properties": {
                    "application_id": "default-application",
                    "device_id": "4b0e8a0e-9c51-4d7f-9d3f-6f1d9b6f0c1e",
                    "product_id": f"sku-{n % 1000:04d}",
                    "title": "Handbag, leather, brn",
                    "price": 129.9,
                    "currency": "EUR",
                    "screen": "checkout/confirm",
                    "kiosk_zone": "entrance-left",
                },
            },
        },
    )


def payload_size(item: OutboundItem) -> int:
    return len(json.dumps(item.payload, separators=(",", ":"), ensure_ascii=False).encode())


def rss_kib() -> tuple[int, int]:
    """(current VmRSS, peak VmHWM) in KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def files_size(path: str) -> tuple[int, int]:
    def size(p: str) -> int:
        try:
            return os.path.getsize(p)
        except FileNotFoundError:
            return 0

    return size(path), size(path + "-wal")


def run_producers(threads: int, per_thread: int, produce: Callable[[int, int], None]) -> float:
    """Seconds for `threads` threads to each run produce(thread, i) `per_thread` times."""
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            produce(t, i)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    return time.perf_counter() - start


def bench_store_ingest(
    workdir: str, durability: str, threads: int, total: int, window: int
) -> dict[str, Any]:
    """`threads` producers, ops of 1 item; each keeps `window` ops in flight (1 = wait for
    each commit before sending the next, like a client waiting for its reply)."""
    path = os.path.join(workdir, f"ingest-{window}.db")
    store = Store(QueueConfig(path=path, max_bytes=2**40, durability=durability))  # type: ignore[arg-type]
    store.open()
    items = [make_item(n) for n in range(1000)]
    per_thread = total // threads
    inflight: list[list[Any]] = [[] for _ in range(threads)]

    def produce(t: int, i: int) -> None:
        item = [items[(t * per_thread + i) % 1000]]
        fut = store.submit(lambda txn: txn.enqueue(item, 1.0))
        pending = inflight[t]
        pending.append(fut)
        if len(pending) >= window:
            for f in pending:
                f.result()
            pending.clear()

    def finish() -> None:
        for pending in inflight:
            for f in pending:
                f.result()

    commits_before = store.commit_count
    elapsed = run_producers(threads, per_thread, produce)
    start = time.perf_counter()
    finish()
    elapsed += time.perf_counter() - start
    n = per_thread * threads
    commits = store.commit_count - commits_before
    assert store.stats().items == n
    store.close()
    return {"items": n, "seconds": elapsed, "rate": n / elapsed, "per_commit": n / commits}


def bench_persist_queue(workdir: str, durability: str, threads: int, total: int) -> dict[str, Any]:
    import persistqueue

    path = os.path.join(workdir, "persistqueue")
    queue = persistqueue.SQLiteAckQueue(path, auto_commit=True, multithreading=True)
    sync = "FULL" if durability == "full" else "NORMAL"
    for conn in {id(queue._putter): queue._putter, id(queue._getter): queue._getter}.values():
        conn.execute(f"PRAGMA synchronous = {sync}")
    payloads = [
        json.dumps(make_item(n).payload, separators=(",", ":")).encode() for n in range(1000)
    ]
    per_thread = total // threads

    def produce(t: int, i: int) -> None:
        queue.put(payloads[(t * per_thread + i) % 1000])

    elapsed = run_producers(threads, per_thread, produce)
    n = per_thread * threads
    assert queue.size == n
    queue.close()
    return {"items": n, "seconds": elapsed, "rate": n / elapsed}


def bench_disk_use(workdir: str, durability: str, count: int) -> dict[str, Any]:
    path = os.path.join(workdir, "disk.db")
    store = Store(QueueConfig(path=path, max_bytes=2**40, durability=durability))  # type: ignore[arg-type]
    store.open()
    items = [make_item(n) for n in range(count)]
    for start in range(0, count, 1000):
        chunk = items[start : start + 1000]
        store.submit(lambda txn, chunk=chunk: txn.enqueue(chunk, 1.0)).result()
    payload = store.stats().bytes
    db_open, wal_open = files_size(path)
    store.close()
    db, _wal = files_size(path)
    return {
        "items": count,
        "payload_avg": payload / count,
        "disk_per_item": db / count,
        "ratio": db / payload,
        "open_total": db_open + wal_open,
    }


def bench_churn(workdir: str, durability: str, cap: int, rounds: int) -> list[dict[str, Any]]:
    """Fill past the cap (drop_oldest evicts), drain with read_batch + ack, repeat."""
    path = os.path.join(workdir, "churn.db")
    store = Store(QueueConfig(path=path, max_bytes=cap, durability=durability))  # type: ignore[arg-type]
    store.open()
    project_id = store.project_for(PROJECT).id
    items = [make_item(n) for n in range(100)]
    per_item = payload_size(items[0])
    results = []
    for r in range(rounds):
        fill = int(cap * 1.5) // per_item
        for _ in range(0, fill, 100):
            store.submit(lambda txn: txn.enqueue(items, 1.0)).result()
        full_db, full_wal = files_size(path)
        queued = store.stats().items
        while True:
            batch = store.read_batch(project_id, 500)
            if not batch:
                break
            ids = [item.id for item in batch]
            store.submit(lambda txn, ids=ids: txn.ack(ids)).result()
        db, wal = files_size(path)
        results.append(
            {
                "round": r + 1,
                "queued_at_full": queued,
                "db_full": full_db,
                "wal_full": full_wal,
                "db_drained": db,
                "wal_drained": wal,
                "dropped": store.stats().dropped,
            }
        )
    store.close()
    return results


def bench_million(workdir: str, durability: str, count: int) -> dict[str, Any]:
    path = os.path.join(workdir, "million.db")
    store = Store(QueueConfig(path=path, max_bytes=2**40, durability=durability))  # type: ignore[arg-type]
    store.open()
    project_id = store.project_for(PROJECT).id
    try:  # reset VmHWM so the peak is this section's, not the earlier ones'
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass
    rss_start, _ = rss_kib()
    items = [make_item(n) for n in range(1000)]
    start = time.perf_counter()
    for _ in range(count // 1000):
        store.submit(lambda txn: txn.enqueue(items, 1.0)).result()
    fill_seconds = time.perf_counter() - start
    rss_held, _peak_fill = rss_kib()
    db, wal = files_size(path)
    samples = []
    after = 0
    drained = 0
    start = time.perf_counter()
    while True:
        batch = store.read_batch(project_id, 50, after)
        if not batch:
            break
        after = batch[-1].id
        ids = [item.id for item in batch]
        store.submit(lambda txn, ids=ids: txn.ack(ids)).result()
        drained += len(ids)
        if drained % 100_000 == 0:
            samples.append(rss_kib()[0])
    drain_seconds = time.perf_counter() - start
    rss_end, peak = rss_kib()
    assert store.stats().items == 0
    store.close()
    return {
        "items": count,
        "fill_rate": count / fill_seconds,
        "drain_rate": drained / drain_seconds,
        "db_bytes": db + wal,
        "rss_start_mib": rss_start / 1024,
        "rss_held_mib": rss_held / 1024,
        "rss_drain_min_mib": min(samples) / 1024 if samples else 0,
        "rss_drain_max_mib": max(samples) / 1024 if samples else 0,
        "rss_end_mib": rss_end / 1024,
        "rss_peak_mib": peak / 1024,
    }


def machine() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"nproc {os.cpu_count()}, CPU {cpu}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--threads", type=int, default=64, help="producer threads")
    parser.add_argument("--items", type=int, default=128_000, help="items for the store ingest")
    parser.add_argument("--pq-items", type=int, default=12_800, help="items for persist-queue")
    parser.add_argument("--churn-cap", type=int, default=16 * 2**20, help="bytes")
    parser.add_argument("--churn-rounds", type=int, default=5)
    parser.add_argument("--million", action="store_true", help="1,000,000-item RSS hold + drain")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write raw results here")
    args = parser.parse_args()
    results: dict[str, Any] = {}

    workdir = args.dir or tempfile.mkdtemp(prefix="bench-queue-")
    os.makedirs(workdir, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"work dir: {workdir} (durability {args.durability})")
    print(f"payload: {payload_size(make_item(1))} bytes of compact JSON per item\n")
    try:
        print(
            f"{'ingest, 1 item per op, until committed':<58} {'items/s':>10} {'items/commit':>13}"
        )
        closed = bench_store_ingest(workdir, args.durability, args.threads, args.items, 1)
        label = f"store, {args.threads} threads, wait each commit"
        print(f"{label:<58} {closed['rate']:>10,.0f} {closed['per_commit']:>13.1f}")
        piped = bench_store_ingest(workdir, args.durability, args.threads, args.items, 16)
        label = f"store, {args.threads} threads, 16 ops in flight each"
        print(f"{label:<58} {piped['rate']:>10,.0f} {piped['per_commit']:>13.1f}")
        single = bench_store_ingest(workdir, args.durability, 1, args.items, 1024)
        label = "store, 1 thread (like the event loop), 1024 ops in flight"
        print(f"{label:<58} {single['rate']:>10,.0f} {single['per_commit']:>13.1f}")
        pq = bench_persist_queue(workdir, args.durability, args.threads, args.pq_items)
        label = f"persist-queue SQLiteAckQueue, {args.threads} threads"
        print(f"{label:<58} {pq['rate']:>10,.0f} {'1.0':>13}")
        ratio = closed["rate"] / pq["rate"]
        print(f"{'ratio store (wait each commit) / persist-queue':<58} {ratio:>10.1f}x")
        results.update(closed=closed, piped=piped, single=single, pq=pq, ratio=ratio)
        print()

        disk = bench_disk_use(workdir, args.durability, 100_000)
        results["disk"] = disk
        print(
            f"disk: {disk['items']:,} items, payload {disk['payload_avg']:.0f} B/item, "
            f"file {disk['disk_per_item']:.0f} B/item = {disk['ratio']:.2f}x payload "
            f"(while open incl. WAL: {disk['open_total'] / disk['items']:.0f} B/item)"
        )
        print()

        cap = args.churn_cap
        print(f"churn: cap {cap / 2**20:.0f} MiB, fill to 1.5x cap (drop_oldest), drain, repeat")
        print(
            f"{'round':>5} {'queued':>8} {'db full MiB':>12} {'wal MiB':>8} {'db drained MiB':>15}"
        )
        results["churn"] = bench_churn(workdir, args.durability, cap, args.churn_rounds)
        for row in results["churn"]:
            print(
                f"{row['round']:>5} {row['queued_at_full']:>8,} {row['db_full'] / 2**20:>12.2f} "
                f"{row['wal_full'] / 2**20:>8.2f} {row['db_drained'] / 2**20:>15.2f}"
            )
        if args.million:
            print()
            m = results["million"] = bench_million(workdir, args.durability, 1_000_000)
            print(
                f"million: fill {m['fill_rate']:,.0f} items/s (1000 per op), drain "
                f"{m['drain_rate']:,.0f} items/s (read_batch 50 + ack), file "
                f"{m['db_bytes'] / 2**20:.0f} MiB"
            )
            print(
                f"RSS MiB: start {m['rss_start_mib']:.1f}, holding 1M {m['rss_held_mib']:.1f}, "
                f"during drain {m['rss_drain_min_mib']:.1f}-{m['rss_drain_max_mib']:.1f}, "
                f"end {m['rss_end_mib']:.1f}, peak {m['rss_peak_mib']:.1f}"
            )
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=1)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
