"""Time sources for devices: a Clock protocol, a manual clock for tests, a monotonic one for runs."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Virtual time in nanoseconds; never goes backwards."""

    def now_ns(self) -> int: ...


class ManualClock:
    """A clock that moves only when told to: deterministic tests and replayable runs."""

    def __init__(self, start_ns: int = 0) -> None:
        if start_ns < 0:
            raise ValueError("start_ns must be >= 0")
        self._now = int(start_ns)

    def now_ns(self) -> int:
        return self._now

    def advance(self, ns: int) -> int:
        """Move time forward by ns nanoseconds; returns the new time."""
        if ns < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += int(ns)
        return self._now

    def set(self, ns: int) -> None:
        """Jump to absolute time ns (not earlier than now)."""
        if ns < self._now:
            raise ValueError("a clock cannot go backwards")
        self._now = int(ns)


class MonotonicClock:
    """Virtual time = host monotonic time elapsed since this clock was created.

    This is the only place in the device model that reads a host clock.
    """

    def __init__(self) -> None:
        self._origin = time.monotonic_ns()

    @property
    def origin_ns(self) -> int:
        """The host monotonic time (ns) that is virtual time 0."""
        return self._origin

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._origin
