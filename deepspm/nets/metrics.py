"""Classifier metrics with scikit-learn, as JSON-able dicts (printed by the CLI and written as JSON).

Labels: 1 = good probe, 0 = bad probe; scores are p(good). The decision threshold of the controller is 0.9;
the original also reported 0.5 and the ROC point closest to (FPR 0, TPR 1), and so do we.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

DEFAULT_THRESHOLD = 0.9
CALIBRATION_BINS = 10
"""Equal-width probability bins on [0, 1] for the expected calibration error and the reliability diagram:
bin b holds the scores in [b/10, (b+1)/10) (the last bin includes 1.0)."""


def calibration(labels: Any, scores: Any, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Expected calibration error of probabilities `scores` for 0/1 `labels` (one output, or one class of a
    multi-label head, or all of its outputs flattened): ECE = sum over bins of (n_b / n) x |frequency of
    label 1 in b - mean score in b|, with `n_bins` equal-width bins (see `CALIBRATION_BINS`). Also the
    maximum gap (MCE) and, per non-empty bin, its range, count, mean score and observed frequency (the
    points of a reliability diagram)."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0 or not np.all(np.isfinite(scores))):
        raise ValueError("calibration needs probabilities in [0, 1]")
    index = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        if not count:
            continue
        confidence, frequency = float(scores[inside].mean()), float(labels[inside].mean())
        gap = abs(frequency - confidence)
        ece += count / scores.size * gap
        mce = max(mce, gap)
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "n": count,
                     "mean_score": confidence, "frequency": frequency})
    return {"n": int(scores.size), "n_bins": n_bins, "ece": float(ece), "mce": float(mce), "bins": bins}


def _at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    predicted = (scores > threshold).astype(int)
    (tn, fp), (fn, tp) = confusion_matrix(labels, predicted, labels=[0, 1])
    return {
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(labels, predicted)),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "npv": float(tn / (tn + fn)) if tn + fn else 0.0,
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],  # rows: true bad, good; cols: predicted
    }


def binary_metrics(labels: Any, scores: Any, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Accuracy, precision, recall, specificity, NPV, F1 and confusion matrix at `threshold` (top level), at
    0.5 (`at_0.5`) and at the ROC point closest to (0, 1) (`roc_best`); ROC AUC (None if one class only).

    A sample counts as predicted good when its score is strictly above the threshold.
    """
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    both_classes = 0 < labels.sum() < labels.size
    result: dict[str, Any] = {
        "n": int(labels.size),
        "n_good": int(labels.sum()),
        "n_bad": int(labels.size - labels.sum()),
        **_at_threshold(labels, scores, threshold),
        "roc_auc": float(roc_auc_score(labels, scores)) if both_classes else None,
        "at_0.5": _at_threshold(labels, scores, 0.5),
    }
    if both_classes:
        fpr, tpr, thresholds = roc_curve(labels, scores)
        best = int(np.argmin(fpr**2 + (1.0 - tpr) ** 2))
        # roc_curve predicts good for score >= t (t = inf: nothing); ours is strict, so step just below t.
        t = thresholds[best]
        result["roc_best"] = _at_threshold(labels, scores, float(np.nextafter(t, -np.inf)) if np.isfinite(t) else 1.0)
    return result


def multilabel_metrics(
    labels: Any, scores: Any, class_names: Sequence[str], threshold: float = 0.5
) -> dict[str, Any]:
    """Per-class `binary_metrics` (one-vs-rest) for a multi-label head, plus the macro-averaged ROC AUC."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 2 or labels.shape[1] != len(class_names):
        raise ValueError(f"labels {labels.shape}, scores {scores.shape} and {len(class_names)} class names disagree")
    per_class = {
        name: binary_metrics(labels[:, k], scores[:, k], threshold) for k, name in enumerate(class_names)
    }
    aucs = [m["roc_auc"] for m in per_class.values() if m["roc_auc"] is not None]
    return {
        "n": int(labels.shape[0]),
        "threshold": float(threshold),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "macro_precision": float(np.mean([m["precision"] for m in per_class.values()])),
        "macro_recall": float(np.mean([m["recall"] for m in per_class.values()])),
        "macro_f1": float(f1_score(labels, (scores > threshold).astype(int), average="macro", zero_division=0)),
        "exact_match": float(np.mean(np.all((scores > threshold) == (labels == 1), axis=1))),
        "per_class": per_class,
    }


def with_calibration(metrics: dict[str, Any], labels: Any, scores: Any, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """`metrics` (binary or multi-label) with `calibration` added: for a binary one at the top level, for a
    multi-label one per class and over all outputs flattened (`calibration` beside `per_class`)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    out = dict(metrics)
    if "per_class" in out:
        out["per_class"] = {name: {**m, "calibration": calibration(labels[:, k], scores[:, k], n_bins)}
                            for k, (name, m) in enumerate(out["per_class"].items())}
    out["calibration"] = calibration(labels, scores, n_bins)
    return out


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few human-readable lines (for the CLI) from a `binary_metrics` or `multilabel_metrics` dict."""

    def line(name: str, m: dict[str, Any]) -> str:
        auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
        cm = m["confusion_matrix"]
        ece = f" ece={m['calibration']['ece']:.3f}" if "calibration" in m else ""
        return (
            f"{name:<18} n={m['n']:<6} acc={m['accuracy']:.3f} prec={m['precision']:.3f} "
            f"rec={m['recall']:.3f} spec={m['specificity']:.3f} auc={auc}{ece} "
            f"(t={m['threshold']:.2f}; TN FP / FN TP = {cm[0][0]} {cm[0][1]} / {cm[1][0]} {cm[1][1]})"
        )

    if "per_class" in metrics:
        macro = metrics["macro_roc_auc"]
        head = f"multi-label: n={metrics['n']} macro AUC={'n/a' if macro is None else f'{macro:.3f}'}"
        if "macro_f1" in metrics:
            head += f" macro F1={metrics['macro_f1']:.3f}"
        if "calibration" in metrics:
            head += f" ECE (all outputs, {metrics['calibration']['n_bins']} bins)={metrics['calibration']['ece']:.3f}"
        lines = [head] + [line(name, m) for name, m in metrics["per_class"].items()]
        if "binary" in metrics:
            lines.append(f"good vs bad derived ({metrics['binary']['rule']}):")
            lines.append(format_metrics(metrics["binary"]["metrics"]))
        return "\n".join(lines)
    lines = [line("good vs bad", metrics)]
    if "at_0.5" in metrics:
        lines.append(line("  at 0.5", {**metrics["at_0.5"], "n": metrics["n"], "roc_auc": metrics["roc_auc"]}))
    return "\n".join(lines)
