"""Orbax checkpoints of nets and of the DQN training state (deepspm.nets.checkpoints)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from deepspm.nets.checkpoint_info import CheckpointError, checkpoint_kind, read_checkpoint_meta
from deepspm.nets.checkpoints import (
    load_learner,
    load_net,
    read_meta,
    save_learner,
    save_learner_async,
    save_net,
    save_net_async,
)
from deepspm.nets.dqn import DQNConfig, Learner
from deepspm.nets.inference import Predictor
from deepspm.nets.model import NetDef

REPO = Path(__file__).resolve().parents[1]
N_ACTIONS = 12


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.5, 1.5, (n, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def classifier():
    net = NetDef.of("tiny", 1)
    variables = net.init(jax.random.key(4))
    # non-default BN statistics, so that restoring them is actually checked
    return net, variables._replace(batch_stats=jax.tree.map(lambda a: a * 1.5 + 0.1, variables.batch_stats))


def test_net_round_trip_gives_identical_outputs(tmp_path: Path, classifier) -> None:
    net, variables = classifier
    path = save_net(tmp_path / "clf", net, variables, kind="classifier", metadata={"seed": 4, "auc": 0.9})
    meta = read_meta(path)
    assert meta["preset"] == "tiny" and meta["kind"] == "classifier" and meta["n_outputs"] == 1
    assert meta["metadata"] == {"seed": 4, "auc": 0.9}
    restored = load_net(path, expect_kind="classifier")
    assert restored.net == net and restored.metadata["auc"] == 0.9
    x = images(3, seed=0)
    np.testing.assert_array_equal(Predictor(net, variables)(x), Predictor(restored.net, restored.variables)(x))
    with pytest.raises(CheckpointError, match="holds a classifier checkpoint, not an agent"):
        load_net(path, expect_kind="agent")


def test_cheap_metadata_reading_equals_orbax_reading(tmp_path: Path, classifier) -> None:
    """`checkpoint_info` reads meta/metadata as plain JSON; if orbax ever stores it otherwise, this fails."""
    net, variables = classifier
    path = save_net(tmp_path / "clf", net, variables, kind="classifier", metadata={"seed": 4})
    assert read_checkpoint_meta(path) == read_meta(path)
    assert checkpoint_kind(path) == "classifier"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "is a file, not a checkpoint directory"),
    (lambda d: d, "is not a deepspm checkpoint (it has no meta/metadata)"),
])
def test_a_path_that_is_no_checkpoint_is_a_checkpoint_error(tmp_path: Path, make, message) -> None:
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        checkpoint_kind(path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_net(path)


def test_existing_checkpoints_are_not_silently_replaced(tmp_path: Path, classifier) -> None:
    net, variables = classifier
    save_net(tmp_path / "clf", net, variables, kind="classifier")
    with pytest.raises(FileExistsError):
        save_net(tmp_path / "clf", net, variables, kind="classifier")
    save_net(tmp_path / "clf", net, variables, kind="classifier", metadata={"v": 2}, overwrite=True)
    assert read_meta(tmp_path / "clf")["metadata"] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]  # no staging or retired copies left behind


def test_restore_in_a_fresh_process(tmp_path: Path, classifier) -> None:
    """A new interpreter with nothing but the path reproduces the outputs."""
    net, variables = classifier
    x = images(2, seed=1)
    np.save(tmp_path / "x.npy", x)
    save_net(tmp_path / "clf", net, variables, kind="classifier")
    script = (
        "import sys, numpy as np\n"
        "from deepspm.nets.checkpoints import load_net\n"
        "from deepspm.nets.inference import Predictor\n"
        "c = load_net(sys.argv[1])\n"
        "np.save(sys.argv[3], Predictor(c.net, c.variables)(np.load(sys.argv[2])))\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "clf"), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
        check=True, cwd=REPO, capture_output=True, timeout=120,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), Predictor(net, variables)(x))


async def test_async_save_runs_off_the_event_loop(tmp_path: Path, classifier) -> None:
    net, variables = classifier
    path = await save_net_async(tmp_path / "clf", net, variables, kind="classifier")
    assert read_meta(path)["kind"] == "classifier"


def filled_learner(net: NetDef, variables, steps: int) -> Learner:
    config = DQNConfig(random_steps=2, batch_size=8, buffer_capacity=64, target_update_every=2)
    learner = Learner(net, variables, config, seed=11)
    mask = np.ones(N_ACTIONS, bool)
    mask[5] = False
    for step in range(steps):
        learner.record(images(1, step)[0], step % 4, -1.0, images(1, step + 100)[0], step % 3 == 0, mask)
        learner.catch_up()
    return learner


def test_learner_state_resumes_exactly(tmp_path: Path) -> None:
    net = NetDef.of("tiny", N_ACTIONS)
    learner = filled_learner(net, net.init(jax.random.key(0)), steps=6)
    assert learner.updates == 4
    save_learner(tmp_path / "dqn", learner, metadata={"episode": 3})
    resumed, metadata = load_learner(tmp_path / "dqn")
    assert metadata == {"episode": 3}
    assert (resumed.updates, resumed.env_steps, len(resumed.buffer)) == (4, 6, 24)
    assert resumed.config == learner.config and resumed.snapshot().version == 4
    x = images(2, seed=5)
    q = Predictor(net, learner.online, "values")
    np.testing.assert_array_equal(q(x), q(x, resumed.online))
    np.testing.assert_array_equal(q(x, learner.target), q(x, resumed.target))
    # the next update (same sampled batch, same dropout key, same Adam moments) is identical
    assert learner.update() == resumed.update()
    np.testing.assert_array_equal(q(x, learner.online), q(x, resumed.online))


async def test_learner_async_save_and_empty_buffer(tmp_path: Path) -> None:
    net = NetDef.of("tiny", N_ACTIONS)
    learner = Learner(net, net.init(jax.random.key(1)), DQNConfig(buffer_capacity=16), seed=2)
    await save_learner_async(tmp_path / "dqn", learner)
    resumed, _ = load_learner(tmp_path / "dqn")
    assert len(resumed.buffer) == 0 and resumed.updates == 0
    json.dumps(read_meta(tmp_path / "dqn"))
