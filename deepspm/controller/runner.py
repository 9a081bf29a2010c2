"""`deepspm run` from the command line: logging, run directory, signals, live progress, the session."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import TextIO

from deepspm.controller.config import RunConfig
from deepspm.controller.diagnostics import configure_logging
from deepspm.controller.loop import RunLoop
from deepspm.controller.runcontrol import RunControl
from deepspm.controller.session import SimulatorOptions, new_run_dir, run_session

DEFAULT_SIM_FRAMES = 300


class ProgressLine:
    """One live line on a terminal (frames, good fraction, episodes, state); periodic lines otherwise."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr, every: int = 25) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self.started = time.monotonic()

    def __call__(self, loop: RunLoop) -> None:
        c = loop.counters
        if not self.tty and c.frames % self.every:
            return
        good = c.good_probe_frames / c.frames if c.frames else 0.0
        total = f"/{self.total}" if self.total else ""
        rate = c.frames / max(time.monotonic() - self.started, 1e-9)
        text = (f"frames {c.frames}{total}  good {good:5.1%}  episodes {c.episodes}  actions {c.actions}  "
                f"moves {c.moves}  recoveries {c.contact_recoveries + c.crash_recoveries}  "
                f"state {loop.state.value:<12}  {rate:5.1f} frames/s")
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def run_from_cli(cfg: RunConfig, args: argparse.Namespace) -> int:
    if args.resume is not None:
        return _resume_from_cli(args)
    configure_logging(cfg.logging.level)
    simulated = cfg.instrument.host is None
    if simulated and cfg.run.frames is None and cfg.run.hours is None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, frames=DEFAULT_SIM_FRAMES))
    run_dir = args.out or (Path(cfg.run.out) if cfg.run.out else new_run_dir())
    simulator = None
    if simulated:
        seed = args.sim_seed if args.sim_seed is not None else cfg.run.seed
        simulator = SimulatorOptions(seed=seed, time_scale=cfg.run.time_scale, sim_config=cfg.simulator.sim_config())
    where = "the embedded simulator" if simulated else f"{cfg.instrument.host}:{cfg.instrument.port}"
    return _launch(cfg, run_dir, simulator, args, where, resume=False)


def _resume_from_cli(args: argparse.Namespace) -> int:
    """Continue a killed run: config, nets, seed and simulator settings come from its journal."""
    from deepspm.controller.config import config_from_dict
    from deepspm.controller.journal import JournalReader

    with JournalReader(args.resume) as reader:  # the start record only (a multi-day journal is hundreds of MB)
        start = next(reader, None)
    if start is None:
        raise FileNotFoundError(f"{args.resume}: no journal records to resume from")
    cfg = config_from_dict(start["config"])
    configure_logging(cfg.logging.level)
    sim = (start.get("instrument") or {}).get("simulator")
    simulator = (SimulatorOptions(seed=sim["seed"], time_scale=sim["time_scale"], sim_config=cfg.simulator.sim_config())
                 if sim else None)
    where = "the embedded simulator" if sim else f"{cfg.instrument.host}:{cfg.instrument.port}"
    return _launch(cfg, Path(args.resume), simulator, args, where, resume=True)


def _launch(cfg: RunConfig, run_dir: Path, simulator: SimulatorOptions | None, args: argparse.Namespace, where: str,
            *, resume: bool) -> int:
    progress = None if args.quiet else ProgressLine(cfg.run.frames)
    verb = "resuming" if resume else "run directory"
    print(f"deepspm: {verb} {run_dir} ({where}); stop with Ctrl-C or by creating {run_dir}/STOP", file=sys.stderr)
    result = asyncio.run(_main(cfg, run_dir, simulator, progress, resume))
    if progress:
        progress.close()
    print(f"deepspm: {result.status} ({result.reason}); run directory: {result.run_dir}")
    return 0 if result.status in ("completed", "stopped") else 1


async def _main(cfg: RunConfig, run_dir: Path, simulator: SimulatorOptions | None, progress: ProgressLine | None,
                resume: bool):
    control = RunControl.for_run_dir(run_dir)
    control.install_signal_handlers()
    if not resume and cfg.probe.target_state != "good":
        from deepspm.controller.targets import target_of, with_target_threshold

        cfg = with_target_threshold(cfg, target_of(cfg))  # the classifier's own threshold for the state
    try:
        return await run_session(cfg, run_dir, simulator=simulator, progress=progress, control=control, resume=resume)
    finally:
        control.remove_signal_handlers()
