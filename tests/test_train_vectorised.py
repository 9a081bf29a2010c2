"""The jitted double-DQN loop over the JAX environment: it learns, is deterministic, writes a loadable agent."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from deepspm import cli
from deepspm.controller.train_vectorised import Trainer, VectorisedOptions, VectorisedTrainingError
from deepspm.io.actions import N_ACTIONS
from deepspm.nets.checkpoints import flatten_named, load_net, save_net
from deepspm.nets.dqn import DQNConfig, agent_from_classifier
from deepspm.nets.model import NetDef


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = NetDef.of("tiny", 1)
    path = tmp_path_factory.mktemp("clf") / "classifier"
    save_net(path, net, net.init(jax.random.key(0)), kind="classifier")
    return path


def _trainer(classifier: Path, seed: int = 0) -> Trainer:
    clf = load_net(classifier, expect_kind="classifier")
    net, variables = agent_from_classifier(clf.net, clf.variables, N_ACTIONS, jax.random.key(1))
    config = DQNConfig(buffer_capacity=256, batch_size=8, random_steps=8, epsilon_decay_steps=8, target_update_every=5)
    return Trainer(clf.net, clf.variables, net, variables, config, VectorisedOptions(envs=4, seed=seed, chunk=3))


def test_loop_learns_keeps_the_trunk_and_is_deterministic(tiny_classifier: Path) -> None:
    trainer = _trainer(tiny_classifier)
    start = trainer.initial()
    before = {k: np.asarray(v) for k, v in flatten_named(start.learner.online.params).items()}
    a = trainer.initial()
    for _ in range(4):
        a = trainer.run_chunk(a)
    b = trainer.initial()
    for _ in range(4):
        b = trainer.run_chunk(b)
    assert int(a.learner.env_steps) > 8 and int(a.learner.updates) > 0
    assert int(a.replay.size) == min(int(a.learner.env_steps), 256)
    assert int(a.tally.frames) == 4 * 3 * 4
    after = {k: np.asarray(v) for k, v in flatten_named(a.learner.online.params).items()}
    for name, value in before.items():
        if name.startswith("convs."):
            np.testing.assert_array_equal(value, after[name], err_msg=name)  # the classifier's trunk, frozen
    assert any(not np.array_equal(before[n], after[n]) for n in before if n.startswith("head."))
    for x, y in zip(jax.tree.leaves(a.learner), jax.tree.leaves(b.learner)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_options_are_typed_errors() -> None:
    with pytest.raises(VectorisedTrainingError, match="--envs"):
        VectorisedOptions(envs=0).check()
    with pytest.raises(VectorisedTrainingError, match="--steps"):
        VectorisedOptions(steps=0).check()


def test_cli_trains_and_writes_an_agent_the_run_loads(tiny_classifier: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agent"
    rc = cli.main(["train", "agent", "--sim", "--vectorised", "--envs", "4", "--steps", "6", "--seed", "3",
                   "--classifier", str(tiny_classifier), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "actions" in printed and f"saved {out}" in printed
    agent = load_net(out, expect_kind="agent")
    assert agent.net.n_outputs == N_ACTIONS and agent.net.spec.name == "tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["env_steps"] >= 6 and metrics["loop"] == "vectorised" and metrics["options"]["envs"] == 4
    assert cli.main(["train", "agent", "--sim", "--envs", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--envs: needs --vectorised" in capsys.readouterr().err
    assert cli.main(["train", "agent", "--sim", "--vectorised", "--init", str(out), "--out", str(tmp_path / "y")]) == 2
