"""Training and evaluation workflows: the functions behind `deepspm dataset|train|evaluate`.

They compose the simulator (synthetic data, the in-process conditioning environment), the controller's
pre-processing, locator and episode bookkeeping, and the nets. Every argument is a plain keyword with a
default where one makes sense, so the CLI maps options onto them one to one; every function prints a short
summary, shows a tqdm progress bar (`progress=False` silences it) and returns a JSON-able dict.

Data (`load_labelled`): a folder in the original DeepSPM layout (`good/`, `bad/` with raw heights in
metres; levelled by RANSAC exactly as the run loop does, one derived seed per file; `*Ransac.npy` files are
already levelled and are only normalised), our synthetic sets (the same layout, plus `labels.csv` naming
each frame's probe kind), or the real H:Si(100) `.npz` (already in the nets' range).

Simulation (`train_agent_sim`, `evaluate_agent_sim`): the simulator's `ConditioningEnv` in-process, seen
through the controller's eyes: every frame is pre-processed, frames failing the bad-sample rule are
rescanned, the locator's largest empty square masks the actions, and the classifier's p(good) drives the
`EpisodeTracker` in training mode (episodes end at p > 0.9; the reset phase applies random reset actions
until p < 0.1, at most 5; reward -1 per action and +10 on the successful step). The simulator's ground
truth is only read for reporting, never for a decision.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from deepspm.controller.episode import EpisodeConfig, EpisodeTracker, Phase, Transition, random_reset_action
from deepspm.controller.locator import action_mask, locate_action
from deepspm.controller.preprocess import BAD_SAMPLE_THRESHOLD_M, is_bad_sample, normalise, preprocess
from deepspm.io.actions import N_ACTIONS
from deepspm.nets.checkpoints import load_net, save_net
from deepspm.nets.classifier import ClassifierConfig, evaluate, train_classifier
from deepspm.nets.data import DataError, load_deepspm_folders, load_hsi100_npz
from deepspm.nets.dqn import Actor, DQNConfig, Learner, agent_from_classifier, epsilon_at, select_action
from deepspm.nets.inference import Predictor
from deepspm.nets.metrics import DEFAULT_THRESHOLD, format_metrics
from deepspm.nets.model import NetDef
from deepspm.simulator.dataset import gallery, synth_dataset
from deepspm.simulator.environment import ConditioningEnv

METRICS_FILE = "metrics.json"
_POOL_MIN_FRAMES = 256  # below this, levelling in-process beats starting worker processes (~4 s each)


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed from any printable parts (a root seed, a file name, a frame index): no global RNG, and
    the same file gets the same seed whatever order the files are read in."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big")


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
    todo_seeds = (int(seeds[i]) for i in todo)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = tqdm(total=todo.size, desc="levelling frames (RANSAC)", unit="frame", disable=not progress)
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
        data = load_hsi100_npz(path, mode="multiclass" if multiclass else "binary", min_responses=min_responses)
        info: dict[str, Any] = {
            "kind": "hsi100_npz", "source": str(path), "n": len(data), "mode": "multiclass" if multiclass else "binary",
            "min_responses": min_responses, "class_names": list(data.categories) if multiclass else None,
        }
        if not multiclass:
            info.update(n_good=int(data.labels.sum()), n_bad=int(len(data) - data.labels.sum()))
        return data.images.astype(np.float32), data.labels, info
    if path.is_dir():
        if multiclass:
            raise DataError(f"{path}: a good/bad folder set has binary labels only")
        data = load_deepspm_folders(path)
        seeds = [derived_seed(seed, p.relative_to(path).as_posix()) for p in data.paths]
        images = normalise_frames(data.images, data.levelled, seeds, workers=workers, progress=progress)
        info = {
            "kind": "folders", "source": str(path), "n": len(data), "n_good": int(data.labels.sum()),
            "n_bad": int(len(data) - data.labels.sum()), "n_levelled_files": int(data.levelled.sum()),
            "ransac_seed": seed, "class_names": None, "kinds": _kinds_from_labels_csv(path, data.paths),
        }
        return images, data.labels, info
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
        "kinds": sum(kinds, []) if all(k is not None for k in kinds) else None,
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
    keep: str = "last",
) -> dict[str, Any]:
    """Train a probe classifier from scratch and save it as a checkpoint directory `out` (kind "classifier").

    data: one or more labelled sets (see `load_labelled`), concatenated. A seeded split stratified by label
    keeps `val_fraction` for validation (the paper's 24 %). Adam at `learning_rate`, L2 `l2` on kernels,
    good samples weighted `good_weight` (binary only), random flips, `epochs` passes of `batch_size`.
    `keep`: save the last epoch's weights, or ("best") those of the epoch with the best validation ROC AUC.
    Prints and returns the validation metrics (at `threshold`, at 0.5 and at the ROC point closest to
    (0, 1)); writes `out/metrics.json` (metrics, per-epoch history, data, options, split sizes) and
    `out/split.json` (the validation rows). The checkpoint's metadata repeats the options and the metrics.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    options = {
        "preset": preset, "epochs": epochs, "seed": seed, "val_fraction": val_fraction, "batch_size": batch_size,
        "learning_rate": learning_rate, "l2": l2, "good_weight": good_weight, "threshold": threshold,
        "multiclass": multiclass, "min_responses": min_responses, "keep": keep,
    }
    images, labels, info = load_labelled_sets(
        list(data), multiclass=multiclass, min_responses=min_responses, seed=seed, workers=workers, progress=progress
    )
    config = ClassifierConfig(batch_size=batch_size, learning_rate=learning_rate, l2=l2, good_weight=good_weight,
                              val_fraction=val_fraction, threshold=threshold, keep=keep)
    start = time.perf_counter()
    result = train_classifier(images, labels, preset, epochs, seed, config=config,
                              class_names=info["class_names"], progress=progress)
    seconds = time.perf_counter() - start
    metrics = result.metrics
    if info.get("kinds") is not None and labels.ndim == 1 and result.val_indices.size:
        val = result.val_indices
        scores = result.predictor().predict_batched(images[val], config.eval_batch_size)
        metrics = {**metrics, "by_kind": accuracy_by_kind([info["kinds"][i] for i in val], labels[val], scores, threshold)}
    summary = {
        "kind": "classifier", "options": options, "data": _without_kinds(info), "n_train": int(result.train_indices.size),
        "n_val": int(result.val_indices.size), "train_seconds": round(seconds, 1), "epoch": result.epoch,
        "metrics": metrics, "history": result.history,
    }
    save_net(out, result.net, result.variables, kind="classifier", overwrite=overwrite,
             metadata={k: v for k, v in summary.items() if k != "history"})
    _write_json(out / METRICS_FILE, summary)
    _write_json(out / "split.json", {"val_indices": result.val_indices.tolist(), "data": [str(p) for p in data]})
    print(f"classifier ({preset}, seed {seed}) trained on {summary['n_train']} images in {seconds:.0f} s; "
          f"kept epoch {result.epoch} of {epochs} ({keep}); validation on {summary['n_val']}:")
    if metrics:
        print(format_metrics(metrics))
    print(f"saved {out}")
    return summary


def evaluate_classifier_command(
    checkpoint: Path | str, data: Sequence[Path | str] | Path | str, *, out_json: Path | str | None = None,
    threshold: float = DEFAULT_THRESHOLD, multiclass: bool | None = None, min_responses: int = 1, seed: int = 0,
    split: Path | str | None = None, workers: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Metrics of a saved classifier on any labelled set(s), printed and returned (and written to `out_json`).

    `multiclass=None` follows the checkpoint's head (one output: binary; several: multi-label). For
    synthetic sets the accuracy per probe kind is added (`by_kind`). Frames are levelled as in training
    (pass the training `seed` to get the very same frames). `split`: a training run's `split.json`, to
    evaluate only its validation rows (the same data, options and order as in training are needed).
    """
    ckpt = load_net(checkpoint, expect_kind="classifier")
    if multiclass is None:
        multiclass = ckpt.net.n_outputs > 1
    paths = [data] if isinstance(data, (str, Path)) else list(data)
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
    if info.get("kinds") is not None and labels.ndim == 1:
        scores = predictor.predict_batched(images)
        metrics["by_kind"] = accuracy_by_kind([info["kinds"][i] for i in rows], labels, scores, threshold)
    summary = {"kind": "classifier_evaluation", "checkpoint": str(checkpoint), "data": _without_kinds(info),
               "split": None if split is None else str(split), "metrics": metrics}
    print(f"classifier {checkpoint} on {', '.join(map(str, paths))}"
          f"{'' if split is None else f' (the {rows.size} validation rows of {split})'}:")
    print(format_metrics(metrics))
    for kind, m in metrics.get("by_kind", {}).items():
        print(f"  {kind:<10} n={m['n']:<5} accuracy={m['accuracy']:.3f}")
    if out_json is not None:
        _write_json(Path(out_json), summary)
    return summary


# --- the conditioning task in simulation ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SimObservation:
    """One classified frame of the simulated task, as the controller sees it (plus the ground truth)."""

    ref: str  # a frame id for the episode tracker
    image: np.ndarray  # (64, 64) float32, the nets' input
    mask: np.ndarray  # (12,) bool, actions whose required clean square fits
    p_good: float
    truly_good: bool  # the simulator's ground truth: for reports only


class SimConditioningTask:
    """`ConditioningEnv` through the controller's eyes: level (RANSAC, a derived seed per frame), drop
    bad-sample frames and scan elsewhere (as the loop; accepted after `accept_bad_sample_after`), locate the
    largest empty square to mask the actions, and classify.

    `classifier` maps one (64, 64) image to an array whose first element is p(good): a compiled
    `Predictor`, or any stand-in (tests use the ground truth)."""

    def __init__(
        self, env: ConditioningEnv, classifier: Callable[[np.ndarray], np.ndarray], seed: int, *,
        accept_bad_sample_after: int = 250,
        frame_size_m: float = 10e-9,
    ) -> None:
        if not env.render:
            raise ValueError("the task needs an environment that renders frames (render=True)")
        self.env = env
        self.classifier = classifier
        self.seed = seed
        self.accept_bad_sample_after = accept_bad_sample_after
        self.frame_size_m = frame_size_m
        self.frames = 0  # frames scanned, discarded ones included
        self.bad_samples = 0

    def _observe(self) -> SimObservation:
        rejected = 0
        while True:
            raw = self.env.observe()
            self.frames += 1
            pre = preprocess(raw, derived_seed(self.seed, "frame", self.frames))
            if rejected >= self.accept_bad_sample_after or not is_bad_sample(raw, BAD_SAMPLE_THRESHOLD_M, plane_m=pre.plane_m):
                break
            rejected += 1
            self.bad_samples += 1
            self.env.step(0)  # the stall does nothing: just move on and scan the next region
        site = locate_action(pre.normalised, (0.0, 0.0), self.frame_size_m, valid=pre.valid)
        p_good = float(self.classifier(pre.normalised)[0])
        return SimObservation(f"f{self.frames}", pre.normalised, action_mask(site.free_side_m), p_good,
                              self.env.ground_truth().is_good)

    def first(self) -> SimObservation:
        """The frame the environment scanned when it was created."""
        return self._observe()

    def act(self, action: int | None) -> SimObservation:
        """Apply a conditioning action (None: none), scan a fresh region, classify it."""
        self.env.step(0 if action is None else int(action))
        return self._observe()


def _compiled_classifier(net: NetDef, variables: Any) -> Predictor:
    predictor = Predictor(net, variables, "probability")
    predictor.compile([1])
    return predictor


ChooseFn = Callable[[SimObservation], int]


@dataclass
class EpisodeRecord:
    """One finished episode: its index, length in conditioning actions, and how it ended."""

    index: int
    actions: int
    truncated: bool
    truly_good_at_end: bool


def drive_episodes(
    task: SimConditioningTask, tracker: EpisodeTracker, choose: ChooseFn, reset_rng: np.random.Generator,
    *, on_transition: Callable[[Transition, dict[str, SimObservation]], None] | None = None,
    on_episode_end: Callable[[EpisodeRecord], None] | None = None, done: Callable[[], bool],
) -> None:
    """The run loop's conditioning logic on the simulated task, until `done()`.

    Per classified frame: the tracker decides (condition, reset, or just scan on); `choose` picks the
    conditioning action, reset actions are uniform among the allowed reset-flagged rows; a completed step
    is handed to `on_transition` with the frames it refers to. An episode that reaches the tracker's action
    cap is truncated and the task simply scans on (the loop would move to a new approach area).
    """
    obs = task.first()
    frames = {obs.ref: obs}
    while not done():
        outcome = tracker.observe(obs.p_good, obs.ref)
        if outcome.transition is not None and on_transition is not None:
            on_transition(outcome.transition, frames)
        if outcome.episode_ended and on_episode_end is not None:
            on_episode_end(EpisodeRecord(outcome.episode_index, tracker.episode_actions, outcome.episode_truncated,
                                         obs.truly_good))
        if done():
            break
        if tracker.phase is Phase.CONDITION:
            action: int | None = choose(obs)
        elif tracker.phase is Phase.RESET:
            action = random_reset_action(reset_rng, obs.mask)
        else:
            action = None
        if action is not None:
            tracker.record_action(action, obs.ref)
        obs = task.act(action)
        acted_on = tracker.pending_state_ref  # the frame the next transition starts from, if any
        frames = {ref: frame for ref, frame in frames.items() if ref == acted_on}
        frames[obs.ref] = obs


def _rolling_mean(values: Sequence[int], n: int = 50) -> float | None:
    """Mean of the last `n` values; None (JSON null) before there are any."""
    return float(np.mean(values[-n:])) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- training the agent --------------------------------------------------------------------------------------


def train_agent_sim(
    classifier_checkpoint: Path | str, out: Path | str, *, steps: int = 3000, seed: int = 0,
    preset: str | None = None, updates_per_step: float = 1.0, random_steps: int = 500,
    epsilon_decay_steps: int = 500, max_episode_actions: int = 100, checkpoint_every: int = 500,
    overwrite: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Train the double-DQN conditioning agent on the simulated microscope; save it to `out` (kind "agent").

    steps: conditioning actions (= stored experiences, each stored with its 4 flips) to train for.
    preset: None initialises the agent from the classifier (trunk, hidden layers and BN copied, fresh
    12-way head); a preset name starts that preset from scratch instead.
    The DQN schedule: `random_steps` actions at epsilon 1 with no learning, then epsilon 1 -> 0.05 over
    `epsilon_decay_steps`, and `updates_per_step` gradient updates per action (batch 64, Adam 5e-4,
    gamma 0.95, target copy every 100 updates). Episodes follow the paper's training mode (see the module
    docstring); an episode is cut after `max_episode_actions`. The checkpoint is rewritten every
    `checkpoint_every` actions and at the end, with `out/metrics.json` (episode lengths, learning curve).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    options = {
        "classifier_checkpoint": str(classifier_checkpoint), "steps": steps, "seed": seed, "preset": preset,
        "updates_per_step": updates_per_step, "random_steps": random_steps,
        "epsilon_decay_steps": epsilon_decay_steps, "max_episode_actions": max_episode_actions,
    }
    classifier = load_net(classifier_checkpoint, expect_kind="classifier")
    root = jax.random.key(seed)
    if preset is None:
        net, variables = agent_from_classifier(classifier.net, classifier.variables, N_ACTIONS, jax.random.fold_in(root, 1))
    else:
        net = NetDef.of(preset, N_ACTIONS)
        variables = net.init(jax.random.fold_in(root, 1))
    config = DQNConfig(random_steps=random_steps, epsilon_decay_steps=epsilon_decay_steps,
                       updates_per_step=updates_per_step)
    learner = Learner(net, variables, config, seed=seed)
    actor = Actor(learner)
    task = SimConditioningTask(ConditioningEnv(seed), _compiled_classifier(classifier.net, classifier.variables), seed)
    tracker = EpisodeTracker(EpisodeConfig(training=True, max_episode_actions=max_episode_actions))
    act_rng = np.random.default_rng([seed, 2])
    episodes: list[EpisodeRecord] = []
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training agent (sim)", unit="action", disable=not progress)

    def choose(obs: SimObservation) -> int:
        return actor.act(obs.image, obs.mask, epsilon_at(learner.env_steps, config), act_rng).action

    def save(final: bool) -> None:
        lengths = [e.actions for e in episodes if e.actions > 0]
        summary = {
            "kind": "agent", "options": options, "env_steps": learner.env_steps, "updates": learner.updates,
            "episodes": len(lengths), "zero_step_episodes": sum(e.actions == 0 for e in episodes),
            "truncated_episodes": sum(e.truncated for e in episodes),
            "mean_actions_last_100": _rolling_mean(lengths, 100), "frames": task.frames,
            "bad_sample_frames": task.bad_samples, "train_seconds": round(time.perf_counter() - start, 1),
            "final": final,
        }
        save_net(out, net, learner.snapshot().variables, kind="agent", overwrite=True, metadata=summary)
        _write_json(out / METRICS_FILE, {**summary, "curve": curve, "episode_lengths": lengths})

    def on_transition(t: Transition, frames: dict[str, SimObservation]) -> None:
        after = frames[t.next_state_ref]
        learner.record(frames[t.state_ref].image, t.action, t.reward, after.image, t.terminal, after.mask)
        learner.catch_up()
        if learner.last_metrics:
            losses.append(learner.last_metrics["loss"])
        lengths = [e.actions for e in episodes if e.actions > 0]
        bar.update(1)
        bar.set_postfix(episodes=len(lengths), actions_per_ep=_fmt(_rolling_mean(lengths)),
                        eps=f"{epsilon_at(learner.env_steps, config):.2f}",
                        loss=f"{losses[-1]:.3f}" if losses else "-")
        if learner.env_steps % 100 == 0:
            curve.append({"env_steps": learner.env_steps, "updates": learner.updates, "episodes": len(lengths),
                          "mean_actions_last_50": _rolling_mean(lengths), "epsilon": epsilon_at(learner.env_steps, config),
                          "mean_loss_last_100": float(np.mean(losses[-100:])) if losses else None})
        if checkpoint_every and learner.env_steps % checkpoint_every == 0 and learner.env_steps < steps:
            save(final=False)

    drive_episodes(task, tracker, choose, np.random.default_rng([seed, 1]), on_transition=on_transition,
                   on_episode_end=episodes.append, done=lambda: learner.env_steps >= steps)
    bar.close()
    save(final=True)
    summary = json.loads((out / METRICS_FILE).read_text())
    summary.pop("episode_lengths")
    print(f"agent trained for {learner.env_steps} actions ({learner.updates} updates, {summary['episodes']} "
          f"episodes) in {summary['train_seconds']:.0f} s; mean actions per episode over the last 100 episodes: "
          f"{_fmt(summary['mean_actions_last_100'])}; saved {out}")
    return summary


# --- evaluating the agent ------------------------------------------------------------------------------------


def _fraction(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def _length_stats(records: Sequence[EpisodeRecord], cap: int) -> dict[str, Any]:
    lengths = np.array([r.actions for r in records], dtype=float)
    return {
        "episodes": int(lengths.size),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "std": float(lengths.std(ddof=1)) if lengths.size > 1 else 0.0,
        "p25": float(np.percentile(lengths, 25)),
        "p75": float(np.percentile(lengths, 75)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
        "truncated": int(sum(r.truncated for r in records)),
        "truly_good_at_end": _fraction([r.truly_good_at_end for r in records if not r.truncated]),
        "histogram": {str(k): int((lengths == k).sum()) for k in range(1, cap + 1) if (lengths == k).any()},
        "lengths": [int(x) for x in lengths],
    }


def _bootstrap_ratio(a: np.ndarray, b: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of mean(a) / mean(b), resampling episodes of each policy."""
    rng = np.random.default_rng([seed, 0xB007])
    ratios = rng.choice(a, (n, a.size)).mean(axis=1) / rng.choice(b, (n, b.size)).mean(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def format_agent_table(result: dict[str, Any]) -> str:
    """The agent-versus-random table printed by `evaluate_agent_sim`."""
    head = f"{'policy':<8} {'episodes':>8} {'mean':>6} {'median':>6} {'p75':>5} {'p90':>5} {'max':>4} {'cut':>4} {'good@end':>8}"
    lines = [head]
    for name in ("agent", "random"):
        s = result[name]
        good = "-" if s["truly_good_at_end"] is None else f"{s['truly_good_at_end']:.2f}"
        lines.append(f"{name:<8} {s['episodes']:>8} {s['mean']:>6.2f} {s['median']:>6.1f} {s['p75']:>5.1f} "
                     f"{s['p90']:>5.1f} {s['max']:>4} {s['truncated']:>4} {good:>8}")
    low, high = result["ratio_ci95"]
    lines.append(f"actions per episode, agent / random: mean {result['ratio_mean']:.3f} (95 % CI {low:.3f}-{high:.3f}), "
                 f"median {result['ratio_median']:.3f}")
    return "\n".join(lines)


def evaluate_agent_sim(
    agent_checkpoint: Path | str, classifier_checkpoint: Path | str, *, episodes: int = 200, seed: int = 0,
    epsilon: float = 0.05, max_episode_actions: int = 100, out_json: Path | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The agent against uniform random choice among the allowed actions, interleaved episode by episode on
    one simulated microscope (both see the same drift of probe and sample), both judged by the classifier.

    Each policy gets `episodes` episodes with at least one action; an episode whose reset phase leaves the
    probe good (p > 0.9 after 5 reset actions) ends with zero actions and is not counted for either. The
    agent acts epsilon-greedily (`epsilon`, default the paper's 0.05) and does not learn during the
    evaluation (the shipped weights are what is measured). Episodes are cut at `max_episode_actions` (counted
    with that length). Prints a table; returns per-policy mean, median, percentiles, histogram and lengths,
    the ratio of means (with a bootstrap 95 % interval) and of medians, and the fraction of episode ends where
    the simulator's ground truth agrees the probe is good.
    """
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    agent = load_net(agent_checkpoint, expect_kind="agent")
    classifier = load_net(classifier_checkpoint, expect_kind="classifier")
    q_net = Predictor(agent.net, agent.variables, "values")
    q_net.compile([1])
    task = SimConditioningTask(ConditioningEnv(seed), _compiled_classifier(classifier.net, classifier.variables), seed)
    tracker = EpisodeTracker(EpisodeConfig(training=True, max_episode_actions=max_episode_actions))
    agent_rng, random_rng = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])
    results: dict[str, list[EpisodeRecord]] = {"agent": [], "random": []}
    turn = ["agent"]  # whose episode the next one is; flips after each counted episode
    bar = tqdm(total=2 * episodes, desc="agent vs random (sim)", unit="episode", disable=not progress)

    def choose(obs: SimObservation) -> int:
        if turn[0] == "agent":
            return select_action(q_net(obs.image)[0], obs.mask, epsilon, agent_rng).action
        return int(random_rng.choice(np.flatnonzero(obs.mask)))

    def on_episode_end(record: EpisodeRecord) -> None:
        if record.actions == 0:
            return
        results[turn[0]].append(record)
        turn[0] = "random" if turn[0] == "agent" else "agent"
        bar.update(1)
        bar.set_postfix({name: _fmt(_rolling_mean([r.actions for r in rs], 10**9)) for name, rs in results.items()})

    start = time.perf_counter()
    drive_episodes(task, tracker, choose, np.random.default_rng([seed, 1]), on_episode_end=on_episode_end,
                   done=lambda: len(results["random"]) >= episodes)
    bar.close()
    stats = {name: _length_stats(records, max_episode_actions) for name, records in results.items()}
    a = np.array(stats["agent"]["lengths"], float)
    r = np.array(stats["random"]["lengths"], float)
    result = {
        "kind": "agent_evaluation", "agent_checkpoint": str(agent_checkpoint),
        "classifier_checkpoint": str(classifier_checkpoint),
        "options": {"episodes": episodes, "seed": seed, "epsilon": epsilon, "max_episode_actions": max_episode_actions},
        **stats,
        "ratio_mean": float(a.mean() / r.mean()),
        "ratio_ci95": list(_bootstrap_ratio(a, r, seed)),
        "ratio_median": float(np.median(a) / np.median(r)),
        "zero_step_episodes": tracker.episode_index - 2 * episodes,
        "frames": task.frames, "bad_sample_frames": task.bad_samples,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(format_agent_table(result))
    if out_json is not None:
        _write_json(Path(out_json), result)
    return result


__all__ = [
    "derived_seed", "load_labelled", "load_labelled_sets", "normalise_frames", "accuracy_by_kind",
    "synth_dataset_command", "gallery_command", "train_classifier_command", "evaluate_classifier_command",
    "SimObservation", "SimConditioningTask", "EpisodeRecord", "drive_episodes", "train_agent_sim",
    "evaluate_agent_sim", "format_agent_table",
]
