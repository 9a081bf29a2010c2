"""One training run for the data-parallel tests (tests/test_parallel.py), in its own process.

The device count of a CPU process is fixed when JAX starts (`XLA_FLAGS=--xla_force_host_platform_device_count=N`
must be set before `import jax`), and `jax.distributed.initialize` must run before any other JAX call, so each
case runs here, started by the test with the environment it needs:

    python tests/parallel_worker.py DEVICES OUT_DIR CASE...   (CASE: classifier, ensemble, dqn)

It joins a multi-process job when the environment describes one (`deepspm.nets.parallel`), trains a `tiny` net
on seeded toy data with `--devices DEVICES` ("all" or a count), and writes `OUT_DIR/<CASE>-<process index>.npz`:
the flattened parameters, batch statistics and losses, plus the device and process counts it ran on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests` is not on the path

from deepspm.nets import parallel  # noqa: E402
from tests.toy_data import toy_set  # noqa: E402


def flat(tree: object, prefix: str) -> dict[str, np.ndarray]:
    import jax

    return {f"{prefix}{jax.tree_util.keystr(path)}": np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run_classifier(devices: parallel.Devices) -> dict[str, np.ndarray]:
    from deepspm.nets.classifier import ClassifierConfig, train_classifier

    images, labels = toy_set(64, 3)
    config = ClassifierConfig(batch_size=16, val_fraction=0.25)  # 48 training rows: 3 steps an epoch
    result = train_classifier(images, labels, "tiny", 2, 7, config=config, progress=False, devices=devices)
    losses = np.array([r["train_loss"] for r in result.history])
    return {**flat(result.variables, "vars"), "losses": losses,
            "val_auc": np.array(result.metrics.get("roc_auc", np.nan)), "saved": saves_and_loads(result)}


def saves_and_loads(result) -> np.ndarray:
    """1 when the trained net round-trips through a checkpoint (in a multi-process job process 0 writes alone;
    the others write nothing)."""
    import tempfile

    import jax

    from deepspm.nets.checkpoints import load_net, save_net

    with tempfile.TemporaryDirectory() as scratch:
        path = save_net(Path(scratch) / "clf", result.net, result.variables, kind="classifier")
        if jax.process_index() != 0:
            return np.array(float(not path.exists()))
        loaded = load_net(path, expect_kind="classifier").variables
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(result.variables)))
        return np.array(float(same))


def run_ensemble(devices: parallel.Devices) -> dict[str, np.ndarray]:
    from deepspm.nets.classifier import ClassifierConfig
    from deepspm.nets.ensemble import train_ensemble

    images, labels = toy_set(60, 4)
    config = ClassifierConfig(batch_size=16, val_fraction=0.2)
    with parallel.use_devices(devices):  # the way the command line passes --devices down
        result = train_ensemble(images, labels, "tiny", 1, 5, 2, holdout_fraction=0.2, config=config, progress=False)
    return flat(result.variables, "vars")


def run_dqn(devices: parallel.Devices) -> dict[str, np.ndarray]:
    import jax

    from deepspm.nets.dqn import DQNConfig, LearnerState, make_learn_step, make_optimizer
    from deepspm.nets.model import NetDef

    net = NetDef.of("tiny", 12)
    config = DQNConfig(batch_size=16, target_update_every=2)
    optimizer = make_optimizer(config)
    # the learner's pure update; states, actions, rewards, next states, dones, next masks are the batch
    step = parallel.over_devices(jax.jit(make_learn_step(net, optimizer, config)), range(1, 7), devices)
    state = LearnerState.create(net.init(jax.random.key(11)), optimizer)
    rng = np.random.default_rng(12)
    losses = []
    for update in range(2):
        n = config.batch_size
        batch = (rng.normal(-1.0, 0.3, (n, 64, 64, 1)).astype(np.float32), rng.integers(0, 12, n).astype(np.int32),
                 rng.choice([-1.0, 10.0], n).astype(np.float32),
                 rng.normal(-1.0, 0.3, (n, 64, 64, 1)).astype(np.float32), rng.random(n) < 0.2,
                 rng.random((n, 12)) < 0.8)
        state, metrics = step(state, *batch, jax.random.fold_in(jax.random.key(13), update))
        losses.append(float(metrics["loss"]))
    state = parallel.to_local(state)
    return {**flat(state.online, "online"), **flat(state.target, "target"), "losses": np.array(losses),
            "updates": np.asarray(state.updates)}


def run_learner(devices: parallel.Devices) -> dict[str, np.ndarray]:
    """The `Learner` itself (as `train agent --sim --devices` builds it, inside `use_devices`): its updates
    data-parallel, its state and snapshots ordinary local arrays."""
    import jax

    from deepspm.nets.dqn import DQNConfig, Learner
    from deepspm.nets.model import NetDef

    net = NetDef.of("tiny", 12)
    config = DQNConfig(batch_size=16, target_update_every=2, random_steps=0, buffer_capacity=64)
    with parallel.use_devices(devices):
        learner = Learner(net, net.init(jax.random.key(21)), config, seed=3)
    rng = np.random.default_rng(22)
    for step in range(6):
        learner.record(rng.normal(-1.0, 0.3, (64, 64)).astype(np.float32), step % 12, -1.0,
                       rng.normal(-1.0, 0.3, (64, 64)).astype(np.float32), step == 5, np.ones(12, bool))
        learner.catch_up()
    assert learner._across_devices == (parallel.mesh_for(devices, config.batch_size) is not None)
    snapshot = learner.snapshot().variables
    assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(snapshot))
    return {**flat(learner.online, "online"), **flat(learner.target, "target"),
            "updates": np.asarray(learner.updates)}


def run_meshes(devices: parallel.Devices) -> dict[str, np.ndarray]:
    """How many devices `mesh_for` takes for global batches of 1..64 (0 for no mesh: one device)."""
    sizes = [parallel.device_count(parallel.mesh_for(devices, b)) for b in range(1, 65)]
    return {"devices_for_batch": np.array(sizes)}


CASES = {"classifier": run_classifier, "ensemble": run_ensemble, "dqn": run_dqn, "learner": run_learner,
         "meshes": run_meshes}


def main(argv: list[str]) -> int:
    devices_text, out, *cases = argv
    joined = parallel.initialize_distributed(timeout_s=60)
    import jax

    devices = parallel.parse_devices(devices_text)
    for case in cases:
        arrays = CASES[case](devices)
        arrays["n_devices"] = np.array(parallel.device_count(parallel.mesh_for(devices)))
        arrays["n_processes"] = np.array(jax.process_count())
        arrays["joined"] = np.array(joined)
        np.savez(Path(out) / f"{case}-{jax.process_index()}.npz", **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
