"""Compiled inference: `Predictor` (p_good or Q-values from images) and its async wrapper.

One jitted pure function per predictor, AOT-compiled per batch size (`compile`) before a run so that the
first real image does not pay for tracing. The variables are an argument, not a constant, so a new
snapshot (after a DQN update) reuses the same executable. Inference is CPU work: from the event loop, call
`predict_async`, which runs it in a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from deepspm.nets import serving
from deepspm.nets.model import NetDef, NetVars
from deepspm.nets.serving import DenseLayout, layout_for

Output = Literal["probability", "values"]


class TraceCounter(Counter):
    """Counts how often each named function body is traced (a Python side effect runs only when tracing)."""

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def traced(*args: Any, **kwargs: Any) -> Any:
            self[name] += 1
            return fn(*args, **kwargs)

        return traced


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs for every array leaf of `tree` (for AOT lowering without data)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def as_image_batch(images: Any, side_px: int) -> np.ndarray:
    """(B, side, side) or (B, side, side, 1) or a single (side, side) image -> float32 (B, side, side, 1)."""
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[1:] != (side_px, side_px, 1):
        raise ValueError(f"expected images of {side_px}x{side_px} px, got array of shape {np.shape(images)}")
    return batch


class _Prepared:
    """One parameter snapshot and its serving forms, prepared lazily per dense layout (see `serving`)."""

    def __init__(self, variables: NetVars, prepare: Callable[[NetVars, DenseLayout], list[Any]]) -> None:
        self.variables = variables
        self._prepare = prepare
        self._leaves: dict[DenseLayout, list[Any]] = {}

    def leaves(self, layout: DenseLayout) -> list[Any]:
        # Two threads may both prepare a missing layout; both results are equal and the dict write is atomic.
        leaves = self._leaves.get(layout)
        if leaves is None:
            leaves = self._leaves[layout] = self._prepare(self.variables, layout)
        return leaves


UNROLL_MEMBERS_ON_CPU = True


def members_of(one: Callable[[Any], jax.Array], stacked: Any, k: int) -> jax.Array:
    """`one` applied to each of the `k` members of `stacked` weights, stacked: (K, ...). On a CPU the members are
    unrolled in the traced function (XLA's CPU convolutions run a vmapped member axis as a slow batched
    convolution: 1.5x separate calls for wide members at batch 1, `bench_ensemble`); on an accelerator vmapped
    (one batched convolution: 1.1x one member on an H200). Either way it is one jitted call."""
    if UNROLL_MEMBERS_ON_CPU and jax.default_backend() == "cpu":
        return jnp.stack([one(jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(k)])
    return jax.vmap(one)(stacked)


class Predictor:
    """Eval-mode forward pass of one net (BN running statistics, no dropout).

    `output="probability"`: sigmoid of the logits; shape (B,) for a 1-logit classifier, (B, K) for K labels.
    `output="values"`: raw outputs, e.g. the agent's Q-values (B, n_actions).
    `net` may be an `EnsembleDef` (variables stacked on a leading member axis): the members run in one jitted
    call (`members_of`) and are combined by the ensemble's rule (`deepspm.nets.ensemble`); the shapes are as above.
    The executables run `serving.forward` over weights prepared once per parameter snapshot (BN folded,
    dense kernels laid out for the batch size); passing the same `variables` object again reuses them.
    Thread-safe: each call reads the current snapshot once (an atomic reference read), so a concurrent
    `set_variables` never tears a call; the compiled executables themselves are reentrant.
    """

    def __init__(self, net: NetDef, variables: NetVars, output: Output = "probability") -> None:
        if output not in ("probability", "values"):
            raise ValueError(f"unknown output kind {output!r}")
        from deepspm.nets.ensemble import EnsembleDef, combine_outputs, dihedral_views  # (ensemble imports classifier)

        self.net = net
        self.output: Output = output
        self.traces = TraceCounter()
        self._treedef = jax.tree.structure(variables)
        self._serving_treedefs: dict[DenseLayout, Any] = {}
        # An ensemble (`EnsembleDef`, variables stacked on a leading member axis) runs as ONE call: prepare is
        # vmapped over the members, forward runs each member (`members_of`; images shared) and combines the
        # outputs inside the same function.
        ensemble = net if isinstance(net, EnsembleDef) else None
        member: NetDef = ensemble.member if ensemble is not None else net
        self._member = member
        # a "dihedral-" rule judges the 8 symmetries of every image in the same call: the members see 8x the batch
        self._views = ensemble.views if ensemble is not None else 1

        def prepare(layout: DenseLayout, variables: NetVars) -> Any:
            one = partial(serving.prepare, member, layout=layout)
            return jax.vmap(one)(variables) if ensemble is not None else one(variables)

        self._prepare_fn = prepare
        self._prepare_jitted = {
            layout: jax.jit(self.traces.wrap(f"prepare {layout.value}", partial(prepare, layout)))
            for layout in DenseLayout
        }
        self._current = _Prepared(variables, self._prepare)
        self._explicit: _Prepared | None = None  # the last snapshot passed per call (the DQN actor's)
        self._compiled: dict[int, Any] = {}
        self._compile_lock = threading.Lock()

        def forward(layout: DenseLayout, leaves: list[jax.Array], images: jax.Array) -> jax.Array:
            weights = jax.tree.unflatten(self._serving_treedefs[layout], leaves)

            seen = dihedral_views(images) if self._views > 1 else images

            def one(w: Any) -> jax.Array:
                outputs = serving.forward(member, w, seen, layout)
                return jax.nn.sigmoid(outputs) if output == "probability" else outputs

            if ensemble is not None:
                outputs = combine_outputs(members_of(one, weights, ensemble.k), ensemble.combine, output == "probability")
            else:
                outputs = one(weights)
            if output == "probability" and net.n_outputs == 1:
                outputs = outputs[:, 0]
            return outputs

        self._jitted = {layout: jax.jit(self.traces.wrap("forward", partial(forward, layout))) for layout in DenseLayout}

    @property
    def variables(self) -> NetVars:
        return self._current.variables

    def set_variables(self, variables: NetVars) -> None:
        """Swap in new variables of the same structure (no recompilation); prepares the layouts in use."""
        prepared = self._snapshot_of(variables)
        for layout in {self._layout(b) for b in self._compiled}:
            prepared.leaves(layout)
        self._current = prepared

    def _snapshot_of(self, variables: NetVars) -> _Prepared:
        if jax.tree.structure(variables) != self._treedef:  # type: ignore[operator]  # jaxlib: no PyTreeDef stub
            raise ValueError("variables do not match this predictor's net structure")
        return _Prepared(variables, self._prepare)

    def _layout(self, batch_size: int) -> DenseLayout:
        """The dense layout for a call of `batch_size` images (the members see `views` x as many)."""
        return layout_for(batch_size * self._views)

    def _prepare(self, variables: NetVars, layout: DenseLayout) -> list[Any]:
        return jax.tree.leaves(self._prepare_jitted[layout](variables))

    def _serving_abstract(self, layout: DenseLayout) -> list[Any]:
        """ShapeDtypeStructs of the prepared leaves (records the serving treedef of `layout`)."""
        shapes = jax.eval_shape(partial(self._prepare_fn, layout), abstract_like(self.variables))
        leaves, self._serving_treedefs[layout] = jax.tree.flatten(shapes)
        return leaves

    def compile(self, batch_sizes: Iterable[int]) -> None:
        """Trace, lower and compile for each batch size now, before the run needs it."""
        for batch_size in batch_sizes:
            self._executable(int(batch_size))
            self._current.leaves(self._layout(int(batch_size)))

    def _executable(self, batch_size: int) -> Any:
        executable = self._compiled.get(batch_size)
        if executable is None:
            with self._compile_lock:
                executable = self._compiled.get(batch_size)
                if executable is None:
                    layout = self._layout(batch_size)
                    side = self.net.spec.image_side_px
                    images = jax.ShapeDtypeStruct((batch_size, side, side, 1), jnp.float32)
                    lowered = self._jitted[layout].lower(self._serving_abstract(layout), images)
                    executable = lowered.compile(compiler_options=serving.compiler_options())
                    self._compiled[batch_size] = executable
        return executable

    def _prepared_for(self, variables: NetVars | None) -> _Prepared:
        current = self._current
        if variables is None or variables is current.variables:
            return current
        explicit = self._explicit
        if explicit is None or explicit.variables is not variables:
            explicit = self._explicit = self._snapshot_of(variables)
        return explicit

    def __call__(self, images: Any, variables: NetVars | None = None) -> np.ndarray:
        """Images (B, 64, 64[, 1]) pre-processed to [-1.5, 1.5] -> numpy outputs; compiles a new B once."""
        batch = as_image_batch(images, self.net.spec.image_side_px)
        executable = self._executable(batch.shape[0])
        leaves = self._prepared_for(variables).leaves(self._layout(batch.shape[0]))
        return np.asarray(executable(leaves, batch))

    def predict_batched(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Many images in fixed-size chunks (the last one zero-padded), so only one shape is ever compiled."""
        batch = as_image_batch(images, self.net.spec.image_side_px)
        n = batch.shape[0]
        size = max(1, min(batch_size, n))
        variables = self._current.variables
        chunks = []
        for start in range(0, n, size):
            chunk = batch[start : start + size]
            if chunk.shape[0] < size:
                chunk = np.concatenate([chunk, np.zeros((size - chunk.shape[0],) + chunk.shape[1:], np.float32)])
            chunks.append(self(chunk, variables)[: n - start])
        if not chunks:
            squeezed = self.output == "probability" and self.net.n_outputs == 1
            return np.zeros((0,) if squeezed else (0, self.net.n_outputs), np.float32)
        return np.concatenate(chunks)


async def predict_async(predictor: Callable[..., np.ndarray], images: Any, **kwargs: Any) -> np.ndarray:
    """Run `predictor(images)` in a worker thread so the event loop keeps serving the instrument meanwhile."""
    return await asyncio.to_thread(predictor, images, **kwargs)
