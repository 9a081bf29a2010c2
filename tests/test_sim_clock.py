"""SimClock: simulated time, optional wall-clock pacing, never a wall-clock sleep at time_scale 0."""

from __future__ import annotations

import asyncio

import pytest

from deepspm.simulator.clock import SimClock


class FakeWall:
    """An injected wall clock: time only moves when the fake sleep is awaited."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.slept.append(dt)
        self.t += dt


def test_advance_and_advance_to() -> None:
    clock = SimClock(0.0, start_s=5.0)
    assert clock.now() == 5.0
    assert clock.advance(2.5) == 7.5
    assert clock.advance_to(7.0) == 7.5  # never backwards
    assert clock.advance_to(10.0) == 10.0
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    with pytest.raises(ValueError):
        SimClock(-1.0)


async def test_scale_zero_sleeps_instantly_in_simulated_time() -> None:
    wall = FakeWall()
    clock = SimClock(0.0, wall=wall, wall_sleep=wall.sleep)
    await clock.sleep(3600.0)
    assert clock.now() == 3600.0
    assert wall.slept == []  # no wall-clock sleep at all


async def test_concurrent_sleepers_do_not_add_up() -> None:
    clock = SimClock(0.0)
    await asyncio.gather(clock.sleep(12.0), clock.sleep(12.0), clock.sleep(1.0))
    assert clock.now() == 12.0


async def test_positive_scale_waits_scaled_wall_time_and_flows_with_the_wall() -> None:
    wall = FakeWall()
    clock = SimClock(0.5, wall=wall, wall_sleep=wall.sleep)
    await clock.sleep(10.0)
    assert wall.slept == [5.0]
    assert clock.now() == pytest.approx(10.0)
    wall.t += 1.0  # one wall second = two simulated seconds
    assert clock.now() == pytest.approx(12.0)
    clock.advance(3.0)
    assert clock.now() == pytest.approx(15.0)


async def test_wall_sleep_waking_early_still_reaches_the_target() -> None:
    wall = FakeWall()

    async def early(dt: float) -> None:
        wall.t += dt * 0.9

    clock = SimClock(1.0, wall=wall, wall_sleep=early)
    await clock.sleep(10.0)
    assert clock.now() >= 10.0
