"""Environment steps per second, JAX (vectorised, jitted) against the numpy simulator, and agent training time.

One environment step = one conditioning action applied, the creep frame's and the frame's lines of scanning
(tip changes), and one rendered 64 x 64 frame (levelled and normalised in JAX; raw heights from numpy's
`ConditioningEnv`, which renders through `SimulatedMicroscope` as the run does, without levelling).
- JAX: `jaxenv.step` jitted over N environments, random actions, timed after compilation in 5 windows of chained
  calls, each ended by blocking on its outputs; steps/s = N x calls / seconds, the median window (and the best).
- numpy: N `ConditioningEnv`s stepped round-robin in one process (the numpy simulator has no batch axis:
  its rate does not grow with N; N = 1024 is measured on 64 environments and marked so).
Training: wall seconds of `train_agent_vectorised` (64 environments, 6000 actions: the shipped agent's recipe;
compilation included) against the old loop's 1067 s for 3000 actions (its agent, `deepspm/weights/README.md`).
Whether an agent reaches <= 0.5x random is judged by `deepspm evaluate agent --sim` (numpy simulator, the run's
plans), reported in docs/training.md, not here. Goals (issue 16): >= 20 000 steps/s at N = 1024; training to
<= 0.5x random in <= 3 minutes. Reported, never asserted.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import print_table, write_json
from deepspm.io.actions import N_ACTIONS
from deepspm.simulator import jaxenv
from deepspm.simulator.environment import ConditioningEnv

GOAL_STEPS_PER_S = 20_000.0  # at N = 1024
GOAL_TRAIN_S = 180.0
OLD_LOOP_TRAIN_S = 1067.0  # 3000 actions, deepspm/weights/README.md
WEIGHTS = Path(__file__).resolve().parents[1] / "deepspm" / "weights"


def jax_rate(n: int, calls: int, repeats: int = 5) -> tuple[float, float, float]:
    """(median and best steps per second over `repeats` windows of `calls` chained steps, compile seconds) of the
    jitted step over `n` environments; each window ends blocked on its last step's outputs."""
    t = jaxenv.tables()
    key = jax.random.key(0)
    probes = jaxenv.initial_probes(key, n, t)
    step = jax.jit(jaxenv.step)
    actions = jax.random.randint(jax.random.key(1), (calls, n), 0, N_ACTIONS)
    keys = jax.random.split(jax.random.key(2), calls)
    start = time.perf_counter()
    out = step(key, probes, actions[0])
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            out = step(keys[i], out[0], actions[i])
        jax.block_until_ready(out)
        rates.append(n * calls / (time.perf_counter() - start))
    return float(np.median(rates)), max(rates), compile_s


def numpy_rate(n: int, steps: int) -> float:
    envs = [ConditioningEnv(seed=i, render=True) for i in range(n)]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(steps):
        frame = envs[i % n].step(int(rng.integers(0, N_ACTIONS)))
        assert frame is not None and frame.shape == (64, 64)
    return steps / (time.perf_counter() - start)


def main(smoke: bool = False) -> dict:
    sizes = (1, 4) if smoke else (1, 64, 1024)
    rows, payload = [], []
    for n in sizes:
        calls = 2 if smoke else max(8, min(200, 8192 // n))
        rate, best, compile_s = jax_rate(n, calls, 2 if smoke else 5)
        n_numpy = min(n, 2 if smoke else 64)
        np_rate = numpy_rate(n_numpy, 2 if smoke else max(32, 2 * n_numpy))
        load = os.getloadavg()[0]
        rows.append((n, rate, best, np_rate, rate / np_rate, compile_s,
                     f"{rate / GOAL_STEPS_PER_S:.3f}" if n == 1024 else "-", load,
                     "" if n_numpy == n else f"numpy on {n_numpy} envs"))
        payload.append({"envs": n, "jax_steps_per_s": rate, "jax_best_steps_per_s": best, "numpy_steps_per_s": np_rate,
                        "numpy_envs": n_numpy, "jax_compile_s": compile_s, "load_average": load})
    print_table(f"Environment steps/s with a rendered 64x64 frame (goal >= {GOAL_STEPS_PER_S:.0f} at N = 1024; JAX: "
                f"median and best of 5 timed windows); {os.cpu_count()} CPUs, load average per row (1 min)",
                ("N envs", "JAX steps/s", "JAX best", "numpy steps/s", "JAX/numpy", "JAX compile s", "x goal", "load",
                 "note"), rows)
    training = None
    if not smoke:
        from deepspm.controller.train_vectorised import train_agent_vectorised

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = train_agent_vectorised(WEIGHTS / "classifier", Path(tmp) / "agent", envs=64, steps=6000,
                                             progress=False)
            seconds = time.perf_counter() - start
        training = {"new_loop_s": seconds, "new_loop_actions": summary["env_steps"], "old_loop_s": OLD_LOOP_TRAIN_S,
                    "old_loop_actions": 3000, "old_loop_source": "deepspm/weights/README.md (measured, 18 min)"}
        print_table("Agent training wall time (old: 3000 actions, 0.605x random; new: 6000 actions, the shipped "
                    "agent's recipe; judge a new agent with `deepspm evaluate agent --sim`, docs/training.md)",
                    ("loop", "actions", "seconds", "x old", "goal s"),
                    [("old: run plans, numpy", 3000, OLD_LOOP_TRAIN_S, 1.0, "-"),
                     ("new: jitted, 64 JAX envs", summary["env_steps"], seconds, seconds / OLD_LOOP_TRAIN_S, GOAL_TRAIN_S)])
        print("wrote", write_json("env", {"rows": payload, "training": training,
                                         "load_average": os.getloadavg()[0]}))
    return {"rows": payload, "training": training}


if __name__ == "__main__":
    main()
