"""Bad database files at start, and a disk that fills up under the agent.

A corrupt, empty or truncated queue file must never stop the agent or make it crash-loop: it is
moved aside, reported in `queue.recovered`, and an empty queue is served (DESIGN "Failure is a
first-class path"). A full disk refuses new commands visibly and harms nothing committed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.daemon import AgentProcess, wait_for
from tests.reliability.harness import (
    EVENT,
    SocketProducer,
    acked_ids,
    agent_config,
    assert_replies_well_formed,
    check_no_loss,
    delivered,
    join_producers,
    wait_delivered,
    wait_drained,
)


def _garbage(db: Path, full: Path) -> None:
    db.write_bytes(os.urandom(16384))


def _zero(db: Path, full: Path) -> None:
    db.write_bytes(b"")


def _short_header(db: Path, full: Path) -> None:
    db.write_bytes(full.read_bytes()[:50])


def _truncated(db: Path, full: Path) -> None:
    data = full.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def _bad_page_size(db: Path, full: Path) -> None:
    data = bytearray(full.read_bytes())
    data[16:18] = b"\x03\x00"  # 768: not a power of two
    db.write_bytes(bytes(data))


def _scribbled(db: Path, full: Path) -> None:
    data = bytearray(full.read_bytes())
    page = 4096
    for offset in range(page, len(data), page * 2):  # every other page past the header page
        data[offset + 8 : offset + 64] = os.urandom(56)
    db.write_bytes(bytes(data))


DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "garbage": _garbage,
    "zero-bytes": _zero,
    "shorter-than-header": _short_header,
    "truncated-half": _truncated,
    "bad-page-size": _bad_page_size,
    "scribbled-pages": _scribbled,
}


@pytest.fixture(scope="module")
def full_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, cleanly closed queue database holding a few hundred items."""
    from tests.fixtures.daemon import AgentProcess as Process

    workdir = tmp_path_factory.mktemp("full-db")
    agent = Process(workdir, {"sync": {"flush_mode": "manual"}})
    agent.start()
    try:
        with agent.client() as client:
            for i in range(400):
                reply = client.request(
                    {
                        "command": "track_event",
                        "name": "old",
                        "properties": {"i": i, "p": "x" * 200},
                    }
                )
                assert reply["ok"], reply
        assert agent.terminate() == 0, agent.log()
    finally:
        agent.close()
    assert (
        not Path(f"{agent.db_path}-wal").exists()
        or Path(f"{agent.db_path}-wal").stat().st_size == 0
    )
    return agent.db_path


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_database_is_moved_aside_and_the_agent_serves(
    make_agent: Any, api_stub: ApiStub, full_database: Path, damage: str
) -> None:
    agent: AgentProcess = make_agent(agent_config(api_stub))
    DAMAGE[damage](agent.db_path, full_database)
    agent.start()  # READY=1, or the fixture fails with the log
    status = agent.status()
    recovered = status["queue"]["recovered"]
    assert len(recovered) == 1, f"{recovered}\n{agent.log()}"
    moved = Path(recovered[0]["file"])
    assert moved.exists(), f"the moved file {moved} is not there"
    assert recovered[0]["reason"], recovered
    assert recovered[0]["at"] > 0
    reply = agent.request({"command": "track_event", "name": EVENT, "properties": {"rid": "a"}})
    assert reply["ok"], reply
    wait_delivered(api_stub, ["a"], agent)
    # The fresh file is sound: a restart does not move anything aside again.
    assert agent.terminate() == 0
    agent.start()
    assert agent.status()["queue"]["recovered"] == [], agent.log()


# --------------------------------------------------------------------------- disk full

SMALL_FS_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk that really fills up (ENOSPC → SQLITE_FULL)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path: Path) -> None:
    """Take every free byte left on the filesystem (appending to `path`)."""
    with contextlib.suppress(OSError), open(path, "ab") as ballast:
        while True:
            ballast.write(b"\0" * 4096)
            ballast.flush()


def test_disk_full_during_ingest_and_deletes_then_recovery(
    make_agent: Any, api_stub: ApiStub, small_fs: Path
) -> None:
    agent: AgentProcess = make_agent(agent_config(api_stub, queue={"path": small_fs / "queue.db"}))
    agent.db_path = small_fs / "queue.db"
    # Ballast that step 3 deletes: how "space returns" (an operator cleaning up, logs rotated).
    ballast = small_fs / "ballast"
    ballast.write_bytes(b"\0" * (512 * 1024))
    agent.start()
    api_stub.fail_next(None, 503)  # the API is down: nothing is deleted, the queue grows

    # 1. Ingest until the disk is full: refusals must be visible and valid.
    producer = SocketProducer(agent.socket_path, "f", count=20000, window=32)
    producer.start()
    wait_for(
        lambda: len(producer.refused) >= 50 or not producer.is_alive(),
        120,
        f"refusals once the disk is full\n{agent.log()[-3000:]}",
    )
    producer.stop()
    join_producers([producer])
    assert_replies_well_formed([producer])
    assert producer.refused, "the disk never filled; the test proves nothing"
    assert set(producer.refused.values()) <= {"unavailable", "queue_full"}, producer.refused
    status = agent.status()  # still serving
    assert status["queue"]["items"] >= len(producer.acked)

    # 2. Take the last free bytes too, then let the API back: uploads succeed but deleting the
    #    delivered rows needs space. Nothing may be lost; resends are allowed.
    fill(ballast)
    requests_before = len(api_stub.requests())
    api_stub.reset()
    wait_for(
        lambda: len(api_stub.requests()) >= requests_before + 3,
        30,
        f"uploads while the disk is full\n{agent.log()[-3000:]}",
    )
    reply = agent.request({"command": "track_event", "name": EVENT, "properties": {"rid": "x"}})
    assert reply["ok"] or reply["error"]["code"] in {"unavailable", "queue_full"}, reply
    late = ["x"] if reply["ok"] else []

    # 3. Space returns: the queue drains, new commands are accepted again.
    ballast.unlink()
    wait_drained(agent, timeout=30)
    reply = agent.request({"command": "track_event", "name": EVENT, "properties": {"rid": "y"}})
    assert reply["ok"], reply
    acked = [*acked_ids([producer]), *late, "y"]
    wait_delivered(api_stub, acked, agent)
    counts = check_no_loss(
        api_stub, acked, max_duplicates=len(api_stub.requests()) * 50, agent=agent
    )
    print(
        f"{len(acked)} acked, {len(producer.refused)} refused while full, "
        f"{sum(n - 1 for n in counts.values())} resent while deletes failed"
    )
    assert delivered(api_stub)
    # Nothing was judged corrupt, now or after a restart.
    assert agent.status()["queue"]["recovered"] == []
    assert agent.terminate() == 0
    agent.start()
    assert agent.status()["queue"]["recovered"] == [], agent.log()
