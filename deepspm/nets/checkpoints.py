"""Self-describing orbax checkpoints for nets and for the learner's state (`LearnerState` and its buffer).

A checkpoint directory holds two orbax items: `arrays` (a flat dict of named arrays) and `meta` (JSON:
format tag, kind, preset name and full layer plan, head size, library versions, caller metadata). Restoring
reads `meta` first, rebuilds the net abstractly (`nnx.eval_shape`, no allocation) and restores the arrays
against that abstract state, so a fresh process needs nothing but the path. A checkpoint is written
completely under a hidden staging name and then renamed into place, so a killed process never leaves a
half-written checkpoint at the path.

Saving is blocking I/O: from the event loop use the `*_async` variants (they run in a worker thread).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deepspm.nets.checkpoint_info import FORMAT, KINDS, CheckpointError, read_checkpoint_meta, require_kind
from deepspm.nets.dqn import DQNConfig, Learner, LearnerState, make_optimizer
from deepspm.nets.ensemble import EnsembleDef
from deepspm.nets.model import NetDef, NetVars
from deepspm.nets.presets import NetSpec
from deepspm.nets.replay_buffer import ReplayBuffer


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten_named(tree: Any) -> dict[str, Any]:
    """{'convs.0.conv.kernel.value': array, ...}: stable, readable names for every leaf."""
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten_named(abstract: Any, named: dict[str, Any]) -> Any:
    """Inverse of `flatten_named` against an abstract tree of the same structure."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, _leaf in paths_and_leaves:
        name = ".".join(_key_name(k) for k in path)
        if name not in named:
            raise KeyError(f"checkpoint lacks array {name}")
        leaves.append(named[name])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _checkpointer() -> ocp.Checkpointer:
    """Orbax's checkpointer. In a multi-process job (data-parallel training) each process reads and writes its
    own checkpoints alone: orbax would otherwise coordinate every process of the job on one save."""
    if jax.process_count() == 1:
        return ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=alone),
        arrays=ocp.StandardCheckpointHandler(multiprocessing_options=alone),
        meta=ocp.JsonCheckpointHandler(multiprocessing_options=alone),
    )  # (orbax's numpy writer writes on process 0 only: `_write` saves there alone)
    return ocp.Checkpointer(handler, multiprocessing_options=alone)


def _write(path: Path | str, arrays: dict[str, Any], meta: dict[str, Any], overwrite: bool) -> Path:
    """Write a complete checkpoint beside `path`, then move it into place.

    Replacing keeps the old checkpoint until the new one is complete (renamed aside, then deleted), so an
    interrupted save leaves either the old or the new checkpoint, never a mixture.
    """
    path = Path(path).absolute()
    if jax.process_index() != 0:  # a multi-process job has one writer, process 0 (the others hold the same values)
        return path
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    # orbax cannot store zero-size arrays; they are recreated from the abstract shape on restore.
    stored = {name: value for name, value in arrays.items() if np.size(value) > 0}
    if jax.process_count() > 1:  # a process's arrays are host-local there: orbax stores them as numpy
        stored = {name: _host_copy(value) for name, value in stored.items()}
    staging = path.with_name(f".{path.name}.saving-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    _checkpointer().save(
        staging, ocp.args.Composite(arrays=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta))
    )
    if path.exists():
        retired = path.with_name(f".{path.name}.replaced-{os.getpid()}-{threading.get_ident()}")
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(path)
    return path


def _host_copy(value: Any) -> Any:
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return value  # (no net stores keys)
    return np.asarray(value)


def read_meta(path: Path | str) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (cheap: no arrays are read); `CheckpointError` if `path` is none."""
    read_checkpoint_meta(path)  # a clear error for a wrong path before orbax sees it
    try:
        meta = _checkpointer().restore(Path(path).absolute(), ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    return meta


def _read_arrays(path: Path | str, abstract: dict[str, Any]) -> dict[str, Any]:
    wanted = {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in abstract.items() if np.prod(a.shape) > 0}
    restored = _checkpointer().restore(
        Path(path).absolute(), ocp.args.Composite(arrays=ocp.args.StandardRestore(wanted))
    )["arrays"]
    return {n: restored[n] if n in restored else np.zeros(a.shape, a.dtype) for n, a in abstract.items()}


def _base_meta(kind: str, net: NetDef, metadata: dict[str, Any] | None) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    extra = {"ensemble": net.to_meta()} if isinstance(net, EnsembleDef) else {}
    return {**extra,
        "format": FORMAT,
        "kind": kind,
        "preset": net.spec.name,
        "spec": net.spec.to_dict(),
        "n_outputs": net.n_outputs,
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "metadata": metadata or {},
    }


def _net_from_meta(meta: dict[str, Any]) -> NetDef:
    return NetDef(NetSpec.from_dict(meta["spec"]), int(meta["n_outputs"]))


def _any_net_from_meta(meta: dict[str, Any]) -> NetDef:
    """The net of a checkpoint: a `NetDef`, or an `EnsembleDef` when the metadata has an `ensemble` entry."""
    net = _net_from_meta(meta)
    ensemble = meta.get("ensemble")
    if ensemble is None:
        return net
    try:
        return EnsembleDef.of_member(net, int(ensemble["k"]), str(ensemble.get("combine", "mean")))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"unreadable ensemble entry {ensemble!r} ({e})") from None


def _to_device(tree: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree)


# --- nets -------------------------------------------------------------------------------------------------


@dataclass
class NetCheckpoint:
    net: NetDef  # an `EnsembleDef` for an ensemble; its variables are stacked on a leading member axis
    variables: NetVars
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)  # the caller's metadata (metrics, seed, data...)


def save_net(
    path: Path | str, net: NetDef, variables: NetVars, *, kind: str, metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a classifier or agent net (params + BN statistics) with self-describing metadata."""
    return _write(path, flatten_named(variables), _base_meta(kind, net, metadata), overwrite)


async def save_net_async(
    path: Path | str, net: NetDef, variables: NetVars, *, kind: str, metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    return await asyncio.to_thread(
        save_net, path, net, variables, kind=kind, metadata=metadata, overwrite=overwrite
    )


def load_net(path: Path | str, expect_kind: str | None = None) -> NetCheckpoint:
    """Restore a net into a fresh process: metadata first, then arrays against the abstract variables.
    An ensemble checkpoint comes back as an `EnsembleDef` with stacked variables, which `Predictor` takes."""
    if expect_kind is not None:
        require_kind(path, expect_kind)
    meta = read_meta(path)
    net = _any_net_from_meta(meta)
    abstract = net.abstract_vars()
    arrays = _read_arrays(path, flatten_named(abstract))
    return NetCheckpoint(net, _to_device(unflatten_named(abstract, arrays)), meta["kind"], meta["metadata"])


# --- the learner's state ------------------------------------------------------------------------------------


def save_learner(
    path: Path | str, learner: Learner, *, metadata: dict[str, Any] | None = None, overwrite: bool = False,
    buffer: bool = True,
) -> Path:
    """Everything to resume learning exactly: the learner's one pytree (`LearnerState`: online and target
    nets, Adam state, counters) and the replay buffer beside it (with its sampling RNG), config and seed.
    `buffer=False` leaves the memory's rows out (a run's journal holds its experience): it loads back empty,
    with the sampling RNG where it was."""
    state, buffer_state = learner.training_state() if buffer else learner.resume_point()
    return write_learner_state(path, learner, state, buffer_state, metadata=metadata, overwrite=overwrite)


def write_learner_state(
    path: Path | str, learner: Learner, state: LearnerState, buffer_state: dict[str, Any], *,
    metadata: dict[str, Any] | None = None, overwrite: bool = False,
) -> Path:
    """Write a state taken from `learner` earlier (`training_state`, `resume_point`) as `save_learner` does."""
    tree = {"state": state._replace(updates=np.int32(state.updates), env_steps=np.int32(state.env_steps)),
            "buffer": buffer_state["arrays"]}
    meta = _base_meta("dqn_training", learner.net, metadata)
    meta["learner"] = {"seed": learner.seed, "config": learner.config.to_dict(), "buffer": buffer_state["meta"]}
    return _write(path, flatten_named(tree), meta, overwrite)


async def save_learner_async(
    path: Path | str, learner: Learner, *, metadata: dict[str, Any] | None = None, overwrite: bool = False,
    buffer: bool = True,
) -> Path:
    return await asyncio.to_thread(save_learner, path, learner, metadata=metadata, overwrite=overwrite, buffer=buffer)


def load_learner(path: Path | str) -> tuple[Learner, dict[str, Any]]:
    """A fresh `Learner` in the saved state, and the caller's metadata."""
    require_kind(path, "dqn_training")
    meta = read_meta(path)
    net = _net_from_meta(meta)
    learner_meta = meta["learner"]
    config = DQNConfig(**learner_meta["config"])
    abstract_vars = net.abstract_vars()
    buffer_meta = learner_meta["buffer"]
    size, side, n_actions = int(buffer_meta["size"]), int(buffer_meta["image_side_px"]), int(buffer_meta["n_actions"])

    def sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, np.dtype(dtype))

    counter = sds((), np.int32)
    abstract = {
        "state": LearnerState(abstract_vars, abstract_vars,
                              jax.eval_shape(make_optimizer(config).init, abstract_vars.params), counter, counter),
        "buffer": {
            "states": sds((size, side, side), np.float32), "next_states": sds((size, side, side), np.float32),
            "actions": sds((size,), np.int32), "rewards": sds((size,), np.float32), "dones": sds((size,), bool),
            "next_masks": sds((size, n_actions), bool),
        },
    }
    tree = unflatten_named(abstract, _read_arrays(path, flatten_named(abstract)))
    saved = tree["state"]
    state = LearnerState(_to_device(saved.online), _to_device(saved.target), _to_device(saved.opt_state),
                         int(saved.updates), int(saved.env_steps))
    buffer = ReplayBuffer(n_actions, int(buffer_meta["capacity"]), side, seed=int(learner_meta["seed"]))
    buffer.load_state_dict({"arrays": {k: np.asarray(v) for k, v in tree["buffer"].items()}, "meta": buffer_meta})
    learner = Learner(net, state.online, config, seed=int(learner_meta["seed"]), buffer=buffer, state=state)
    return learner, meta["metadata"]
