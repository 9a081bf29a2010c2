"""Bad-probe counter, conditioning episodes, rewards and the training-mode reset phase
(reference sections 1.1 and 4.3), as one pure, serialisable state machine.

The controller calls `observe(p_good, frame_ref)` for every classified image and
`record_action(action, state_ref)` after every executed conditioning or reset action. Frames are
referred to by an opaque string (the journal's content hash), so the state is JSON-able and the
replay buffer can look the arrays up. Discarded images (bad sample, lost contact, crash) are not
classified and never reach the tracker; by the labelling rule they are not "good images".

"Good" here means "in the run's target state" (`EpisodeConfig.target_state`, linked to `[probe]
target_state`; issue 12 part 4): the p the tracker observes is p(target) from the classifier's output for that
state, p(good) by default. Rewards, the counter, an episode's end and the reset phase follow it unchanged.

Operation mode:
- a good probe (p > 0.9) resets the counter; a bad one increments it; the episode starts on the
  10th consecutive bad image (`count >= threshold`; the original needed 11, weakness 1);
- in an episode, each image after an action completes a transition: reward -1, or, if the image is
  good, the terminal reward and the episode ends (counter := 0);
- after `max_episode_actions` (100) actions without success the episode is truncated (its last
  transition is stored as non-terminal: a time limit is not a terminal state) and the controller
  moves to a new approach area.

Training mode: a good image ends the episode and starts the reset phase: up to 5 random reset
actions (each followed by a scan at a new region), stopping as soon as p < 0.1. Reset steps give no
reward and no transition. After the reset (`reset_done`), the next classified image starts the next
episode immediately, without the 10-image trigger; if the probe is still good there, that episode
ends at once with zero steps and the probe is reset again. The first episode starts without a reset
(on the first classified image). This matches the original's loop "reset (not before the first
episode), observe, act until good" and the FSM rows probe_good -> resetting -> reset_done -> selecting.

Terminal reward: the paper gives -1 per action and +10 per successful episode, so the final step
earns -1 + 10 = +9 (`TerminalReward.PAPER`, the default); the original code gave +10 *instead of*
-1 (`TerminalReward.CODE`).

"Good image" label (reference 1.1 step 10): an image is a good image unless it belongs to a
conditioning episode or was discarded. The bad-probe images that triggered an episode belong to it,
so labels of bad-probe images outside an episode wait until the counter either resets (good image)
or reaches the threshold (not good). The good image that ends an episode shows a good probe after
the last action and is labelled good; reset-phase images are not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from deepspm.fsm.guards import DecisionContext
from deepspm.io.actions import RESET_ACTIONS


class Phase(str, Enum):
    """What the controller should do next."""

    SCAN = "scan"  # select the next region and scan it
    CONDITION = "condition"  # choose a conditioning action for the last image and execute it
    RESET = "reset"  # training: execute a random reset action
    NEW_AREA = "new_area"  # the episode hit its action cap: move to a new approach area, then scan


class TerminalReward(str, Enum):
    PAPER = "paper"  # the successful step earns step_reward + success_reward (-1 + 10 = +9)
    CODE = "code"  # the successful step earns success_reward instead (+10)


@dataclass(frozen=True)
class EpisodeConfig:
    training: bool = False
    bad_probe_threshold: int = 10
    good_threshold: float = 0.9  # p_good > this is a good probe (p(target) > this: the target state)
    target_state: str = "good"  # the tip state episodes aim for (linked to probe.target_state)
    step_reward: float = -1.0
    success_reward: float = 10.0
    terminal_reward: TerminalReward = TerminalReward.PAPER
    max_episode_actions: int = 100
    reset_max_actions: int = 5
    reset_stop_below: float = 0.1  # the reset phase ends once p_good < this

    def __post_init__(self) -> None:
        object.__setattr__(self, "terminal_reward", TerminalReward(self.terminal_reward))
        if self.bad_probe_threshold < 1 or self.max_episode_actions < 1 or self.reset_max_actions < 1:
            raise ValueError("threshold, episode cap and reset length must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "terminal_reward": self.terminal_reward.value}


@dataclass(frozen=True)
class ConditioningStep:
    """One RL experience: action `action` chosen on frame `state_ref` led to frame `next_state_ref`."""

    state_ref: str
    action: int
    reward: float
    next_state_ref: str
    terminal: bool


@dataclass(frozen=True)
class ImageLabel:
    frame_ref: str
    good_image: bool


@dataclass(frozen=True)
class ProbeOutcome:
    """What one classified image means.

    trigger: the FSM trigger to fire: 'probe_good' / 'probe_bad' for an image judged in
        `classifying`; during the reset phase 'reset_done' when it finishes, else None (stay in
        `resetting` and do another reset action).
    next_phase: what to do next (see `Phase`).
    bad_probe_count, in_episode: the tracker's values after this image (for `DecisionContext`).
    labels: "good image" labels decided by this image (possibly for earlier frames too).
    """

    probe_good: bool
    trigger: str | None
    next_phase: Phase
    bad_probe_count: int
    in_episode: bool
    episode_index: int
    episode_started: bool = False
    episode_ended: bool = False
    episode_truncated: bool = False
    step: ConditioningStep | None = None
    labels: tuple[ImageLabel, ...] = ()

    @property
    def reward(self) -> float | None:
        return None if self.step is None else self.step.reward

    def decision_context(self, config: EpisodeConfig) -> DecisionContext:
        """The FSM guards' view of this outcome."""
        return DecisionContext(
            training=config.training,
            bad_probe_count=self.bad_probe_count,
            in_episode=self.in_episode,
            bad_probe_threshold=config.bad_probe_threshold,
            target=config.target_state,
        )


@dataclass
class EpisodeTracker:
    """The counter and episode bookkeeping; all fields are plain data.

    episode_index counts episodes started (zero-step ones included); episode_actions counts the
    conditioning actions of the current episode; `episode_armed` means the next classified image
    starts an episode (training mode: at the start and after every reset).
    """

    config: EpisodeConfig = field(default_factory=EpisodeConfig)
    phase: Phase = Phase.SCAN
    bad_probe_count: int = 0
    in_episode: bool = False
    episode_index: int = 0
    episode_actions: int = 0
    episode_armed: bool | None = None
    resetting: bool = False
    reset_actions: int = 0
    pending_action: int | None = None
    pending_state_ref: str | None = None
    pending_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phase = Phase(self.phase)
        if self.episode_armed is None:
            self.episode_armed = self.config.training  # the first training episode needs no reset

    # -- inputs -----------------------------------------------------------------------------------------
    def record_action(self, action: int, state_ref: str) -> None:
        """A conditioning action (in an episode) or a random reset action (reset phase) chosen on
        frame `state_ref` was executed; the next image completes its step."""
        if self.phase is Phase.CONDITION and self.in_episode:
            self.episode_actions += 1
        elif self.phase is Phase.RESET and self.resetting:
            self.reset_actions += 1
        else:
            raise ValueError(f"no action expected in phase {self.phase.value!r}")
        self.pending_action, self.pending_state_ref = int(action), state_ref
        self.phase = Phase.SCAN

    def observe(self, p_good: float, frame_ref: str) -> ProbeOutcome:
        """Account for one classified image with probability `p_good` of a good probe."""
        good = bool(p_good > self.config.good_threshold)
        action, state_ref = self.pending_action, self.pending_state_ref
        self.pending_action = self.pending_state_ref = None
        if self.resetting:
            return self._observe_reset(p_good, good, frame_ref)
        if self.in_episode:
            return self._observe_in_episode(good, frame_ref, action, state_ref)
        if self.episode_armed:
            return self._start_armed_episode(good, frame_ref)
        return self._observe_counting(good, frame_ref)

    def flush_labels(self) -> tuple[ImageLabel, ...]:
        """At the end of a run: bad-probe images still waiting never joined an episode."""
        labels = tuple(ImageLabel(ref, True) for ref in self.pending_labels)
        self.pending_labels = []
        return labels

    # -- the cases --------------------------------------------------------------------------------------
    def _outcome(self, good: bool, trigger: str | None, **details: Any) -> ProbeOutcome:
        return ProbeOutcome(
            probe_good=good,
            trigger=trigger,
            next_phase=self.phase,
            bad_probe_count=self.bad_probe_count,
            in_episode=self.in_episode,
            episode_index=self.episode_index,
            **details,
        )

    def _after_good_probe(self) -> None:
        """Operation keeps imaging; training re-damages the probe."""
        self.bad_probe_count = 0
        if self.config.training:
            self.resetting, self.reset_actions, self.phase = True, 0, Phase.RESET
        else:
            self.phase = Phase.SCAN

    def _start_episode(self) -> None:
        self.in_episode, self.episode_actions = True, 0
        self.episode_index += 1
        self.phase = Phase.CONDITION

    def _observe_counting(self, good: bool, ref: str) -> ProbeOutcome:
        if good:
            labels = tuple(ImageLabel(r, True) for r in [*self.pending_labels, ref])
            self.pending_labels = []
            self._after_good_probe()
            return self._outcome(good, "probe_good", labels=labels)
        self.bad_probe_count += 1
        if self.bad_probe_count < self.config.bad_probe_threshold:
            self.pending_labels.append(ref)
            self.phase = Phase.SCAN
            return self._outcome(good, "probe_bad")
        labels = tuple(ImageLabel(r, False) for r in [*self.pending_labels, ref])
        self.pending_labels = []
        self._start_episode()
        return self._outcome(good, "probe_bad", episode_started=True, labels=labels)

    def _start_armed_episode(self, good: bool, ref: str) -> ProbeOutcome:
        self.episode_armed = False
        self._start_episode()
        if good:  # still good after the reset: the episode ends with zero steps
            self.in_episode = False
            self._after_good_probe()
            return self._outcome(
                good, "probe_good", episode_started=True, episode_ended=True, labels=(ImageLabel(ref, True),)
            )
        return self._outcome(good, "probe_bad", episode_started=True, labels=(ImageLabel(ref, False),))

    def _observe_in_episode(self, good: bool, ref: str, action: int | None, state_ref: str | None) -> ProbeOutcome:
        cfg = self.config
        truncated = not good and self.episode_actions >= cfg.max_episode_actions
        step = None
        if action is not None and state_ref is not None:
            reward = cfg.step_reward
            if good:
                reward = cfg.success_reward if cfg.terminal_reward is TerminalReward.CODE else reward + cfg.success_reward
            step = ConditioningStep(state_ref, action, reward, ref, terminal=good)
        if good:
            self.in_episode = False
            self._after_good_probe()
            return self._outcome(
                good, "probe_good", episode_ended=True, step=step, labels=(ImageLabel(ref, True),)
            )
        if truncated:
            self.in_episode, self.bad_probe_count = False, 0
            self.episode_armed = cfg.training
            self.phase = Phase.NEW_AREA
            return self._outcome(
                good,
                "probe_bad",
                episode_ended=True,
                episode_truncated=True,
                step=step,
                labels=(ImageLabel(ref, False),),
            )
        self.phase = Phase.CONDITION
        return self._outcome(good, "probe_bad", step=step, labels=(ImageLabel(ref, False),))

    def _observe_reset(self, p_good: float, good: bool, ref: str) -> ProbeOutcome:
        labels = (ImageLabel(ref, False),)
        if p_good < self.config.reset_stop_below or self.reset_actions >= self.config.reset_max_actions:
            self.resetting, self.episode_armed, self.phase = False, True, Phase.SCAN
            return self._outcome(good, "reset_done", labels=labels)
        self.phase = Phase.RESET
        return self._outcome(good, None, labels=labels)

def random_reset_action(rng: np.random.Generator, allowed: np.ndarray) -> int:
    """A uniformly random reset-flagged action among the allowed ones (the -8 V pulse always is)."""
    candidates = [a for a in RESET_ACTIONS if allowed[a]]
    if not candidates:
        raise ValueError("no reset action is allowed")
    return int(candidates[rng.integers(len(candidates))])
