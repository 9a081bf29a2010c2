"""The inference-only forward pass over weights prepared for it: what `Predictor` runs on the hot path.

Training needs the NNX module (`model.apply_train`); inference needs only the frozen arithmetic, so the
weights are prepared once per parameter snapshot, outside the per-image executable:
- BN with running statistics becomes one per-channel `scale` and `shift` (fused into the conv/FC epilogue);
- the FC kernels are laid out for the batch size. At batch 1 a dense layer is a matrix-vector product
  whose cost is one read of the kernel; XLA's CPU backend streams an (out, in) kernel contracted over its
  contiguous last axis ~1.4x faster than the (in, out) kernel that training keeps (measured on the `paper`
  first FC, 2.1 GB: ~70 versus ~97 ms), but the same (out, in) kernel is ~5x slower than (in, out) at
  batch >= 2. So batch 1 uses `GEMV` (out, in) and larger batches use `GEMM` (in, out), unchanged.
On the CPU the convolutions are compiled with XLA's YNNPACK library fusion (`compiler_options`): ~15 %
faster for `paper` (its 16x16 and 64-map layers), the same for `compact`, identical outputs to rounding.
`model.apply_eval` stays the reference; tests hold the two to float32 rounding for every layer plan.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deepspm.nets.model import NetDef, NetVars


class DenseLayout(str, Enum):
    GEMM = "gemm"  # kernels (in, out), as trained: any batch size
    GEMV = "gemv"  # kernels (out, in): the faster layout at batch 1


def layout_for(batch_size: int) -> DenseLayout:
    return DenseLayout.GEMV if batch_size == 1 else DenseLayout.GEMM


# XLA's (experimental, jaxlib-pinned) switch that hands each convolution to YNNPACK; a CPU-backend option.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def compiler_options() -> dict[str, str]:
    """XLA options for the serving executables on the default backend (none off the CPU)."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


class Affine(NamedTuple):
    """A kernel with its per-output-channel epilogue `y = relu(x . kernel * scale + shift)` (BN folded)."""

    kernel: jax.Array
    scale: jax.Array
    shift: jax.Array


class ServingWeights(NamedTuple):
    convs: tuple[Affine, ...]
    dense: tuple[Affine, ...]
    head_kernel: jax.Array
    head_bias: jax.Array


def _value(variable: Any) -> jax.Array:
    return variable[...]


def _fold_bn(params: Any, stats: Any, epsilon: float) -> tuple[jax.Array, jax.Array]:
    scale = _value(params["scale"]) * jax.lax.rsqrt(_value(stats["var"]) + epsilon)
    return scale, _value(params["bias"]) - _value(stats["mean"]) * scale


def prepare(net: NetDef, variables: NetVars, layout: DenseLayout) -> ServingWeights:
    """The serving form of `variables` (pure; jit it: for `paper` the GEMV layout copies 2.2 GB once)."""
    params, stats, eps = variables.params, variables.batch_stats, net.spec.bn_epsilon

    def oriented(kernel: jax.Array) -> jax.Array:
        return kernel.T if layout is DenseLayout.GEMV else kernel

    convs = tuple(
        Affine(_value(params["convs"][i]["conv"]["kernel"]), *_fold_bn(params["convs"][i]["bn"], stats["convs"][i]["bn"], eps))
        for i in range(sum(len(s) for s in net.spec.conv_sets))
    )
    dense = tuple(
        Affine(oriented(_value(params["dense"][i]["linear"]["kernel"])),
               *_fold_bn(params["dense"][i]["bn"], stats["dense"][i]["bn"], eps))
        for i in range(len(net.spec.hidden))
    )
    head = params["head"]
    return ServingWeights(convs, dense, oriented(_value(head["kernel"])), _value(head["bias"]))


def _dense(x: jax.Array, kernel: jax.Array, layout: DenseLayout) -> jax.Array:
    contracted = 1 if layout is DenseLayout.GEMV else 0
    return jax.lax.dot_general(x, kernel, (((1,), (contracted,)), ((), ())))


def forward(net: NetDef, weights: ServingWeights, images: jax.Array, layout: DenseLayout) -> jax.Array:
    """(B, 64, 64, 1) images -> (B, n_outputs) raw outputs; eval mode, the same arithmetic as `apply_eval`."""
    spec, x, layer = net.spec, images, 0
    for conv_set, pooled in zip(spec.conv_sets, spec.pool_after):
        for _ in conv_set:
            conv = weights.convs[layer]
            x = jax.lax.conv_general_dilated(x, conv.kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x * conv.scale + conv.shift)
            layer += 1
        if pooled:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = jnp.mean(x, axis=(1, 2)) if spec.global_pool else x.reshape(x.shape[0], -1)
    for fc in weights.dense:
        x = jax.nn.relu(_dense(x, fc.kernel, layout) * fc.scale + fc.shift)
    return _dense(x, weights.head_kernel, layout) + weights.head_bias
