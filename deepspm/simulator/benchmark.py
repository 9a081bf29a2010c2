"""In-process rendering throughput of the simulated microscope (for `make bench`; never a timed test).

The pattern is the controller's: 10 nm frames on a raster of 10 nm cells, each cell scanned twice (the
discarded creep frame and the real one), going through the same `SimulatedMicroscope` calls the fake
Nanonis server makes (frame set, scan start, time passing, frame grab of the forward z channel).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from deepspm.simulator.clock import SimClock
from deepspm.simulator.microscope import Z_INDEX, SimConfig, SimulatedMicroscope
from deepspm.simulator.probe import ProbeKind


@dataclass(frozen=True)
class RenderBenchmark:
    pixels: int
    probe: str
    frames: int
    wall_s: float
    cpu_s: float

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s

    @property
    def frames_per_cpu_s(self) -> float:
        return self.frames / self.cpu_s

    def as_dict(self) -> dict:
        return {**asdict(self), "frames_per_s": self.frames_per_s, "frames_per_cpu_s": self.frames_per_cpu_s}


def measure(
    pixels: int = 64, frames: int = 2000, probe: ProbeKind | None = ProbeKind.GOOD, seed: int = 0, warmup: int = 100
) -> RenderBenchmark:
    """Frames per second through `SimulatedMicroscope` (probe None = default config, which degrades over time)."""
    config = (SimConfig() if probe is None
              else SimConfig(initial_probe_kind=probe, degradation_per_frame=0.0, spontaneous_changes=False))
    clock = SimClock(0.0)
    m = SimulatedMicroscope(seed, clock, config)
    m.set_scan_buffer([Z_INDEX], pixels, pixels)

    def run(start: int, count: int) -> None:
        for i in range(start, start + count):
            cell = i // 2
            x = ((cell % 60) - 30) * 10e-9
            y = ((cell // 60) % 60 - 30) * 10e-9
            m.set_scan_frame(x, y, 10e-9, 10e-9, 0.0)
            m.scan_action(0, True)
            clock.advance(m.frame_time_s())
            m.frame_data(Z_INDEX, True)

    run(0, warmup)
    wall, cpu = time.perf_counter(), time.process_time()
    run(warmup, frames)
    return RenderBenchmark(pixels, "mixed" if probe is None else probe.value, frames, time.perf_counter() - wall,
                           time.process_time() - cpu)


def main() -> list[RenderBenchmark]:
    results = []
    print(f"{'pixels':>6} {'probe':>9} {'frames':>6} {'frames/s':>9} {'frames/CPU-s':>13}")
    for pixels, frames in ((64, 3000), (256, 300)):
        for probe in (ProbeKind.GOOD, ProbeKind.MULTIPLE, None):
            r = measure(pixels, frames, probe)
            results.append(r)
            print(f"{r.pixels:>6} {r.probe:>9} {r.frames:>6} {r.frames_per_s:>9.0f} {r.frames_per_cpu_s:>13.0f}")
    return results


if __name__ == "__main__":
    main()
