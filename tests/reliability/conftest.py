"""Fixtures of the reliability suite (the shared ones live in tests/fixtures/)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.mosquitto import MosquittoBroker
from tests.reliability.harness import BROKER_CONFIG


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto that never drops queued messages for an offline session."""
    with MosquittoBroker(tmp_path / "mosquitto", BROKER_CONFIG) as instance:
        yield instance
