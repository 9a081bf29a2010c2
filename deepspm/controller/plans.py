"""The run's policies as plans: one generator per FSM state, and the plan stubs they are built from.

A plan decides; an engine executes. A plan yields messages and receives their results:
- a `Command` (`commands.py`): performed on the instrument and journaled with its reply; a `Scan` answers
  with a `messages.Scanned` (the frame and its journal reference); an instrument error is thrown into the
  plan at the `yield`, which may handle it (an action's unknown outcome) or let it end the step;
- a `documents.Document` (decisions, notes): journaled as it is;
- `messages.Compute`, `Classify`, `Choose`, `Experience`, `Learn`: CPU and net work;
- `messages.Fire`: the FSM trigger that ends the state's plan.
Plans import no asyncio and do no I/O. The async run loop and the synchronous engine used for training in
simulation drive the very same plans, so a policy exists once.

`RunState` is everything the plans decide from (planner map, episode tracker, counters, position, the last
judged frame). It is plain data, rebuilt exactly by re-living a journal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from deepspm.controller.commands import (
    ApproachRunning,
    Command,
    Dip,
    GrabFrame,
    MotorMove,
    Pulse,
    ReadZ,
    SetBias,
    SetSetpoint,
    Settle,
    Stall,
    StartApproach,
    StartScan,
    StopApproach,
    StopScan,
    Wait,
    WaitScanEnd,
    Withdraw,
)
from deepspm.controller.config import RunConfig
from deepspm.controller.documents import (
    ActionChosen,
    Classification,
    LineJudgement,
    NoRoom,
    Note,
    ResetActionChosen,
    SampleVerdict,
    ZCheck,
)
from deepspm.controller.episode import EpisodeTracker, ProbeOutcome, random_reset_action
from deepspm.controller.journal import SCHEMA_VERSION
from deepspm.controller.locator import ActionSite, action_mask, locate_action
from deepspm.controller.messages import (
    ActionDecision,
    Choose,
    Classify,
    ClassifyLines,
    Compute,
    Experience,
    Fire,
    Learn,
    Plan,
    Scanned,
)
from deepspm.controller.planner import RegionPlanner, bad_sample_radius_m
from deepspm.controller.preprocess import (
    Preprocessed,
    is_bad_sample,
    preprocess,
    preprocess_partial,
    scan_order,
    scanned_lines,
)
from deepspm.controller.seeds import derived_seed
from deepspm.fsm.states import State
from deepspm.io.actions import ACTIONS, ActionKind
from deepspm.io.errors import InstrumentError, SafetyError
from deepspm.io.instrument import ApproachFailed, ApproachSettings, ZState, line_time_s


class RunFailed(Exception):
    """An unrecoverable condition (repeated crashes, a failed recovery): the run goes to `fault`."""


class PlanError(RuntimeError):
    """A plan was started without what its state needs (a bug, never an instrument condition)."""


@dataclass
class RunCounters:
    frames: int = 0  # recorded images: judged frames, not creep frames, not bad samples (the frame budget counts these)
    scanned_frames: int = 0  # every non-creep frame scanned, bad samples included
    creep_frames: int = 0
    aborted_frames: int = 0  # judged frames stopped early by the line-window net (counted in `frames` too)
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
    after_approach: bool = True  # an approach since the last creep frame: z creeps too, never skip the creep frame
    consecutive_incomplete: int = 0  # judged frames that came back with lines missing, in a row


@dataclass
class JudgedFrame:
    """The last classified frame: what conditioning acts on."""

    ref: str
    pre: Preprocessed
    site: ActionSite
    mask: np.ndarray


@dataclass
class RunState:
    """What the plans decide from and update; no I/O handles, no clocks."""

    config: RunConfig
    planner: RegionPlanner
    tracker: EpisodeTracker
    counters: RunCounters = field(default_factory=RunCounters)
    position: Position = field(default_factory=Position)
    last: JudgedFrame | None = None
    pending: Scanned | None = None  # recorded in scanning, judged in classifying
    pending_scan: ScanResult | None = None  # how it was scanned (line judgements, an early abort)
    images: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # ref -> (image, mask), recent
    reset_rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    agent_rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    random_policy_rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    episode_start_actions: int = 0
    classifier_version: str = "unknown"  # which weights judge the frames (journaled with each judgement)
    schema: int = SCHEMA_VERSION  # of the journal written or re-lived: its record order (journal.SCHEMA_HISTORY)

    @classmethod
    def new(cls, config: RunConfig, classifier_version: str = "unknown", schema: int = SCHEMA_VERSION) -> RunState:
        seed = config.run.seed
        return cls(config, RegionPlanner(config.planner), EpisodeTracker(config=config.episode),
                   reset_rng=np.random.default_rng([seed, 1]), agent_rng=np.random.default_rng([seed, 2]),
                   random_policy_rng=np.random.default_rng([seed, 3]),
                   classifier_version=classifier_version, schema=schema)

    def remember(self, ref: str, image: np.ndarray, mask: np.ndarray, keep: int = 8) -> None:
        self.images[ref] = (image, mask)
        while len(self.images) > keep:
            self.images.pop(next(iter(self.images)))


# -- plan stubs: composite instrument procedures, one journaled operation per step -------------------------------


def approach(s: ApproachSettings) -> Plan:
    """Auto-approach and poll until it ends (at most `timeout_s`, then it is stopped); returns the z state."""
    yield StartApproach()
    polls = max(1, math.ceil(s.timeout_s / s.poll_s))
    for _ in range(polls):
        if not (yield ApproachRunning()):
            return (yield ReadZ())
        yield Wait(s.poll_s)
    yield StopApproach()
    raise ApproachFailed(f"auto-approach still running after {s.timeout_s:g} s; stopped")


def set_z_extension(s: ApproachSettings) -> Plan:
    """Bring the z piezo to the target extension (about 80 %) with single coarse steps and re-approaches."""
    state: ZState = yield ReadZ()
    for _ in range(s.max_adjustments):
        if abs(state.extension - s.target_extension) <= s.extension_tolerance:
            return state
        towards = state.extension > s.target_extension
        direction = s.towards_sample_direction if towards else s.away_from_sample_direction
        yield Withdraw()
        yield MotorMove(direction, s.z_steps_per_adjust, "adjust z extension")
        state = yield from approach(s)
    raise ApproachFailed(f"z extension {state.extension:.2f} not within {s.target_extension}+-{s.extension_tolerance} "
                         f"after {s.max_adjustments} coarse adjustments")


def retract_after_crash(s: ApproachSettings) -> Plan:
    """Withdraw, back off with the coarse motor, approach again and re-centre z."""
    yield Withdraw()
    yield MotorMove(s.away_from_sample_direction, s.crash_retract_steps, "retract after a crash")
    yield from approach(s)
    return (yield from set_z_extension(s))


def move_area(s: ApproachSettings, direction: int) -> Plan:
    """Withdraw and move the coarse positioner to a new approach area (the approach there is its own state)."""
    yield Withdraw()
    yield MotorMove(direction, s.area_move_steps, "new approach area")


# -- one plan per state -------------------------------------------------------------------------------------------


def idle(rs: RunState) -> Plan:
    yield Fire("start")


def imaging_conditions(rs: RunState) -> Plan:
    """Set the imaging bias and current setpoint (constant current): before the first scan, after every
    approach, and after every pulse or dip (which change them)."""
    yield SetBias(rs.config.scan.bias_V)
    yield SetSetpoint(rs.config.scan.setpoint_A)


def approaching(rs: RunState) -> Plan:
    yield from imaging_conditions(rs)
    yield from approach(rs.config.approach)
    yield from set_z_extension(rs.config.approach)
    rs.position.new_region = rs.position.after_approach = True
    yield Fire("approached")


def settling(rs: RunState) -> Plan:
    yield Settle(rs.config.run.settle_s)
    yield Fire("settled")


def selecting(rs: RunState) -> Plan:
    pos = rs.position
    target = None if pos.force_move else rs.planner.next_region(pos.previous_xy_m)
    if target is None:
        pos.force_move = False
        yield Fire("area_exhausted")
        return
    step_m = math.dist(pos.previous_xy_m, (float(target[0]), float(target[1])))
    pos.target_xy_m = (float(target[0]), float(target[1]))
    pos.new_region = True
    skip_below = rs.config.scan.creep_skip_below_m
    if not pos.after_approach and step_m < skip_below:
        pos.new_region = False
        yield Note(f"creep frame skipped: a move of {step_m * 1e9:.1f} nm is below {skip_below * 1e9:.1f} nm")
    yield Fire("region_selected")


@dataclass
class ScanResult:
    """A scanned frame (`Scanned`: whole, partial, or stopped early) and what was seen while it was scanned."""

    scanned: Scanned
    trouble: float | None = None  # the z extension of a mid-frame reading in trouble (lost contact, crash)
    judgements: list[tuple[int, float]] = field(default_factory=list)  # (lines, p(good)) by the line-window net
    aborted_at: int | None = None  # lines scanned when a confident bad judgement stopped the scan


def scan_frame(rs: RunState, x: float, y: float, size: float, lines: int, purpose: str) -> Plan:
    """Scan the first `lines` lines of the frame at (x, y) and grab it (NaN where not scanned). Every
    `scan.z_check_lines` lines the z extension is checked (lost contact or a crash mid-frame stops the scan at
    once); with a line-window net (`classifier.lines_checkpoint`) a judged frame's partial data is grabbed
    instead and judged, and a confident bad judgement stops the scan early (`classifier.early_abort`; a good
    one never shortens a frame). The frame is then waited to its end (whole) or stopped (partial). Returns a
    `ScanResult`."""
    sc, cl = rs.config.scan, rs.config.classifier
    lines = min(lines, sc.pixels)
    seconds_per_line = line_time_s(sc, size)
    # the line-window net says p(good): it judges (and may stop) frames only when the target is "good"
    judge = purpose == "frame" and cl.lines_checkpoint != "none" and rs.config.probe.target_state == "good"
    yield StartScan(x, y, size, purpose)
    result: ScanResult | None = None
    scanned_lines, trouble, judgements = 0, None, []
    while True:
        remaining = lines - scanned_lines
        if remaining <= sc.z_check_lines:
            if lines >= sc.pixels:
                yield WaitScanEnd()
            else:
                yield Wait(remaining * seconds_per_line)
                yield StopScan()
            break
        yield Wait(sc.z_check_lines * seconds_per_line)
        scanned_lines += sc.z_check_lines
        if judge:
            partial: Scanned = yield GrabFrame()
            extension = partial.frame.z_after.extension
        else:
            z: ZState = yield ReadZ()
            extension = z.extension
        if z_verdict(rs, extension) is not None:
            trouble = extension
            yield StopScan()
            break
        judged = (yield from judge_lines(rs, partial)) if judge else None
        if judged is not None:
            seen, p_good = judged
            judgements.append((seen, p_good))
            if cl.early_abort and seen >= cl.abort_min_lines and p_good < cl.abort_below:
                # the decision is journaled before the stop it causes (schema 3): a kill during the stop_scan
                # must leave the reason in the journal for the resume's re-live; schema 2 wrote it after
                abort = LineJudgement(frame=partial.ref, lines=seen, p_good=p_good, abort=True)
                if rs.schema >= 3:
                    yield abort
                yield StopScan()
                if rs.schema < 3:
                    yield abort
                result = ScanResult(partial, None, judgements, seen)
                break
            yield LineJudgement(frame=partial.ref, lines=seen, p_good=p_good)
    if result is not None:
        return result
    scanned: Scanned = yield GrabFrame()
    return ScanResult(scanned, trouble, judgements)


def judge_lines(rs: RunState, partial: Scanned) -> Plan:
    """The line-window net's p(good) for a partial frame: levelled on its scanned lines, in scan order.
    Returns (lines seen, p(good)), or None when no complete line has arrived yet (nothing to judge)."""
    frame = partial.frame
    ordered = scan_order(frame.data_m, frame.scan_up)
    if scanned_lines(ordered) == 0:
        return None
    seed = derived_seed(rs.config.run.seed, rs.counters.scanned_frames, "lines", partial.ref)
    image, seen = yield Compute(preprocess_partial, (ordered, seed))
    p_good: float = yield ClassifyLines(image)
    return seen, p_good


def changed_at_line(judgements: list[tuple[int, float]], threshold: float, final_good: bool) -> int | None:
    """The line after which the judgement of a frame changed (good <-> bad) while it was scanned, the whole
    frame's judgement counting as the last; None when it never changed."""
    verdicts = [(lines, p > threshold) for lines, p in judgements]
    for (_, before), (lines, after) in zip(verdicts, verdicts[1:] + [(-1, final_good)]):
        if before != after:
            return judgements[-1][0] if lines == -1 else lines
    return None


def z_verdict(rs: RunState, extension: float) -> str | None:
    """The trigger a z extension calls for: "contact_lost", "crashed", or None."""
    s = rs.config.detection
    if extension >= s.lost_contact_extension:
        return "contact_lost"
    if extension <= s.crash_extension:
        return "crashed"
    return None


def scanning(rs: RunState) -> Plan:
    pos, sc = rs.position, rs.config.scan
    size = sc.frame_size_m
    x, y = pos.target_xy_m
    if pos.new_region:
        creep = yield from scan_frame(rs, x, y, size, sc.creep_lines, "creep")
        rs.counters.creep_frames += 1
        if (yield from z_trouble(rs, creep.scanned, creep.trouble)):
            return
        pos.new_region = pos.after_approach = False
    result = yield from scan_frame(rs, x, y, size, sc.pixels, "frame")
    scanned = result.scanned
    if (yield from z_trouble(rs, scanned, result.trouble)):
        return
    pos.consecutive_crashes = pos.consecutive_lost_contacts = 0
    if result.aborted_at is None and not scanned.frame.complete:  # never judged as data: scanned again
        pos.consecutive_incomplete += 1
        missing = int(np.isnan(scanned.frame.data_m).all(axis=1).sum())
        yield Note(f"frame {scanned.ref} came back incomplete ({missing} of {sc.pixels} lines missing); rescanned",
                   {"frame": scanned.ref, "missing_lines": missing})
        if pos.consecutive_incomplete > rs.config.detection.max_consecutive_faults:
            raise RunFailed(f"{pos.consecutive_incomplete} incomplete frames in a row at {pos.target_xy_m} m")
        return
    pos.consecutive_incomplete = 0
    rs.planner.mark_scanned(pos.target_xy_m)
    pos.previous_xy_m = pos.target_xy_m
    rs.counters.scanned_frames += 1
    rs.pending = scanned
    rs.pending_scan = result
    if result.aborted_at is not None:
        rs.counters.aborted_frames += 1
        yield Fire("scan_aborted")
        return
    yield Fire("frame_recorded")


def z_trouble(rs: RunState, scanned: Scanned, mid_frame: float | None = None) -> Plan:
    """Lost contact or crash, judged from a reading during the scan (`mid_frame`) or the z extension right after
    it; True if so (the trigger fired)."""
    ext = mid_frame if mid_frame is not None else scanned.frame.z_after.extension
    trigger = z_verdict(rs, ext)
    if trigger is None:
        return False
    pos = rs.position
    pos.recovery = "crash" if trigger == "crashed" else "contact"
    if trigger == "crashed":  # counted when seen, so a failed retract is reported as itself, not as a crash
        pos.consecutive_crashes += 1
    else:
        pos.consecutive_lost_contacts += 1
    yield ZCheck(extension=ext, verdict=trigger)
    yield Fire(trigger)
    return True


def recovering(rs: RunState) -> Plan:
    """Re-approach after lost contact, or retract and re-approach after a crash (elsewhere), then settle: the
    paper waits after every approach. More than `max_consecutive_*` of the same trouble in a row ends the run."""
    pos, limits, s = rs.position, rs.config.detection, rs.config.approach
    if pos.recovery == "crash":
        if pos.consecutive_crashes > limits.max_consecutive_crashes:
            raise RunFailed(f"{pos.consecutive_crashes} crashes in a row at {pos.target_xy_m} m")
        yield from retract_after_crash(s)
        rs.counters.crash_recoveries += 1
        # The original blocks a circle around a crash and images elsewhere: the sample there is likely
        # damaged. Scanning resumes at the nearest free cell (the same one if none is left).
        rs.planner.block_circle(pos.target_xy_m, limits.crash_forbidden_radius_m)
        elsewhere = rs.planner.next_region(pos.target_xy_m)
        if elsewhere is not None:
            pos.target_xy_m = (float(elsewhere[0]), float(elsewhere[1]))
    else:
        if pos.consecutive_lost_contacts > limits.max_consecutive_lost_contacts:
            raise RunFailed(f"contact lost {pos.consecutive_lost_contacts} times in a row at {pos.target_xy_m} m")
        yield from approach(s)
        yield from set_z_extension(s)
        rs.counters.contact_recoveries += 1
    yield Settle(rs.config.run.settle_s)
    pos.recovery = None
    pos.after_approach = True
    pos.new_region = True  # the re-approach causes creep again: discard one frame
    yield Fire("recovered")


def classifying(rs: RunState) -> Plan:
    scanned = rs.pending
    if scanned is None:
        raise PlanError("classifying needs a recorded frame")
    cfg, pos, det = rs.config, rs.position, rs.config.detection
    frame, ref = scanned.frame, scanned.ref
    seed = derived_seed(cfg.run.seed, rs.counters.scanned_frames)
    pre: Preprocessed = yield Compute(preprocess, (frame.data_m, seed))
    rough = is_bad_sample(frame.data_m, det.bad_sample_peak_to_peak_m, plane_m=pre.plane_m)
    if rough and pos.consecutive_bad_sample < det.bad_sample_accept_after:
        pos.consecutive_bad_sample += 1
        radius = bad_sample_radius_m(pos.consecutive_bad_sample, det.bad_sample_base_radius_m)
        rs.planner.block_circle(pos.target_xy_m, radius)
        rs.counters.bad_samples += 1
        yield SampleVerdict(frame=ref, verdict="bad_sample", radius_m=radius)
        yield Fire("sample_bad")
        return
    pos.consecutive_bad_sample = 0
    rs.counters.frames += 1
    site = locate_action(pre.normalised, pos.target_xy_m, cfg.scan.frame_size_m, valid=pre.valid)
    mask = action_mask(site.free_side_m)
    rs.remember(ref, pre.normalised, mask)
    how = rs.pending_scan or ScanResult(scanned)
    if how.aborted_at is not None:  # stopped early: the line-window net's confident judgement is the verdict
        p_good = how.judgements[-1][1]
    else:
        p_good = yield Classify(pre.normalised)  # p(target state): p(good) unless [probe] target_state says otherwise
    outcome = rs.tracker.observe(p_good, ref)
    rs.last = JudgedFrame(ref, pre, site, mask)
    if outcome.probe_good:
        rs.counters.good_probe_frames += 1
    yield from learn_from(rs, outcome)
    trigger = classification_trigger(outcome)
    ctx = outcome.decision_context(rs.tracker.config)
    if outcome.episode_started:
        rs.counters.episodes += 1
        rs.episode_start_actions = rs.counters.actions
    if outcome.episode_ended:
        rs.counters.episode_lengths.append(rs.counters.actions - rs.episode_start_actions)
    if outcome.episode_truncated:
        pos.force_move = True
    yield Classification(
        frame=ref, ransac_seed=seed, p_good=p_good, good=outcome.probe_good, classifier=rs.classifier_version,
        trigger=trigger, context=ctx.as_record(), bad_probe_count=outcome.bad_probe_count,
        in_episode=outcome.in_episode, episode=outcome.episode_index, episode_started=outcome.episode_started,
        episode_ended=outcome.episode_ended, reward=outcome.reward, free_side_m=site.free_side_m,
        episode_truncated=outcome.episode_truncated, episode_actions=rs.tracker.episode_actions,
        labels=[[label.frame_ref, label.good_image] for label in outcome.labels],
        lines=how.aborted_at,
        changed_at_line=None if how.aborted_at is not None else changed_at_line(
            how.judgements, rs.tracker.config.good_threshold, outcome.probe_good),
        target=target_name(rs),
    )
    yield Fire(trigger, ctx)


def target_name(rs: RunState) -> str | None:
    """The target state for the journal: None for "good" (records stay as before target states), else its name."""
    target = rs.config.probe.target_state
    return None if target == "good" else target


def classification_trigger(outcome: ProbeOutcome) -> str:
    """The FSM trigger for a judged frame. The reset phase has its own two rows (`reset_continues`,
    `reset_over`), so the journal never shows a made-up good or bad probe."""
    if outcome.trigger is None:
        return "reset_continues"
    if outcome.trigger == "reset_done":
        return "reset_over"
    return outcome.trigger


def learn_from(rs: RunState, outcome: ProbeOutcome) -> Plan:
    """A completed conditioning step goes to the replay memory, followed by the learner updates it is owed."""
    t = outcome.step
    if t is None or t.state_ref not in rs.images or t.next_state_ref not in rs.images:
        return
    state, _ = rs.images[t.state_ref]
    next_state, next_mask = rs.images[t.next_state_ref]
    yield Experience(state, t.action, t.reward, next_state, t.terminal, next_mask)
    yield Learn()


def conditioning(rs: RunState) -> Plan:
    last = rs.last
    if last is None:
        raise PlanError("conditioning needs a classified frame")
    if not last.mask.any():
        yield NoRoom(frame=last.ref)
        yield Fire("no_room")
        return
    if episode_policy(rs) == "random":  # interleaved evaluation: this episode acts uniformly at random
        action = int(rs.random_policy_rng.choice(np.flatnonzero(last.mask)))
        decision = ActionDecision(action, [], 1.0, True, "random")
    else:
        decision = yield Choose(last.pre.normalised, last.mask, rs.agent_rng)
    yield ActionChosen(
        frame=last.ref, action=decision.action, q_values=decision.q_values, mask=last.mask.tolist(),
        epsilon=decision.epsilon, explored=decision.explored, agent=decision.net_version,
        site_xy_m=[last.site.x_m, last.site.y_m], free_side_m=last.site.free_side_m, target=target_name(rs),
    )
    yield from act(rs, decision.action, last)
    rs.tracker.record_action(decision.action, last.ref)
    rs.counters.actions += 1
    yield Fire("conditioned")


def episode_policy(rs: RunState) -> str:
    """Who acts in the current episode: the agent, or (interleaved evaluation, every second episode) uniform random
    choice among the allowed actions. Episodes are numbered from 1, so the agent has the first."""
    interleaved = rs.config.run.evaluate_interleaved
    return "random" if interleaved and rs.tracker.episode_index % 2 == 0 else "agent"


def resetting(rs: RunState) -> Plan:
    last = rs.last
    if last is None:
        raise PlanError("resetting needs a classified frame")
    action = random_reset_action(rs.reset_rng, last.mask)
    yield ResetActionChosen(frame=last.ref, action=action)
    yield from act(rs, action, last)
    rs.tracker.record_action(action, last.ref)
    rs.counters.reset_actions += 1
    yield Fire("reset_done")


def action_command(index: int, x_m: float, y_m: float) -> Command:
    action = ACTIONS[index]
    if action.kind is ActionKind.PULSE:
        return Pulse(x_m, y_m, action.bias_V, action.duration_s, index)
    if action.kind is ActionKind.DIP:
        return Dip(x_m, y_m, action.dip_depth_m, action.bias_V, action.duration_s, index)
    return Stall(index)


def act(rs: RunState, index: int, last: JudgedFrame) -> Plan:
    """Execute a conditioning action. If its outcome is unknown (timeout, lost connection) it counts as
    done: a pulse or dip is never repeated, the next frame shows what happened."""
    x, y = last.site.x_m, last.site.y_m
    try:
        yield action_command(index, x, y)
    except SafetyError:
        raise
    except InstrumentError as exc:
        yield Note(f"action {index} outcome unknown ({type(exc).__name__}); not repeated")
    if ACTIONS[index].kind is not ActionKind.STALL:  # a pulse or dip leaves other conditions behind
        yield from imaging_conditions(rs)
    rs.planner.block_circle((x, y), ACTIONS[index].forbidden_radius_m)
    rs.position.previous_xy_m = (x, y)  # the original's reference point during conditioning


def moving(rs: RunState) -> Plan:
    yield from move_area(rs.config.approach, rs.config.approach.area_move_direction)
    rs.planner.new_area()
    # a new approach area is a new sample region: the bad-sample count t starts again
    rs.position = dataclasses.replace(rs.position, previous_xy_m=(0.0, 0.0), new_region=True, consecutive_bad_sample=0)
    rs.counters.moves += 1
    yield Fire("moved")


PLANS: dict[State, Callable[[RunState], Plan]] = {
    State.idle: idle,
    State.approaching: approaching,
    State.settling: settling,
    State.selecting: selecting,
    State.scanning: scanning,
    State.recovering: recovering,
    State.classifying: classifying,
    State.conditioning: conditioning,
    State.resetting: resetting,
    State.moving: moving,
}


def plan_for(state: State, rs: RunState) -> Plan:
    """The plan of one step in `state`."""
    try:
        return PLANS[state](rs)
    except KeyError:
        raise PlanError(f"no plan for the terminal state {state.value!r}") from None
