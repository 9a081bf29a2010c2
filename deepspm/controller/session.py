"""Compose and run one session: config -> instrument (real or simulated) -> nets -> journal -> run loop.

This is what `deepspm run` delegates to. It owns the tasks of a run in one `asyncio.TaskGroup` (the loop,
the journal writer, the stop-file watcher) and guarantees the journal's stop record from a
`finally`. With no instrument address the simulated microscope is served on a loopback port in this
process, and the controller talks to it through TCP exactly as it would to a real Nanonis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import hashlib
import importlib.metadata
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import structlog

from deepspm.controller.brain import NetBrain
from deepspm.controller.commands import StartScan
from deepspm.controller.config import RunConfig, ScanConfig, config_from_dict, config_to_dict
from deepspm.controller.documents import Start, record_of
from deepspm.controller.journal import (
    CHECKPOINTS_DIR,
    JOURNAL_FILE,
    SUSPENDED,
    DiskFull,
    Journal,
    RunClock,
    check_schema,
    load_frame,
)
from deepspm.controller.loop import RunLoop
from deepspm.controller.outputs import SxmOutput
from deepspm.controller.resume_points import ResumePoints, adopt_resume_point
from deepspm.controller.runcontrol import RunControl
from deepspm.controller.runfold import JournalSurvey, relive_journal, survey_journal
from deepspm.controller.runlock import RunDirLock
from deepspm.fsm.table import table_as_records, table_hash
from deepspm.io.actions import N_ACTIONS
from deepspm.io.client import NanonisClient
from deepspm.io.commands import Release
from deepspm.io.connection import NanonisConnection
from deepspm.io.instrument import NanonisInstrument
from deepspm.io.safety import SafetyEnvelope
from deepspm.nets.checkpoint_info import CheckpointError
from deepspm.nets.checkpoints import load_net, save_learner_async, save_net_async
from deepspm.nets.dqn import DQNConfig, Learner, agent_from_classifier
from deepspm.nets.inference import Predictor

log = structlog.get_logger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
SCHEMA = 1


@dataclass(frozen=True)
class SimulatorOptions:
    """The embedded simulated microscope (used when no instrument address is given)."""

    seed: int = 0
    time_scale: float = 0.0
    sim_config: Any = None  # deepspm.simulator.microscope.SimConfig, or None for its defaults


@dataclass
class SessionResult:
    run_dir: Path
    status: str
    reason: str
    loop: RunLoop | None


def checkpoint_path(setting: str, name: str) -> Path:
    """'shipped' means the weights inside the package; anything else is a checkpoint directory."""
    path = WEIGHTS_DIR / name if setting == "shipped" else Path(setting)
    if not path.exists():
        raise FileNotFoundError(f"{name} checkpoint not found: {path}")
    return path


def checkpoint_id(path: Path) -> str:
    """A content hash of a checkpoint directory: the journal names exactly which weights ran."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(f.read_bytes())
    return f"{path.name}@{digest.hexdigest()[:12]}"


class CheckpointMismatch(RuntimeError):
    """The weights found for a journaled run are not the ones it ran with."""


def recorded_checkpoint(start: Mapping[str, Any], name: str) -> Path | None:
    """The `name` ("classifier" or "agent") checkpoint a journaled run used, found on this machine.

    The start record holds the path the weights were loaded from. A run copied to another machine (or made
    by another installation) that used the shipped weights finds them in this installation's package. None
    when the start record names no checkpoint (a brain injected by a test). `check_recorded_nets` then
    verifies what was loaded against the start record's content ids."""
    recorded = (start.get("checkpoint_paths") or {}).get(name)
    if recorded is None:
        return None
    path = Path(recorded)
    if not path.exists():
        section, key = ("classifier", "lines_checkpoint") if name == LINES else (name, "checkpoint")
        if ((start.get("config") or {}).get(section) or {}).get(key) not in ("shipped", "auto"):
            raise FileNotFoundError(f"the run's {name} checkpoint {recorded} is not on this machine")
        path = WEIGHTS_DIR / name
    return path


def check_recorded_nets(start: Mapping[str, Any], brain: NetBrain, names: tuple[str, ...]) -> None:
    """`CheckpointMismatch` unless the loaded `names` nets are the ones the start record names (content ids,
    computed once by `load_brain`)."""
    versions = {"classifier": brain.classifier_version, "agent": brain.agent_version, LINES: brain.lines_version}
    for name in names:
        expected = (start.get("checkpoints") or {}).get(name)
        if expected is not None and versions[name] != expected:
            where = (start.get("checkpoint_paths") or {}).get(name)
            raise CheckpointMismatch(f"the {name} weights found for this run ({versions[name]}) are not the ones "
                                     f"the run used ({expected}); put those back at {where} (a what-if replay takes "
                                     f"other weights with --{name})")


NEW_AGENT = "new"  # agent.checkpoint: a new agent initialised from the classifier (training from scratch)
LINES = "classifier_lines"  # the line-window classifier's name in checkpoint records and under weights/


def agent_setting(cfg: RunConfig) -> str:
    """What `agent.checkpoint` means here: "auto" is a new agent when training, the shipped one otherwise."""
    setting = cfg.agent.checkpoint
    if setting == "auto":
        return NEW_AGENT if cfg.run.train else "shipped"
    return setting


def load_brain(cfg: RunConfig, classifier_path: Path | None = None, agent_path: Path | None = None,
               learn_online: bool | None = None, lines_path: Path | None = None) -> NetBrain:
    """The classifier and the agent (named by the config unless given), compiled for batch 1.

    A new agent (`agent.checkpoint = "new"`, or "auto" in training) is built from the classifier as `train agent
    --sim` builds it (trunk copied, a fresh head drawn from the run's seed) and follows the paper's schedule: 500
    random actions, then epsilon 1 -> 0.05. Training from a checkpoint continues from it at `agent.epsilon`.

    The run judges each frame by p(target state) (`probe.target_state`, `targets.target_classifier`): p(good) of a
    one-output net, or one column of a multi-class net (then the line-window net, which says p(good), is not used).
    A new agent from an ensemble classifier is refused (`require_single`)."""
    from deepspm.controller.targets import target_classifier
    from deepspm.nets.ensemble import require_single

    cls_path = classifier_path or checkpoint_path(cfg.classifier.checkpoint, "classifier")
    classifier = load_net(cls_path, expect_kind="classifier")
    predictor, target = target_classifier(classifier, cfg.probe.target_state, cfg.classifier.threshold, str(cls_path))
    classifier_version = checkpoint_id(Path(cls_path))
    paths = {"classifier": str(cls_path)}
    new_agent = agent_path is None and agent_setting(cfg) == NEW_AGENT
    if new_agent:
        require_single(classifier.net, f"a new agent from the classifier {cls_path}")
        net, variables = agent_from_classifier(classifier.net, classifier.variables, N_ACTIONS,
                                               jax.random.fold_in(jax.random.key(cfg.run.seed), 1))
        agent_version = f"new-from-{classifier_version}"
        log.info("agent.new", classifier=str(cls_path), detail="a new agent from the classifier (paper schedule)")
    else:
        agent_path = agent_path or checkpoint_path(agent_setting(cfg), "agent")
        agent = load_net(agent_path, expect_kind="agent")
        net, variables = agent.net, agent.variables
        agent_version = checkpoint_id(Path(agent_path))
        paths["agent"] = str(agent_path)
        if cfg.run.train:
            log.info("agent.continues", checkpoint=str(agent_path), detail="training continues from this agent")
    if new_agent:
        dqn = DQNConfig(updates_per_step=cfg.agent.updates_per_action)
    elif cfg.run.train:  # a trained agent learns on from where it was, exploring at agent.epsilon
        dqn = DQNConfig(random_steps=0, epsilon_start=cfg.agent.epsilon, updates_per_step=cfg.agent.updates_per_action)
    else:  # a trained agent: no random phase, fixed exploration
        dqn = DQNConfig(random_steps=0, updates_per_step=cfg.agent.updates_per_action)
    learner = Learner(net, variables, dqn, seed=cfg.run.seed)
    lines, lines_version = None, None
    if cfg.classifier.lines_checkpoint != "none" and target.index is None:
        lines_path = lines_path or checkpoint_path(cfg.classifier.lines_checkpoint, LINES)
        lines_net = load_net(lines_path, expect_kind="classifier")
        if lines_net.net.n_outputs != 1:
            raise CheckpointError(f"{lines_path}: the line-window classifier has {lines_net.net.n_outputs} outputs; "
                                  f"the run needs one, p(good)")
        lines = Predictor(lines_net.net, lines_net.variables, "probability")
        lines_version = checkpoint_id(Path(lines_path))
        paths[LINES] = str(lines_path)
    brain = NetBrain(
        predictor,  # type: ignore[arg-type]  # a TargetPredictor is a Predictor seen through one column
        learner,
        classifier_version=classifier_version,
        agent_version=agent_version,
        epsilon=None if cfg.run.train else cfg.agent.epsilon,
        learn_online=(cfg.agent.learn_online or cfg.run.train) if learn_online is None else learn_online,
        checkpoint_paths=paths,
        lines=lines,
        lines_version=lines_version,
    )
    brain.compile()
    return brain


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("deepspm", "numpy", "jax", "flax", "optax", "scikit-learn", "transitions", "structlog"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def new_run_dir(base: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = base / stamp
    k = 1
    while path.exists():
        path = base / f"{stamp}-{k}"
        k += 1
    return path


def start_record(cfg: RunConfig, run_dir: Path, brain: NetBrain, instrument: dict[str, Any]) -> Start:
    return Start(
        run_id=run_dir.name,
        config=config_to_dict(cfg),
        seed=cfg.run.seed,
        versions=package_versions(),
        fsm_table=table_as_records(),
        fsm_hash=table_hash(),
        checkpoints={"classifier": brain.classifier_version, "agent": brain.agent_version,
                     **({LINES: lines} if (lines := getattr(brain, "lines_version", None)) else {})},
        checkpoint_paths=getattr(brain, "checkpoint_paths", {}),  # an injected test brain has none
        instrument=instrument,
        argv=list(sys.argv),
    )


async def run_session(
    cfg: RunConfig,
    run_dir: Path,
    *,
    simulator: SimulatorOptions | None = None,
    progress: Callable[[RunLoop], None] | None = None,
    control: RunControl | None = None,
    brain: NetBrain | None = None,
    on_simulator: Callable[[Any], None] | None = None,
    resume: bool = False,
) -> SessionResult:
    """Run one session to its end; the journal in `run_dir` records everything.

    With `resume`, `run_dir` holds a run that was killed or crashed: its config, nets and run id are taken
    from the journal, the loop fast-forwards through the journal (answered from it, not the instrument) to
    rebuild its state exactly, and then carries on live, appending to the same journal.
    The run directory is locked first (`RunDirInUse` if another process holds it), so a second process can
    neither resume a live run nor touch the microscope on its behalf.
    """
    run_dir = Path(run_dir)
    if resume and not (run_dir / JOURNAL_FILE).is_file():
        raise ResumeError(f"nothing to resume: no journal in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(run_dir)
    lock.acquire()
    try:
        return await _locked_session(cfg, run_dir, lock, simulator=simulator, progress=progress, control=control,
                                     brain=brain, on_simulator=on_simulator, resume=resume)
    finally:
        lock.release()


async def _locked_session(
    cfg: RunConfig,
    run_dir: Path,
    lock: RunDirLock,
    *,
    simulator: SimulatorOptions | None,
    progress: Callable[[RunLoop], None] | None,
    control: RunControl | None,
    brain: NetBrain | None,
    on_simulator: Callable[[Any], None] | None,
    resume: bool,
) -> SessionResult:
    recorded = _resumable(run_dir) if resume else None  # None: a new run (or nothing complete to resume)
    start = record_of(recorded.fold.start) if recorded is not None and recorded.fold.start is not None else {}
    if recorded is not None:
        cfg = config_from_dict(start.get("config") or {})
    if brain is None:
        brain = await asyncio.to_thread(_load_recorded_brain, cfg, start)
    sim = sim_thread = None
    host, port = cfg.instrument.host or "127.0.0.1", cfg.instrument.port
    if simulator is not None:
        from deepspm.simulator.fake_nanonis import SimulatorServer
        from deepspm.simulator.threaded import LoopThread

        sim = SimulatorServer(seed=simulator.seed, time_scale=simulator.time_scale, config=simulator.sim_config)
        if on_simulator is not None:
            on_simulator(sim)
        sim_thread = LoopThread()  # the simulator renders on its own loop: it never blocks the controller's
        host, port = "127.0.0.1", await sim_thread.call_async(lambda: sim.start(0))
    ins = cfg.instrument
    client = NanonisClient(
        NanonisConnection(host, port, connect_timeout_s=ins.connect_timeout_s),
        SafetyEnvelope(cfg.safety),
        release=Release[ins.release] if ins.release else None,
        default_timeout_s=ins.command_timeout_s,
        blocking_timeout_s=ins.blocking_timeout_s,
    )
    # Against the simulator, waits (settling, approach polls) and the time budget run on its clock.
    sleep = sim.clock.sleep if sim is not None else asyncio.sleep
    monotonic = sim.clock.now if sim is not None else time.monotonic
    instrument = NanonisInstrument(client, cfg.scan, cfg.approach, cfg.dip, cfg.orientation)
    control = control or RunControl.for_run_dir(run_dir)
    status, reason, loop = "fault", "did not start", None
    structlog.contextvars.bind_contextvars(run_id=run_dir.name)
    # Exempt everything alive now (nets, modules, JAX caches) from the run's garbage collections: a full
    # collection walks every tracked object, and over a large heap one stalled the event loop for >0.1 s.
    # No collection first (it would stall the loop itself); `gc.unfreeze()` at the end hands them back.
    gc.freeze()
    try:
        # On the run's clock, so that the time a resumed run has already spent is measured as its budget is.
        journal = Journal(run_dir, RunClock(monotonic), resume=resume, lock=lock)
        async with asyncio.TaskGroup() as tasks:
            writer = tasks.create_task(journal.writer())
            watcher = tasks.create_task(control.watch_stop_file())
            try:
                await instrument.connect()
                r = await instrument.piezo_range()
                if recorded is None:
                    cfg = dataclasses.replace(
                        cfg, planner=dataclasses.replace(cfg.planner, piezo_range_xy_m=(r.x_m, r.y_m)))
                    journal.start(start_record(cfg, run_dir, brain, {
                        "host": host, "port": port, "simulated": simulator is not None,
                        "simulator": dataclasses.asdict(simulator) if simulator else None,
                        "release": client.release.name if client.release else None,
                        "version": dataclasses.asdict(client.version) if client.version else None,
                        "piezo_range_m": [r.x_m, r.y_m, r.z_m],
                    }))
                    loop = RunLoop(instrument=instrument, journal=journal, brain=brain, config=cfg, control=control,
                                   progress=_trimming_heap(progress), sleep=sleep, monotonic=monotonic,
                                   outputs=SxmOutput(run_dir, run_dir.name, cfg),
                                   after_learning=_resume_points(run_dir, journal, brain))
                else:
                    if sim is not None and sim_thread is not None:
                        scan = recorded.scan_in_flight
                        if scan is not None:
                            await sim_thread.call_async(functools.partial(continue_scan, sim.microscope, scan, cfg.scan))
                    loop = _fast_forward_loop(recorded, run_dir, instrument, journal, brain, cfg, control, progress,
                                              sleep, monotonic)
                status, reason = await loop.run()
            except Exception as exc:
                status, reason = "fault", f"{type(exc).__name__}: {exc}"
                log.error("session.failed", error=reason)
            finally:
                watcher.cancel()
                if not journal.closed:
                    if journal.next_seq == 0:
                        journal.start(Start(run_id=run_dir.name, config=config_to_dict(cfg), seed=cfg.run.seed,
                                            versions=package_versions(), failed_before_start=True))
                    saved = await save_learned(run_dir, brain) if loop is not None else {}
                    try:
                        await journal.close(status, reason, **(_summary(loop) if loop else {}),
                                            **({"saved": saved} if saved else {}))
                    except DiskFull as exc:  # still full: the journal ends at its last complete record
                        status = SUSPENDED
                        reason = (reason if reason.startswith("disk full") else f"{exc}; {reason}") + (
                            "; the journal ends at its last complete record")
                if status == SUSPENDED:
                    reason += f"; free space, then continue the run: deepspm run --resume {run_dir}"
                del writer
    finally:
        await client.close()
        if sim is not None and sim_thread is not None:
            await sim_thread.call_async(sim.close)
            sim_thread.stop()
        structlog.contextvars.unbind_contextvars("run_id")
        gc.unfreeze()
    return SessionResult(run_dir, status, reason, loop)


def _load_recorded_brain(cfg: RunConfig, start: Mapping[str, Any]) -> NetBrain:
    """The nets of the config, or those a journaled run used (`start`: its start record; {} for a new run)."""
    brain = load_brain(cfg, recorded_checkpoint(start, "classifier"), recorded_checkpoint(start, "agent"),
                       lines_path=recorded_checkpoint(start, LINES))
    check_recorded_nets(start, brain, ("classifier", "agent", LINES))
    return brain


class ResumeError(RuntimeError):
    """The run directory cannot be resumed (it stopped normally, or its journal is unsound)."""


def _resumable(run_dir: Path) -> JournalSurvey | None:
    """The survey of a journal to resume (read once, a record at a time); None if it has no complete record (the
    run was killed while starting: it begins afresh). ResumeError for a stopped run, JournalError for a journal of
    another schema."""
    survey = survey_journal(run_dir)
    fold = survey.fold
    if survey.first is None:
        return None
    if fold.last_kind == "stop" and fold.stop is not None and fold.stop.status != SUSPENDED:
        raise ResumeError(f"{run_dir}: the run has stopped ({fold.stop.status}: {fold.stop.reason}); nothing to resume")
    check_schema(survey.first, "resumed")
    return survey


def _fast_forward_loop(recorded: JournalSurvey, run_dir: Path, instrument: NanonisInstrument, journal: Journal,
                       brain: NetBrain, cfg: RunConfig, control: RunControl, progress: Callable[[RunLoop], None] | None,
                       sleep: Callable[[float], Any], monotonic: Callable[[], float]) -> RunLoop:
    """A loop that re-lives the journal (answered from it, read as the loop goes) and then hands over to the live
    instrument, journal, nets and operator."""
    from deepspm.controller.replay import ReplayBrain, ReplayControl, ReplayInstrument, ReplayJournal

    learner = _online_learner(brain)
    if learner is not None:
        adopt_resume_point(run_dir, learner, recorded.actions)
    relived = relive_journal(run_dir, recorded.valid_bytes)
    replay_journal = ReplayJournal(run_dir, relived.entries, live=journal)
    return RunLoop(
        instrument=ReplayInstrument(relived.calls, lambda ref: load_frame(run_dir, ref), live=instrument),
        journal=replay_journal,
        brain=ReplayBrain(relived.decisions, cfg.classifier.threshold, live=brain,
                          classifier_version=brain.classifier_version),
        config=cfg,
        control=ReplayControl(replay_journal, recorded.relived, live=control),
        progress=_trimming_heap(progress), sleep=sleep, monotonic=monotonic,
        time_spent_s=journal.resume_info.time_spent_s if journal.resume_info else 0.0,
        outputs=SxmOutput(run_dir, recorded.fold.run_id or run_dir.name, cfg),
        after_learning=_resume_points(run_dir, journal, brain),
        schema=recorded.fold.schema,
    )


def _online_learner(brain: Any) -> Learner | None:
    """The learner of a brain whose nets learn online (a `NetBrain`'s); None for any other brain (a test's has
    no learner)."""
    learner = getattr(brain, "learner", None)
    return learner if getattr(brain, "learn_online", False) and isinstance(learner, Learner) else None


def _resume_points(run_dir: Path, journal: Journal, brain: Any) -> Callable[[], Awaitable[None]] | None:
    """The saver of the learner's resume points, for a run whose nets learn online."""
    learner = _online_learner(brain)
    return ResumePoints(run_dir, journal, learner).after_learning if learner is not None else None


async def continue_scan(microscope: Any, scan: StartScan, settings: ScanConfig) -> None:
    """Put a fresh embedded simulator back to scanning `scan`, as the one that died with the killed process
    was (its state is the microscope's, not a decision: nothing is journaled). Without this, every resume
    of the embedded simulator mid-frame lost the frame, and repeated kills in one frame ended the run."""
    from deepspm.simulator.microscope import Z_INDEX

    microscope.set_scan_buffer([Z_INDEX], settings.pixels, settings.pixels)
    microscope.set_scan_speed(settings.fwd_speed_mps, settings.bwd_speed_mps)
    microscope.set_scan_frame(scan.centre_x_m, scan.centre_y_m, scan.size_m, scan.size_m, 0.0)
    microscope.scan_action(0, settings.scan_up)


async def save_learned(run_dir: Path, brain: Any) -> dict[str, str]:
    """A run that learned online keeps what it learned: the agent net (`checkpoints/agent`, for
    `--agent-checkpoint`) and the learner's state (`checkpoints/learner`: both nets, Adam state, counters;
    the journal holds the experience, so the replay memory is left out). Returns the paths saved; a failure
    to save is logged, never raised over the run's own outcome."""
    learner = _online_learner(brain)
    if learner is None or learner.env_steps == 0:
        return {}
    folder = run_dir / CHECKPOINTS_DIR
    meta = {"run_id": run_dir.name, "env_steps": learner.env_steps, "updates": learner.updates}
    try:
        await save_net_async(folder / "agent", learner.net, learner.online, kind="agent", metadata=meta,
                             overwrite=True)
        await save_learner_async(folder / "learner", learner, metadata=meta, overwrite=True, buffer=False)
    except (OSError, ValueError) as exc:
        log.error("session.save_failed", error=f"{type(exc).__name__}: {exc}", folder=str(folder))
        return {}
    log.info("session.saved", agent=str(folder / "agent"), learner=str(folder / "learner"), **meta)
    return {"agent": f"{CHECKPOINTS_DIR}/agent", "learner": f"{CHECKPOINTS_DIR}/learner"}


TRIM_EVERY_FRAMES = 100  # live frames between hand-backs of freed heap (each takes milliseconds)


def _trimming_heap(progress: Callable[[RunLoop], None] | None) -> Callable[[RunLoop], None]:
    """`progress`, plus: hand the heap freed since back to the OS (glibc's malloc_trim) at the first frame judged
    live (after a resume's re-live) and every `TRIM_EVERY_FRAMES` live frames after it. The allocator keeps the
    pages of freed memory: a process that re-lived 1282 frames stayed ~80 MB above one that re-lived 588 for the
    rest of its life, and a run that learns online, whose worker threads allocate and free the update's arrays,
    grew ~0.13 MB a frame in resident memory with nothing held (the soak's memory check, issue 17)."""
    trimmed_at: int | None = None

    def hook(loop: RunLoop) -> None:
        nonlocal trimmed_at
        frames = loop.counters.frames
        if not loop.journal.replaying and (trimmed_at is None or frames - trimmed_at >= TRIM_EVERY_FRAMES):
            trimmed_at = frames
            _malloc_trim()
        if progress is not None:
            progress(loop)

    return hook


def _malloc_trim() -> None:
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library (musl): nothing to trim
        pass


def _summary(loop: RunLoop) -> dict[str, Any]:
    return {"counters": dataclasses.asdict(loop.counters), "final_state": loop.state.value}
