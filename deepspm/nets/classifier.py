"""Training and evaluating the probe classifier (reference section 4.2).

Recipe: sigmoid cross-entropy with good samples weighted x8 (the paper; the released code used 3), L2 5e-5
on conv/FC kernels only, Adam 1e-3, batch 64, independent random left-right / up-down flips, BN running
statistics updated in training passes, a seeded class-stratified validation split, decision threshold 0.9.

Inputs are already pre-processed float32 images in [-1.5, 1.5] (v = h / 1 Å - 1, plane at -1); levelling
(RANSAC) belongs to the controller. Labels: (N,) with 1 = good probe, or (N, K) multi-hot for a K-label
head (the H:Si(100) multi-class mode), which trains K independent sigmoids without class weighting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from deepspm.nets import parallel
from deepspm.nets.inference import Predictor, TraceCounter, as_image_batch
from deepspm.nets.linewindow import mask_rows, random_truncation, seeded_line_counts
from deepspm.nets.losses import (
    l2_on_kernels,
    random_crops,
    random_dihedral,
    random_flips,
    weighted_sigmoid_cross_entropy,
)
from deepspm.nets.metrics import DEFAULT_THRESHOLD, binary_metrics, multilabel_metrics
from deepspm.nets.model import NetDef, NetVars, apply_eval, apply_train
from deepspm.nets.presets import NetSpec

# Purposes folded into the root key, so each random stream is independent and reproducible.
_INIT, _STEP = 0, 1


KEEP_CHOICES = ("last", "best")
LR_SCHEDULES = ("constant", "cosine")


def selection_score(metrics: dict[str, Any]) -> float:
    """What `keep="best"` maximises: the validation ROC AUC (macro over labels for a multi-label head);
    threshold-free, so it does not reward an epoch for where its scores happen to fall around 0.9."""
    auc = metrics.get("roc_auc", metrics.get("macro_roc_auc"))
    return -math.inf if auc is None else float(auc)


@dataclass(frozen=True)
class ClassifierConfig:
    batch_size: int = 64
    learning_rate: float = 1e-3
    l2: float = 5e-5
    good_weight: float = 8.0
    val_fraction: float = 0.24  # the paper's 76 / 24 split
    threshold: float = DEFAULT_THRESHOLD
    flips: bool = True
    eval_batch_size: int = 256
    keep: str = "last"  # the weights returned: the last epoch's, or "best": the best validation ROC AUC's
    # fine-tuning (small data): the conv features frozen for the first `freeze_epochs` (only the dense layers
    # and the head learn), then everything at `finetune_learning_rate` (default: learning_rate; lr / 10 was
    # too slow to adapt the simulator-trained features to real H:Si frames, docs/training.md);
    # `patience` > 0 stops after that many epochs without a better validation score (early stopping)
    freeze_epochs: int = 0
    finetune_learning_rate: float | None = None
    patience: int = 0
    max_train: int | None = None  # use at most this many training images (a stratified, seeded subset)
    # > 0: train a line-window net (`deepspm.nets.linewindow`): after the flips, each training image keeps its
    # first n rows, n uniform in line_window_min_lines..64, the rest set to the unscanned fill; validation
    # sees each image truncated to a seeded count from the same range (the same every epoch)
    line_window_min_lines: int = 0
    # augmentation and schedule (docs/training.md, "Default H:Si recipe"): `dihedral` adds the transpose to the
    # flips (all 8 symmetries of the square: 90-degree rotations and mirrorings); `crop_min_scale` < 1 takes a
    # random square crop of side [crop_min_scale, 1] x 64 px per image and resizes it back to 64 (validation and
    # inference see whole images); `lr_schedule` "cosine" decays the learning rate to 0 over all steps
    dihedral: bool = False
    crop_min_scale: float = 1.0
    lr_schedule: str = "constant"
    # a one-output (good/bad) net trained with good_weight w scores log(w) too high in logit (the weighted loss's
    # optimum); `prior_correction` subtracts log(w) from the output bias (validation and the returned weights), so
    # the probabilities are those of the unweighted data while the weight still shapes the training
    prior_correction: bool = False

    def __post_init__(self) -> None:
        if self.keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_CHOICES)}, got {self.keep!r}")
        if self.freeze_epochs < 0 or self.patience < 0:
            raise ValueError("freeze_epochs and patience must be >= 0")
        if self.max_train is not None and self.max_train < 1:
            raise ValueError(f"max_train must be >= 1, got {self.max_train}")
        if self.line_window_min_lines < 0:
            raise ValueError(f"line_window_min_lines must be >= 0, got {self.line_window_min_lines}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        if self.prior_correction and not self.good_weight > 0:
            raise ValueError(f"prior_correction needs a good_weight > 0, got {self.good_weight}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")


FEATURE_LAYERS = ("convs",)
"""Top-level parameter groups that `freeze_epochs` keeps fixed: the convolutional feature extractor."""


def _is_feature(path: tuple[Any, ...]) -> bool:
    first = path[0] if path else None
    return getattr(first, "key", getattr(first, "name", first)) in FEATURE_LAYERS


def frozen_features_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam on every parameter except the conv features, whose updates are zero."""
    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if _is_feature(path) else "train", params)

    return optax.multi_transform({"train": optax.adam(learning_rate), "frozen": optax.set_to_zero()}, labels)


def stratified_subset(indices: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Exactly `n` of `indices` (all if fewer), each label pattern keeping its share (largest remainders)."""
    indices = np.asarray(indices)
    if n >= indices.size:
        return indices
    flat = np.asarray(labels)[indices].reshape(indices.size, -1)
    _, strata = np.unique(flat, axis=0, return_inverse=True)
    strata = strata.ravel()
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    quotas = np.array([n * g.size / indices.size for g in groups])
    counts = np.floor(quotas).astype(int)
    for k in np.argsort(-(quotas - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    rng = np.random.default_rng([seed, 0x5B5E])
    chosen = [indices[rng.permutation(g)[:c]] for g, c in zip(groups, counts)]
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping each class's share (multi-hot rows are stratified by their exact pattern).

    Returns sorted (train_indices, val_indices).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    _, strata = np.unique(labels.reshape(labels.shape[0], -1), axis=0, return_inverse=True)
    rng = np.random.default_rng([seed, 0x5EED])
    val: list[np.ndarray] = []
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        val.append(members[: int(round(val_fraction * members.size))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, int)
    train_idx = np.setdiff1d(np.arange(labels.shape[0]), val_idx)
    return train_idx, val_idx


def shift_output_bias(variables: NetVars, offset: float) -> NetVars:
    """The variables with `offset` added to the output layer's bias (every output's logit moves by `offset`)."""
    def shift(path: tuple[Any, ...], leaf: Any) -> Any:
        names = [getattr(p, "key", getattr(p, "name", p)) for p in path]
        return leaf + offset if names[:2] == ["head", "bias"] else leaf

    return NetVars(jax.tree_util.tree_map_with_path(shift, variables.params), variables.batch_stats)


def classifier_loss(
    net: NetDef,
    variables: NetVars,
    images: jax.Array,
    labels: jax.Array,
    dropout_key: jax.Array | None,
    config: ClassifierConfig,
) -> tuple[jax.Array, NetVars]:
    """Weighted sigmoid cross-entropy + L2; a training pass if `dropout_key` is given, else eval mode.

    Returns the loss and the variables with updated BN running statistics (unchanged in eval mode).
    """
    if dropout_key is None:
        logits, new_vars = apply_eval(net, variables, images), variables
    else:
        logits, stats = apply_train(net, variables, images, dropout_key)
        new_vars = NetVars(variables.params, stats)
    logits = logits[:, 0] if labels.ndim == 1 else logits
    positive_weight = config.good_weight if labels.ndim == 1 else 1.0
    loss = weighted_sigmoid_cross_entropy(logits, labels, positive_weight)
    return loss + config.l2 * l2_on_kernels(variables.params), new_vars


StepFn = Callable[[NetVars, Any, jax.Array, jax.Array, jax.Array], tuple[NetVars, Any, jax.Array]]


def make_train_step(
    net: NetDef, optimizer: optax.GradientTransformation, config: ClassifierConfig,
    traces: TraceCounter | None = None, donate: bool = True,
) -> StepFn:
    """A jitted `(variables, opt_state, images, labels, key) -> (variables, opt_state, loss)`.

    `images` (B, 64, 64, 1) float32, `labels` (B,) or (B, K) float32; `key` drives flips and dropout.
    With `donate`, the input variables and optimiser state are consumed (halves peak memory for `paper`).
    """
    traces = traces if traces is not None else TraceCounter()

    def step(variables: NetVars, opt_state: Any, images: jax.Array, labels: jax.Array, key: jax.Array):
        flip_key, dropout_key = jax.random.split(key)
        if config.flips:
            images = (random_dihedral if config.dihedral else random_flips)(images, flip_key)
        if config.crop_min_scale < 1.0:
            images = random_crops(images, jax.random.fold_in(flip_key, 2), config.crop_min_scale)
        if config.line_window_min_lines:  # after the flips: the scanned rows stay at the top
            images = random_truncation(images, jax.random.fold_in(flip_key, 1), config.line_window_min_lines)

        def loss_of(params: Any) -> tuple[jax.Array, NetVars]:
            return classifier_loss(net, NetVars(params, variables.batch_stats), images, labels, dropout_key, config)

        (loss, new_vars), grads = jax.value_and_grad(loss_of, has_aux=True)(variables.params)
        updates, opt_state = optimizer.update(grads, opt_state, variables.params)
        params = optax.apply_updates(variables.params, updates)
        return NetVars(params, new_vars.batch_stats), opt_state, loss

    return jax.jit(traces.wrap("train_step", step), donate_argnums=(0, 1) if donate else ())


@dataclass
class TrainResult:
    """A trained classifier and what it was measured at. `summary()` is JSON-able."""

    net: NetDef
    variables: NetVars
    config: ClassifierConfig
    seed: int
    metrics: dict[str, Any]  # validation metrics of the returned weights ({} without a validation split)
    history: list[dict[str, Any]]  # per epoch: mean training loss and validation metrics
    train_indices: np.ndarray
    val_indices: np.ndarray
    class_names: tuple[str, ...] | None = None
    traces: TraceCounter = field(default_factory=TraceCounter)
    epoch: int = 0  # the epoch (1-based) whose weights these are: the last, or the best with keep="best"

    def predictor(self) -> Predictor:
        return Predictor(self.net, self.variables, "probability")

    def summary(self) -> dict[str, Any]:
        return {
            "preset": self.net.spec.name,
            "spec": self.net.spec.to_dict(),
            "n_outputs": self.net.n_outputs,
            "seed": self.seed,
            "config": asdict(self.config),
            "class_names": list(self.class_names) if self.class_names else None,
            "n_train": int(self.train_indices.size),
            "n_val": int(self.val_indices.size),
            "epoch": self.epoch,
            "metrics": self.metrics,
            "history": self.history,
        }


def evaluate(
    predictor: Predictor,
    images: Any,
    labels: Any,
    threshold: float = DEFAULT_THRESHOLD,
    class_names: Sequence[str] | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of a classifier on any labelled set: `binary_metrics` for (N,) labels, else per-class ones."""
    labels = np.asarray(labels)
    scores = predictor.predict_batched(images, batch_size)
    if labels.ndim == 1:
        return binary_metrics(labels, scores, threshold)
    names = class_names if class_names is not None else [f"class_{k}" for k in range(labels.shape[1])]
    return multilabel_metrics(labels, scores, names, threshold)


def train_classifier(
    images: Any,
    labels: Any,
    preset: NetSpec | str,
    epochs: int,
    seed: int,
    *,
    config: ClassifierConfig = ClassifierConfig(),
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    init: tuple[NetDef, NetVars] | None = None,
    devices: parallel.Devices = None,
    step_cache: dict[Any, tuple[optax.GradientTransformation, StepFn]] | None = None,
) -> TrainResult:
    """Train a classifier from scratch on pre-processed images (N, 64, 64[, 1]) and labels (N,) or (N, K).

    Deterministic for a given seed: the jax root key `jax.random.key(seed)` is folded per purpose and step;
    shuffling and the split use numpy generators seeded from the same seed. The last epoch's weights are
    returned, or with `config.keep == "best"` those of the epoch with the best `selection_score` (the
    earliest on a tie); `on_epoch` receives each epoch's record (e.g. to checkpoint).

    `init`: start from these weights (fine-tuning; `preset` is then the init's) instead of a fresh net; see
    `ClassifierConfig.freeze_epochs`, `finetune_learning_rate` and `patience` for the small-data recipe.
    `step_cache`: a dict shared by several trainings of the same net, config and sizes (an ensemble's members),
    so that the jitted train step is compiled once for all of them.

    `devices`: data-parallel over this many local devices (of every process in a `jax.distributed` job), or
    "all" (the most that split the batch evenly); None: the enclosing `parallel.use_devices` block's choice,
    else 1 (one device, no mesh). The global batch, its rows and its random streams do not depend on the
    device count, so the result is the same to float rounding (`deepspm.nets.parallel`).
    """
    labels = np.asarray(labels, dtype=np.float32)
    n_outputs = 1 if labels.ndim == 1 else labels.shape[1]
    net = NetDef.of(preset, n_outputs) if init is None else init[0]
    if net.n_outputs != n_outputs:
        raise ValueError(f"the initial net has {net.n_outputs} output(s) but the labels need {n_outputs}")
    batch = as_image_batch(images, net.spec.image_side_px)
    if batch.shape[0] != labels.shape[0]:
        raise ValueError(f"{batch.shape[0]} images but {labels.shape[0]} labels")
    if not np.all(np.isfinite(batch)):
        raise ValueError("images contain NaN or inf")
    if config.line_window_min_lines > batch.shape[1]:
        raise ValueError(f"line_window_min_lines {config.line_window_min_lines} exceeds the image side {batch.shape[1]}")

    train_idx, val_idx = stratified_split(labels, config.val_fraction, seed)
    if config.max_train is not None:
        train_idx = stratified_subset(train_idx, labels, config.max_train, seed)
    if (config.keep == "best" or config.patience) and val_idx.size == 0:
        raise ValueError('keep="best" (and early stopping) needs a validation split (val_fraction > 0)')
    batch_size = min(config.batch_size, train_idx.size)
    if batch_size == 0:
        raise ValueError("no training images")
    mesh = parallel.mesh_for(parallel.scoped_devices(devices), batch_size)
    parallel.check_batch(parallel.device_count(mesh), batch_size)
    root = jax.random.key(seed)
    step_root = jax.random.fold_in(root, _STEP)
    if init is None:
        variables = net.init(jax.random.fold_in(root, _INIT))
    else:
        variables = jax.tree.map(jnp.copy, init[1])  # train_step donates its input: never consume the caller's
    traces = TraceCounter()

    def phase(epoch: int) -> tuple[optax.GradientTransformation, StepFn]:
        key = (net, config, epochs, train_idx.size, init is None, epoch < config.freeze_epochs, mesh)
        if step_cache is None:
            return new_phase(epoch)
        if key not in step_cache:
            step_cache[key] = new_phase(epoch)
        return step_cache[key]

    def new_phase(epoch: int) -> tuple[optax.GradientTransformation, StepFn]:
        if epoch < config.freeze_epochs:
            optimizer = frozen_features_optimizer(config.learning_rate)
        elif config.freeze_epochs or init is not None:
            optimizer = optax.adam(config.finetune_learning_rate or config.learning_rate)
        elif config.lr_schedule == "cosine":
            total = max(1, epochs * (train_idx.size // batch_size))
            optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, total))
        else:
            optimizer = optax.adam(config.learning_rate)
        step_fn = make_train_step(net, optimizer, config, traces)
        if mesh is not None:  # the same global-batch step, its batch split over the devices
            step_fn = parallel.data_parallel(step_fn, mesh, batch_argnums=(2, 3), donate_argnums=(0, 1))
        return optimizer, step_fn

    optimizer, train_step = phase(0)
    opt_state = optimizer.init(variables.params)
    predictor = Predictor(net, variables, "probability")
    if mesh is not None:  # parameters and optimiser state replicated on every device
        variables, opt_state = parallel.replicate(mesh, (variables, opt_state))
    shuffle_rng = np.random.default_rng([seed, 0x5A1F])

    val_images = batch[val_idx]
    if config.line_window_min_lines and val_idx.size:
        counts = seeded_line_counts(val_idx.size, config.line_window_min_lines, batch.shape[1], seed)
        val_images = mask_rows(val_images[..., 0], counts)[..., None]

    # the prior correction (`ClassifierConfig.prior_correction`): only the weighted one-output loss shifts the logit
    offset = -math.log(config.good_weight) if config.prior_correction and labels.ndim == 1 else 0.0

    def corrected(current: NetVars) -> NetVars:
        return shift_output_bias(current, offset) if offset else current

    def validation_metrics(current: NetVars) -> dict[str, Any]:
        if val_idx.size == 0:
            return {}
        current = corrected(current)
        predictor.set_variables(current if mesh is None else parallel.to_local(current))
        return evaluate(predictor, val_images, labels[val_idx], config.threshold, class_names,
                        config.eval_batch_size)

    history: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    best: tuple[int, NetVars, dict[str, Any]] | None = None
    keep_best = config.keep == "best" or config.patience > 0
    stale = 0
    step = 0
    for epoch in range(epochs):
        if epoch > 0 and epoch == config.freeze_epochs:  # unfreeze: a new optimiser for every parameter
            optimizer, train_step = phase(epoch)
            opt_state = optimizer.init(variables.params)
        order = shuffle_rng.permutation(train_idx)
        n_batches = order.size // batch_size  # drop the ragged tail: one shape, one trace
        losses = []
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, unit="batch")
        for b in bar:
            idx = order[b * batch_size : (b + 1) * batch_size]
            variables, opt_state, loss = train_step(
                variables, opt_state, batch[idx], labels[idx], jax.random.fold_in(step_root, step)
            )
            step += 1
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        metrics = validation_metrics(variables)
        record = {"epoch": epoch + 1, "steps": step, "train_loss": float(np.mean(losses)) if losses else None,
                  "val": metrics, "frozen_features": epoch < config.freeze_epochs}
        history.append(record)
        if keep_best and (best is None or selection_score(metrics) > selection_score(best[2])):
            best = (epoch + 1, jax.tree.map(jnp.copy, variables), metrics)  # train_step consumes `variables`
            stale = 0
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(record)
        if config.patience and stale >= config.patience:
            record["early_stop"] = True
            break

    kept_epoch = len(history)
    if best is not None:
        kept_epoch, variables, metrics = best
    if mesh is not None:
        variables = parallel.to_local(variables)
    variables = corrected(variables)
    traces.update(predictor.traces)
    return TrainResult(net, variables, config, seed, metrics, history, train_idx, val_idx,
                       tuple(class_names) if class_names is not None else None, traces, kept_epoch)


def mean_loss(
    net: NetDef, variables: NetVars, images: Any, labels: Any, config: ClassifierConfig,
    dropout_key: jax.Array | None = None,
) -> float:
    """The loss of a batch without updating anything: eval mode by default (no flips, no dropout, running
    BN statistics), or a training-mode pass with `dropout_key` (batch statistics, dropout; no flips)."""
    batch = jnp.asarray(as_image_batch(images, net.spec.image_side_px))
    loss, _ = _jitted_loss(net, variables, batch, jnp.asarray(labels, jnp.float32), dropout_key, config)
    return float(loss)


_jitted_loss = jax.jit(classifier_loss, static_argnums=(0, 5))
