"""Tip-state classifiers beyond one number: ensembles, calibration and the good/bad view of a six-class model.

- `train_ensemble_command` (behind `deepspm train classifier --ensemble K`): K members into ONE checkpoint,
  evaluated on a hold-out no member saw; the metadata lists the members, their seeds and the combination rule.
- `evaluation_extras`: what `deepspm evaluate classifier` adds to the metrics: the expected calibration error
  (`nets.metrics.calibration`: 10 equal-width bins) for the binary output or each class and all classes, and
  for a six-class H:Si(100) model the binary good/bad view derived from its outputs
  (`nets.data.BINARY_FROM_MULTICLASS_RULE`) on the rows that have a binary label, and the four categories of
  Gordon et al. 2020 (`nets.data.four_categories`).
- `reliability_diagram`: the PNG (observed frequency against mean predicted probability per bin).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepspm.io.atomic import save_figure
from deepspm.nets.data import (
    BINARY_FROM_MULTICLASS_RULE,
    GORDON2020_CATEGORIES,
    HSI100_CATEGORIES,
    HSI100_HOLDOUT_FRACTION,
    binary_from_multiclass,
    four_categories,
    hsi100_holdout_rows,
    load_hsi100_npz,
)
from deepspm.nets.metrics import (
    CALIBRATION_BINS,
    DEFAULT_THRESHOLD,
    binary_metrics,
    format_metrics,
    multilabel_metrics,
    with_calibration,
)

RELIABILITY_PNG = "reliability.png"


def derived_binary_rows(path: Path | str, min_responses: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of the H:Si(100) set loaded in multi-class mode: (positions among `rows` that have a binary
    good/bad label, those labels)."""
    multi = load_hsi100_npz(path, mode="multiclass", min_responses=min_responses)
    binary = load_hsi100_npz(path, mode="binary", min_responses=min_responses)
    label_of = dict(zip(binary.indices.tolist(), binary.labels.tolist()))
    npz_rows = multi.indices[np.asarray(rows, dtype=int)]
    positions = np.array([i for i, r in enumerate(npz_rows.tolist()) if r in label_of], dtype=int)
    labels = np.array([label_of[r] for r in npz_rows[positions].tolist()], dtype=np.int64)
    return positions, labels


def evaluation_extras(
    metrics: dict[str, Any], labels: np.ndarray, scores: np.ndarray, *, class_names: Sequence[str] | None,
    threshold: float, paths: Sequence[Path | str], rows: np.ndarray, min_responses: int,
) -> dict[str, Any]:
    """`metrics` with calibration added; for a six-class H:Si(100) model read from one .npz, also `binary`
    (good/bad derived from the outputs, with calibration) and `four_categories` (Gordon et al. 2020)."""
    out = with_calibration(metrics, labels, scores)
    six = labels.ndim == 2 and class_names is not None and tuple(class_names) == HSI100_CATEGORIES
    if six:
        out["four_categories"] = multilabel_metrics(four_categories(labels), four_categories(scores),
                                                    list(GORDON2020_CATEGORIES), threshold)
        if len(paths) == 1 and Path(paths[0]).suffix == ".npz":
            positions, binary_labels = derived_binary_rows(paths[0], min_responses, rows)
            if positions.size:
                p_good = binary_from_multiclass(scores[positions])
                out["binary"] = {"rule": BINARY_FROM_MULTICLASS_RULE, "metrics": with_calibration(
                    binary_metrics(binary_labels, p_good, threshold), binary_labels, p_good)}
    return out


def _curves(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, calibration) of every output to draw: the binary one, or all classes then each class."""
    curves = []
    if "per_class" in metrics:
        curves.append(("all classes", metrics["calibration"]))
        curves += [(name, m["calibration"]) for name, m in metrics["per_class"].items() if "calibration" in m]
        if "binary" in metrics:
            curves.append(("good vs bad (derived)", metrics["binary"]["metrics"]["calibration"]))
    elif "calibration" in metrics:
        curves.append(("good vs bad", metrics["calibration"]))
    return curves


def reliability_diagram(metrics: dict[str, Any], path: Path | str, title: str = "") -> Path:
    """Write a reliability diagram PNG (one panel per output: observed frequency of the positive label
    against the mean predicted probability of each non-empty bin, the diagonal, and the bin counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(metrics)
    if not curves:
        raise ValueError("the metrics hold no calibration to draw")
    cols = min(4, len(curves))
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(curves):]:
        ax.axis("off")
    for ax, (name, cal) in zip(axes.ravel(), curves):
        bins = cal["bins"]
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        ax.bar([b["low"] for b in bins], [b["frequency"] for b in bins], width=1.0 / cal["n_bins"], align="edge",
               alpha=0.35, edgecolor="C0")
        ax.plot([b["mean_score"] for b in bins], [b["frequency"] for b in bins], "o-", color="C0", ms=3)
        for b in bins:
            ax.annotate(str(b["n"]), (b["low"] + 0.5 / cal["n_bins"], 0.02), ha="center", fontsize=6, color="0.3")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency",
               title=f"{name}\nECE {cal['ece']:.3f} (n={cal['n']}, {cal['n_bins']} bins)")
        ax.title.set_fontsize(8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


def print_extras(metrics: dict[str, Any]) -> None:
    """The lines `evaluate` adds: ECE and, for six classes, the four categories (the binary view is part of
    `format_metrics`)."""
    if "per_class" not in metrics and "calibration" in metrics:
        cal = metrics["calibration"]
        print(f"calibration: ECE {cal['ece']:.3f}, MCE {cal['mce']:.3f} ({cal['n_bins']} equal-width bins, n={cal['n']})")
    if "four_categories" in metrics:
        m = metrics["four_categories"]
        print(f"four categories (Gordon et al. 2020): macro AUC {_num(m['macro_roc_auc'])}, macro F1 {m['macro_f1']:.3f}")
        for name, c in m["per_class"].items():
            auc = "n/a" if c["roc_auc"] is None else f"{c['roc_auc']:.3f}"
            print(f"  {name:<20} prec={c['precision']:.3f} rec={c['recall']:.3f} auc={auc}")


def train_ensemble_command(
    data: Sequence[Path | str], out: Path | str, *, k: int, combine: str = "mean", holdout_fraction: float = 0.2,
    preset: str = "compact", epochs: int = 20, seed: int = 0, val_fraction: float = 0.24, batch_size: int = 64,
    learning_rate: float = 1e-3, l2: float = 5e-5, good_weight: float = 8.0, threshold: float = DEFAULT_THRESHOLD,
    multiclass: bool = False, min_responses: int = 1, keep: str = "last", overwrite: bool = False,
    progress: bool = True, plots: Path | str | None = None, dihedral: bool = False, crop_min_scale: float = 1.0,
    lr_schedule: str = "constant", fixed_holdout: bool = False, recipe: dict[str, Any] | None = None,
    prior_correction: bool = False,
) -> dict[str, Any]:
    """Train an ensemble of `k` members into one checkpoint `out` (kind "classifier", metadata `ensemble`).

    A seeded stratified hold-out of `holdout_fraction` is carved first (with `fixed_holdout` and the H:Si(100)
    .npz alone: the set's fixed hold-out, `nets.data.hsi100_holdout_rows`, the same images in the binary and the
    six-class view, whatever the seed); member i trains with seed `seed + i` on the other rows, split again by
    its own seed (`val_fraction`) for its validation. The hold-out rows are written to `out/split.json` (so
    `evaluate --split` measures exactly them); `out/metrics.json` holds the ensemble's and each member's hold-out
    metrics (calibration included). `dihedral`, `crop_min_scale`, `lr_schedule`, `prior_correction`:
    `nets.classifier.ClassifierConfig`.
    `recipe`: the recipe record (`controller.recipes.record`) for the metadata.
    """
    from deepspm.controller.training import METRICS_FILE, _write_json, load_labelled_sets
    from deepspm.nets.checkpoints import save_net
    from deepspm.nets.classifier import ClassifierConfig
    from deepspm.nets.classifier import evaluate as evaluate_predictor
    from deepspm.nets.ensemble import train_ensemble
    from deepspm.nets.inference import Predictor

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    images, labels, info = load_labelled_sets(list(data), multiclass=multiclass, min_responses=min_responses,
                                              seed=seed, progress=progress)
    config = ClassifierConfig(batch_size=batch_size, learning_rate=learning_rate, l2=l2, good_weight=good_weight,
                              val_fraction=val_fraction, threshold=threshold, keep=keep, dihedral=dihedral,
                              crop_min_scale=crop_min_scale, lr_schedule=lr_schedule,
                              prior_correction=prior_correction)
    holdout_rows = None
    if fixed_holdout and len(data) == 1 and Path(data[0]).suffix == ".npz":
        kept = load_hsi100_npz(data[0], mode="multiclass" if multiclass else "binary",
                               min_responses=min_responses).indices
        holdout_rows = np.flatnonzero(np.isin(kept, hsi100_holdout_rows(data[0])))
        holdout_fraction = HSI100_HOLDOUT_FRACTION
    start = time.perf_counter()
    result = train_ensemble(images, labels, preset, epochs, seed, k, holdout_fraction=holdout_fraction,
                            combine=combine, config=config, class_names=info["class_names"], progress=progress,
                            holdout_indices=holdout_rows)
    seconds = time.perf_counter() - start
    holdout = result.holdout_indices
    extras = {"class_names": info["class_names"], "threshold": threshold, "paths": list(data), "rows": holdout,
              "min_responses": min_responses}

    def measured(predictor: Predictor) -> dict[str, Any]:
        scores = predictor.predict_batched(images[holdout])
        metrics = evaluate_predictor(predictor, images[holdout], labels[holdout], threshold, info["class_names"])
        return evaluation_extras(metrics, labels[holdout], scores, **extras)

    metrics = measured(Predictor(result.net, result.variables, "probability")) if holdout.size else {}
    member_metrics = [measured(m.predictor()) for m in result.members] if holdout.size else []
    summary = {
        "kind": "classifier", "ensemble": result.summary(),
        "options": {"preset": preset, "epochs": epochs, "seed": seed, "k": k, "combine": combine,
                    "holdout_fraction": holdout_fraction, "val_fraction": val_fraction, "batch_size": batch_size,
                    "learning_rate": learning_rate, "l2": l2, "good_weight": good_weight, "threshold": threshold,
                    "multiclass": multiclass, "min_responses": min_responses, "keep": keep, "dihedral": dihedral,
                    "crop_min_scale": crop_min_scale, "lr_schedule": lr_schedule,
                    "prior_correction": prior_correction,
                    "holdout": "hsi100_fixed" if holdout_rows is not None else "seeded"},
        "recipe": recipe,
        "data": {k_: v for k_, v in info.items() if k_ != "kinds"}, "n_holdout": int(holdout.size),
        "train_seconds": round(seconds, 1), "metrics": metrics,
        "member_metrics": member_metrics,
    }
    light = {key: value for key, value in summary.items() if key != "member_metrics"}
    save_net(out, result.net, result.variables, kind="classifier", overwrite=overwrite, metadata=light)
    _write_json(out / METRICS_FILE, summary)
    _write_json(out / "split.json", {"val_indices": holdout.tolist(), "data": [str(p) for p in data]})
    print(f"ensemble of {k} {preset} classifiers (seeds {result.seeds}, combined by {combine}) trained in "
          f"{seconds:.0f} s; hold-out of {holdout.size} rows that no member saw:")
    if metrics:
        print(format_metrics(metrics))
        print_extras(metrics)
        for s, m in zip(result.seeds, member_metrics):
            print(f"  member seed {s}: {_headline(m)}")
        if plots is not None:
            print(f"reliability diagram: {reliability_diagram(metrics, Path(plots) / RELIABILITY_PNG, str(out))}")
    print(f"saved {out}")
    return summary


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _headline(m: dict[str, Any]) -> str:
    """One line: macro AUC / F1 / ECE (multi-label) or precision / AUC / ECE (binary)."""
    if "per_class" in m:
        line = (f"macro AUC {_num(m['macro_roc_auc'])}, macro F1 {m['macro_f1']:.3f}, "
                f"ECE {m['calibration']['ece']:.3f}")
        if "binary" in m:
            b = m["binary"]["metrics"]
            line += f"; derived good/bad: precision {b['precision']:.3f}, AUC {_num(b['roc_auc'])}"
        return line
    auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
    return f"precision {m['precision']:.3f}, AUC {auc}, ECE {m['calibration']['ece']:.3f}"


__all__ = ["CALIBRATION_BINS", "evaluation_extras", "reliability_diagram", "train_ensemble_command"]
