"""Fixtures of the unit suite (the shared ones live in tests/fixtures/)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import Store
from tests.unit.test_store_helpers import config


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An open store on a real SQLite file in tmp_path, with room to spare (1 MB): tests of
    the cap and eviction build their own with the capacity they need."""
    s = Store(config(tmp_path, max_bytes=10**6))
    s.open()
    yield s
    s.close()
