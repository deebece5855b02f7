"""Fixtures of the reliability suite (the shared ones live in tests/fixtures/)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.fixtures.mosquitto import MosquittoBroker
from tests.reliability.harness import BROKER_CONFIG


@pytest.fixture
def broker(make_mosquitto: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A private Mosquitto that never drops queued messages for an offline session."""
    return make_mosquitto(BROKER_CONFIG)
