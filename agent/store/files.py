"""The database file on disk: the single-instance lock, the start-up check, moving a bad file aside.

The lock is a `flock` on our own descriptor of the database file. SQLite uses POSIX `fcntl`
locks, which on Linux are independent of `flock`, so the two never interfere. Because closing
*any* descriptor of a file drops the process's POSIX locks on it, the lock descriptor is closed
only after every SQLite connection to that file is closed, and the header is read through it
(`os.pread`) rather than through a new `open()`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import struct
import time
from dataclasses import dataclass

from agent.store.model import StoreLocked

log = logging.getLogger("engagement_agent.store")

_MAGIC = b"SQLite format 3\x00"
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24
#: SQLite primary result codes meaning "this file is damaged", as opposed to "cannot do it now".
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_CORRUPT_WORDS = ("malformed", "not a database", "corrupt")


@dataclass
class LockedFile:
    path: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1


def lock(path: str) -> tuple[LockedFile, bool]:
    """Take the exclusive lock, creating the file if needed; returns (lock, existed before).

    Non-blocking: a second agent on the same file must fail at once with a clear message,
    not hang until systemd kills it.
    """
    existed = os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreLocked(
                f"queue database {path} is locked by another process (is engagement-agent "
                "already running? stop it first, or use the CLI against the running agent)"
            ) from None
        raise
    return LockedFile(path, fd), existed


def precheck(locked: LockedFile, existed: bool) -> str | None:
    """Problems visible in the header without SQLite; None when SQLite should judge."""
    size = os.fstat(locked.fd).st_size
    if size == 0:
        if existed:
            # A power loss can leave a zero-length file where a database was; SQLite would
            # silently treat it as empty, so make the loss visible.
            return "database file is empty (0 bytes)"
        return None
    header = os.pread(locked.fd, 100, 0)
    if len(header) < 100:
        return f"database file is truncated ({size} bytes, shorter than the 100-byte header)"
    if header[:16] != _MAGIC:
        return "not an SQLite database (bad header)"
    (page_size,) = struct.unpack(">H", header[16:18])
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        return f"corrupt database header (page size {page_size})"
    return None


def note_partial_wal(path: str) -> None:
    """Log when the WAL ends mid-frame: a crash cut the last, unacknowledged transaction.

    SQLite discards such a tail by itself and the database stays consistent (what was
    committed before it is kept), so this is not a reason to move the file aside.
    """
    try:
        with open(path + "-wal", "rb") as wal:
            header = wal.read(_WAL_HEADER)
            size = os.fstat(wal.fileno()).st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    if len(header) < _WAL_HEADER:
        log.warning("queue database %s: WAL header is truncated; it is ignored", path)
        return
    (page_size,) = struct.unpack(">I", header[8:12])
    frame = _WAL_FRAME_HEADER + page_size
    if page_size and (size - _WAL_HEADER) % frame:
        log.warning(
            "queue database %s: WAL ends in a partial frame (crash during a write); "
            "the incomplete transaction is discarded",
            path,
        )


def is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return (code & 0xFF) in _CORRUPT_CODES
    text = str(exc).lower()
    return any(word in text for word in _CORRUPT_WORDS)


def quick_check(conn: sqlite3.Connection) -> str | None:
    """None if the database is sound, else a short reason. `quick_check` may return rows
    describing problems *or* raise; a corruption error counts, any other error propagates."""
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            return f"quick_check failed: {exc}"
        raise
    problems = [line for row in rows for line in str(row[0]).splitlines() if line.strip()]
    if problems == ["ok"]:
        return None
    summary = "; ".join(problems[:3])
    if len(problems) > 3:
        summary += f" (+{len(problems) - 3} more)"
    return f"quick_check: {summary[:500]}"


def move_aside(path: str) -> str:
    """Rename the database and its -wal/-shm to `<name>.corrupt-<UTC stamp>`; returns the name.

    The companions keep SQLite's naming (`X-wal` next to `X`) so the moved copy can still be
    opened for forensics with its WAL.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.exists(target):
        target = f"{path}.corrupt-{stamp}-{n}"
        n += 1
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + suffix, target + suffix)
    os.rename(path, target)
    return target
