"""Power-cut simulation for `queue.durability = "full"`.

At a random moment while producers pipeline commands and the uploader deletes, the agent is
frozen (SIGSTOP), the database and its WAL are copied byte for byte, and it is resumed. The copy
is what the files held at one instant with transactions half-written — a crash image. A fresh
agent opens the copy: it must not call it corrupt, and every command acknowledged before the
freeze must be in it or already at the API. See docs/reliability.md for what this cannot show
(the page cache is not the disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.daemon import AgentProcess
from tests.reliability.harness import (
    EVENT,
    agent_config,
    assert_replies_well_formed,
    delivered,
    rounds,
    seeded,
    start_producers,
    stop_producers,
    wait_ingest_progress,
)


def crash_image(agent: AgentProcess, target: Path) -> None:
    """Copy the main file and the WAL (not the -shm index: SQLite rebuilds it from the WAL
    after a reboot, as it must after a real power cut)."""
    target.mkdir(parents=True)
    for suffix in ("", "-wal"):
        source = Path(f"{agent.db_path}{suffix}")
        if source.exists():
            shutil.copyfile(source, target / f"queue.db{suffix}")


@pytest.mark.parametrize("n_rounds", rounds(2, 12))
def test_crash_image_holds_everything_acknowledged_before_it(
    make_agent: Any, api_stub: ApiStub, tmp_path: Path, n_rounds: int
) -> None:
    rng = seeded()
    agent: AgentProcess = make_agent(agent_config(api_stub, queue={"durability": "full"}))
    agent.start()
    assert agent.process is not None
    producers = start_producers(agent, 3, "p", reconnect=True)
    images: list[tuple[Path, set[str], set[str]]] = []
    try:
        for n in range(n_rounds):
            wait_ingest_progress(agent, producers, 300, "ingest progress")
            time.sleep(rng.uniform(0, 0.1))  # an arbitrary instant, not a quiet one
            acked_before: set[str] = set()
            for producer in producers:
                acked_before |= producer.snapshot_acked()
            os.kill(agent.process.pid, signal.SIGSTOP)
            try:
                # Deleted rows in the image were received by the API before the freeze.
                at_api = set(delivered(api_stub))
                image = tmp_path / f"image{n}"
                crash_image(agent, image)
            finally:
                os.kill(agent.process.pid, signal.SIGCONT)
            images.append((image, acked_before, at_api))
    finally:
        stop_producers(producers)
    assert_replies_well_formed(producers)

    for n, (image, acked_before, at_api) in enumerate(images):
        # Sync stays off: the image's project rows still point at the live stand-in.
        fresh: AgentProcess = make_agent(
            agent_config(api_stub, sync={"flush_mode": "manual"}), name=f"fresh{n}"
        )
        for file in image.iterdir():
            shutil.copyfile(file, fresh.workdir / file.name)
        fresh.start()
        status = fresh.status()
        assert status["queue"]["recovered"] == [], (
            f"the crash image was judged corrupt: {status['queue']['recovered']}\n{fresh.log()}"
        )
        fresh.kill()  # not SIGTERM: its last flush would send the image's items away
        in_image = queued_ids(fresh.db_path)
        assert len(in_image) == status["queue"]["items"] - count_other_items(fresh.db_path)
        missing = sorted(acked_before - at_api - in_image)
        assert not missing, (
            f"image {n}: {len(missing)} of {len(acked_before)} commands acknowledged before "
            f"the cut are gone, e.g. {missing[:10]}\n{fresh.log()[-4000:]}"
        )
        print(
            f"image {n}: {len(acked_before)} acked before the cut: {len(at_api)} at the API, "
            f"{len(in_image)} queued in the image"
        )


def _payload_rid(payload: bytes) -> str | None:
    data = json.loads(payload)
    data = data.get("data", data)
    if data.get("event_type") != EVENT:
        return None
    rid = (data.get("properties") or {}).get("rid")
    return rid if isinstance(rid, str) else None


def queued_ids(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT payload FROM outbox").fetchall()
    return {rid for (payload,) in rows if (rid := _payload_rid(payload)) is not None}


def count_other_items(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT payload FROM outbox").fetchall()
    return sum(1 for (payload,) in rows if _payload_rid(payload) is None)
