"""Training and evaluation workflows: the functions behind `deepspm dataset|train|evaluate`.

They compose the simulator (synthetic data), the controller's pre-processing and the nets. Every argument is a plain keyword
with a default where one makes sense, so the CLI maps options onto them one to one; every function prints a short
summary, shows a tqdm progress bar (`progress=False` silences it) and returns a JSON-able dict.

Data (`load_labelled`): a folder in the original DeepSPM layout (`good/`, `bad/` with raw heights in
metres; levelled by RANSAC exactly as the run loop does, one derived seed per file; `*Ransac.npy` files are
already levelled and are only normalised), our synthetic sets (the same layout, plus `labels.csv` naming
each frame's probe kind), or the real H:Si(100) `.npz` (already in the nets' range).

The agent is trained and evaluated in simulation by `agent_sim`, on the run's own plans.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from deepspm.controller.preprocess import Preprocessed, normalise, preprocess
from deepspm.controller.seeds import derived_seed
from deepspm.controller.tipstates import RELIABILITY_PNG, evaluation_extras, print_extras, reliability_diagram
from deepspm.nets.checkpoints import load_net, save_net
from deepspm.nets.classifier import ClassifierConfig, evaluate, train_classifier
from deepspm.nets.data import DataError, FolderDataset, NpzDataset, load_deepspm_folders, load_hsi100_npz
from deepspm.nets.ensemble import require_single
from deepspm.nets.inference import Predictor
from deepspm.nets.linewindow import DEFAULT_MIN_LINES, LINE_WINDOW_KEY, LineWindowSpec, is_line_window, mask_rows
from deepspm.nets.metrics import DEFAULT_THRESHOLD, binary_metrics, format_metrics
from deepspm.simulator.dataset import gallery, synth_dataset

METRICS_FILE = "metrics.json"
_POOL_MIN_FRAMES = 256  # below this, levelling in-process beats starting worker processes (~4 s each)


# --- labelled data -----------------------------------------------------------------------------------------


def normalise_frames(
    frames_m: np.ndarray, levelled: np.ndarray, seeds: Sequence[int], *, workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Raw height frames (N, 64, 64) in metres -> float32 (N, 64, 64) in [-1.5, 1.5].

    Frames flagged `levelled` are only mapped (v = h / 1 Å - 1, clipped); the others get the run loop's
    RANSAC plane first, with `seeds[i]`. RANSAC is Python-bound (the GIL), so many frames are spread over a
    pool of `workers` processes (default: the CPU count); small sets, and `workers=1`, are levelled
    in-process. The workers are spawned, not forked (forking a process that runs JAX's threads can
    deadlock), so a script calling this must guard its entry point with `if __name__ == "__main__":`.
    """
    out = np.empty(frames_m.shape, np.float32)
    todo = np.flatnonzero(~np.asarray(levelled, bool))
    for i in np.flatnonzero(levelled):
        out[i] = normalise(frames_m[i])
    raw = (frames_m[i] for i in todo)
    todo_seeds = (int(seeds[int(i)]) for i in todo)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = tqdm(total=todo.size, desc="levelling frames (RANSAC)", unit="frame", disable=not progress)
    results: Iterator[Preprocessed]
    if workers == 1 or todo.size < _POOL_MIN_FRAMES:
        results = map(preprocess, raw, todo_seeds)
        pool = None
    else:  # spawned workers import only the light preprocess module (the pickled function's home)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(preprocess, raw, todo_seeds, chunksize=32)
    try:
        for i, result in zip(todo, results):
            out[i] = result.normalised
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return out


def _kinds_from_labels_csv(root: Path, paths: Sequence[Path]) -> list[str] | None:
    """The probe kind of each frame of a synthetic set (its `labels.csv`), or None for other folders."""
    table = root / "labels.csv"
    if not table.is_file():
        return None
    with open(table, newline="") as f:
        kind_of = {row["file"]: row["kind"] for row in csv.DictReader(f)}
    kinds = [kind_of.get(p.relative_to(root).as_posix()) for p in paths]
    return None if any(k is None for k in kinds) else [str(k) for k in kinds]


def read_hsi100_set(path: Path, multiclass: bool, min_responses: int) -> tuple[NpzDataset, dict[str, Any]]:
    """The H:Si(100) `.npz` set, binary or six-class, and its `info` (what was read: counts, class names)."""
    data = load_hsi100_npz(path, mode="multiclass" if multiclass else "binary", min_responses=min_responses)
    info: dict[str, Any] = {
        "kind": "hsi100_npz", "source": str(path), "n": len(data), "mode": "multiclass" if multiclass else "binary",
        "min_responses": min_responses, "class_names": list(data.categories) if multiclass else None,
    }
    if not multiclass:
        info.update(n_good=int(data.labels.sum()), n_bad=int(len(data) - data.labels.sum()))
    return data, info


def folder_set_info(path: Path, folder: FolderDataset, seed: int) -> dict[str, Any]:
    """`info` of a good/bad folder set: counts, the RANSAC seed, and each frame's probe kind (`kinds`)."""
    return {
        "kind": "folders", "source": str(path), "n": len(folder), "n_good": int(folder.labels.sum()),
        "n_bad": int(len(folder) - folder.labels.sum()), "n_levelled_files": int(folder.levelled.sum()),
        "ransac_seed": seed, "class_names": None, "kinds": _kinds_from_labels_csv(path, folder.paths),
    }


def load_labelled(
    path: Path | str, *, multiclass: bool = False, min_responses: int = 1, seed: int = 0,
    workers: int | None = None, progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read any supported labelled set as the nets' input: `(images float32 (N, 64, 64), labels, info)`.

    - a `.npz` file: the H:Si(100) tip-state set; binary labels (N,) 1 = good by default, `multiclass=True`
      for (N, 6) multi-hot labels over its categories; `min_responses` keeps images with that many votes.
    - a folder with `good/` and/or `bad/`: the original DeepSPM layout or our synthetic sets. Raw frames are
      levelled with RANSAC seeded by `derived_seed(seed, file path relative to the folder)`.
    `info` (JSON-able) says what was read: kind, source, counts, class names, and for synthetic sets the
    probe kind of every frame (`kinds`), which evaluations break the accuracy down by.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        data, info = read_hsi100_set(path, multiclass, min_responses)
        return data.images.astype(np.float32), data.labels, info
    if path.is_dir():
        if multiclass:
            raise DataError(f"{path}: a good/bad folder set has binary labels only")
        folder = load_deepspm_folders(path)
        seeds = [derived_seed(seed, p.relative_to(path).as_posix()) for p in folder.paths]
        images = normalise_frames(folder.images, folder.levelled, seeds, workers=workers, progress=progress)
        return images, folder.labels, folder_set_info(path, folder, seed)
    raise DataError(f"{path}: neither a .npz file nor a folder with good/ and bad/")


def load_labelled_sets(
    paths: Sequence[Path | str], **options: Any
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Several sets (same label layout) concatenated; `info["sets"]` holds each one's info."""
    if not paths:
        raise DataError("no data given")
    parts = [load_labelled(p, **options) for p in paths]
    shapes = {labels.shape[1:] for _, labels, _ in parts}
    if len(shapes) != 1:
        raise DataError("the data sets have different label layouts (binary vs multi-class)")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    kinds = [p[2].get("kinds") for p in parts]
    info = {
        "n": int(labels.shape[0]), "sets": [p[2] for p in parts], "class_names": parts[0][2]["class_names"],
        "kinds": [k for ks in kinds if ks is not None for k in ks] if all(k is not None for k in kinds) else None,
    }
    if labels.ndim == 1:
        info.update(n_good=int(labels.sum()), n_bad=int(labels.size - labels.sum()))
    return images, labels, info


def _without_kinds(info: dict[str, Any]) -> dict[str, Any]:
    """`info` for metadata and JSON: the per-frame kind lists are large and only needed in memory."""
    out = {k: v for k, v in info.items() if k != "kinds"}
    if "sets" in out:
        out["sets"] = [_without_kinds(s) for s in out["sets"]]
    return out


def accuracy_by_kind(kinds: Sequence[str], labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per probe kind of a synthetic set: how many frames, and the fraction classified correctly."""
    kinds_arr = np.asarray(kinds)
    correct = (scores > threshold) == (np.asarray(labels) == 1)
    return {
        str(kind): {"n": int((kinds_arr == kind).sum()), "accuracy": float(correct[kinds_arr == kind].mean())}
        for kind in sorted(set(kinds_arr.tolist()))
    }


# --- synthetic data sets -------------------------------------------------------------------------------------


def synth_dataset_command(
    out: Path | str, *, n: int = 4000, seed: int = 0, good_fraction: float = 0.25, progress: bool = True
) -> dict[str, Any]:
    """Write `n` simulated 64x64 frames (10 nm, raw metres) with ground-truth labels in the original layout
    (`out/good`, `out/bad`, `out/labels.csv`): `good_fraction` of them good (a quarter, as the paper's data),
    the bad ones spread evenly over the defect kinds."""
    if not 0.0 <= good_fraction <= 1.0:
        raise ValueError(f"good_fraction must be in [0, 1], got {good_fraction}")
    start = time.perf_counter()
    root = synth_dataset(n, out, seed, progress=progress, good_fraction=good_fraction)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = {
        "out": str(root), "n": len(rows), "seed": seed, "good_fraction": good_fraction,
        "kinds": {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"wrote {summary['n']} frames to {root} (seed {seed}): {summary['kinds']}")
    return summary


def gallery_command(dataset: Path | str, out_png: Path | str, *, n_per_class: int = 12, seed: int = 0) -> Path:
    """A PNG montage of a synthetic set's good and bad frames (levelled, -0.5 to 2.5 Å), labelled by kind."""
    path = gallery(dataset, out_png, n_per_class=n_per_class, seed=seed)
    print(f"wrote {path}")
    return path


# --- the classifier ------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def train_classifier_command(
    data: Sequence[Path | str], out: Path | str, *, preset: str = "compact", epochs: int = 20, seed: int = 0,
    val_fraction: float = 0.24, batch_size: int = 64, learning_rate: float = 1e-3, l2: float = 5e-5,
    good_weight: float = 8.0, threshold: float = DEFAULT_THRESHOLD, multiclass: bool = False,
    min_responses: int = 1, workers: int | None = None, overwrite: bool = False, progress: bool = True,
    keep: str = "last", init: Path | str | None = None, freeze_epochs: int | None = None, patience: int | None = None,
    finetune_learning_rate: float | None = None, max_train: int | None = None, lines: bool = False,
    min_lines: int = DEFAULT_MIN_LINES, dihedral: bool = False, crop_min_scale: float = 1.0,
    lr_schedule: str = "constant", recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a probe classifier (from scratch, or fine-tuned from `init`) and save it as a checkpoint directory
    `out` (kind "classifier").

    Fine-tuning (`init`: a classifier checkpoint directory, or "shipped" for the package's): the net and its
    preset are the checkpoint's; the small-data recipe defaults to the conv features frozen for
    `freeze_epochs` = 3 epochs, then every layer at `finetune_learning_rate` (default learning_rate), early
    stopping after `patience` = 5 epochs without a better validation ROC AUC, and the best epoch kept.
    `max_train` keeps at most that many training images (a stratified subset; the validation split is unchanged).

    data: one or more labelled sets (see `load_labelled`), concatenated. A seeded split stratified by label
    keeps `val_fraction` for validation (the paper's 24 %). Adam at `learning_rate`, L2 `l2` on kernels,
    good samples weighted `good_weight` (binary only), random flips, `epochs` passes of `batch_size`.
    `keep`: save the last epoch's weights, or ("best") those of the epoch with the best validation ROC AUC.
    Prints and returns the validation metrics (at `threshold`, at 0.5 and at the ROC point closest to
    (0, 1)); writes `out/metrics.json` (metrics, per-epoch history, data, options, split sizes) and
    `out/split.json` (the validation rows). The checkpoint's metadata repeats the options and the metrics.

    `lines`: train a line-window net (`deepspm.nets.linewindow`): random truncation to the first n rows, n uniform
    in `min_lines`..64 per image and step; the metadata says `{"lines": true, "line_window": {...}}`. Its
    validation metrics are on seeded random truncations; `by_lines` adds them at 8, 16, 32 and 64 visible lines
    (the validation images levelled as full frames, then masked; `evaluate --lines` re-levels each partial frame).

    `dihedral`, `crop_min_scale`, `lr_schedule`: augmentation and schedule (`ClassifierConfig`); `recipe`: the
    recipe record (`controller.recipes`) kept in the metadata and metrics.json.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    start_from = None
    if init is not None:
        from deepspm.controller.session import checkpoint_path

        ckpt = load_net(checkpoint_path(str(init), "classifier"), expect_kind="classifier")
        start_from = (require_single(ckpt.net, f"fine-tuning from {init}"), ckpt.variables)
        preset = ckpt.net.spec.name
        freeze_epochs = 3 if freeze_epochs is None else freeze_epochs
        patience = 5 if patience is None else patience
        keep = "best"
    options = {
        "preset": preset, "epochs": epochs, "seed": seed, "val_fraction": val_fraction, "batch_size": batch_size,
        "learning_rate": learning_rate, "l2": l2, "good_weight": good_weight, "threshold": threshold,
        "multiclass": multiclass, "min_responses": min_responses, "keep": keep,
        "init": None if init is None else str(init), "freeze_epochs": freeze_epochs or 0, "patience": patience or 0,
        "finetune_learning_rate": finetune_learning_rate, "max_train": max_train, "lines": lines,
        "min_lines": min_lines if lines else None, "dihedral": dihedral, "crop_min_scale": crop_min_scale,
        "lr_schedule": lr_schedule,
    }
    images, labels, info = load_labelled_sets(
        list(data), multiclass=multiclass, min_responses=min_responses, seed=seed, workers=workers, progress=progress
    )
    config = ClassifierConfig(batch_size=batch_size, learning_rate=learning_rate, l2=l2, good_weight=good_weight,
                              val_fraction=val_fraction, threshold=threshold, keep=keep,
                              freeze_epochs=freeze_epochs or 0, patience=patience or 0,
                              finetune_learning_rate=finetune_learning_rate, max_train=max_train,
                              line_window_min_lines=min_lines if lines else 0, dihedral=dihedral,
                              crop_min_scale=crop_min_scale, lr_schedule=lr_schedule)
    start = time.perf_counter()
    result = train_classifier(images, labels, preset, epochs, seed, config=config,
                              class_names=info["class_names"], progress=progress, init=start_from)
    seconds = time.perf_counter() - start
    metrics = result.metrics
    if info.get("kinds") is not None and labels.ndim == 1 and result.val_indices.size:
        val = result.val_indices
        scores = result.predictor().predict_batched(images[val], config.eval_batch_size)
        metrics = {**metrics, "by_kind": accuracy_by_kind([info["kinds"][i] for i in val], labels[val], scores, threshold)}
    by_lines = None
    if lines and labels.ndim == 1 and result.val_indices.size:
        predictor = result.predictor()
        by_lines = [{"lines": n, "metrics": binary_metrics(labels[result.val_indices], predictor.predict_batched(
            mask_rows(images[result.val_indices], n), config.eval_batch_size), threshold)} for n in (8, 16, 32, 64)]
    summary = {
        "kind": "classifier", "options": options, "data": _without_kinds(info), "n_train": int(result.train_indices.size),
        "n_val": int(result.val_indices.size), "train_seconds": round(seconds, 1), "epoch": result.epoch,
        "metrics": metrics, "history": result.history, **({"recipe": recipe} if recipe is not None else {}),
    }
    if lines:
        summary.update({LINE_WINDOW_KEY: True, "line_window": LineWindowSpec(min_lines=min_lines).to_dict(),
                        "by_lines": by_lines})
    save_net(out, result.net, result.variables, kind="classifier", overwrite=overwrite,
             metadata={k: v for k, v in summary.items() if k != "history"})
    _write_json(out / METRICS_FILE, summary)
    _write_json(out / "split.json", {"val_indices": result.val_indices.tolist(), "data": [str(p) for p in data]})
    origin = "from scratch" if init is None else f"fine-tuned from {init}"
    kind = f"line-window classifier (min {min_lines} lines)" if lines else "classifier"
    print(f"{kind} ({preset}, seed {seed}, {origin}) trained on {summary['n_train']} images in {seconds:.0f} s; "
          f"kept epoch {result.epoch} of {epochs} ({keep})"
          f"{'' if len(result.history) == epochs else f', stopped early after {len(result.history)}'}; "
          f"validation on {summary['n_val']}:")
    if metrics:
        print(format_metrics(metrics))
    if by_lines:
        print("by visible lines (validation frames levelled whole, then masked):")
        print(format_lines_table(by_lines))
    print(f"saved {out}")
    return summary


def evaluate_classifier_command(
    checkpoint: Path | str, data: Sequence[Path | str] | Path | str, *, out_json: Path | str | None = None,
    threshold: float = DEFAULT_THRESHOLD, multiclass: bool | None = None, min_responses: int = 1, seed: int = 0,
    split: Path | str | None = None, workers: int | None = None, progress: bool = True,
    lines: Sequence[int] | None = None, plots: Path | str | None = None,
) -> dict[str, Any]:
    """Metrics of a saved classifier on any labelled set(s), printed and returned (and written to `out_json`).

    Calibration (expected calibration error, `tipstates.evaluation_extras`) is added for every output; a
    six-class H:Si(100) model also gets its derived good/bad metrics and the four categories of Gordon et al.
    2020. `plots`: a folder for the reliability diagram (`reliability.png`). Ensemble checkpoints work as any.

    `multiclass=None` follows the checkpoint's head (one output: binary; several: multi-label). For
    synthetic sets the accuracy per probe kind is added (`by_kind`). Frames are levelled as in training
    (pass the training `seed` to get the very same frames). `split`: a training run's `split.json`, to
    evaluate only its validation rows (the same data, options and order as in training are needed).

    `lines` (a list of visible-line counts N): one evaluation each, with only rows 0..N-1 of every image
    visible (the rest NaN, as a partial `Scan.FrameDataGrab` returns them), levelled from those rows
    (`controller.partial_data`); the summary's `by_lines` holds one metrics dict per N. Any classifier works:
    a full-frame one is the comparison for a line-window one.
    """
    ckpt = load_net(checkpoint, expect_kind="classifier")
    if multiclass is None:
        multiclass = ckpt.net.n_outputs > 1
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if lines:
        return _evaluate_by_lines(ckpt, checkpoint, paths, list(lines), out_json=out_json, threshold=threshold,
                                  multiclass=multiclass, min_responses=min_responses, seed=seed, split=split,
                                  workers=workers, progress=progress, plots=plots)
    images, labels, info = load_labelled_sets(
        paths, multiclass=multiclass, min_responses=min_responses, seed=seed, workers=workers, progress=progress
    )
    rows = np.arange(labels.shape[0])
    if split is not None:
        rows = np.asarray(json.loads(Path(split).read_text())["val_indices"], dtype=int)
        if rows.size and rows.max() >= labels.shape[0]:
            raise DataError(f"{split} names row {rows.max()} but the data has {labels.shape[0]} images")
    images, labels = images[rows], labels[rows]
    predictor = Predictor(ckpt.net, ckpt.variables, "probability")
    metrics = evaluate(predictor, images, labels, threshold, info["class_names"])
    scores = predictor.predict_batched(images)
    metrics = evaluation_extras(metrics, labels, scores, class_names=info["class_names"], threshold=threshold,
                                paths=paths, rows=rows, min_responses=min_responses)
    if info.get("kinds") is not None and labels.ndim == 1:
        metrics["by_kind"] = accuracy_by_kind([info["kinds"][i] for i in rows], labels, scores, threshold)
    summary = {"kind": "classifier_evaluation", "checkpoint": str(checkpoint), "data": _without_kinds(info),
               "split": None if split is None else str(split), "metrics": metrics}
    print(f"classifier {checkpoint} on {', '.join(map(str, paths))}"
          f"{'' if split is None else f' (the {rows.size} validation rows of {split})'}:")
    print(format_metrics(metrics))
    print_extras(metrics)
    for kind, m in metrics.get("by_kind", {}).items():
        print(f"  {kind:<10} n={m['n']:<5} accuracy={m['accuracy']:.3f}")
    if plots is not None:
        print(f"reliability diagram: {reliability_diagram(metrics, Path(plots) / RELIABILITY_PNG, str(checkpoint))}")
    if out_json is not None:
        _write_json(Path(out_json), summary)
    return summary


def _split_rows(split: Path | str) -> np.ndarray:
    return np.asarray(json.loads(Path(split).read_text())["val_indices"], dtype=int)


def _evaluate_by_lines(
    ckpt: Any, checkpoint: Path | str, paths: list[Path | str], lines: list[int], *, out_json: Path | str | None,
    threshold: float, multiclass: bool, min_responses: int, seed: int, split: Path | str | None,
    workers: int | None, progress: bool, plots: Path | str | None = None,
) -> dict[str, Any]:
    """`evaluate_classifier_command` with `lines`: one metrics dict (and printed row) per visible-line count;
    with `plots`, one reliability diagram per count (`plots/lines-N/reliability.png`)."""
    from deepspm.controller.partial_data import load_partial_sets
    from deepspm.nets.classifier import evaluate as evaluate_predictor

    rows = None if split is None else _split_rows(split)
    by_n, labels, info = load_partial_sets(paths, lines, rows=rows, multiclass=multiclass,
                                           min_responses=min_responses, seed=seed, workers=workers, progress=progress)
    predictor = Predictor(ckpt.net, ckpt.variables, "probability")
    kept = np.arange(info["n"]) if rows is None else rows
    by_lines: list[dict[str, Any]] = []
    for n, images in by_n.items():  # the same metrics as a full-frame evaluation, per visible-line count
        metrics = evaluate_predictor(predictor, images, labels, threshold, info["class_names"])
        scores = predictor.predict_batched(images)
        metrics = evaluation_extras(metrics, labels, scores, class_names=info["class_names"], threshold=threshold,
                                    paths=paths, rows=kept, min_responses=min_responses)
        if info.get("kinds") is not None and labels.ndim == 1:
            metrics["by_kind"] = accuracy_by_kind(info["kinds"], labels, scores, threshold)
        by_lines.append({"lines": n, "metrics": metrics})
    summary = {"kind": "classifier_evaluation", "checkpoint": str(checkpoint), "data": _without_kinds(info),
               "split": None if split is None else str(split), "line_window_net": is_line_window(ckpt.metadata),
               "lines": [r["lines"] for r in by_lines], "by_lines": by_lines}
    kind = "line-window classifier" if summary["line_window_net"] else "full-frame classifier"
    print(f"{kind} {checkpoint} on {', '.join(map(str, paths))}"
          f"{'' if split is None else f' (the {labels.shape[0]} validation rows of {split})'}, "
          f"rows 0..N-1 visible:")
    print(format_lines_table(by_lines))
    if plots is not None:
        for row in by_lines:
            n = row["lines"]
            drawn = reliability_diagram(row["metrics"], Path(plots) / f"lines-{n}" / RELIABILITY_PNG,
                                        f"{checkpoint}, {n} lines")
            print(f"reliability diagram, {n} lines: {drawn}")
    if out_json is not None:
        _write_json(Path(out_json), summary)
    return summary


def format_lines_table(by_lines: Sequence[dict[str, Any]]) -> str:
    """One row per visible-line count: the binary metrics at the threshold, or the macro AUC (multi-label)."""
    out = []
    for row in by_lines:
        m = row["metrics"]
        if "per_class" in m:
            auc = m["macro_roc_auc"]
            out.append(f"  lines={row['lines']:<3} n={m['n']:<6} macro auc={'n/a' if auc is None else f'{auc:.3f}'} "
                       f"exact={m['exact_match']:.3f}")
            continue
        auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
        cm = m["confusion_matrix"]
        out.append(f"  lines={row['lines']:<3} n={m['n']:<6} acc={m['accuracy']:.3f} prec={m['precision']:.3f} "
                   f"rec={m['recall']:.3f} spec={m['specificity']:.3f} auc={auc} "
                   f"(t={m['threshold']:.2f}; TN FP / FN TP = {cm[0][0]} {cm[0][1]} / {cm[1][0]} {cm[1][1]})")
    return "\n".join(out)


__all__ = [
    "derived_seed", "load_labelled", "load_labelled_sets", "normalise_frames", "accuracy_by_kind",
    "synth_dataset_command", "gallery_command", "train_classifier_command", "evaluate_classifier_command",
]
