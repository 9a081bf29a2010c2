"""Ensembles of classifiers (Gordon et al. 2019 used majority-voting CNN ensembles for H:Si(100) tip states).

An ensemble is K members of ONE net definition whose variables are stacked along a new leading axis
(every leaf gets shape (K, ...)). It is stored as one checkpoint (`checkpoints.save_net` with an
`EnsembleDef`) and run as one call: `Predictor` runs the serving forward pass of every member (vmapped over the
member axis on an accelerator, unrolled on a CPU, where that is faster; the images are shared), then combines
the members' outputs inside the same jitted function.

Combination rules (`COMBINE_RULES`), per output:
- "mean": the mean of the members' probabilities (sigmoid of each member's logits);
- "vote": the fraction of members whose probability is above 0.5 (majority vote: the fraction > 0.5). With
  the run's threshold 0.9 a vote score passes only when more than 90 % of the members say yes;
- "dihedral-mean", "dihedral-vote": test-time augmentation: every member also judges the 7 other symmetries of
  the square of each image (90-degree rotations and mirrorings, `dihedral_views`), in the same call (the batch
  is 8x larger), and the rule runs over the 8K (member, view) outputs. The rule is stored with the ensemble in
  the checkpoint (`meta.ensemble.combine`), so the run, replay and evaluate apply it; a reader that does not
  know it refuses the checkpoint rather than dropping the views.
For raw outputs ("values") every rule averages the outputs.

Training (`train_ensemble`): a held-out evaluation split is carved first (seeded, stratified), then member
k trains on the rest with seed `seed + k`, i.e. its own initialisation, shuffling, flips and its own
train/validation split of the remaining rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepspm.nets import parallel
from deepspm.nets.checkpoint_info import CheckpointError
from deepspm.nets.classifier import ClassifierConfig, TrainResult, stratified_split, train_classifier
from deepspm.nets.model import NetDef, NetVars
from deepspm.nets.presets import NetSpec

BASE_RULES = ("mean", "vote")
DIHEDRAL = "dihedral-"  # the prefix of a rule that also averages over the 8 symmetries of each image
COMBINE_RULES = (*BASE_RULES, *(DIHEDRAL + rule for rule in BASE_RULES))
N_DIHEDRAL = 8
VOTE_LEVEL = 0.5  # a member votes "yes" for an output when its probability is above this


class EnsembleError(CheckpointError):
    """An ensemble cannot be built or used as asked (no members, mixed nets, unknown combination rule, an
    ensemble where a single net is needed); a `CheckpointError`, so the command line reports it in one line."""


@dataclass(frozen=True)
class EnsembleDef(NetDef):
    """K members of the net (`spec`, `n_outputs`), combined by `combine`. A `NetDef` (so code that asks a net
    for its input size and head size, and every signature typed `NetDef`, takes it), hashable; its variables
    are the members' stacked on a leading axis. Only classifiers form ensembles: an agent, the DQN learner and
    fine-tuning need a single net (`require_single`)."""

    k: int = 1
    combine: str = "mean"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise EnsembleError(f"an ensemble needs at least one member, got {self.k}")
        if self.combine not in COMBINE_RULES:
            raise EnsembleError(f"unknown combination rule {self.combine!r}; use one of {', '.join(COMBINE_RULES)}")

    @classmethod
    def of_member(cls, member: NetDef, k: int, combine: str = "mean") -> EnsembleDef:
        return cls(member.spec, member.n_outputs, int(k), combine)

    @property
    def member(self) -> NetDef:
        """The single net every member is."""
        return NetDef(self.spec, self.n_outputs)

    def abstract_vars(self) -> NetVars:
        """ShapeDtypeStructs of the stacked variables (leading axis K)."""
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((self.k, *a.shape), a.dtype), self.member.abstract_vars())

    def init(self, key: jax.Array) -> NetVars:
        """K fresh members (keys folded from `key` by member index), stacked."""
        return stack_members([self.member.init(jax.random.fold_in(key, i)) for i in range(self.k)])

    @property
    def views(self) -> int:
        """How many symmetries of each image every member judges: 8 for a "dihedral-" rule, else 1."""
        return views_of(self.combine)

    def to_meta(self) -> dict[str, Any]:
        return {"k": self.k, "combine": self.combine}


def views_of(rule: str) -> int:
    """The number of views of each image a combination rule averages over (8 with "dihedral-", else 1)."""
    return N_DIHEDRAL if rule.startswith(DIHEDRAL) else 1


def dihedral_views(images: jax.Array) -> jax.Array:
    """(B, S, S, C) -> (8B, S, S, C): the 8 symmetries of the square, view-major (rows v*B .. v*B + B - 1 are
    view v of every image): identity, the 3 rotations by 90 degrees, then the same 4 of the transpose."""
    views: list[jax.Array] = []
    for base in (images, jnp.swapaxes(images, 1, 2)):
        views.extend(jnp.rot90(base, k, axes=(1, 2)) for k in range(4))
    return jnp.concatenate(views)


def require_single(net: NetDef, purpose: str) -> NetDef:
    """`net` itself, or `EnsembleError` naming `purpose` when it is an ensemble."""
    if isinstance(net, EnsembleDef):
        raise EnsembleError(f"{purpose} needs a single net, not an ensemble of {net.k}")
    return net


def stack_members(members: Sequence[NetVars]) -> NetVars:
    """K variable trees of the same structure -> one tree whose leaves have a leading member axis."""
    if not members:
        raise EnsembleError("no members to stack")
    structure = jax.tree.structure(members[0])
    shapes = [np.shape(a) for a in jax.tree.leaves(members[0])]
    for m in members[1:]:
        if (jax.tree.structure(m) != structure  # type: ignore[operator]  # jaxlib: no PyTreeDef stub
                or [np.shape(a) for a in jax.tree.leaves(m)] != shapes):
            raise EnsembleError("the members' variables differ in structure (not the same net)")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)


def member_variables(stacked: NetVars, index: int) -> NetVars:
    """The variables of one member of a stacked tree."""
    return jax.tree.map(lambda a: a[index], stacked)


def combine_outputs(outputs: jax.Array, rule: str, probability: bool) -> jax.Array:
    """(K, V*B, ...) member outputs, V = `views_of(rule)` views of B images (view-major, as `dihedral_views`
    stacks them) -> (B, ...): see the module docstring for the rules."""
    if rule not in COMBINE_RULES:
        raise EnsembleError(f"unknown combination rule {rule!r}")
    views = views_of(rule)
    if views > 1:  # (K, V*B, ...) -> (K*V, B, ...): each (member, view) pair is one voter
        outputs = outputs.reshape(outputs.shape[0] * views, outputs.shape[1] // views, *outputs.shape[2:])
    if probability and rule.removeprefix(DIHEDRAL) == "vote":
        return jnp.mean((outputs > VOTE_LEVEL).astype(outputs.dtype), axis=0)
    return jnp.mean(outputs, axis=0)


@dataclass
class EnsembleResult:
    """K trained members, the stacked ensemble and the held-out rows no member trained or validated on."""

    net: EnsembleDef
    variables: NetVars
    members: list[TrainResult]
    seeds: list[int]
    holdout_indices: np.ndarray  # rows of the input held out from every member (sorted)
    pool_indices: np.ndarray  # the other rows: each member's own train/validation split is carved from these

    def summary(self) -> dict[str, Any]:
        return {
            "k": self.net.k, "combine": self.net.combine, "seeds": self.seeds,
            "n_holdout": int(self.holdout_indices.size), "n_pool": int(self.pool_indices.size),
            "members": [{"seed": s, "epoch": m.epoch, "n_train": int(m.train_indices.size),
                         "n_val": int(m.val_indices.size), "val_metrics": m.metrics}
                        for s, m in zip(self.seeds, self.members)],
        }


def train_ensemble(
    images: Any, labels: Any, preset: NetSpec | str, epochs: int, seed: int, k: int, *,
    holdout_fraction: float = 0.2, combine: str = "mean", config: ClassifierConfig | None = None,
    class_names: Sequence[str] | None = None, progress: bool = True, devices: parallel.Devices = None,
    on_member: Callable[[int, TrainResult], None] | None = None, holdout_indices: Any = None,
) -> EnsembleResult:
    """Train `k` members (seeds seed, seed+1, ...) on the rows outside a seeded stratified hold-out of
    `holdout_fraction` (0: no hold-out), or outside the given `holdout_indices` (rows of `images`; a hold-out
    fixed by the caller, e.g. the H:Si(100) set's). Each member splits the remaining rows itself
    (`config.val_fraction`, by its own seed), so the members see different training rows."""
    config = config if config is not None else ClassifierConfig()
    if k < 1:
        raise EnsembleError(f"an ensemble needs at least one member, got {k}")
    if combine not in COMBINE_RULES:
        raise EnsembleError(f"unknown combination rule {combine!r}; use one of {', '.join(COMBINE_RULES)}")
    labels = np.asarray(labels)
    images = np.asarray(images)
    if images.shape[0] != labels.shape[0]:
        raise EnsembleError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if holdout_indices is None:
        pool, holdout = stratified_split(labels, holdout_fraction, seed)
    else:
        holdout = np.unique(np.asarray(holdout_indices, dtype=int))
        if holdout.size and (holdout[0] < 0 or holdout[-1] >= labels.shape[0]):
            raise EnsembleError(f"hold-out rows must be in 0..{labels.shape[0] - 1}")
        pool = np.setdiff1d(np.arange(labels.shape[0]), holdout)
    seeds = [seed + i for i in range(k)]
    members: list[TrainResult] = []
    steps: dict[Any, Any] = {}  # one compiled train step for all members (same net, config and sizes)
    for i, member_seed in enumerate(seeds):
        result = train_classifier(images[pool], labels[pool], preset, epochs, member_seed, config=config,
                                  class_names=class_names, progress=progress, devices=devices, step_cache=steps)
        # report the member's rows in the caller's numbering
        result = replace(result, train_indices=pool[result.train_indices], val_indices=pool[result.val_indices])
        members.append(result)
        if on_member is not None:
            on_member(i, result)
    net = EnsembleDef.of_member(members[0].net, k, combine)
    return EnsembleResult(net, stack_members([m.variables for m in members]), members, seeds, holdout, pool)
