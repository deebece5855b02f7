"""The store's writer, outbox, counters and reads, on real SQLite files."""

from __future__ import annotations

import gc
import json
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from agent.errors import InvalidState, QueueFull, Unavailable
from agent.store import Store, Txn
from agent.store.writer_state import Counters
from agent.tracker.model import AppState, OutboundItem, Project
from tests.fixtures.daemon import wait_for
from tests.unit.test_store_helpers import (
    P1,
    P2,
    assert_counters_match_file,
    assert_no_secrets,
    config,
    enqueue,
    file_totals,
    item,
    writer_blocked,
)


def test_constructor_does_no_io(tmp_path: Path) -> None:
    Store(config(tmp_path))
    assert not (tmp_path / "state").exists()


def test_enqueue_stores_compact_json_one_row_per_item(store: Store) -> None:
    payload = {"name": "customers/events", "data": {"text": "čaj ☕", "n": [1, 2]}}
    enqueue(store, OutboundItem(P1, "track_event", payload), OutboundItem(P2, "x", payload))
    rows = store.list_items()
    expected = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    assert [r.payload for r in rows] == [expected, expected]
    assert rows[0].project_id != rows[1].project_id
    assert rows[0].created_at == 1000.0
    stats = store.stats()
    assert (stats.items, stats.bytes) == (2, 2 * len(expected))
    assert_counters_match_file(store)


def test_read_batch_is_per_project_oldest_first(store: Store) -> None:
    enqueue(store, *[item(n, P1 if n % 2 else P2) for n in range(10)])
    p1 = store.project_for(P1).id
    batch = store.read_batch(p1, 3)
    assert [i.project_id for i in batch] == [p1] * 3
    ids = [i.id for i in batch]
    assert ids == sorted(ids)
    rest = store.read_batch(p1, 10, after_id=ids[-1])
    assert len(rest) == 2 and rest[0].id > ids[-1]
    assert store.get_item(ids[0]) == batch[0]
    assert store.get_item(10**9) is None
    everything = store.list_items()
    assert store.list_items(limit=4, after_id=everything[0].id) == everything[1:5]


def test_ack_deletes_and_ignores_missing_ids(store: Store) -> None:
    enqueue(store, *[item(n) for n in range(5)])
    ids = [i.id for i in store.list_items()]
    assert store.submit(lambda t: t.ack(ids[:2])).result() == 2
    assert store.submit(lambda t: t.ack([ids[0], ids[2], 999999])).result() == 1
    assert [i.id for i in store.list_items()] == ids[3:]
    assert store.stats().items == 2
    assert_counters_match_file(store)


def test_ids_are_never_reused_after_draining(store: Store) -> None:
    enqueue(store, item(1), item(2))
    last = store.list_items()[-1].id
    store.submit(lambda t: t.ack([i.id for i in store.list_items()])).result()
    enqueue(store, item(3))
    assert store.list_items()[0].id > last
    store.submit(lambda t: t.purge()).result()
    enqueue(store, item(4))
    assert store.list_items()[0].id > last + 1


def test_project_rows_hold_no_credentials(store: Store) -> None:
    row = store.project_for(P1)
    assert (row.base_url, row.project_token) == ("https://api.example.com", "token-one")
    slash = Project("token-one", "", "https://api.example.com/")
    assert store.project_for(slash) == row  # same key
    other_key = store.project_for(Project("token-one", "new-auth", "https://api.example.com"))
    assert other_key == row  # a different authorization token is the same project
    assert store.projects() == [row]
    # Called from inside an op it joins that op's transaction.
    inside = store.submit(lambda t: store.project_for(P2)).result()
    assert inside in store.projects()
    secrets = [P1.authorization_token.encode(), P2.authorization_token.encode(), b"new-auth"]
    store.close()
    assert_no_secrets(Path(store.config.path).parent, secrets)


def test_new_project_rolled_back_with_its_op(store: Store) -> None:
    row = store.project_for(P1)

    def op(txn: Txn) -> None:
        txn.project_for(Project("brand-new", "a", "https://api.example.com"))
        raise InvalidState("no")

    with pytest.raises(InvalidState):
        store.submit(op).result()
    assert store.projects() == [row]
    assert store.project_for(P1) == row


def test_group_commit_puts_waiting_ops_in_one_transaction(store: Store) -> None:
    ops_per_thread, threads = 50, 8
    futures: list[Future[None]] = []
    lock = threading.Lock()

    def producer(t: int) -> None:
        for i in range(ops_per_thread):
            f = store.submit(lambda txn, n=t * 1000 + i: txn.enqueue([item(n, size=60)], 1.0))
            with lock:
                futures.append(f)

    with writer_blocked(store):
        commits = store.commit_count
        workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert store.pending_ops == threads * ops_per_thread
    for f in futures:
        f.result(20)
    # The gate's own transaction plus exactly one for all 400 waiting ops.
    assert store.commit_count - commits == 1 + 1
    assert store.stats().items == threads * ops_per_thread
    assert_counters_match_file(store)


def test_concurrent_submitters_all_commit(store: Store) -> None:
    def producer(t: int) -> None:
        for i in range(100):
            store.submit(lambda txn, n=t * 1000 + i: txn.enqueue([item(n, size=50)], 1.0)).result()

    workers = [threading.Thread(target=producer, args=(t,)) for t in range(12)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert store.stats().items == 1200
    assert store.commit_count <= 1200
    assert_counters_match_file(store)


def test_failing_op_rolls_back_only_itself(store: Store) -> None:
    events: list[str] = []

    def good(name: str) -> object:
        def op(txn: Txn) -> str:
            txn.enqueue([item(1)], 1.0)
            txn.save_app_state(name, AppState(cookie=name))
            txn.after_commit(lambda: events.append(f"commit {name}"))
            txn.after_rollback(lambda: events.append(f"rollback {name}"))
            return name

        return op

    def bad(error: Exception) -> object:
        def op(txn: Txn) -> None:
            txn.enqueue([item(2), item(3)], 1.0)
            txn.save_app_state("bad", AppState(cookie="bad"))
            txn.set_meta("bad", "1")
            txn.after_commit(lambda: events.append("commit bad"))
            txn.after_rollback(lambda: events.append("rollback bad"))
            raise error

        return op

    with writer_blocked(store):
        a = store.submit(good("a"))  # type: ignore[arg-type]
        b = store.submit(bad(InvalidState("nope")))  # type: ignore[arg-type]
        c = store.submit(bad(ValueError("a bug")))  # type: ignore[arg-type]
        d = store.submit(good("d"))  # type: ignore[arg-type]
    assert a.result() == "a" and d.result() == "d"
    with pytest.raises(InvalidState):
        b.result()
    with pytest.raises(ValueError):
        c.result()
    assert sorted(events) == ["commit a", "commit d", "rollback bad", "rollback bad"]
    assert set(store.load_app_states()) == {"a", "d"}
    assert store.get_meta("bad") is None
    assert store.stats().items == 2
    assert_counters_match_file(store)


def test_a_group_runs_each_call_as_its_own_op(store: Store) -> None:
    """`submit_group(fn, calls, on_done)`: `fn(*args, txn)` per call, in order, one callback
    with every result; a refused call fails only itself, its writes and hooks undone."""
    events: list[str] = []
    results: Future[list[object]] = Future()

    def track(name: str, items: int, refuse: bool, txn: Txn) -> str:
        txn.enqueue([item(n) for n in range(items)], 1.0)
        txn.save_app_state(name, AppState(cookie=name))
        txn.after_commit(lambda: events.append(f"commit {name}"))
        txn.after_rollback(lambda: events.append(f"rollback {name}"))
        if refuse:
            raise InvalidState(f"{name} refused")
        return name

    with writer_blocked(store):
        store.submit_group(
            track, [("a", 1, False), ("b", 2, True), ("c", 1, False)], results.set_result
        )
    first, second, third = results.result(timeout=10)
    assert (first, third) == ("a", "c")
    assert isinstance(second, InvalidState)
    assert events == ["rollback b", "commit a", "commit c"]
    assert set(store.load_app_states()) == {"a", "c"}
    assert store.stats().items == 2
    assert_counters_match_file(store)


def test_a_counters_snapshot_puts_every_counter_back() -> None:
    """What a refused op relies on: `restore(snapshot())` brings back every counter, and the
    snapshot does not change with the counters it was taken from."""
    counters = Counters(1, 2, 3, 4, 5, 6, 7, 8.5, 9, {1: (10, 11)}, 12, 13)
    snapshot = counters.snapshot()
    counters.add_sendable(1, 1, 5)
    counters.items = counters.rejected = 0
    restored = Counters()
    restored.restore(snapshot)
    expected = Counters(1, 2, 3, 4, 5, 6, 7, 8.5, 9, {1: (10, 11)}, 12, 13)
    for name in Counters.__slots__:
        assert getattr(restored, name) == getattr(expected, name), name


def test_refused_ops_leave_no_garbage_for_the_cyclic_gc(store: Store) -> None:
    """A refused op's error is kept (the batch's lists, the group's results) without the
    frames it was raised through: they would hold it in a cycle that only the cyclic GC,
    which the daemon runs rarely (`agent.daemon.tune_gc`), frees."""

    def refuse(name: str, txn: Txn) -> None:
        txn.enqueue([item(1)], 1.0)
        raise InvalidState(f"{name} refused")

    def refused_group() -> list[object]:
        results: Future[list[object]] = Future()
        store.submit_group(refuse, [(str(n),) for n in range(20)], results.set_result)
        return results.result(timeout=10)

    refused_group()  # first use: whatever is built once (log records, caches)
    gc.collect()
    gc.disable()
    try:
        results = refused_group()
        assert all(isinstance(r, InvalidState) for r in results)
        del results
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert store.stats().items == 0


def test_after_commit_runs_on_writer_before_the_future_resolves(store: Store) -> None:
    seen: list[str] = []

    def op(txn: Txn) -> None:
        txn.after_commit(lambda: seen.append(threading.current_thread().name))

    f = store.submit(op)
    f.add_done_callback(lambda _: seen.append("done"))
    f.result()
    assert seen == ["store-writer", "done"]


def test_on_enqueued_gets_project_ids_after_commit(store: Store) -> None:
    calls: list[set[int]] = []
    store.on_enqueued = calls.append
    enqueue(store, item(1, P1), item(2, P2))
    store.submit(lambda t: t.set_meta("k", "v")).result()
    assert calls == [{store.project_for(P1).id, store.project_for(P2).id}]


def test_drop_oldest_keeps_cap_exact_under_concurrency(tmp_path: Path) -> None:
    s = Store(config(tmp_path, max_bytes=65536, on_full="drop_oldest"))
    s.open()
    try:
        sizes = [60, 333, 1000, 2500]
        total_items = 0
        lock = threading.Lock()

        def producer(t: int) -> None:
            nonlocal total_items
            for i in range(60):
                items = [item(i, P1 if t % 2 else P2, sizes[(t + i) % 4]) for _ in range(1 + i % 3)]
                s.submit(lambda txn, items=items: txn.enqueue(items, 1.0)).result()
                with lock:
                    total_items += len(items)

        workers = [threading.Thread(target=producer, args=(t,)) for t in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stats = s.stats()
        assert stats.bytes <= 65536
        assert stats.items + stats.dropped == total_items
        assert stats.dropped > 0
        assert_counters_match_file(s)
        ids = [i.id for i in s.list_items(limit=10**6)]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # only the oldest went
    finally:
        s.close()


def test_reject_policy_under_concurrency_counts_and_persists(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_bytes=65536, on_full="reject")
    s = Store(cfg)
    s.open()
    rejected = 0
    accepted = 0
    lock = threading.Lock()

    def producer(t: int) -> None:
        nonlocal rejected, accepted
        for i in range(40):
            f = s.submit(lambda txn, n=i: txn.enqueue([item(n, size=700), item(n, P2, 700)], 1.0))
            try:
                f.result()
                outcome = "ok"
            except QueueFull:
                outcome = "full"
            with lock:
                if outcome == "ok":
                    accepted += 1
                else:
                    rejected += 1

    workers = [threading.Thread(target=producer, args=(t,)) for t in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats = s.stats()
    assert rejected > 0
    assert stats.rejected == rejected
    assert stats.dropped == 0
    assert stats.items == 2 * accepted
    assert stats.bytes == 1400 * accepted <= 65536
    assert_counters_match_file(s)
    s.close()
    s2 = Store(cfg)
    s2.open()
    assert s2.stats().rejected == rejected
    s2.close()


def test_items_larger_than_the_whole_cap_are_refused(tmp_path: Path) -> None:
    s = Store(config(tmp_path, max_bytes=65536, on_full="drop_oldest"))
    s.open()
    try:
        enqueue(s, item(1, size=1000))
        with pytest.raises(QueueFull, match="exceed the whole queue capacity"):
            enqueue(s, *[item(n, size=40000) for n in range(2)])
        stats = s.stats()
        assert (stats.items, stats.dropped, stats.rejected) == (1, 0, 1)
    finally:
        s.close()


def test_dead_letter_moves_rows_with_reason(store: Store) -> None:
    enqueue(store, *[item(n) for n in range(4)])
    ids = [i.id for i in store.list_items()]
    moved = store.submit(lambda t: t.dead_letter([(ids[1], "bad property"), (999, "gone")], 5.0))
    assert moved.result() == 1
    (dead,) = store.dead_letters()
    assert (dead.reason, dead.failed_at, dead.created_at) == ("bad property", 5.0, 1000.0)
    assert dead.payload == store.get_item(ids[0]).payload.replace(b'"n":0', b'"n":1')  # type: ignore[union-attr]
    assert store.get_item(ids[1]) is None
    stats = store.stats()
    assert (stats.items, stats.dead_letters, stats.dead_letter_bytes) == (3, 1, 100)
    assert_counters_match_file(store)


def test_dead_letter_cap_drops_oldest(tmp_path: Path) -> None:
    s = Store(config(tmp_path, max_bytes=10**6, max_dead_letter_bytes=65536))
    s.open()
    try:
        for round_ in range(5):
            enqueue(s, *[item(n, size=1000) for n in range(20)])
            ids = [i.id for i in s.list_items(limit=100)]
            s.submit(
                lambda t, ids=ids, r=round_: t.dead_letter([(i, f"r{r}") for i in ids], r)
            ).result()
        stats = s.stats()
        assert stats.dead_letter_bytes <= 65536
        assert stats.dead_letters == 65 and stats.dead_letters_dropped == 35
        assert s.dead_letters(limit=1)[0].reason == "r1"
        assert_counters_match_file(s)
    finally:
        s.close()


def test_retry_dead_letters_appends_with_new_ids(store: Store) -> None:
    calls: list[set[int]] = []
    enqueue(store, item(0), item(1, P2), item(2), now=50.0)
    ids = [i.id for i in store.list_items()]
    store.submit(lambda t: t.dead_letter([(ids[0], "x"), (ids[1], "y")], 60.0)).result()
    store.on_enqueued = calls.append
    dead_ids = [d.id for d in store.dead_letters()]
    assert store.submit(lambda t: t.retry_dead_letters([dead_ids[1]])).result() == 1
    assert calls == [{store.project_for(P2).id}]
    assert store.submit(lambda t: t.retry_dead_letters()).result() == 1
    rows = store.list_items()
    assert [r.id > ids[2] for r in rows] == [False, True, True]
    assert [r.created_at for r in rows] == [50.0, 50.0, 50.0]
    assert store.dead_letters() == []
    assert store.submit(lambda t: t.retry_dead_letters()).result() == 0
    assert_counters_match_file(store)


def test_retry_respects_the_cap_policy(tmp_path: Path) -> None:
    s = Store(config(tmp_path, max_bytes=65536, on_full="reject"))
    s.open()
    try:
        enqueue(s, *[item(n, size=1000) for n in range(10)])
        ids = [i.id for i in s.list_items()]
        s.submit(lambda t: t.dead_letter([(i, "x") for i in ids], 1.0)).result()
        enqueue(s, *[item(n, size=1000) for n in range(60)])
        with pytest.raises(QueueFull):
            s.submit(lambda t: t.retry_dead_letters()).result()
        assert s.stats().dead_letters == 10
        assert_counters_match_file(s)
    finally:
        s.close()


def test_purge(store: Store) -> None:
    enqueue(store, *[item(n) for n in range(6)])
    ids = [i.id for i in store.list_items()]
    store.submit(lambda t: t.dead_letter([(ids[0], "x")], 1.0)).result()
    assert store.submit(lambda t: t.purge(dead=True)).result() == 1
    assert store.stats().dead_letters == 0 and store.stats().items == 5
    assert store.submit(lambda t: t.purge()).result() == 5
    assert store.list_items() == [] and store.stats().bytes == 0
    assert store.stats().oldest_age is None
    assert_counters_match_file(store)


def test_oldest_age_follows_the_head(store: Store) -> None:
    now = time.time()
    enqueue(store, item(1), now=now - 100)
    enqueue(store, item(2), now=now - 10)
    age = store.stats().oldest_age
    assert age is not None and age >= 100
    store.submit(lambda t: t.ack([store.list_items()[0].id])).result()
    age = store.stats().oldest_age
    assert age is not None and 10 <= age < 100


def test_counters_and_state_persist_across_reopen(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_bytes=65536, max_dead_letter_bytes=65536)
    s = Store(cfg)
    s.open()
    for n in range(80):
        enqueue(s, item(n, size=1000))  # 65 fit: 15 dropped
    ids = [i.id for i in s.list_items()]
    s.submit(lambda t: t.dead_letter([(ids[0], "x")], 1.0)).result()
    s.submit(lambda t: t.ack(ids[1:3])).result()
    s.submit(lambda t: t.save_app_state("kiosk", AppState(cookie="c1", ids={"a": "b"}))).result()
    s.submit(lambda t: t.set_meta("device_uuid", "u-1")).result()
    before = s.stats()
    s.close()
    s2 = Store(cfg)
    s2.open()
    try:
        after = s2.stats()
        assert (after.items, after.bytes, after.dropped, after.dead_letters) == (
            before.items,
            before.bytes,
            before.dropped,
            before.dead_letters,
        )
        assert (before.dropped, before.items, before.dead_letters) == (15, 62, 1)
        assert s2.load_app_states() == {"kiosk": AppState(cookie="c1", ids={"a": "b"})}
        assert s2.get_meta("device_uuid") == "u-1"
        assert s2.get_meta("missing") is None
        assert_counters_match_file(s2)
    finally:
        s2.close()


def test_reserved_meta_keys_are_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.submit(lambda t: t.set_meta("store.items", "0")).result()
    assert store.stats().items == 0


def test_invalid_app_state_is_skipped(store: Store) -> None:
    store.submit(lambda t: t.save_app_state("good", AppState())).result()
    store.submit(
        lambda t: t.connection.execute(
            "INSERT INTO app_states (app, state) VALUES ('bad', '{\"session\": 5}')"
        )
    ).result()
    assert set(store.load_app_states()) == {"good"}


def test_each_thread_reads_on_its_own_connection(store: Store) -> None:
    enqueue(store, item(1))
    seen: list[sqlite3.Connection] = []

    def read() -> None:
        assert len(store.list_items()) == 1
        seen.append(store.reader())

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read()
    assert len({id(c) for c in seen}) == 4


def test_cancelled_op_is_not_run(store: Store) -> None:
    ran: list[int] = []
    with writer_blocked(store):
        f = store.submit(lambda t: ran.append(1))
        assert f.cancel()
        g = store.submit(lambda t: ran.append(2))
    g.result()
    assert ran == [2]


def test_close_drains_then_refuses(tmp_path: Path) -> None:
    s = Store(config(tmp_path))
    s.open()
    with writer_blocked(s):
        futures = [s.submit(lambda t, n=n: t.enqueue([item(n)], 1.0)) for n in range(50)]
        closer = threading.Thread(target=s.close)
        closer.start()
        wait_for(lambda: s.submit(lambda t: None).exception() is not None, 20, "refusal")
    closer.join()
    assert all(f.result() is None for f in futures)
    with pytest.raises(Unavailable):
        s.submit(lambda t: None).result()
    assert file_totals(s.config.path)[0] == 50


def test_writer_healthy_reports_a_stall(store: Store) -> None:
    assert store.writer_healthy(0.01)
    with writer_blocked(store):
        store.submit(lambda t: None)
        wait_for(lambda: not store.writer_healthy(0.01), 20, "the stall to show")
    wait_for(lambda: store.writer_healthy(0.01), 20, "the writer healthy again")
    store.close()
    assert not store.writer_healthy(60)


def test_offline_cli_pattern(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    daemon = Store(cfg)
    daemon.open()
    enqueue(daemon, item(1), item(2))
    first = daemon.list_items()[0].id
    daemon.submit(lambda t: t.dead_letter([(first, "refused")], 2.0)).result()
    daemon.close()

    cli = Store(cfg)
    cli.open()
    assert len(cli.list_items()) == 1
    assert cli.get_item(cli.list_items()[0].id) is not None
    assert cli.dead_letters()[0].reason == "refused"
    assert cli.submit(lambda t: t.purge(dead=True)).result() == 1
    assert cli.submit(lambda t: t.purge()).result() == 1
    cli.close()
    reopened = Store(cfg)
    reopened.open()
    assert reopened.stats().items == 0 and reopened.stats().dead_letters == 0
    reopened.close()


def test_later_ops_in_a_batch_see_earlier_ops_writes(store: Store) -> None:
    """Buffered rows of earlier ops are in place before an op runs SQL of its own."""

    def count(txn: Txn) -> int:
        return int(txn.connection.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def enqueue_then_fail(txn: Txn) -> None:
        txn.enqueue([item(7)], 1.0)
        txn.ack([i for (i,) in txn.connection.execute("SELECT id FROM outbox").fetchall()])
        txn.save_app_state("x", AppState())
        raise InvalidState("undo all of it")

    with writer_blocked(store):
        store.submit(lambda t: t.enqueue([item(1), item(2)], 1.0))
        seen = store.submit(count)
        failed = store.submit(enqueue_then_fail)
        own = store.submit(lambda t: (t.enqueue([item(3)], 1.0), count(t))[1])
        purged = store.submit(lambda t: t.purge())
        store.submit(lambda t: t.enqueue([item(4)], 1.0))
    assert seen.result() == 2
    with pytest.raises(InvalidState):
        failed.result()
    assert own.result() == 3
    assert purged.result() == 3
    assert [i.payload for i in store.list_items()] == [
        json.dumps(item(4).payload, separators=(",", ":")).encode()
    ]
    assert store.load_app_states() == {}
    assert_counters_match_file(store)
