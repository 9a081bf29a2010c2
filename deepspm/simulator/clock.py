"""Simulated time for the microscope: one clock shared by the physics and the fake server.

`time_scale` is wall seconds per simulated second: 1 = real time, 0.1 = ten times faster, 0 = as fast as
possible (simulated time only moves when someone sleeps or advances it; nothing ever waits on the wall
clock). With a positive scale, simulated time also flows with the wall clock between sleeps, so an external
client that polls on its own wall clock (e.g. `Scan.StatusGet` every second) sees a scan progress.

Concurrent sleepers: each `sleep(dt)` targets `now_at_call + dt` and, on waking, moves the clock to at least
that target (never backwards), so two tasks sleeping at the same time do not add up their delays. With
time_scale 0 every sleeper jumps straight to its target after one event-loop turn; the relative order of
concurrent sleepers with different targets is therefore only approximate (there is no global event queue).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class SimClock:
    """Simulated seconds since the clock's creation (starts at `start_s`)."""

    def __init__(
        self,
        time_scale: float = 0.0,
        start_s: float = 0.0,
        wall: Callable[[], float] = time.monotonic,
        wall_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        self.time_scale = float(time_scale)
        self._wall = wall
        self._wall_sleep = wall_sleep
        self._offset_s = float(start_s)  # simulated time at wall reference _wall0
        self._wall0 = wall()

    def now(self) -> float:
        """Current simulated time in seconds."""
        if self.time_scale > 0:
            return self._offset_s + (self._wall() - self._wall0) / self.time_scale
        return self._offset_s

    def advance(self, dt_s: float) -> float:
        """Move simulated time forward by `dt_s` at once (synchronous use, tests, the RL environment)."""
        if dt_s < 0:
            raise ValueError(f"cannot advance by a negative time {dt_s}")
        self._offset_s += dt_s
        return self.now()

    def advance_to(self, t_s: float) -> float:
        """Move simulated time forward to `t_s` (no-op if already later)."""
        now = self.now()
        if t_s > now:
            self._offset_s += t_s - now
        return self.now()

    async def sleep(self, dt_s: float) -> None:
        """Let `dt_s` simulated seconds pass; waits dt_s * time_scale wall seconds (none when the scale is 0)."""
        if dt_s < 0:
            dt_s = 0.0
        target = self.now() + dt_s
        if self.time_scale > 0:
            await self._wall_sleep(dt_s * self.time_scale)
        else:
            await asyncio.sleep(0)  # yield once so other tasks run, but never wait on the wall clock
        self.advance_to(target)
