"""Select tip state (issue 12 part 4): which state of the probe a run conditions towards.

The run judges every frame by one number and compares it with `classifier.threshold`. By default that number
is p(good) from a one-output classifier. With `[probe] target_state = NAME` (`deepspm run --target-state NAME`)
and a multi-class classifier (one sigmoid output per tip state, its class names in the checkpoint's metadata),
it is p(NAME): the column of that state. Everything downstream (the bad-probe counter, an episode's end and
its +10, the reset phase's p < 0.1, the journal's `Classification.p_good` and `good`) then follows the target
instead of "good"; the number keeps its journal name, `p_good`, and the record's `target` names the state.

- `TipTarget`: the resolved target (name, output column, threshold, the states the classifier offers).
- `resolve_target` / `check_target_setting`: validation, a `TargetStateError` (a `ConfigError` on
  `probe.target_state`, so the CLI prints one line and exits 2) naming the allowed states.
- `TargetPredictor`: a compiled classifier seen through one column, p(target) for a batch.
- `target_classifier`: the predictor the run's brain judges frames with, and its target.
- `load_target_brain`: `session.load_brain` for any target (it takes one-output classifiers only; see
  docs/decisions.md, "Select tip state").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspm.controller.config import ConfigError

if TYPE_CHECKING:
    from deepspm.controller.config import RunConfig
    from deepspm.nets.checkpoints import NetCheckpoint
    from deepspm.nets.inference import Predictor

GOOD = "good"
KEY = "probe.target_state"


class TargetStateError(ConfigError):
    """`probe.target_state` names a state the loaded classifier cannot judge."""

    def __init__(self, message: str) -> None:
        super().__init__(KEY, message)


@dataclass(frozen=True)
class TipTarget:
    """What a run conditions the probe towards.

    name: "good" or one of the classifier's class names. index: the classifier output judged (None: the single
    output, p(good)). threshold: p(target) above this is the target state. states: what the classifier offers."""

    name: str
    index: int | None
    threshold: float
    states: tuple[str, ...]

    @property
    def is_good(self) -> bool:
        return self.name == GOOD

    def as_record(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "threshold": self.threshold, "states": list(self.states)}


def class_names_of(metadata: Mapping[str, Any] | None) -> list[str] | None:
    """A classifier checkpoint's class names (its metadata's `class_names`, or `data.class_names` as
    `train classifier` writes them); None for a binary net."""
    if not metadata:
        return None
    names = metadata.get("class_names")
    if names is None:
        names = (metadata.get("data") or {}).get("class_names")
    return None if names is None else [str(n) for n in names]


def classifier_states(n_outputs: int, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """The target states a classifier can judge: "good" for one output, else its class names (outputs without
    names are "class_K")."""
    if n_outputs == 1:
        return (GOOD,)
    names = list(class_names or [])
    if len(names) != n_outputs:
        names = [f"class_{k}" for k in range(n_outputs)]
    return tuple(names)


def resolve_target(name: str, n_outputs: int, metadata: Mapping[str, Any] | None, threshold: float,
                   where: str = "the classifier") -> TipTarget:
    """The target `name` for a classifier with `n_outputs` outputs and this metadata, or `TargetStateError`
    naming the allowed states. The threshold is the classifier's own for that state when its metadata has one
    (`thresholds`: {state: threshold or null}, chosen on held-out frames), else `threshold`
    (`classifier.threshold`); a state whose threshold is null cannot be targeted with this classifier."""
    states = classifier_states(n_outputs, class_names_of(metadata))
    if name not in states:
        kind = "one output, p(good)" if n_outputs == 1 else f"{n_outputs} outputs"
        raise TargetStateError(f"{KEY} {name!r} is not a state that {where} ({kind}) judges; allowed: "
                               f"{', '.join(states)}")
    own = (metadata or {}).get("thresholds") if n_outputs > 1 else None
    if isinstance(own, Mapping) and name in own:
        if own[name] is None:
            usable = [s for s in states if own.get(s) is not None]
            raise TargetStateError(f"{KEY} {name!r}: {where} recognises it too rarely to target it (no threshold "
                                   f"reached its precision); allowed: {', '.join(usable)}")
        threshold = float(own[name])
    return TipTarget(name, None if n_outputs == 1 else states.index(name), threshold, states)


def with_target_threshold(cfg: RunConfig, target: TipTarget) -> RunConfig:
    """`cfg` with `classifier.threshold` (and the episode logic's linked copy) set to the target's threshold."""
    import dataclasses

    if cfg.classifier.threshold == target.threshold:
        return cfg
    return dataclasses.replace(cfg, classifier=dataclasses.replace(cfg.classifier, threshold=target.threshold),
                               episode=dataclasses.replace(cfg.episode, good_threshold=target.threshold))


def check_target_setting(cfg: RunConfig, classifier_path: Path | str) -> TipTarget:
    """The run's target checked against the classifier checkpoint's metadata alone (no JAX): for the CLI edge."""
    from deepspm.nets.checkpoint_info import require_kind

    meta = require_kind(classifier_path, "classifier")
    return resolve_target(cfg.probe.target_state, int(meta.get("n_outputs", 1)), meta.get("metadata"),
                          cfg.classifier.threshold, f"the classifier.checkpoint {classifier_path}")


def target_of(cfg: RunConfig) -> TipTarget:
    """The run's target, resolved against its classifier checkpoint (`classifier.checkpoint`)."""
    from deepspm.controller.session import checkpoint_path

    return check_target_setting(cfg, checkpoint_path(cfg.classifier.checkpoint, "classifier"))


class TargetPredictor:
    """A classifier's `Predictor` seen through one output column: `__call__` gives p(target) with shape (N,)."""

    def __init__(self, predictor: Predictor, index: int) -> None:
        self.predictor = predictor
        self.index = index
        self.net = predictor.net

    def compile(self, batch_sizes: Any) -> None:
        self.predictor.compile(batch_sizes)

    def __call__(self, images: Any, variables: Any = None) -> np.ndarray:
        return np.asarray(self.predictor(images, variables))[:, self.index]

    def predict_batched(self, images: Any, batch_size: int = 256) -> np.ndarray:
        return np.asarray(self.predictor.predict_batched(images, batch_size))[:, self.index]


def target_classifier(loaded: NetCheckpoint, name: str, threshold: float,
                      where: str = "the classifier") -> tuple[Predictor | TargetPredictor, TipTarget]:
    """The predictor a run judges frames with for target `name` (p(target) per frame), and the target."""
    from deepspm.nets.inference import Predictor

    target = resolve_target(name, loaded.net.n_outputs, loaded.metadata, threshold, where)
    predictor = Predictor(loaded.net, loaded.variables, "probability")
    return (predictor if target.index is None else TargetPredictor(predictor, target.index)), target


__all__ = ["GOOD", "TargetPredictor", "TargetStateError", "TipTarget", "check_target_setting", "class_names_of",
           "classifier_states", "resolve_target", "target_classifier", "target_of",
           "with_target_threshold"]
