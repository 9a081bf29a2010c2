"""The simulator's H:Si(100) tip-state classifier for `deepspm run --target-state` (issue 12 part 4).

Trained on frames the simulated microscope scans exactly as the run does (`simulator.hsi_dataset.
synth_hsi_run_frames`: 64 px, 10 nm, raw heights), labelled by the simulated tip's true state, levelled by the
run's own RANSAC (`training.normalise_frames`, seeded per frame), one sigmoid output per `HsiTipState`
(one-hot labels: the simulator knows the state exactly). Its class names are the tip states, so a run or
`train agent --sim` may target any of them. Shipped as `deepspm/weights/hsi_tipstates` (how: its README).

    python -m deepspm.controller.hsi_states synth --n 7000 --seed 1 --out hsi-run-s1.npz
    python -m deepspm.controller.hsi_states train --data hsi-run-s1.npz --out hsi_tipstates --epochs 12
    python -m deepspm.controller.hsi_states thresholds --checkpoint hsi_tipstates --data hsi-run-s2.npz --seed 2
    python -m deepspm.controller.hsi_states evaluate --checkpoint hsi_tipstates --data hsi-run-s2.npz
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepspm.controller.seeds import derived_seed
from deepspm.simulator.hsi_dataset import RUN_STATES, synth_hsi_run_frames


def load_run_frames(paths: Sequence[Path | str], seed: int = 0, progress: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Frames of `synth_hsi_run_frames` files levelled as the run levels them: (images (N, 64, 64) in
    [-1.5, 1.5], one-hot labels (N, 7) over `RUN_STATES`, the state of each frame)."""
    from deepspm.controller.training import normalise_frames

    frames, states = [], []
    for p in paths:
        with np.load(p) as z:
            frames.append(z["frames"])
            states += [str(s) for s in z["states"]]
    raw = np.concatenate(frames)
    seeds = [derived_seed(seed, i) for i in range(len(raw))]
    images = normalise_frames(raw, np.zeros(len(raw), bool), seeds, progress=progress)
    labels = np.zeros((len(states), len(RUN_STATES)), np.float32)
    labels[np.arange(len(states)), [RUN_STATES.index(s) for s in states]] = 1.0
    return images, labels, states


def state_metrics(scores: np.ndarray, states: Sequence[str], threshold: float = 0.9) -> dict[str, Any]:
    """Per true state: how often the top output names it (top-1 accuracy) and how often its own output is above
    `threshold` (recall at the run's threshold); per output: precision at the threshold. The confusion of the
    top output is rows = true state, columns = top output, in `RUN_STATES` order."""
    truth = np.array([RUN_STATES.index(s) for s in states])
    top = scores.argmax(axis=1)
    k = len(RUN_STATES)
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (truth, top), 1)
    per_state = {}
    for i, name in enumerate(RUN_STATES):
        mine = truth == i
        above = scores[:, i] > threshold
        per_state[name] = {
            "n": int(mine.sum()),
            "top1_recall": float((top[mine] == i).mean()) if mine.any() else None,
            "recall_at_threshold": float(above[mine].mean()) if mine.any() else None,
            "precision_at_threshold": float(mine[above].mean()) if above.any() else None,
        }
    return {"n": len(states), "threshold": threshold, "top1_accuracy": float((top == truth).mean()),
            "per_state": per_state, "confusion_top1": confusion.tolist(), "states": list(RUN_STATES)}


def choose_thresholds(scores: np.ndarray, states: Sequence[str], precision: float = 0.95, min_above: int = 5,
                      grid: np.ndarray | None = None) -> dict[str, float | None]:
    """Per state, the lowest threshold (0.05..0.95 in steps of 0.01) above which at least `min_above` frames are
    and at least `precision` of them truly show that state; None where no threshold reaches it (the state
    cannot be targeted with this net). A sigmoid per state trained on one-hot labels is under-confident where
    states look alike, so one threshold for all (0.9) would leave most states unreachable."""
    truth = np.array([RUN_STATES.index(s) for s in states])
    grid = np.round(np.arange(0.05, 0.955, 0.01), 2) if grid is None else grid
    out: dict[str, float | None] = {}
    for i, name in enumerate(RUN_STATES):
        out[name] = None
        for t in grid:
            above = scores[:, i] > t
            if above.sum() >= min_above and (truth[above] == i).mean() >= precision:
                out[name] = float(t)
                break
    return out


def thresholds_command(checkpoint: Path | str, data: Sequence[Path | str], *, seed: int = 0, precision: float = 0.95,
                       progress: bool = True) -> dict[str, Any]:
    """Choose the per-state thresholds on the first half of `data`'s frames, measure them on the second half, and
    write them into the checkpoint's metadata (`thresholds`: what `--target-state` compares p(state) with)."""
    from deepspm.nets.checkpoint_info import META_FILE
    from deepspm.nets.checkpoints import load_net
    from deepspm.nets.inference import Predictor

    loaded = load_net(checkpoint, expect_kind="classifier")
    images, _, states = load_run_frames(data, seed, progress)
    scores = Predictor(loaded.net, loaded.variables, "probability").predict_batched(images)
    half = len(states) // 2
    chosen = choose_thresholds(scores[:half], states[:half], precision)
    truth = np.array([RUN_STATES.index(s) for s in states[half:]])
    measured: dict[str, Any] = {}
    for i, name in enumerate(RUN_STATES):
        t = chosen[name]
        if t is None:
            measured[name] = None
            continue
        above = scores[half:, i] > t
        mine = truth == i
        measured[name] = {"threshold": t, "precision": float(mine[above].mean()) if above.any() else None,
                          "recall": float(above[mine].mean()) if mine.any() else None, "n": int(mine.sum())}
    meta_file = Path(checkpoint) / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["metadata"]["thresholds"] = chosen
    meta["metadata"]["thresholds_how"] = {"data": [str(p) for p in data], "seed": seed, "precision": precision,
                                          "chosen_on": f"frames 0..{half - 1}", "measured_on": f"frames {half}..",
                                          "measured": measured}
    meta_file.write_text(json.dumps(meta))
    for name, m in measured.items():
        print(f"{name:<11} " + ("no threshold reaches precision " + f"{precision:g}" if m is None else
                                f"threshold {m['threshold']:.2f}: precision {m['precision']:.3f}, recall "
                                f"{m['recall']:.3f} on {m['n']} held-out frames"))
    return {"thresholds": chosen, "measured": measured}


def format_state_metrics(m: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "  -  " if x is None else f"{x:.3f}"

    lines = [f"top-1 accuracy {m['top1_accuracy']:.3f} on {m['n']} frames; at threshold {m['threshold']}:",
             f"{'state':<11} {'n':>5} {'top1 rec':>8} {'rec@thr':>8} {'prec@thr':>8}"]
    for name, s in m["per_state"].items():
        lines.append(f"{name:<11} {s['n']:>5} {f(s['top1_recall']):>8} {f(s['recall_at_threshold']):>8} "
                     f"{f(s['precision_at_threshold']):>8}")
    return "\n".join(lines)


def train_states_command(data: Sequence[Path | str], out: Path | str, *, preset: str = "tiny", epochs: int = 12,
                         seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the tip-state classifier on run frames and save it (kind "classifier", `class_names` = the states)."""
    from deepspm.nets.checkpoints import save_net
    from deepspm.nets.classifier import ClassifierConfig, train_classifier

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    images, labels, states = load_run_frames(data, seed, progress)
    config = ClassifierConfig(keep="best", dihedral=False)
    start = time.perf_counter()
    result = train_classifier(images, labels, preset, epochs, seed, config=config, class_names=RUN_STATES,
                              progress=progress)
    seconds = time.perf_counter() - start
    val = result.val_indices
    scores = result.predictor().predict_batched(images[val])
    metrics = state_metrics(scores, [states[i] for i in val], config.threshold)
    summary = {
        "kind": "classifier", "class_names": list(RUN_STATES), "target_states": list(RUN_STATES),
        "options": {"preset": preset, "epochs": epochs, "seed": seed, "keep": "best", "labels": "one-hot tip state",
                    "levelling": "run RANSAC, seed derived_seed(seed, row)"},
        "data": {"paths": [str(p) for p in data], "n": len(states), "class_names": list(RUN_STATES),
                 "counts": {s: states.count(s) for s in RUN_STATES}},
        "n_train": int(result.train_indices.size), "n_val": int(val.size), "epoch": result.epoch,
        "train_seconds": round(seconds, 1), "validation": metrics, "multilabel_metrics": result.metrics,
    }
    save_net(out, result.net, result.variables, kind="classifier", overwrite=overwrite, metadata=summary)
    (out / "metrics.json").write_text(json.dumps({**summary, "history": result.history}, indent=2) + "\n")
    print(f"tip-state classifier ({preset}, {len(RUN_STATES)} states) trained in {seconds:.0f} s, kept epoch "
          f"{result.epoch}; validation:")
    print(format_state_metrics(metrics))
    return summary


def evaluate_states_command(checkpoint: Path | str, data: Sequence[Path | str], *, seed: int = 0,
                            threshold: float = 0.9, progress: bool = True) -> dict[str, Any]:
    from deepspm.nets.checkpoints import load_net
    from deepspm.nets.inference import Predictor

    loaded = load_net(checkpoint, expect_kind="classifier")
    images, _, states = load_run_frames(data, seed, progress)
    scores = Predictor(loaded.net, loaded.variables, "probability").predict_batched(images)
    metrics = state_metrics(scores, states, threshold)
    print(format_state_metrics(metrics))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepspm.controller.hsi_states", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="simulated H:Si run frames with their true tip states (.npz)")
    s.add_argument("--n", type=int, required=True, help="number of frames")
    s.add_argument("--seed", type=int, default=0, help="simulator seed")
    s.add_argument("--out", type=Path, required=True, help=".npz to write")
    t = sub.add_parser("train", help="train the tip-state classifier")
    t.add_argument("--data", type=Path, nargs="+", required=True, help=".npz files of `synth`")
    t.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    t.add_argument("--preset", default="tiny", help="net preset (default tiny)")
    t.add_argument("--epochs", type=int, default=12, help="epochs (default 12)")
    t.add_argument("--seed", type=int, default=0, help="split, levelling and weights seed")
    t.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    h = sub.add_parser("thresholds", help="choose per-state thresholds (precision >= 0.95) into the checkpoint")
    h.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (its metadata is updated)")
    h.add_argument("--data", type=Path, nargs="+", required=True, help=".npz files of `synth` (unseen in training)")
    h.add_argument("--seed", type=int, default=0, help="levelling seed")
    h.add_argument("--precision", type=float, default=0.95, help="precision each threshold must reach")
    e = sub.add_parser("evaluate", help="per-state metrics of a checkpoint on `synth` frames")
    e.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    e.add_argument("--data", type=Path, nargs="+", required=True, help=".npz files of `synth`")
    e.add_argument("--seed", type=int, default=0, help="levelling seed")
    e.add_argument("--json", type=Path, help="also write the metrics as JSON")
    args = parser.parse_args(argv)
    if args.command == "synth":
        print(f"wrote {synth_hsi_run_frames(args.n, args.out, args.seed)}")
    elif args.command == "thresholds":
        thresholds_command(args.checkpoint, args.data, seed=args.seed, precision=args.precision)
    elif args.command == "train":
        train_states_command(args.data, args.out, preset=args.preset, epochs=args.epochs, seed=args.seed,
                             overwrite=args.overwrite)
    else:
        metrics = evaluate_states_command(args.checkpoint, args.data, seed=args.seed)
        if args.json:
            args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # the levelling pool spawns workers that import this module
    raise SystemExit(main())
