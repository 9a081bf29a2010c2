"""Simulated-microscope frames per second: rendered in-process, and through TCP with our client.

In-process reuses the simulator's own benchmark (`deepspm.simulator.benchmark.measure`: the controller's
pattern of 10 nm frames on a raster, each cell scanned twice, through the same `SimulatedMicroscope` calls
the fake server makes). Through TCP, `SimulatorServer(time_scale=0)` and `NanonisClient` share one event
loop (as in `deepspm run`), with the same probe settings, in two ways:
- "client": Scan.FrameSet, Scan.Action (start), Scan.WaitEndOfScan, Scan.FrameDataGrab per frame;
- "instrument": `NanonisInstrument.scan`, what the controller calls (the same four requests plus the z
  state read after the scan).
Goals (issue 3, 64x64): >= 1000 frames/s in-process, >= 200 frames/s through TCP. Reported, not asserted.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from benchmarks.common import print_table, write_json
from deepspm.io.client import NanonisClient
from deepspm.io.connection import NanonisConnection
from deepspm.io.instrument import NanonisInstrument, ScanSettings
from deepspm.io.safety import SafetyEnvelope
from deepspm.simulator.benchmark import RenderBenchmark, measure
from deepspm.simulator.fake_nanonis import SimulatorServer
from deepspm.simulator.microscope import SimConfig
from deepspm.simulator.probe import ProbeKind

FRAME_SIZE_M = 10e-9
GOAL_IN_PROCESS_FPS = 1000.0  # at 64x64
GOAL_TCP_FPS = 200.0  # at 64x64


@dataclass(frozen=True)
class SimRate(RenderBenchmark):
    """The simulator's own rate record, plus which path the frames took."""

    path: str = "in-process"  # "in-process", "tcp client" or "tcp instrument"


def raster_xy_m(index: int) -> tuple[float, float]:
    """Centre of the `index`-th scan: cells of 10 nm in a 600 nm square, each cell scanned twice (the
    discarded creep frame and the real one), as the simulator's in-process benchmark does."""
    cell = index // 2
    return ((cell % 60) - 30) * FRAME_SIZE_M, ((cell // 60) % 60 - 30) * FRAME_SIZE_M


def steady_probe_config() -> SimConfig:
    """A good probe that neither degrades nor changes: the same frames' cost as the in-process run."""
    return SimConfig(initial_probe_kind=ProbeKind.GOOD, degradation_per_frame=0.0, spontaneous_changes=False)


async def tcp_rate(pixels: int, frames: int, path: str, seed: int = 0, warmup: int = 20) -> SimRate:
    """Frames per wall second through the Nanonis protocol over loopback, server and client in one loop."""
    async with SimulatorServer(seed=seed, time_scale=0.0, config=steady_probe_config()) as sim:
        client = NanonisClient(NanonisConnection("127.0.0.1", sim.port), SafetyEnvelope())
        instrument = NanonisInstrument(client, ScanSettings(pixels=pixels))
        await instrument.connect()  # also reads the piezo range the safety envelope checks frames against
        try:
            channel = (await client.signal_names()).index(instrument.scan_settings.z_channel_name)
            await client.scan_buffer_set([channel], pixels, pixels)

            async def by_client(i: int) -> None:
                x, y = raster_xy_m(i)
                await client.scan_frame_set(x, y, FRAME_SIZE_M, FRAME_SIZE_M)
                await client.scan_start()
                timed_out, _ = await client.scan_wait_end(60.0)
                grabbed = await client.scan_frame_data_grab(channel)
                assert not timed_out and grabbed.data.shape == (pixels, pixels)

            async def by_instrument(i: int) -> None:
                frame = await instrument.scan(*raster_xy_m(i), FRAME_SIZE_M)
                assert frame.data_m.shape == (pixels, pixels)

            one = by_client if path == "tcp client" else by_instrument
            for i in range(warmup):
                await one(i)
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(warmup, warmup + frames):
                await one(i)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        finally:
            await instrument.close()
    return SimRate(pixels, ProbeKind.GOOD.value, frames, wall, cpu, path=path)


def in_process_rate(pixels: int, frames: int, probe: ProbeKind | None, warmup: int) -> SimRate:
    r = measure(pixels, frames, probe, warmup=warmup)
    return SimRate(pixels, r.probe, r.frames, r.wall_s, r.cpu_s, path="in-process")


def goal_for(rate: SimRate) -> float | None:
    if rate.pixels != 64:
        return None
    return GOAL_IN_PROCESS_FPS if rate.path == "in-process" else GOAL_TCP_FPS


def main(smoke: bool = False) -> list[SimRate]:
    """Measure every row; `smoke` runs a handful of frames (for the test that keeps this module working)."""
    if not smoke:
        from deepspm.controller.diagnostics import configure_logging

        configure_logging("warning")
    frames = {64: 10, 256: 3} if smoke else {64: 3000, 256: 300}
    tcp_frames = {64: 10, 256: 3} if smoke else {64: 1000, 256: 150}
    warmup = 2 if smoke else 50
    rates: list[SimRate] = []
    for pixels in (64, 256):
        for probe in (ProbeKind.GOOD, None):
            rates.append(in_process_rate(pixels, frames[pixels], probe, warmup))
        for path in ("tcp client", "tcp instrument"):
            rates.append(asyncio.run(tcp_rate(pixels, tcp_frames[pixels], path, warmup=warmup)))
    rows = []
    for r in rates:
        goal = goal_for(r)
        rows.append((f"{r.pixels}x{r.pixels}", r.path, r.probe, r.frames, r.frames_per_s, r.frames_per_cpu_s,
                     "-" if goal is None else f">= {goal:.0f}",
                     "-" if goal is None else f"{r.frames_per_s / goal:.2f}"))
    print_table(
        "Simulator frames/s (time scale 0; 'mixed' = the default degrading probe; goals at 64x64: in-process "
        f">= {GOAL_IN_PROCESS_FPS:.0f}, TCP >= {GOAL_TCP_FPS:.0f}); load average {os.getloadavg()[0]:.1f}",
        ("frame", "path", "probe", "frames", "frames/s", "frames/CPU-s", "goal", "x goal"), rows,
    )
    if not smoke:
        payload = [{**r.as_dict(), "goal_frames_per_s": goal_for(r)} for r in rates]
        print("wrote", write_json("sim", {"rows": payload}))
    return rates


if __name__ == "__main__":
    main()
