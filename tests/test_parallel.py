"""Data-parallel training (deepspm.nets.parallel): one device versus four, one process versus two.

The device count of a CPU process is fixed when JAX starts, so each configuration trains in its own process
(tests/parallel_worker.py): `XLA_FLAGS=--xla_force_host_platform_device_count=N` gives N CPU devices, and
two processes on localhost join through `jax.distributed` (the coordinator on a free port). Every run must end
with the same parameters as the single-device run, to float rounding.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepspm.cli import main
from deepspm.nets import parallel
from deepspm.nets.parallel import ParallelError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel_worker.py"
CASES = ("classifier", "ensemble", "dqn", "learner")
DISTRIBUTED_ENV = (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID,
                   "JAX_LOCAL_DEVICE_IDS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def worker_env(devices_per_process: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra)
    return env


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JAX's persistent compilation cache, shared by this module's single-process runs: a step compiled for
    one case (the classifier's) is not compiled again for the next (the ensemble's members)."""
    return tmp_path_factory.mktemp("jax_cache")


def run_worker(out: Path, devices: str, host_devices: int, cases: tuple[str, ...], cache: Path) -> None:
    env = worker_env(host_devices, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    done = subprocess.run([sys.executable, str(WORKER), devices, str(out), *cases], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_same_training(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    """Every parameter and statistic equal to float rounding; the losses too (relative to their size)."""
    names = [k for k in reference if k not in ("n_devices", "n_processes", "joined")]
    assert sorted(names) == sorted(k for k in other if k not in ("n_devices", "n_processes", "joined"))
    for name in names:
        np.testing.assert_allclose(other[name], reference[name], rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory: pytest.TempPathFactory, compile_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("one_device")
    run_worker(out, "1", 1, CASES, compile_cache)
    return out


# --- in this process (one CPU device) ---------------------------------------------------------------------


def test_parse_devices() -> None:
    assert parallel.parse_devices("all") == "all"
    assert parallel.parse_devices(" ALL ") == "all"
    assert parallel.parse_devices("3") == 3
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ParallelError, match="positive integer or 'all'"):
            parallel.parse_devices(bad)


def test_distributed_settings_from_the_environment() -> None:
    full = {parallel.ENV_COORDINATOR: "10.0.0.1:1234", parallel.ENV_NUM_PROCESSES: "4", parallel.ENV_PROCESS_ID: "2"}
    assert parallel.distributed_settings({}) is None
    assert parallel.distributed_settings(full) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                   "process_id": 2}
    assert parallel.distributed_settings({**full, parallel.ENV_NUM_PROCESSES: "1", parallel.ENV_PROCESS_ID: "0"}) is None
    assert parallel.distributed_settings({"SLURM_NTASKS": "8"}) == {"cluster_detection_method": "slurm"}
    assert parallel.distributed_settings({"OMPI_COMM_WORLD_SIZE": "2"}) == {"cluster_detection_method": "ompi"}
    assert parallel.distributed_settings({"SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    with pytest.raises(ParallelError, match=f"missing {parallel.ENV_PROCESS_ID}"):
        parallel.distributed_settings({k: v for k, v in full.items() if k != parallel.ENV_PROCESS_ID})
    with pytest.raises(ParallelError, match="0..DEEPSPM_NUM_PROCESSES-1, got 4 of 4"):
        parallel.distributed_settings({**full, parallel.ENV_PROCESS_ID: "4"})
    with pytest.raises(ParallelError, match="must be integers"):
        parallel.distributed_settings({**full, parallel.ENV_NUM_PROCESSES: "four"})
    with pytest.raises(ParallelError, match="host:port"):
        parallel.distributed_settings({**full, parallel.ENV_COORDINATOR: "10.0.0.1"})


def test_one_device_keeps_the_single_device_path() -> None:
    import jax

    assert len(jax.local_devices()) == 1 and jax.process_count() == 1
    assert parallel.mesh_for(1) is None and parallel.mesh_for("all") is None and parallel.mesh_for(None) is None
    with pytest.raises(ParallelError, match="2 devices asked for but this process has 1"):
        parallel.mesh_for(2)

    def step(x: int, batch: int) -> int:
        return x + batch

    assert parallel.over_devices(step, batch_argnums=(1,), devices=1) is step


def test_batch_must_split_over_the_devices() -> None:
    parallel.check_batch(1, 7)  # one device: any batch
    parallel.check_batch(4, 64)
    with pytest.raises(ParallelError, match="the batch of 6 does not split evenly over 4 devices"):
        parallel.check_batch(4, 6)


def test_use_devices_reaches_loops_that_ask_and_counts_them() -> None:
    assert parallel.scoped_devices() == 1
    with parallel.use_devices("all") as scope:
        assert scope.taken == 0
        assert parallel.scoped_devices(2) == 2 and scope.taken == 0  # an explicit choice wins, takes nothing
        assert parallel.scoped_devices() == "all" and scope.taken == 1
        with parallel.use_devices(3):
            assert parallel.scoped_devices() == 3
        assert parallel.scoped_devices() == "all" and scope.taken == 2
    assert parallel.scoped_devices() == 1


def test_train_classifier_refuses_more_devices_than_there_are() -> None:
    from deepspm.nets.classifier import train_classifier

    images = np.zeros((8, 64, 64), np.float32)
    labels = np.array([0, 1] * 4)
    with pytest.raises(ParallelError, match="3 devices asked for"):
        train_classifier(images, labels, "tiny", 1, 0, progress=False, devices=3)


def test_parallel_step_on_one_device_equals_the_plain_step() -> None:
    """data_parallel on a one-device mesh is the plain jitted step (what the N-device tests then compare to)."""
    import jax
    import jax.numpy as jnp

    def step(w: jax.Array, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        noise = jax.random.normal(key, x.shape)
        return w - 0.1 * jnp.mean(x + noise, axis=0), jnp.sum(x)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (parallel.BATCH_AXIS,))
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    w = np.ones(3, np.float32)
    expected = jax.jit(step)(w, x, jax.random.key(1))
    got = parallel.data_parallel(step, mesh, batch_argnums=(1,))(w, x, jax.random.key(1))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
        assert a.sharding == parallel.replicated(mesh)


@pytest.mark.parametrize("value", ["0", "two"])
def test_cli_refuses_a_bad_device_count(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for cls in ("good", "bad"):
        (data / cls).mkdir(parents=True)
        np.save(data / cls / "a.npy", np.zeros((64, 64), np.float32))
    assert main(["train", "classifier", "--data", str(data), "--out", str(tmp_path / "c"), "--devices", value]) == 2
    err = capsys.readouterr().err
    assert "--devices" in err and "positive integer or 'all'" in err and "Traceback" not in err


@pytest.mark.parametrize("net", ["classifier", "agent"])
def test_cli_help_explains_devices(net: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", net, "--help"] if net == "classifier" else ["train", net, "--sim", "--help"]
    assert main(argv) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--devices N|all" in text and "JAX_COORDINATOR_ADDRESS" in text


def test_cli_refuses_an_incomplete_multiprocess_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(parallel.ENV_COORDINATOR, "127.0.0.1:1")
    data = tmp_path / "data"
    for cls in ("good", "bad"):
        (data / cls).mkdir(parents=True)
        np.save(data / cls / "a.npy", np.zeros((64, 64), np.float32))
    assert main(["train", "classifier", "--data", str(data), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "missing DEEPSPM_NUM_PROCESSES, DEEPSPM_PROCESS_ID" in err and "Traceback" not in err


# --- in other processes -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_devices_train_as_one(one_device: Path, tmp_path: Path, compile_cache: Path) -> None:
    """Classifier, ensemble and DQN update: batches split over 4 devices, parameters replicated, the same
    parameters, batch statistics and losses as on one device."""
    run_worker(tmp_path, "all", 4, (*CASES, "meshes"), compile_cache)
    sizes = load(tmp_path / "meshes-0.npz")["devices_for_batch"]  # "all": the most devices that split the batch
    assert [sizes[b - 1] for b in (1, 2, 3, 6, 7, 8, 9, 12, 64)] == [1, 2, 3, 3, 1, 4, 3, 4, 4]
    for case in CASES:
        reference, four = load(one_device / f"{case}-0.npz"), load(tmp_path / f"{case}-0.npz")
        assert int(reference["n_devices"]) == 1 and int(four["n_devices"]) == 4, case
        assert_same_training(reference, four)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_train_as_one(one_device: Path, tmp_path: Path) -> None:
    """Two processes on localhost (2 CPU devices each: one mesh of 4 across both) through jax.distributed,
    configured by the environment alone: both end with the single-process parameters (the classifier: the
    DQN update runs through the same `data_parallel`, checked on 4 devices above)."""
    address = f"127.0.0.1:{free_port()}"
    cases = ("classifier",)
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "all", str(tmp_path), *cases],
        env=worker_env(2, **{parallel.ENV_COORDINATOR: address, parallel.ENV_NUM_PROCESSES: "2",
                             parallel.ENV_PROCESS_ID: str(i)}),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            errors.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    for case in cases:
        reference = load(one_device / f"{case}-0.npz")
        for index in range(2):
            result = load(tmp_path / f"{case}-{index}.npz")
            assert bool(result["joined"]) and int(result["n_processes"]) == 2 and int(result["n_devices"]) == 4
            assert_same_training(reference, result)
