"""Fine-tuning a classifier from a checkpoint: frozen features first, then all layers, early stopping, subsets."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from deepspm.nets.classifier import ClassifierConfig, stratified_subset, train_classifier
from deepspm.nets.model import NetDef


def _data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    images = rng.normal(size=(n, 64, 64)).astype(np.float32) * 0.2
    images[labels == 1, 20:44, 20:44] += 1.0  # a learnable difference
    return images, labels


def _leaves(params, group: str) -> list[np.ndarray]:
    return [np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if jax.tree_util.keystr(path).startswith(f"['{group}']")]


def test_frozen_epochs_leave_the_features_alone_and_then_everything_learns() -> None:
    images, labels = _data()
    net = NetDef.of("tiny", 1)
    start = net.init(jax.random.key(3))
    config = ClassifierConfig(batch_size=16, val_fraction=0.25, freeze_epochs=1, good_weight=1.0)
    frozen = train_classifier(images, labels, "tiny", 1, 0, config=config, progress=False, init=(net, start))
    for a, b in zip(_leaves(start.params, "convs"), _leaves(frozen.variables.params, "convs")):
        assert np.array_equal(a, b)  # no update reached the conv features
    pairs = zip(_leaves(start.params, "dense"), _leaves(frozen.variables.params, "dense"))
    assert any(not np.array_equal(a, b) for a, b in pairs)
    assert frozen.history[0]["frozen_features"] is True
    both = train_classifier(images, labels, "tiny", 2, 0, config=config, progress=False, init=(net, start))
    assert both.history[1]["frozen_features"] is False
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(start.params, "convs"), _leaves(both.variables.params, "convs")))
    # the caller's weights were not consumed by the donating train step
    assert np.isfinite(np.asarray(_leaves(start.params, "convs")[0])).all()


def test_early_stopping_keeps_the_best_epoch() -> None:
    images, labels = _data()
    config = ClassifierConfig(batch_size=16, val_fraction=0.25, patience=1, learning_rate=0.0, good_weight=1.0)
    result = train_classifier(images, labels, "tiny", 6, 0, config=config, progress=False)
    # lr 0: nothing improves after the first epoch, so it stops after patience epochs, keeping epoch 1
    assert len(result.history) == 2 and result.history[-1].get("early_stop") and result.epoch == 1


def test_max_train_and_head_mismatch() -> None:
    images, labels = _data()
    config = ClassifierConfig(batch_size=8, val_fraction=0.25, max_train=10)
    result = train_classifier(images, labels, "tiny", 1, 0, config=config, progress=False)
    assert result.train_indices.size == 10 and labels[result.train_indices].sum() == 5
    assert not set(result.train_indices) & set(result.val_indices)
    with pytest.raises(ValueError, match="1 output"):
        train_classifier(images, np.eye(3)[labels], "tiny", 1, 0, progress=False, init=(NetDef.of("tiny", 1), None))


def test_stratified_subset_is_exact_and_keeps_shares() -> None:
    labels = np.array([1] * 30 + [0] * 70)
    chosen = stratified_subset(np.arange(100), labels, 20, seed=1)
    assert chosen.size == 20 and labels[chosen].sum() == 6
    assert np.array_equal(chosen, stratified_subset(np.arange(100), labels, 20, seed=1))
    assert stratified_subset(np.arange(5), labels, 20, seed=1).size == 5
