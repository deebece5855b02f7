"""The one jittered backoff (agent/backoff.py): bounds checked exactly with injected numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.backoff import full_jitter, spread


def test_full_jitter_grows_exponentially_up_to_the_cap() -> None:
    almost_one = 0.999999
    assert full_jitter(0, base=1.0, cap=300, uniform=almost_one) == pytest.approx(1.0, rel=1e-3)
    assert full_jitter(3, base=1.0, cap=300, uniform=almost_one) == pytest.approx(8.0, rel=1e-3)
    assert full_jitter(20, base=1.0, cap=300, uniform=almost_one) == pytest.approx(300, rel=1e-3)
    assert full_jitter(10_000, base=1.0, cap=300, uniform=almost_one) == pytest.approx(300)
    assert full_jitter(5, base=1.0, cap=300, uniform=0.0) == 0.0  # full jitter reaches zero


@given(
    st.integers(min_value=-5, max_value=10_000),
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.floats(min_value=1, max_value=3600),
    st.floats(min_value=0.01, max_value=10),
)
def test_full_jitter_stays_within_its_window(
    attempt: int, uniform: float, cap: float, base: float
) -> None:
    delay = full_jitter(attempt, base=base, cap=cap, uniform=uniform)
    assert 0.0 <= delay <= cap
    assert delay <= base * 2.0 ** min(max(attempt, 0), 62)


@given(
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.floats(min_value=0.1, max_value=3600),
)
def test_spread_is_within_plus_minus_half(uniform: float, interval: float) -> None:
    delay = spread(interval, uniform=uniform)
    assert interval * 0.5 <= delay <= interval * 1.5 + 1e-9


def test_spread_covers_its_whole_range() -> None:
    assert spread(10.0, uniform=0.0) == 5.0
    assert spread(10.0, uniform=0.5) == 10.0
    assert spread(10.0, uniform=0.999999) == pytest.approx(15.0, rel=1e-5)
    assert spread(10.0, uniform=0.5, fraction=0.1) == 10.0
