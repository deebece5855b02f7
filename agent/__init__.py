"""engagement-agent: a durable Bloomreach Engagement tracking agent for Linux edge devices."""

from __future__ import annotations

__version__ = "0.2.0"
