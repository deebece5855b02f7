"""Random sequences of queue operations against a plain-Python model of the cap rules."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import QueueFull
from agent.store import Store
from tests.unit.test_store_helpers import P1, P2, assert_counters_match_file, config, item

CAP = 65536
DEAD_CAP = 65536

operation = st.one_of(
    st.tuples(st.just("enqueue"), st.lists(st.integers(60, 9000), min_size=1, max_size=4)),
    st.tuples(st.just("ack"), st.lists(st.integers(0, 30), max_size=6)),
    st.tuples(st.just("dead"), st.lists(st.integers(0, 30), max_size=6)),
    st.tuples(st.just("retry"), st.none()),
    st.tuples(st.just("purge"), st.booleans()),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["drop_oldest", "reject"]), ops=st.lists(operation, max_size=25))
def test_counters_follow_a_model(policy: str, ops: list[tuple[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(
            Path(tmp),
            max_bytes=CAP,
            max_dead_letter_bytes=DEAD_CAP,
            on_full=policy,
            durability="normal",
        )
        store = Store(cfg)
        store.open()
        queue: list[int] = []  # sizes, oldest first (ids are positions in `ids`)
        ids: list[int] = []
        dead: list[int] = []
        dropped = rejected = 0
        try:
            for name, arg in ops:
                if name == "enqueue":
                    sizes: list[int] = arg  # type: ignore[assignment]
                    batch = [item(n, P1 if n % 2 else P2, size) for n, size in enumerate(sizes)]
                    fut = store.submit(lambda t, b=batch: t.enqueue(b, 1.0))
                    total = sum(sizes)
                    if total > CAP or (policy == "reject" and sum(queue) + total > CAP):
                        rejected += 1
                        try:
                            fut.result()
                            raise AssertionError("expected QueueFull")
                        except QueueFull:
                            pass
                    else:
                        fut.result()
                        while sum(queue) + total > CAP:
                            queue.pop(0)
                            ids.pop(0)
                            dropped += 1
                        queue.extend(sizes)
                        ids.extend(i.id for i in store.list_items(limit=10**6)[-len(sizes) :])
                elif name in ("ack", "dead"):
                    picks = sorted({p for p in arg if p < len(ids)})  # type: ignore[union-attr]
                    chosen = [ids[p] for p in picks]
                    if name == "ack":
                        store.submit(lambda t, c=chosen: t.ack(c)).result()
                    else:
                        entries = [(i, "r") for i in chosen]
                        store.submit(lambda t, e=entries: t.dead_letter(e, 2.0)).result()
                        dead.extend(queue[p] for p in picks)
                        while sum(dead) > DEAD_CAP:
                            dead.pop(0)
                    for p in reversed(picks):
                        queue.pop(p)
                        ids.pop(p)
                elif name == "retry":
                    total = sum(dead)
                    fut = store.submit(lambda t: t.retry_dead_letters())
                    if dead and (total > CAP or (policy == "reject" and sum(queue) + total > CAP)):
                        try:
                            fut.result()
                            raise AssertionError("expected QueueFull")
                        except QueueFull:
                            pass
                    else:
                        fut.result()
                        while dead and sum(queue) + total > CAP:
                            queue.pop(0)
                            ids.pop(0)
                            dropped += 1
                        queue.extend(dead)
                        if dead:
                            ids.extend(i.id for i in store.list_items(limit=10**6)[-len(dead) :])
                        dead = []
                else:
                    store.submit(lambda t, d=arg: t.purge(dead=bool(d))).result()
                    if arg:
                        dead = []
                    else:
                        queue, ids = [], []
                stats = store.stats()
                assert (stats.items, stats.bytes) == (len(queue), sum(queue))
                assert (stats.dead_letters, stats.dead_letter_bytes) == (len(dead), sum(dead))
                assert (stats.dropped, stats.rejected) == (dropped, rejected)
                assert [i.id for i in store.list_items(limit=10**6)] == ids
            assert_counters_match_file(store)
        finally:
            store.close()
        reopened = Store(cfg)
        reopened.open()
        stats = reopened.stats()
        assert (stats.items, stats.bytes, stats.dropped, stats.rejected) == (
            len(queue),
            sum(queue),
            dropped,
            rejected,
        )
        reopened.close()
