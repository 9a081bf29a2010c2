"""An in-process RL environment for probe conditioning (no TCP), on top of `SimulatedMicroscope`.

One step = the action-table row applied physically (a `Bias.Pulse`-like pulse or a tip-shaper dip, at
the centre of the current region, or nothing for the stall), then a move to a fresh region `region_step_m`
away (serpentine over the approach area; a coarse move to a new area when it is used up), a settle wait so
xy creep has decayed, and one 64 x 64 scan. The observation is that scan's forward z in metres, row 0 at the
top (+y) edge (the controller's `Frame.data_m` convention). With `render=False` the scan still runs (its
duration and the tip changes during it are part of the dynamics) but no image is computed: use it when
only the dynamics matter (statistics of policies).

Episodes: `reset()` damages the probe like the original's training-mode reset (random reset-flagged
actions, each followed by a scan, until the probe is bad or `max_reset_actions` were used); the episode
ends when the probe is good (ground truth; the real controller uses the classifier instead).
The oracle policy reads the ground truth; the random policy draws uniformly among all 12 actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from deepspm.io.actions import ACTIONS, N_ACTIONS, RESET_ACTIONS, ActionKind
from deepspm.simulator.clock import SimClock
from deepspm.simulator.conditioning import best_action_for
from deepspm.simulator.microscope import (
    Z_INDEX,
    GroundTruth,
    MotorDirection,
    SimConfig,
    SimulatedMicroscope,
    TipShaperSettings,
)
from deepspm.simulator.probe import ProbeKind
from deepspm.simulator.sample import area_rng

ENV_CONFIG = SimConfig(z_jump_rate_per_s=0.0)  # no sudden z jumps: recoveries are not what the agent learns
_P_ENV = 301


class ConditioningEnv:
    """A simulated probe-conditioning task: observe a frame, pick an action, see the next frame."""

    def __init__(
        self, seed: int, render: bool = True, config: SimConfig | None = None, pixels: int = 64,
        frame_m: float = 10e-9, region_step_m: float = 30e-9, settle_s: float = 30.0, max_reset_actions: int = 5,
    ) -> None:
        self.seed = seed
        self.render = render
        self.clock = SimClock(0.0)
        self.microscope = SimulatedMicroscope(seed, self.clock, config or ENV_CONFIG)
        self.frame_m = frame_m
        self.region_step_m = region_step_m
        self.settle_s = settle_s
        self.max_reset_actions = max_reset_actions
        self.rng = area_rng(seed, _P_ENV)
        self.microscope.set_scan_buffer([Z_INDEX], pixels, pixels)
        self._regions = self._region_path()
        self._centre = (0.0, 0.0)
        self._frame: np.ndarray | None = None
        self.reset_actions_used = 0
        self.steps = 0
        self._scan_next()

    # --- the task -----------------------------------------------------------------------------------------
    def observe(self) -> np.ndarray | None:
        """The last frame (lines x pixels, metres, float32, row 0 = top), or None when not rendering."""
        return self._frame

    def ground_truth(self) -> GroundTruth:
        return self.microscope.ground_truth()

    @property
    def done(self) -> bool:
        return self.microscope.ground_truth().is_good

    def reset(self) -> np.ndarray | None:
        """Damage the probe with random reset actions until it is bad (at most `max_reset_actions`)."""
        used = 0
        while self.done and used < self.max_reset_actions:
            self._apply(int(self.rng.choice(RESET_ACTIONS)))
            self._scan_next()
            used += 1
        self.reset_actions_used = used
        self.steps = 0
        return self.observe()

    def step(self, action_index: int) -> np.ndarray | None:
        """Apply one action of the table, scan a fresh nearby region, return its frame."""
        if not 0 <= action_index < N_ACTIONS:
            raise ValueError(f"action index {action_index} outside 0..{N_ACTIONS - 1}")
        self._apply(action_index)
        self._scan_next()
        self.steps += 1
        return self.observe()

    # --- mechanics ----------------------------------------------------------------------------------------
    def _apply(self, action_index: int) -> None:
        m = self.microscope
        action = ACTIONS[action_index]
        if action.kind is ActionKind.STALL:
            return
        self.clock.advance(m.set_folme_xy(*self._centre))
        if action.kind is ActionKind.PULSE:
            self.clock.advance(m.pulse(action.duration_s, action.bias_V, z_hold=True, absolute=True))
        else:
            scan_bias = m.bias_V()
            m.set_tip_shaper_props(TipShaperSettings(
                change_bias=True, bias_V=action.bias_V, tip_lift_m=-action.dip_depth_m, lift_time1_s=action.duration_s,
                bias_lift_V=scan_bias, lift_height_m=action.dip_depth_m, lift_time2_s=action.duration_s,
                end_wait_s=0.5, restore_feedback=True,
            ))
            self.clock.advance(m.tip_shaper_start())

    def _region_path(self) -> Iterator[tuple[float, float]]:
        half = self.microscope.config.piezo_xy_range_m / 2 * 0.95 - self.frame_m
        n = int(2 * half // self.region_step_m) + 1
        coords = [-half + i * self.region_step_m for i in range(n)]
        while True:
            for j, y in enumerate(coords):
                for x in (coords if j % 2 == 0 else coords[::-1]):
                    yield x, y
            self._move_area()

    def _move_area(self) -> None:
        m = self.microscope
        self.clock.advance(m.withdraw())
        self.clock.advance(m.motor_move(MotorDirection.X_PLUS, int(math.ceil(850e-9 / m.config.motor_step_xy_m))))
        self._approach()

    def _approach(self) -> None:
        approach_and_settle(self.microscope, self.clock)

    def _ensure_tunnelling(self) -> None:
        m = self.microscope
        gt = m.ground_truth()
        if not (gt.lost_contact or gt.in_contact):
            return
        self.clock.advance(m.withdraw())
        if gt.in_contact:
            self.clock.advance(m.motor_move(MotorDirection.Z_PLUS, 3))
        self._approach()

    def _scan_next(self) -> None:
        m = self.microscope
        self._ensure_tunnelling()
        self._centre = next(self._regions)
        self.clock.advance(m.set_folme_xy(*self._centre))
        self.clock.advance(self.settle_s)
        m.set_scan_frame(self._centre[0], self._centre[1], self.frame_m, self.frame_m, 0.0)
        m.scan_action(0, True)
        self.clock.advance(m.frame_time_s())
        if self.render:
            _, data, up = m.frame_data(Z_INDEX, True)
            if m.config.acquisition_order and up:
                data = data[::-1]
            self._frame = np.ascontiguousarray(data)


def approach_and_settle(m: SimulatedMicroscope, clock: SimClock, max_extension: float = 0.88, settle_s: float = 120.0) -> None:
    """Approach, coarse-step towards the sample until the extension is at most `max_extension`, let creep settle."""
    for _ in range(30):
        m.auto_approach_start()
        while m.auto_approach_running():
            clock.advance(m.config.approach_cycle_s)
        if m.z_extension() <= max_extension:
            break
        clock.advance(m.withdraw())
        clock.advance(m.motor_move(MotorDirection.Z_MINUS, 1))
    clock.advance(settle_s)


Policy = Callable[[ConditioningEnv], int]


def oracle_policy(env: ConditioningEnv) -> int:
    """Knows the defect (ground truth) and applies the action that fixes it most often."""
    kind = env.ground_truth().kind
    if not isinstance(kind, ProbeKind):
        raise ValueError(f"the oracle knows the Ag(100) probe kinds, not {kind!r}")
    return best_action_for(kind)


def random_policy(env: ConditioningEnv) -> int:
    """Uniformly random among all 12 actions."""
    return int(env.rng.integers(0, N_ACTIONS))


def run_episode(env: ConditioningEnv, policy: Policy, max_steps: int = 100) -> int:
    """Reset, then act until the probe is good; returns the number of actions (max_steps if never)."""
    env.reset()
    steps = 0
    while not env.done and steps < max_steps:
        env.step(policy(env))
        steps += 1
    return steps
