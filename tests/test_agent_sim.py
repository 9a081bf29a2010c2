"""The agent in simulation: the run's own plans on the synchronous engine (deepspm.controller.agent_sim)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepspm.controller.agent_sim import SimNets, SimRun, evaluate_agent_sim, train_agent_sim
from deepspm.controller.brain import ActionDecision
from deepspm.controller.training import synth_dataset_command, train_classifier_command
from deepspm.fsm.states import State
from deepspm.io.actions import N_ACTIONS
from deepspm.nets.checkpoints import flatten_named, load_net


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("synth") / "set"
    synth_dataset_command(data, n=96, seed=11, progress=False)
    out = tmp_path_factory.mktemp("cls") / "classifier"
    train_classifier_command([data], out, preset="tiny", epochs=2, seed=3, batch_size=16, progress=False)
    return out


class TruthNets(SimNets):
    """A perfect classifier (the simulator's ground truth: p = 0.99 good, 0.01 bad), uniform random actions,
    and a memory of every experience the plans hand over."""

    def __init__(self) -> None:
        self.sim: SimRun | None = None
        self.experiences: list[tuple[np.ndarray, int, float, np.ndarray, bool, np.ndarray]] = []
        self.masks: list[np.ndarray] = []
        self.truth_before: list[bool] = []
        rng = np.random.default_rng(0)

        def choice(image: np.ndarray, mask: np.ndarray, _: np.random.Generator) -> ActionDecision:
            self.masks.append(mask)
            assert self.sim is not None
            self.truth_before.append(self.sim.instrument.ground_truth().is_good)
            return ActionDecision(int(rng.choice(np.flatnonzero(mask))), [0.0] * N_ACTIONS, 1.0, True, "random")

        super().__init__(classifier=None, choice=choice)  # type: ignore[arg-type]

    def classify(self, image: np.ndarray) -> float:
        assert self.sim is not None
        return 0.99 if self.sim.instrument.ground_truth().is_good else 0.01

    def store(self, state, action, reward, next_state, terminal, next_mask) -> None:  # noqa: ANN001
        assert self.sim is not None
        self.experiences.append((state, action, reward, next_state, terminal, next_mask))
        assert terminal == self.sim.instrument.ground_truth().is_good  # the perfect classifier ends the episode


def test_episodes_follow_the_paper_with_a_perfect_classifier() -> None:
    nets = TruthNets()
    episodes = []
    sim = SimRun(21, nets, max_episode_actions=30, on_episode_end=episodes.append)
    nets.sim = sim
    sim.run(done=lambda: len(episodes) >= 6)
    assert sum(e.actions for e in episodes) == len(nets.experiences)
    for state, _action, reward, next_state, terminal, next_mask in nets.experiences:
        assert reward == (9.0 if terminal else -1.0)  # -1 per action, +10 on the successful step
        assert state.shape == next_state.shape == (64, 64) and next_mask.shape == (N_ACTIONS,)
    assert not any(nets.truth_before)  # conditioning only ever acts on a bad probe
    assert all(e.truly_good_at_end for e in episodes if not e.truncated)
    assert all(m[0] and m.dtype == bool for m in nets.masks)  # the stall always fits
    # the run's own behaviour: every region starts with a creep frame, training resets the probe between episodes
    triggers = [t for t, _, _ in sim.engine.transitions]
    assert {"reset_continues", "reset_over", "reset_done"} & set(triggers)
    assert sim.run_state.counters.creep_frames >= 1 and sim.engine.state is not State.fault


def test_a_truncated_episode_moves_to_a_new_approach_area() -> None:
    """The drift the old training loop had: an episode cut at its cap scanned on in place. The plans move area."""
    nets = TruthNets()
    nets.classify = lambda image: 0.01  # type: ignore[method-assign]  # the probe never looks good
    nets.store = lambda *a: None  # type: ignore[method-assign]
    episodes = []
    sim = SimRun(5, nets, max_episode_actions=2, on_episode_end=episodes.append)
    nets.sim = sim
    sim.run(done=lambda: len(episodes) >= 1 and sim.engine.state is State.approaching)
    assert episodes[0].truncated and episodes[0].actions == 2
    assert ("area_exhausted", State.selecting, State.moving) in sim.engine.transitions
    assert sim.run_state.counters.moves == 1


def test_train_agent_sim_runs_and_writes_a_loadable_agent(tiny_classifier: Path, tmp_path: Path) -> None:
    out = tmp_path / "agent"
    summary = train_agent_sim(tiny_classifier, out, steps=20, seed=1, random_steps=16, epsilon_decay_steps=2,
                              max_episode_actions=4, checkpoint_every=10, progress=False)
    agent = load_net(out, expect_kind="agent")
    assert agent.net.n_outputs == N_ACTIONS and agent.net.spec.name == "tiny"
    assert summary["env_steps"] == 20 and summary["updates"] == 4  # learning starts after the random steps
    assert agent.metadata["updates"] == 4 and agent.metadata["final"] is True
    assert json.loads((out / "metrics.json").read_text())["episode_lengths"] is not None
    result = evaluate_agent_sim(out, tiny_classifier, episodes=2, seed=4, max_episode_actions=3, progress=False,
                                out_json=tmp_path / "agent_eval.json")
    for policy in ("agent", "random"):
        assert result[policy]["episodes"] == 2 and all(1 <= n <= 3 for n in result[policy]["lengths"])
    assert result["ratio_mean"] == pytest.approx(result["agent"]["mean"] / result["random"]["mean"])
    assert json.loads((tmp_path / "agent_eval.json").read_text())["options"]["episodes"] == 2


def test_the_agent_starts_from_the_classifier_unless_a_preset_is_named(tiny_classifier: Path, tmp_path: Path) -> None:
    classifier = flatten_named(load_net(tiny_classifier).variables)
    for preset in (None, "tiny"):
        out = tmp_path / str(preset)
        summary = train_agent_sim(tiny_classifier, out, steps=2, seed=0, preset=preset, random_steps=2,
                                  max_episode_actions=3, progress=False)
        assert summary["updates"] == 0
        agent = flatten_named(load_net(out).variables)
        trunk = [name for name in agent if not name.startswith("params.head")]
        assert trunk and set(trunk) <= set(classifier)
        same = [np.array_equal(agent[name], classifier[name]) for name in trunk]
        assert all(same) if preset is None else not all(same)


def test_train_agent_init_continues_an_agent(tiny_classifier: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    train_agent_sim(tiny_classifier, first, steps=2, seed=0, random_steps=2, max_episode_actions=3, progress=False)
    again = tmp_path / "again"
    summary = train_agent_sim(tiny_classifier, again, steps=3, seed=1, init=first, max_episode_actions=3,
                              progress=False)
    assert summary["options"]["init"] == str(first)
    start, continued = flatten_named(load_net(first).variables), flatten_named(load_net(again).variables)
    assert set(start) == set(continued)  # the same net, continued (no updates yet: the weights are the start's)
    assert all(np.array_equal(start[k], continued[k]) for k in start) == (summary["updates"] == 0)
    with pytest.raises(ValueError, match="preset"):
        train_agent_sim(tiny_classifier, tmp_path / "x", steps=1, init=first, preset="tiny", progress=False)
