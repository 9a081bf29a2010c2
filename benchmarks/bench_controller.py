"""Controller overhead per frame: the run loop's wall time that is not spent awaiting the instrument.

A real session (`run_session`: config -> embedded simulator at time scale 0 served over TCP -> nets ->
journal -> run loop) runs N frames with random-initialised nets of the `compact` and the `paper` preset
(saved as checkpoints in a temp dir and loaded by `load_brain`, exactly as a run loads them). Two thin
timing subclasses are swapped into the session module for the benchmark's duration (the session builds its
instrument and loop itself):
- the instrument: every `Instrument` operation the loop awaits (scan, approach, pulse, ...) adds its wall
  time, outermost call only, while the loop runs;
- the loop: the wall time of `RunLoop.run`.
overhead per frame = (loop wall time - instrument time) / recorded frames: preprocessing (RANSAC), the
bad-sample rule, inference, planning, locating, the FSM and the journal (records and frame files). The
inference part is also shown on its own (the brain is wrapped). The instrument's share includes the
simulator's own work (rendering, protocol), which a real microscope would replace by 12 s of scanning.

Online learning is off in the main rows (a background thread, not on the loop's path; with `paper` one
update takes minutes); `compact` is also run with it on, to show what the learner thread costs the loop on
this 2-core machine. Goal (issue 5): <= 1 % of the 12 s frame (120 ms) with `compact`. Reported only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import jax
import numpy as np

import deepspm.controller.session as session_module
from benchmarks.bench_nets import random_vars
from benchmarks.common import print_table, write_json
from deepspm.controller.brain import NetBrain
from deepspm.controller.config import RunConfig, load_config
from deepspm.controller.loop import RunLoop
from deepspm.controller.session import SimulatorOptions, load_brain, run_session
from deepspm.io.instrument import OPERATIONS, NanonisInstrument
from deepspm.nets.checkpoints import save_net
from deepspm.nets.dqn import agent_from_classifier
from deepspm.nets.model import NetDef, count_leaves
from deepspm.nets.presets import NetSpec

N_ACTIONS = 12
GOAL_FRACTION = 0.01  # of the frame time
# The Instrument operations the loop awaits (connect and close happen outside the loop).
TIMED_OPS = OPERATIONS
# `NetDef.init` draws with threefry at XLA optimisation level 0: ~100 s for `paper`'s 561 M parameters. Above
# this size the agent gets its own fast numpy-drawn variables instead of `agent_from_classifier`'s fresh head.
FAST_AGENT_ABOVE_PARAMS = 50_000_000


class Meter:
    """Wall-time accumulators, filled by the timing subclasses and the brain wrapper."""

    def __init__(self) -> None:
        self.in_loop = False
        self.loop_s = 0.0
        self.instrument_s = 0.0
        self.instrument_calls: Counter[str] = Counter()  # per operation, while the loop runs
        self.nets_s = 0.0
        self.nets_calls = 0
        self._depth = 0  # instrument operations call each other (scan reads the z state): time the outermost
        self.loop: RunLoop | None = None

    def time_instrument(self, op: str, method: Any) -> Any:
        meter = self

        @functools.wraps(method)
        async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            if meter._depth or not meter.in_loop:
                meter._depth += 1
                try:
                    return await method(self, *args, **kwargs)
                finally:
                    meter._depth -= 1
            meter._depth += 1
            start = time.perf_counter()
            try:
                return await method(self, *args, **kwargs)
            finally:
                meter.instrument_s += time.perf_counter() - start
                meter.instrument_calls[op] += 1
                meter._depth -= 1

        return timed


@contextlib.contextmanager
def timed_session(meter: Meter) -> Iterator[None]:
    """Swap timing subclasses of the instrument and the loop into the session module, restore them after."""

    class TimedInstrument(NanonisInstrument):
        pass

    for op in TIMED_OPS:
        setattr(TimedInstrument, op, meter.time_instrument(op, getattr(NanonisInstrument, op)))

    class TimedRunLoop(RunLoop):
        async def run(self) -> tuple[str, str]:
            meter.loop, meter.in_loop = self, True
            start = time.perf_counter()
            try:
                return await super().run()
            finally:
                meter.loop_s += time.perf_counter() - start
                meter.in_loop = False

    names = vars(session_module)  # the session module's globals, patched for the duration of one timed run
    saved = {"NanonisInstrument": names["NanonisInstrument"], "RunLoop": names["RunLoop"]}
    names.update(NanonisInstrument=TimedInstrument, RunLoop=TimedRunLoop)
    try:
        yield
    finally:
        names.update(saved)


class TimedBrain:
    """The session's brain, with the time the loop awaits inference (classify, choose) added to a meter."""

    def __init__(self, inner: Any, meter: Meter) -> None:
        self._inner = inner
        self._meter = meter

    def __getattr__(self, name: str) -> Any:  # versions, store, learn, stop_learning, ...
        return getattr(self._inner, name)

    async def classify(self, image: np.ndarray) -> float:
        start = time.perf_counter()
        try:
            return await self._inner.classify(image)
        finally:
            self._meter.nets_s += time.perf_counter() - start
            self._meter.nets_calls += 1

    async def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Any:
        start = time.perf_counter()
        try:
            return await self._inner.choose(image, mask, rng)
        finally:
            self._meter.nets_s += time.perf_counter() - start
            self._meter.nets_calls += 1


def make_checkpoints(preset: NetSpec | str, directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random-initialised classifier (1 output) and agent (12 Q-values) of `preset`, saved with `save_net`."""
    net = NetDef.of(preset, 1)
    variables = random_vars(net, seed)
    classifier = save_net(directory / "classifier", net, variables, kind="classifier", metadata={"bench": True})
    if count_leaves(net.abstract_vars().params) > FAST_AGENT_ABOVE_PARAMS:
        agent_net = NetDef(net.spec, N_ACTIONS)
        del variables
        agent_vars = random_vars(agent_net, seed + 1)
    else:
        agent_net, agent_vars = agent_from_classifier(net, variables, N_ACTIONS, jax.random.key(seed + 1))
    agent = save_net(directory / "agent", agent_net, agent_vars, kind="agent", metadata={"bench": True})
    return classifier, agent


@dataclass
class OverheadRow:
    preset: str
    learn_online: bool
    frames: int  # recorded frames
    scans: int  # every scan, creep frames included
    actions: int  # conditioning and reset actions
    loop_s: float
    instrument_s: float
    nets_s: float
    frame_time_s: float  # one frame on the real instrument (64 lines at the configured speeds)
    status: str
    load_s: float  # load_brain before the run: restore, hash and compile both nets (not per frame)

    @property
    def overhead_s_per_frame(self) -> float:
        return (self.loop_s - self.instrument_s) / self.frames

    @property
    def nets_s_per_frame(self) -> float:
        return self.nets_s / self.frames

    @property
    def fraction_of_frame(self) -> float:
        return self.overhead_s_per_frame / self.frame_time_s


def frame_time_s(cfg: RunConfig) -> float:
    s = cfg.scan
    return s.pixels * (s.frame_size_m / s.fwd_speed_mps + s.frame_size_m / s.bwd_speed_mps)


async def measure_overhead(preset: NetSpec | str, frames: int, learn_online: bool, checkpoints: tuple[Path, Path],
                           run_dir: Path, seed: int = 0) -> OverheadRow:
    cfg = load_config(None, {
        "run.frames": frames, "run.seed": seed, "classifier.checkpoint": str(checkpoints[0]),
        "agent.checkpoint": str(checkpoints[1]), "agent.learn_online": learn_online,
    })
    meter = Meter()
    start = time.perf_counter()
    brain = TimedBrain(await asyncio.to_thread(load_brain, cfg), meter)  # loaded and compiled before the run
    load_s = time.perf_counter() - start
    with timed_session(meter):
        result = await run_session(cfg, run_dir, simulator=SimulatorOptions(seed=seed, time_scale=0.0),
                                   brain=cast(NetBrain, brain))  # a NetBrain in all but name (__getattr__)
    loop = meter.loop
    if loop is None:
        raise RuntimeError(f"the run never started: {result.reason}")
    c = loop.counters
    name = preset if isinstance(preset, str) else preset.name
    return OverheadRow(name, learn_online, c.frames, meter.instrument_calls["start_scan"],
                       c.actions + c.reset_actions, meter.loop_s, meter.instrument_s, meter.nets_s, frame_time_s(cfg),
                       f"{result.status}: {result.reason}", load_s)


def main(smoke: bool = False) -> list[OverheadRow]:
    """`smoke`: the `tiny` preset, a few frames (the test that keeps this module working); no JSON."""
    if not smoke:
        from deepspm.controller.diagnostics import configure_logging

        configure_logging("warning")
    # (preset, frames, learn_online)
    plan = [("tiny", 4, False)] if smoke else [("compact", 300, False), ("compact", 300, True), ("paper", 40, False)]
    rows: list[OverheadRow] = []
    with tempfile.TemporaryDirectory(prefix="deepspm-bench-") as tmp:
        made: dict[str, tuple[Path, Path]] = {}
        for k, (preset, frames, learn) in enumerate(plan):
            if preset not in made:
                for old in list(made):  # one preset's checkpoints on disk at a time (paper: 2 x 2.25 GB)
                    for path in made.pop(old):
                        shutil.rmtree(path, ignore_errors=True)
                made[preset] = make_checkpoints(preset, Path(tmp) / preset)
            rows.append(asyncio.run(measure_overhead(preset, frames, learn, made[preset], Path(tmp) / f"run{k}")))
            gc.collect()
    table = []
    for r in rows:
        goal = f"<= {GOAL_FRACTION * r.frame_time_s * 1e3:.0f} ms" if r.preset == "compact" and not r.learn_online else "-"
        table.append((r.preset, "on" if r.learn_online else "off", r.frames, r.scans, r.actions, f"{r.loop_s:.2f}",
                      f"{r.instrument_s:.2f}", f"{r.overhead_s_per_frame * 1e3:.3g}", f"{r.nets_s_per_frame * 1e3:.3g}",
                      f"{(r.overhead_s_per_frame - r.nets_s_per_frame) * 1e3:.3g}", f"{100 * r.fraction_of_frame:.3g}",
                      goal, f"{r.load_s:.1f}", r.status))
    print_table(
        "Controller overhead per recorded frame against the simulator (time scale 0, TCP), ms; random-initialised "
        f"nets; % of the {rows[0].frame_time_s:.0f} s frame; load average {os.getloadavg()[0]:.1f}",
        ("preset", "learning", "frames", "scans", "actions", "loop s", "instrument s", "overhead", "inference",
         "other", "% frame", "goal", "load s", "status"),
        table,
    )
    if not smoke:
        payload = [{**asdict(r), "overhead_s_per_frame": r.overhead_s_per_frame, "nets_s_per_frame": r.nets_s_per_frame,
                    "fraction_of_frame": r.fraction_of_frame} for r in rows]
        print("wrote", write_json("controller", {"rows": payload, "goal_fraction_of_frame": GOAL_FRACTION}))
    return rows


if __name__ == "__main__":
    main()
