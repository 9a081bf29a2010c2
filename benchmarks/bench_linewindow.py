"""Line-window judgement at batch 1 against the line time: can the run judge the frame after every scan line?

For simulated raw frames (good and bad probes, the synthetic set's generator) truncated to n visible lines, one
judgement is `preprocess_partial` (RANSAC plane on the n scanned rows, normalisation, unscanned rows filled) plus
one forward pass of the line-window net at batch 1 (`Predictor` compiled once for batch 1 before timing, as the
run does). The line time is the paper's: 10 nm at 80 nm/s forward and 160 nm/s back = 0.1875 s. The table gives
the median and the 95th percentile per n and the fraction of one line time a judgement takes (goal: well under 1,
so every line can be judged with room to spare). Reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json
from deepspm.controller.preprocess import preprocess_partial, truncate_rows
from deepspm.io.instrument import ScanSettings, line_time_s
from deepspm.nets.inference import Predictor
from deepspm.simulator.dataset import synth_dataset

LINE_COUNTS = (4, 8, 16, 32, 64)
FRAME_SIZE_M = 10e-9


def _frames(n: int, seed: int) -> np.ndarray:
    """Raw simulated frames (m), half good, half bad probes (scan order = stored order for these sets)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = synth_dataset(n, Path(tmp) / "set", seed, progress=False, good_fraction=0.5)
        files = sorted(root.glob("good/*.npy")) + sorted(root.glob("bad/*.npy"))
        return np.stack([np.load(f) for f in files]).astype(np.float64)


def _predictor(smoke: bool) -> tuple[Predictor, str]:
    """The shipped line-window net (a random compact net if it is missing; a random tiny one for the smoke run)."""
    from deepspm.nets.model import NetDef

    if not smoke:
        from deepspm.controller.session import WEIGHTS_DIR
        from deepspm.nets.checkpoints import load_net

        path = WEIGHTS_DIR / "classifier_lines"
        if path.exists():
            ckpt = load_net(path, expect_kind="classifier")
            return Predictor(ckpt.net, ckpt.variables, "probability"), f"shipped classifier_lines ({ckpt.net.spec.name})"
    import jax

    net = NetDef.of("tiny" if smoke else "compact", 1)
    return Predictor(net, net.init(jax.random.key(0)), "probability"), f"random {net.spec.name}"


def main(smoke: bool = False) -> dict:
    """Measure every row; `smoke` (or `--quick`) times a few frames with a tiny net, to keep the module working."""
    frames = _frames(4 if smoke else 40, seed=7)
    predictor, which = _predictor(smoke)
    predictor.compile([1])  # before timing, as the run compiles before its first frame
    predictor(preprocess_partial(truncate_rows(frames[0], 8), seed=0)[0][None])  # first-call costs, untimed
    line_s = line_time_s(ScanSettings(), FRAME_SIZE_M)
    repeats = 1 if smoke else 3
    rows, payload = [], []
    for n in LINE_COUNTS:
        prep, net, total = [], [], []
        for frame in frames:
            partial = truncate_rows(frame, n)
            for _ in range(repeats):
                t0 = time.perf_counter()
                image, lines = preprocess_partial(partial, seed=0)
                t1 = time.perf_counter()
                p = predictor(image[None])
                t2 = time.perf_counter()
                assert lines == n and p.shape == (1,)
                prep.append(t1 - t0)
                net.append(t2 - t1)
                total.append(t2 - t0)
        med, p95 = float(np.median(total)), float(np.percentile(total, 95))
        row = {"lines": n, "judgements": len(total), "preprocess_median_s": float(np.median(prep)),
               "net_median_s": float(np.median(net)), "total_median_s": med, "total_p95_s": p95,
               "line_time_s": line_s, "p95_fraction_of_line": p95 / line_s}
        payload.append(row)
        rows.append((n, len(total), row["preprocess_median_s"] * 1e3, row["net_median_s"] * 1e3, med * 1e3,
                     p95 * 1e3, f"{p95 / line_s:.3f}"))
    print_table(
        f"Line-window judgement at batch 1 ({which}; {len(frames)} simulated frames, half bad probes) against one "
        f"line time of {line_s:.4f} s; load average {os.getloadavg()[0]:.1f}",
        ("lines", "judgements", "level ms", "net ms", "total ms (median)", "total ms (p95)", "p95 / line time"), rows,
    )
    result = {"net": which, "line_time_s": line_s, "rows": payload}
    if not smoke:
        print("wrote", write_json("linewindow", result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few frames and a tiny net (smoke run; nothing written)")
    main(smoke=parser.parse_args().quick)
