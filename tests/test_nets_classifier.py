"""Classifier training, losses and metrics (deepspm.nets.classifier / losses / metrics)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepspm.nets.classifier import (
    ClassifierConfig,
    evaluate,
    make_train_step,
    mean_loss,
    stratified_split,
    train_classifier,
)
from deepspm.nets.inference import TraceCounter
from deepspm.nets.losses import l2_on_kernels, random_flips, weighted_sigmoid_cross_entropy
from deepspm.nets.metrics import binary_metrics, format_metrics, multilabel_metrics
from deepspm.nets.model import NetDef
from tests.toy_data import toy_set


def test_weighted_cross_entropy_weights_good_samples() -> None:
    logits = jnp.array([0.3, -0.2])
    plain = np.asarray(optax.sigmoid_binary_cross_entropy(logits, jnp.array([1.0, 0.0])))
    loss = float(weighted_sigmoid_cross_entropy(logits, jnp.array([1.0, 0.0]), 8.0))
    assert loss == pytest.approx((8 * plain[0] + plain[1]) / 2, rel=1e-6)


def test_l2_covers_kernels_only() -> None:
    net = NetDef.of("tiny", 1)
    variables = net.init(jax.random.key(0))
    expected = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables.params):
        if "kernel" in jax.tree_util.keystr(path):
            expected += 0.5 * float(jnp.sum(leaf**2))
    assert float(l2_on_kernels(variables.params)) == pytest.approx(expected, rel=1e-5)
    bumped = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 1.0 if "kernel" not in jax.tree_util.keystr(p) else v, variables.params
    )
    assert float(l2_on_kernels(bumped)) == pytest.approx(expected, rel=1e-5)  # BN and biases ignored


def test_random_flips_are_independent_per_image() -> None:
    base = jnp.arange(16.0).reshape(1, 4, 4, 1)
    batch = jnp.tile(base, (64, 1, 1, 1))
    flipped = np.asarray(random_flips(batch, jax.random.key(0)))
    variants = {
        "id": base[0], "lr": base[0, :, ::-1], "ud": base[0, ::-1, :], "both": base[0, ::-1, ::-1],
    }
    seen = set()
    for image in flipped:
        matches = [name for name, v in variants.items() if np.array_equal(image, np.asarray(v))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(variants)


def test_a_training_step_reduces_the_loss_on_a_fixed_batch() -> None:
    net = NetDef.of("tiny", 1)
    config = ClassifierConfig(flips=False)  # the same batch in and out of the step
    variables = net.init(jax.random.key(0))
    optimizer = optax.adam(config.learning_rate)
    opt_state = optimizer.init(variables.params)
    traces = TraceCounter()
    step = make_train_step(net, optimizer, config, traces, donate=False)
    x, y = toy_set(32, seed=1)
    x4, yf = x[..., None], y.astype(np.float32)
    key = jax.random.key(7)
    _, dropout_key = jax.random.split(key)  # the step's own split: same dropout mask when re-evaluated

    stepped, opt_state, loss = step(variables, opt_state, x4, yf, key)
    assert float(loss) == pytest.approx(mean_loss(net, variables, x, y, config, dropout_key), rel=1e-4)
    assert mean_loss(net, stepped, x, y, config, dropout_key) < float(loss)

    trained = stepped
    for i in range(20):
        trained, opt_state, loss = step(trained, opt_state, x4, yf, jax.random.key(i))
    assert traces["train_step"] == 1  # one shape, one trace
    before = mean_loss(net, variables, x, y, config, dropout_key)
    assert mean_loss(net, trained, x, y, config, dropout_key) < 0.7 * before
    # the running statistics moved towards the batch statistics (momentum 0.9)
    stats_before = np.asarray(variables.batch_stats["convs"][0]["bn"]["var"][...])
    stats_after = np.asarray(trained.batch_stats["convs"][0]["bn"]["var"][...])
    assert not np.allclose(stats_before, stats_after)


def test_stratified_split_is_seeded_and_keeps_class_shares() -> None:
    labels = np.array([1] * 40 + [0] * 160)
    train, val = stratified_split(labels, 0.25, seed=3)
    assert len(val) == 50 and labels[val].sum() == 10
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == 200
    again_train, again_val = stratified_split(labels, 0.25, seed=3)
    assert np.array_equal(val, again_val)
    assert not np.array_equal(val, stratified_split(labels, 0.25, seed=4)[1])


def test_binary_metrics_against_a_hand_count() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    scores = np.array([0.95, 0.92, 0.6, 0.1, 0.91, 0.3, 0.2, 0.4])
    m = binary_metrics(labels, scores)
    # at 0.9: predicted good = {0, 1, 4}; TP 2, FP 1, FN 2, TN 3
    assert m["confusion_matrix"] == [[3, 1], [2, 2]]
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(5 / 8) and m["specificity"] == pytest.approx(0.75)
    assert m["at_0.5"]["confusion_matrix"] == [[3, 1], [1, 3]]
    # AUC: pairs (good, bad) ranked correctly: 14 of 16
    assert m["roc_auc"] == pytest.approx(14 / 16)
    assert m["roc_best"]["recall"] >= 0.5
    json.dumps(m)
    assert "auc=0.875" in format_metrics(m)
    assert binary_metrics([1, 1], [0.9, 0.95])["roc_auc"] is None  # one class only


def test_multilabel_metrics_per_class() -> None:
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6], [0.2, 0.1]])
    m = multilabel_metrics(labels, scores, ["a", "b"])
    assert m["per_class"]["a"]["roc_auc"] == 1.0 and m["macro_roc_auc"] == 1.0
    assert m["exact_match"] == 1.0
    assert "macro AUC=1.000" in format_metrics(m)


def test_train_classifier_learns_a_toy_task_deterministically() -> None:
    x, y = toy_set(240, seed=2)
    config = ClassifierConfig(batch_size=32, val_fraction=0.25)
    result = train_classifier(x, y, "tiny", epochs=4, seed=5, config=config, progress=False)
    assert result.traces["train_step"] == 1
    assert result.metrics["roc_auc"] > 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.metrics["n"] == len(result.val_indices) == 60
    summary = result.summary()
    assert json.loads(json.dumps(summary))["preset"] == "tiny"
    # evaluate() on the same validation images agrees with the recorded metrics
    again = evaluate(result.predictor(), x[result.val_indices], y[result.val_indices])
    assert again["roc_auc"] == pytest.approx(result.metrics["roc_auc"])
    # same seed, same weights
    repeat = train_classifier(x, y, "tiny", epochs=4, seed=5, config=config, progress=False)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), repeat.variables, result.variables)
    assert all(jax.tree.leaves(same))


def test_train_classifier_multilabel_head() -> None:
    x, y = toy_set(96, seed=3)
    multi = np.stack([y, 1 - y, np.zeros_like(y)], axis=1)  # a class that never occurs has no AUC
    result = train_classifier(x, multi, "tiny", epochs=1, seed=0, config=ClassifierConfig(batch_size=32),
                              class_names=["good", "bad", "never"], progress=False)
    assert result.net.n_outputs == 3
    assert set(result.metrics["per_class"]) == {"good", "bad", "never"}
    assert result.metrics["per_class"]["never"]["roc_auc"] is None


def test_train_classifier_rejects_mismatched_inputs() -> None:
    x, y = toy_set(10, seed=0)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(x, y[:5], "tiny", epochs=1, seed=0, progress=False)
    x[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_classifier(x, y, "tiny", epochs=1, seed=0, progress=False)


def test_keep_best_returns_the_weights_of_the_best_validation_epoch() -> None:
    x, y = toy_set(240, seed=2)
    config = ClassifierConfig(batch_size=32, val_fraction=0.25, keep="best")
    result = train_classifier(x, y, "tiny", epochs=6, seed=5, config=config, progress=False)
    aucs = [h["val"]["roc_auc"] for h in result.history]
    assert result.epoch == aucs.index(max(aucs)) + 1 == 3  # the earliest of the tied best epochs
    kept, last = result.history[2]["val"], result.history[-1]["val"]
    # the scores of the kept weights: the ROC point closest to (0, 1) sits at a score unique to each epoch
    assert kept["roc_best"]["threshold"] != last["roc_best"]["threshold"]
    assert result.metrics == kept and result.summary()["epoch"] == 3
    again = evaluate(result.predictor(), x[result.val_indices], y[result.val_indices])
    assert again["roc_best"]["threshold"] == pytest.approx(kept["roc_best"]["threshold"], rel=1e-5)
    assert again["confusion_matrix"] == kept["confusion_matrix"]
    assert train_classifier(x, y, "tiny", epochs=6, seed=5, config=ClassifierConfig(batch_size=32, val_fraction=0.25),
                            progress=False).epoch == 6


def test_keep_is_checked() -> None:
    with pytest.raises(ValueError, match="keep must be one of last, best"):
        ClassifierConfig(keep="first")
    x, y = toy_set(20, seed=0)
    with pytest.raises(ValueError, match="needs a validation split"):
        train_classifier(x, y, "tiny", epochs=1, seed=0, config=ClassifierConfig(val_fraction=0.0, keep="best"),
                         progress=False)
