"""Jittered waits between attempts, shared by sync and MQTT reconnects (docs/sync.md).

Pure functions: the caller passes a uniform random number in [0, 1) (from its own injected
`random.Random`) and gets a delay in seconds. Keeping randomness out is what lets the unit
tests check the bounds exactly, and what lets a test make a whole fleet deterministic.

Why jitter at all: a fleet that lost its uplink at the same moment would otherwise come back
in lockstep and hit the broker and the API with one spike per retry round.
"""

from __future__ import annotations

#: Exponents beyond this cannot make a float delay any larger than a sane cap; bounding it
#: keeps `2 ** attempt` from overflowing after years of failures.
MAX_EXPONENT = 62


def full_jitter(attempt: int, *, base: float, cap: float, uniform: float) -> float:
    """Exponential backoff with full jitter: a point in [0, min(cap, base * 2**attempt)).

    `attempt` counts consecutive failures from 0 (negative counts as 0). Full jitter (rather
    than "exponential plus a little noise") spreads retries over the whole window, which is
    what keeps a recovering server from being hit by every client at once.
    """
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), MAX_EXPONENT))
    return max(0.0, min(ceiling, ceiling * uniform))


def spread(interval: float, *, uniform: float, fraction: float = 0.5) -> float:
    """`interval` jittered by ±`fraction` of itself: a fixed-rate schedule (the network probe)
    whose ticks do not line up across devices that started together."""
    low = interval * (1.0 - fraction)
    return max(0.0, low + 2.0 * fraction * interval * uniform)


__all__ = ["MAX_EXPONENT", "full_jitter", "spread"]
