"""The host timer behind virtual devices: a thread that sleeps until the next device deadline and kicks the vCPU out of the guest (an external-interrupt exit, as a host timer tick would be)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from devicemodel.clock import Clock

# fire(retry) -> ns after which to call fire(retry=True) again, or None when done. A kick can
# land between two runs of the CPU and be lost (emu_stop is not sticky), so the vCPU asks to be
# kicked again until it has seen the kick.
FireFn = Callable[[bool], "int | None"]


class HostTimer:
    """One armed deadline at a time, on the devices' clock. Blocks on a condition, never spins."""

    def __init__(self, clock: Clock, fire: FireFn, name: str = "host-timer") -> None:
        self._clock = clock
        self._fire = fire
        self._cond = threading.Condition()
        self._deadline: int | None = None
        self._retry: int | None = None
        self._stopping = False
        self.fired = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def arm(self, deadline_ns: int | None) -> None:
        """Fire at `deadline_ns` (an earlier armed deadline stays); None disarms."""
        with self._cond:
            if deadline_ns is None:
                self._deadline = None
            elif self._deadline is None or deadline_ns < self._deadline:
                self._deadline = deadline_ns
            else:
                return
            self._cond.notify()

    def _next(self) -> int | None:
        times = [t for t in (self._deadline, self._retry) if t is not None]
        return min(times) if times else None

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                due = self._next()
                now = self._clock.now_ns()
                if due is None or due > now:
                    self._cond.wait(1.0 if due is None else min((due - now) / 1e9, 1.0))
                    continue
                retry = self._retry is not None and self._retry <= now
                if not retry:
                    self._deadline = None
                    self.fired += 1
                self._cond.release()
                try:
                    again = self._fire(retry)
                finally:
                    self._cond.acquire()
                self._retry = None if again is None else self._clock.now_ns() + again

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(2.0)
