"""The in-process RL environment: frames, ground truth, determinism."""

from __future__ import annotations

import numpy as np

from deepspm.io.actions import N_ACTIONS
from deepspm.simulator.environment import ConditioningEnv, oracle_policy


def test_reset_step_observe_give_raw_frames_in_metres() -> None:
    env = ConditioningEnv(seed=5)
    first = env.reset()
    assert env.reset_actions_used >= 1 or not env.done
    assert first is not None and first.shape == (64, 64) and first.dtype == np.float32
    assert np.isfinite(first).all()
    assert 1e-10 < np.ptp(first) < 5e-9  # Angstrom-scale features
    z_low, z_high = -0.5e-6, 0.5e-6
    assert z_low < first.mean() < z_high  # absolute piezo z
    frame = env.step(int(oracle_policy(env)))
    assert frame is not None and env.observe() is frame and env.steps == 1
    assert not np.array_equal(frame, first)  # a fresh region


def test_same_seed_same_episode() -> None:
    def run() -> tuple[list[bytes], list[str]]:
        env = ConditioningEnv(seed=9)
        frames, kinds = [env.reset().tobytes()], []
        for a in (3, 7, 11, 0, 4):
            frames.append(env.step(a).tobytes())
            kinds.append(env.ground_truth().kind.value)
        return frames, kinds

    assert run() == run()


def test_render_flag_does_not_change_the_dynamics() -> None:
    def kinds(render: bool) -> list[str]:
        env = ConditioningEnv(seed=3, render=render)
        env.reset()
        out = []
        for i in range(20):
            env.step(i % N_ACTIONS)
            out.append(env.ground_truth().kind.value)
        return out

    assert kinds(True) == kinds(False)
    env = ConditioningEnv(seed=3, render=False)
    assert env.reset() is None


def test_the_environment_keeps_going_over_many_regions() -> None:
    env = ConditioningEnv(seed=4, render=False, region_step_m=200e-9)  # few regions per area: forces area moves
    env.reset()
    for i in range(40):
        env.step(i % N_ACTIONS)
    assert env.microscope.approach_area() != (0, 0)
    gt = env.ground_truth()
    assert not gt.lost_contact and not gt.in_contact
