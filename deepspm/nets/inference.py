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
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from deepspm.nets.model import NetDef, NetVars, apply_eval

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


class Predictor:
    """Eval-mode forward pass of one net (BN running statistics, no dropout).

    `output="probability"`: sigmoid of the logits; shape (B,) for a 1-logit classifier, (B, K) for K labels.
    `output="values"`: raw outputs, e.g. the agent's Q-values (B, n_actions).
    Thread-safe: each call reads the current variables once (an atomic reference read), so a concurrent
    `set_variables` never tears a call; the compiled executables themselves are reentrant.
    """

    def __init__(self, net: NetDef, variables: NetVars, output: Output = "probability") -> None:
        if output not in ("probability", "values"):
            raise ValueError(f"unknown output kind {output!r}")
        self.net = net
        self.output: Output = output
        self.traces = TraceCounter()
        # The executables take the flat leaves: flattening the nnx.State tree costs ~0.1 ms per call.
        leaves, self._treedef = jax.tree.flatten(variables)
        self._current: tuple[NetVars, list[Any]] = (variables, leaves)
        self._compiled: dict[int, Any] = {}
        self._compile_lock = threading.Lock()
        treedef = self._treedef

        def forward(leaves: list[jax.Array], images: jax.Array) -> jax.Array:
            outputs = apply_eval(net, jax.tree.unflatten(treedef, leaves), images)
            if output == "probability":
                outputs = jax.nn.sigmoid(outputs)
                if net.n_outputs == 1:
                    outputs = outputs[:, 0]
            return outputs

        self._jitted = jax.jit(self.traces.wrap("forward", forward))

    @property
    def variables(self) -> NetVars:
        return self._current[0]

    def set_variables(self, variables: NetVars) -> None:
        """Swap in new variables of the same structure (no recompilation)."""
        self._current = (variables, self._leaves_of(variables))

    def _leaves_of(self, variables: NetVars) -> list[Any]:
        leaves, treedef = jax.tree.flatten(variables)
        if treedef != self._treedef:
            raise ValueError("variables do not match this predictor's net structure")
        return leaves

    def compile(self, batch_sizes: Iterable[int]) -> None:
        """Trace, lower and compile for each batch size now, before the run needs it."""
        for batch_size in batch_sizes:
            self._executable(int(batch_size))

    def _executable(self, batch_size: int) -> Any:
        executable = self._compiled.get(batch_size)
        if executable is None:
            with self._compile_lock:
                executable = self._compiled.get(batch_size)
                if executable is None:
                    side = self.net.spec.image_side_px
                    images = jax.ShapeDtypeStruct((batch_size, side, side, 1), jnp.float32)
                    executable = self._jitted.lower(abstract_like(self._current[1]), images).compile()
                    self._compiled[batch_size] = executable
        return executable

    def __call__(self, images: Any, variables: NetVars | None = None) -> np.ndarray:
        """Images (B, 64, 64[, 1]) pre-processed to [-1.5, 1.5] -> numpy outputs; compiles a new B once."""
        batch = as_image_batch(images, self.net.spec.image_side_px)
        leaves = self._current[1] if variables is None else self._leaves_of(variables)
        return np.asarray(self._executable(batch.shape[0])(leaves, batch))

    def predict_batched(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Many images in fixed-size chunks (the last one zero-padded), so only one shape is ever compiled."""
        batch = as_image_batch(images, self.net.spec.image_side_px)
        n = batch.shape[0]
        size = max(1, min(batch_size, n))
        variables = self._current[0]
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
