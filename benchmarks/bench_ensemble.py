"""An ensemble of K = 5 compact classifiers at batch 1: one batched (vmapped) call against K separate calls.

The ensemble `Predictor` (an `EnsembleDef` with stacked member variables) runs every member in ONE jitted
call (unrolled on a CPU, vmapped on an accelerator: `inference.members_of`) and combines them inside it (mean
probability); the comparison is the run-time alternative, K single
member `Predictor`s called one after another, and one member alone; and the ensemble with test-time
augmentation (`dihedral-mean`: every member judges the 8 symmetries of the image, a batch of 8, in the same
call). Every predictor is compiled for batch 1 before timing (as the run does); the calls are interleaved round
by round so that load from other processes hits all of them alike; the median and the 95th percentile of the
per-call latency are reported. Goal: the batched call at most 2x one member's latency. Reported, never asserted.
Also timed, beside them: the H:Si(100) recipe's ensemble (5 `wide` members, the default of `train classifier` on
that set), against one wide member ("x one member" of a row is against the member of its own preset).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from benchmarks.common import print_table, write_json
from deepspm.nets.ensemble import EnsembleDef, stack_members
from deepspm.nets.inference import Predictor
from deepspm.nets.model import NetDef

K = 5
TTA_RULE = "dihedral-mean"


def _predictors(preset: str, rules: tuple[str, ...]) -> tuple[list[Predictor], dict[str, Predictor]]:
    """K members of `preset` (seeds 0..K-1) as K single predictors and one ensemble predictor per combination rule,
    all compiled for batch 1 (as the run compiles them)."""
    net = NetDef.of(preset, 1)
    members = [net.init(jax.random.key(seed)) for seed in range(K)]
    singles = [Predictor(net, variables, "probability") for variables in members]
    ensembles = {rule: Predictor(EnsembleDef.of_member(net, K, rule), stack_members(members), "probability")
                 for rule in rules}
    for predictor in (*singles, *ensembles.values()):
        predictor.compile([1])
    return singles, ensembles


def main(smoke: bool = False) -> dict[str, Any]:
    """`smoke` (or `--quick`): tiny members and a few rounds, nothing written (keeps the module working)."""
    preset = "tiny" if smoke else "compact"
    # TTA_RULE: every member also judges the 8 symmetries of the image, in the same call
    singles, ensembles = _predictors(preset, ("mean", TTA_RULE))
    image = np.random.default_rng(3).uniform(-1.0, 1.0, (1, 64, 64)).astype(np.float32)
    expected = np.mean([p(image) for p in singles], axis=0)
    got = ensembles["mean"](image)
    assert np.allclose(got, expected, atol=1e-5), (got, expected)

    def k_calls(predictors: list[Predictor]) -> Callable[[], Any]:
        return lambda: np.mean([p(image) for p in predictors], axis=0)

    calls: dict[str, Callable[[], Any]] = {
        "one member": lambda: singles[0](image),
        f"ensemble of {K}, one batched call": lambda: ensembles["mean"](image),
        f"{K} separate calls": k_calls(singles),
        f"ensemble of {K}, {TTA_RULE} (8 views), one batched call": lambda: ensembles[TTA_RULE](image),
    }
    reference = dict.fromkeys(calls, "one member")
    if not smoke:  # the H:Si(100) recipe's members
        wide_singles, wide_ensembles = _predictors("wide", ("mean",))
        calls["one wide member"] = lambda: wide_singles[0](image)
        calls[f"ensemble of {K} wide (H:Si recipe), one batched call"] = lambda: wide_ensembles["mean"](image)
        calls[f"{K} separate wide calls"] = k_calls(wide_singles)
        reference.update(dict.fromkeys(list(calls)[-3:], "one wide member"))
    rounds = 5 if smoke else 300
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows, payload = [], []
    for name, samples in times.items():
        one = float(np.median(times[reference[name]]))
        med, p95 = float(np.median(samples)), float(np.percentile(samples, 95))
        payload.append({"call": name, "median_s": med, "p95_s": p95, "x_one_member": med / one})
        rows.append((name, med * 1e3, p95 * 1e3, f"{med / one:.2f}"))
    print_table(
        f"Ensemble inference at batch 1 ({K} x {preset}, mean probability; {rounds} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.1f}; goal: batched <= 2x one member)",
        ("call", "median ms", "p95 ms", "x one member"), rows,
    )
    result = {"preset": preset, "k": K, "rounds": rounds, "rows": payload}
    if not smoke:
        print("wrote", write_json("ensemble", result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny members, a few rounds (smoke run; nothing written)")
    main(smoke=parser.parse_args().quick)
