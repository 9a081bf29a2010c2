"""The run loop: next command -> execute -> record -> interpret -> trigger, until a terminal state.

It is the only code that awaits the instrument (through the executor) and the only task that fires
FSM triggers. What to do in each state is decided here from plain data (planner map, episode tracker,
the last frame); the FSM does bookkeeping and refuses anything its table does not allow.
Operator requests (stop, pause) are acted on between commands, which are the run's safe points. On a
fatal error the tip is withdrawn before the error leaves the loop, and the journal's stop record is
written from a `finally`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
import structlog

from deepspm.controller.brain import Brain
from deepspm.controller.config import RunConfig
from deepspm.controller.commands import Approach, Command, Dip, MoveArea, Pulse, RetractAfterCrash, Scan, SetZ, Settle, Stall, Withdraw
from deepspm.controller.episode import EpisodeTracker, ProbeOutcome, random_reset_action
from deepspm.controller.executor import Executor, JournalSink
from deepspm.controller.locator import ActionSite, action_mask, locate_action
from deepspm.controller.planner import RegionPlanner, bad_sample_radius_m
from deepspm.controller.runcontrol import OperatorRequest, RunControl
from deepspm.controller.preprocess import Preprocessed, is_bad_sample, preprocess
from deepspm.fsm.guards import DecisionContext
from deepspm.fsm.machine import RunModel, build_machine
from deepspm.fsm.states import State
from deepspm.io.actions import ACTIONS, ActionKind
from deepspm.io.errors import InstrumentError, Interrupted, SafetyError
from deepspm.io.instrument import Frame, Instrument

log = structlog.get_logger(__name__)


class RunFailed(Exception):
    """An unrecoverable condition (repeated crashes, a failed recovery): the run goes to `fault`."""


@dataclass
class RunCounters:
    frames: int = 0  # recorded images: judged frames, not creep frames, not bad samples (the frame budget counts these)
    scanned_frames: int = 0  # every non-creep frame scanned, bad samples included
    creep_frames: int = 0
    good_probe_frames: int = 0
    bad_samples: int = 0
    episodes: int = 0
    episode_lengths: list[int] = field(default_factory=list)
    actions: int = 0
    reset_actions: int = 0
    moves: int = 0
    contact_recoveries: int = 0
    crash_recoveries: int = 0


@dataclass
class Position:
    target_xy_m: tuple[float, float] = (0.0, 0.0)
    previous_xy_m: tuple[float, float] = (0.0, 0.0)
    new_region: bool = True  # the next scan of this region is its first: record a creep frame first
    consecutive_bad_sample: int = 0
    consecutive_crashes: int = 0
    consecutive_lost_contacts: int = 0
    recovery: str | None = None  # "contact" or "crash" while recovering
    force_move: bool = False  # an episode hit its cap: move to a new approach area


@dataclass
class LastFrame:
    ref: str
    frame: Frame
    pre: Preprocessed
    site: ActionSite
    mask: np.ndarray


class RunLoop:
    def __init__(
        self,
        *,
        instrument: Instrument,
        journal: JournalSink,
        brain: Brain,
        config: RunConfig,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] | None = None,
        control: RunControl | None = None,
        progress: Callable[["RunLoop"], None] | None = None,
        time_spent_s: float = 0.0,
    ) -> None:
        """`time_spent_s`: run time of the processes before a resume, which the time budget counts too."""
        self.config = config
        self.journal = journal
        self.brain = brain
        self.executor = Executor(instrument, journal, sleep)
        self.model = RunModel()
        self.machine = build_machine(self.model, self._on_transition)
        self.planner = RegionPlanner(config.planner)
        self.tracker = EpisodeTracker(config=config.episode)
        self.counters = RunCounters()
        self.position = Position()
        self.last: LastFrame | None = None
        self._pending_frame: Frame | None = None  # recorded in scanning, judged in classifying
        self._images: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # frame ref -> (normalised, mask), recent only
        self._reset_rng = np.random.default_rng([config.run.seed, 1])
        self._agent_rng = np.random.default_rng([config.run.seed, 2])
        self.control = control or RunControl()
        self._progress = progress
        self._monotonic = monotonic or asyncio.get_running_loop().time
        self._started = self._monotonic() - time_spent_s
        self._episode_start_actions = 0
        self._consecutive_faults = 0

    @property
    def state(self) -> State:
        return self.model.state

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _on_transition(self, trigger: str, source: State, dest: State) -> None:
        self.journal.event("transition", trigger=trigger, source=source.value, dest=dest.value)
        structlog.contextvars.bind_contextvars(state=dest.value)

    async def _fire(self, trigger: str, ctx: DecisionContext | None = None) -> None:
        await self.model.fire(trigger, ctx=ctx)

    async def _do(self, command: Command) -> Any:
        return await self.executor.execute(command)

    # -- the loop -----------------------------------------------------------------------------------------
    async def run(self) -> tuple[str, str]:
        """Run until stopped, done or failed; returns (status, reason) for the journal's stop record."""
        try:
            await self._fire("start")
            while not self.state.terminal:
                stop_reason = await self._safe_point()
                if stop_reason:
                    await self._stop(stop_reason)
                    return ("stopped" if stop_reason.startswith("operator") else "completed", stop_reason)
                await self.step()
            return ("stopped", "terminal state")
        except asyncio.CancelledError:
            await self._withdraw_safely("cancelled")
            raise
        except Exception as exc:
            log.error("run.fatal", error=f"{type(exc).__name__}: {exc}")
            await self._withdraw_safely(f"{type(exc).__name__}: {exc}")
            if not self.state.terminal:
                await self._fire("fail")
            return ("fault", f"{type(exc).__name__}: {exc}")

    def _journal_requests(self, requests: list[OperatorRequest]) -> None:
        for r in requests:
            self.journal.event("operator", request=r.kind.value, source=r.source.value, detail=r.detail)

    async def _safe_point(self) -> str | None:
        """Between commands: act on operator requests (pause waits here) and the run's budgets."""
        self._journal_requests(self.control.pending())
        if self.control.paused and not self.control.stop_requested:
            self.journal.event("note", message="paused by the operator")
            self._journal_requests(await self.control.wait_while_paused())
        if self.control.abort_requested:
            return "operator abort"
        if self.control.stop_requested:
            return "operator stop"
        run = self.config.run
        if run.frames is not None and self.counters.frames >= run.frames:
            return f"frame budget of {run.frames} reached"
        # The budget runs on live time only: a replayed past stops where its journal stopped (ReplayControl).
        if run.hours is not None and not self.journal.replaying and self._monotonic() - self._started >= run.hours * 3600:
            return f"time budget of {run.hours} h reached"
        return None

    async def _stop(self, reason: str) -> None:
        if self.config.run.withdraw_on_stop and self.state is not State.idle:
            await self._do(Withdraw())
        await self._fire("stop")

    async def _withdraw_safely(self, why: str) -> None:
        """Withdraw the tip before a fatal exit; a failure here is journaled, never raised over the cause."""
        try:
            await asyncio.wait_for(self.executor.execute(Withdraw()), 30.0)
        except BaseException as exc:  # noqa: BLE001 - the original error matters more
            self.journal.event("note", message=f"withdraw after '{why}' failed: {type(exc).__name__}: {exc}")

    async def step(self) -> None:
        """One state's work. An instrument error leaves the state unchanged, so the next step decides again
        (a new, journaled decision, never a blind re-send); too many in a row end the run."""
        try:
            await self._dispatch()
        except SafetyError:
            raise
        except Interrupted as exc:  # the controller was killed during the command: not the instrument's fault
            self.journal.event("note", message=f"resumed after an interruption in {self.state.value}: {exc}")
            return
        except InstrumentError as exc:
            self._consecutive_faults += 1
            self.journal.event("note", message=f"instrument fault in {self.state.value}: {type(exc).__name__}: {exc}",
                               consecutive=self._consecutive_faults)
            if self._consecutive_faults >= self.config.detection.max_consecutive_faults:
                raise RunFailed(f"{self._consecutive_faults} instrument faults in a row; last: {exc}") from exc
            return
        self._consecutive_faults = 0

    async def _dispatch(self) -> None:
        handler = {
            State.idle: self._idle,
            State.approaching: self._approaching,
            State.settling: self._settling,
            State.selecting: self._selecting,
            State.scanning: self._scanning,
            State.recovering: self._recovering,
            State.classifying: self._classifying,
            State.conditioning: self._conditioning,
            State.resetting: self._resetting,
            State.moving: self._moving,
        }[self.state]
        await handler()

    # -- one handler per state ------------------------------------------------------------------------------
    async def _idle(self) -> None:
        await self._fire("start")

    async def _approaching(self) -> None:
        await self._do(Approach())
        await self._do(SetZ())
        self.position.new_region = True
        await self._fire("approached")

    async def _settling(self) -> None:
        await self._do(Settle(self.config.run.settle_s))
        await self._fire("settled")

    async def _selecting(self) -> None:
        pos = self.position
        target = None if pos.force_move else self.planner.next_region(pos.previous_xy_m)
        if target is None:
            pos.force_move = False
            await self._fire("area_exhausted")
            return
        pos.target_xy_m = (float(target[0]), float(target[1]))
        pos.new_region = True
        await self._fire("region_selected")

    async def _scanning(self) -> None:
        pos, size = self.position, self.config.scan.frame_size_m
        x, y = pos.target_xy_m
        if pos.new_region:
            creep = await self._do(Scan(x, y, size, "creep"))
            self.counters.creep_frames += 1
            if await self._z_trouble(creep):
                return
            pos.new_region = False
        frame = await self._do(Scan(x, y, size, "frame"))
        if await self._z_trouble(frame):
            return
        pos.consecutive_crashes = pos.consecutive_lost_contacts = 0
        self.planner.mark_scanned(pos.target_xy_m)
        pos.previous_xy_m = pos.target_xy_m
        self.counters.scanned_frames += 1
        self._pending_frame = frame
        await self._fire("frame_recorded")

    async def _z_trouble(self, frame: Frame) -> bool:
        """Lost contact or crash, judged from the z extension right after the scan."""
        ext = frame.z_after.extension
        s = self.config.detection
        if ext >= s.lost_contact_extension:
            self.position.recovery = "contact"
            self.journal.event("decision", decision="z_check", extension=ext, verdict="contact_lost")
            await self._fire("contact_lost")
            return True
        if ext <= s.crash_extension:
            self.position.recovery = "crash"
            self.journal.event("decision", decision="z_check", extension=ext, verdict="crashed")
            await self._fire("crashed")
            return True
        return False

    async def _recovering(self) -> None:
        pos, limits = self.position, self.config.detection
        if pos.recovery == "crash":
            pos.consecutive_crashes += 1
            if pos.consecutive_crashes >= limits.max_consecutive_crashes:
                raise RunFailed(f"{pos.consecutive_crashes} crashes in a row at {pos.target_xy_m} m")
            await self._do(RetractAfterCrash())
            self.counters.crash_recoveries += 1
            # The original blocks a circle around a crash and images elsewhere: the sample there is likely
            # damaged. Scanning resumes at the nearest free cell (the same one if none is left).
            self.planner.block_circle(pos.target_xy_m, limits.crash_forbidden_radius_m)
            elsewhere = self.planner.next_region(pos.target_xy_m)
            if elsewhere is not None:
                pos.target_xy_m = (float(elsewhere[0]), float(elsewhere[1]))
        else:
            pos.consecutive_lost_contacts += 1
            if pos.consecutive_lost_contacts > limits.max_consecutive_lost_contacts:
                raise RunFailed(f"contact lost {pos.consecutive_lost_contacts} times in a row at {pos.target_xy_m} m")
            await self._do(Approach())
            await self._do(SetZ())
            self.counters.contact_recoveries += 1
        pos.recovery = None
        pos.new_region = True  # the re-approach causes creep again: discard one frame
        await self._fire("recovered")

    async def _classifying(self) -> None:
        frame = self._pending_frame
        assert frame is not None, "classifying needs a recorded frame"
        cfg, pos = self.config, self.position
        det = cfg.detection
        ref = self.executor.last_frame_ref
        assert ref is not None
        seed = _frame_seed(cfg.run.seed, self.counters.scanned_frames)
        pre = await asyncio.to_thread(preprocess, frame.data_m, seed)
        rough = is_bad_sample(frame.data_m, det.bad_sample_peak_to_peak_m, plane_m=pre.plane_m)
        if rough and pos.consecutive_bad_sample < det.bad_sample_accept_after:
            pos.consecutive_bad_sample += 1
            radius = bad_sample_radius_m(pos.consecutive_bad_sample, det.bad_sample_base_radius_m)
            self.planner.block_circle(pos.target_xy_m, radius)
            self.counters.bad_samples += 1
            self.journal.event("decision", decision="sample", frame=ref, verdict="bad_sample", radius_m=radius)
            await self._fire("sample_bad")
            return
        pos.consecutive_bad_sample = 0
        self.counters.frames += 1
        site = locate_action(pre.normalised, pos.target_xy_m, cfg.scan.frame_size_m, valid=pre.valid)
        mask = action_mask(site.free_side_m)
        self._remember(ref, pre.normalised, mask)
        p_good = await self.brain.classify(pre.normalised)
        outcome = self.tracker.observe(p_good, ref)
        self.last = LastFrame(ref, frame, pre, site, mask)
        if outcome.probe_good:
            self.counters.good_probe_frames += 1
        self._learn_from(outcome)
        trigger, ctx = self._classification_trigger(outcome)
        self.journal.event(
            "decision", decision="classify", frame=ref, ransac_seed=seed, p_good=p_good, good=outcome.probe_good,
            classifier=self.brain.classifier_version, trigger=trigger, context=dataclasses.asdict(ctx),
            bad_probe_count=outcome.bad_probe_count, in_episode=outcome.in_episode, episode=outcome.episode_index,
            episode_started=outcome.episode_started, episode_ended=outcome.episode_ended,
            reward=outcome.reward, free_side_m=site.free_side_m,
        )
        if outcome.episode_started:
            self.counters.episodes += 1
            self._episode_start_actions = self.counters.actions
        if outcome.episode_ended:
            self.counters.episode_lengths.append(self.counters.actions - self._episode_start_actions)
        if outcome.episode_truncated:
            pos.force_move = True
        if self._progress is not None:
            self._progress(self)
        await self._fire(trigger, ctx)

    def _classification_trigger(self, outcome: ProbeOutcome) -> tuple[str, DecisionContext]:
        """Map the tracker's verdict onto the FSM's triggers (see docs/decisions.md, reset phase)."""
        ctx = outcome.decision_context(self.tracker.config)
        if outcome.trigger is None:  # reset phase goes on: the probe is not damaged enough yet
            return "probe_good", dataclasses.replace(ctx, training=True)
        if outcome.trigger == "reset_done":  # reset phase over: select a region, the next frame opens an episode
            return "probe_bad", dataclasses.replace(ctx, in_episode=False, bad_probe_count=0)
        return outcome.trigger, ctx

    def _remember(self, ref: str, image: np.ndarray, mask: np.ndarray) -> None:
        self._images[ref] = (image, mask)
        while len(self._images) > 8:
            self._images.pop(next(iter(self._images)))

    def _learn_from(self, outcome: ProbeOutcome) -> None:
        t = outcome.transition
        if t is None or t.state_ref not in self._images or t.next_state_ref not in self._images:
            return
        state, _ = self._images[t.state_ref]
        next_state, next_mask = self._images[t.next_state_ref]
        self.brain.store(state, t.action, t.reward, next_state, t.terminal, next_mask)

    async def _conditioning(self) -> None:
        last = self.last
        assert last is not None, "conditioning needs a classified frame"
        if not last.mask.any():
            self.journal.event("decision", decision="action", frame=last.ref, verdict="no_room")
            await self._fire("no_room")
            return
        decision = await self.brain.choose(last.pre.normalised, last.mask, self._agent_rng)
        self.journal.event(
            "decision", decision="action", frame=last.ref, action=decision.action, q_values=decision.q_values,
            mask=last.mask.tolist(), epsilon=decision.epsilon, explored=decision.explored,
            agent=decision.net_version, site_xy_m=[last.site.x_m, last.site.y_m], free_side_m=last.site.free_side_m,
        )
        await self._act(decision.action, last)
        self.tracker.record_action(decision.action, last.ref)
        self.counters.actions += 1
        await self._fire("conditioned")

    async def _resetting(self) -> None:
        last = self.last
        assert last is not None
        action = random_reset_action(self._reset_rng, last.mask)
        self.journal.event("decision", decision="reset_action", frame=last.ref, action=action)
        await self._act(action, last)
        self.tracker.record_action(action, last.ref)
        self.counters.reset_actions += 1
        await self._fire("reset_done")

    async def _act(self, index: int, last: LastFrame) -> None:
        """Execute a conditioning action. If its outcome is unknown (timeout, lost connection) it counts as
        done: a pulse or dip is never repeated, the next frame shows what happened."""
        action = ACTIONS[index]
        x, y = last.site.x_m, last.site.y_m
        if action.kind is ActionKind.PULSE:
            command: Command = Pulse(x, y, action.bias_V, action.duration_s, index)
        elif action.kind is ActionKind.DIP:
            command = Dip(x, y, action.dip_depth_m, action.bias_V, action.duration_s, index)
        else:
            command = Stall(index)
        try:
            await self._do(command)
        except SafetyError:
            raise
        except InstrumentError as exc:
            self.journal.event("note", message=f"action {index} outcome unknown ({type(exc).__name__}); not repeated")
        self.planner.block_circle((x, y), action.forbidden_radius_m)
        self.position.previous_xy_m = (x, y)  # the original's reference point during conditioning

    async def _moving(self) -> None:
        await self._do(MoveArea(self.config.approach.area_move_direction))
        self.planner.new_area()
        self.position = dataclasses.replace(self.position, previous_xy_m=(0.0, 0.0), new_region=True)
        self.counters.moves += 1
        await self._fire("moved")


def _frame_seed(root: int, index: int) -> int:
    """A per-frame RANSAC seed derived from the root seed (no global RNG)."""
    digest = hashlib.sha256(f"{root}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")
