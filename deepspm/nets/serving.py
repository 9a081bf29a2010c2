"""The inference-only forward pass over weights prepared for it: what `Predictor` runs on the hot path.

Training needs the NNX module (`model.apply_train`); inference needs only the frozen arithmetic, so the
weights are prepared once per parameter snapshot, outside the per-image executable:
- BN with running statistics becomes one per-channel `scale` and `shift` (fused into the conv/FC epilogue);
- the FC kernels are laid out for the batch size. At batch 1 a dense layer is a matrix-vector product
  whose cost is one read of the kernel; XLA's CPU backend streams an (out, in) kernel contracted over its
  contiguous last axis ~1.4x faster than the (in, out) kernel that training keeps (measured on the `paper`
  first FC, 2.1 GB: ~70 versus ~97 ms), but the same (out, in) kernel is ~5x slower than (in, out) at
  batch >= 2. So batch 1 uses `GEMV` (out, in) and larger batches use `GEMM` (in, out), unchanged.
- the convs with enough work (`winograd_plan`) run as Winograd F(2x2, 3x3): 2.25x fewer multiplications
  (`paper` convs ~33 -> ~21 ms); their kernels are transformed here, once.
On the CPU the direct convolutions are compiled with XLA's YNNPACK library fusion (`compiler_options`).
`model.apply_eval` stays the reference; tests hold the two to float32 rounding for every layer plan.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepspm.nets.model import NetDef, NetVars
from deepspm.nets.presets import NetSpec


class DenseLayout(str, Enum):
    GEMM = "gemm"  # kernels (in, out), as trained: any batch size
    GEMV = "gemv"  # kernels (out, in): the faster layout at batch 1


def layout_for(batch_size: int) -> DenseLayout:
    return DenseLayout.GEMV if batch_size == 1 else DenseLayout.GEMM


# XLA's (experimental, jaxlib-pinned) switch that hands each convolution to YNNPACK; a CPU-backend option.
CPU_COMPILER_OPTIONS: dict[str, str | bool] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def compiler_options() -> dict[str, str | bool]:
    """XLA options for the serving executables on the default backend (none off the CPU)."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


class Affine(NamedTuple):
    """A kernel with its per-output-channel epilogue `y = relu(x . kernel * scale + shift)` (BN folded).

    A Winograd conv's kernel is its 16 transformed (in, out) matrices (`winograd_kernel`)."""

    kernel: Any
    scale: jax.Array
    shift: jax.Array


# --- Winograd F(2x2, 3x3) (Lavin & Gray, 2016) -----------------------------------------------------------
# A 3x3 "same" conv computed per 4x4 input tile (stride 2) as 16 independent (tiles, in) x (in, out) matrix
# products plus cheap additive transforms: 2.25x fewer multiplications than the direct conv, identical to
# float32 rounding (~1e-6 relative). XLA's CPU backend runs 16 separate 2-D products faster than one batched
# product (which it gives one core). Worth it only for layers with enough work to hide the transforms.
# per image: the direct conv's multiply-adds x 2 (paper and original: 11 of 12 convs qualify, compact: none)
WINOGRAD_MIN_MFLOP = 32.0
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)  # kernel transform


def winograd_plan(spec: NetSpec, backend: str | None = None) -> tuple[bool, ...]:
    """For each conv layer in order: whether it runs as Winograd (even side, >= WINOGRAD_MIN_MFLOP). Only on the
    CPU backend (`backend`, default JAX's): on a GPU the direct convs won at every preset and batch (one H200,
    docs/decisions.md), while folded BN and the per-batch dense layout still help there."""
    if (backend or jax.default_backend()) != "cpu":
        return tuple(False for _ in spec.conv_shapes())
    return tuple(side % 2 == 0 and 2 * side * side * 9 * maps_in * maps_out / 1e6 >= WINOGRAD_MIN_MFLOP
                 for side, maps_in, maps_out in spec.conv_shapes())


def winograd_kernel(kernel: jax.Array) -> tuple[jax.Array, ...]:
    """(3, 3, in, out) HWIO -> the 16 matrices G k G^T[r, c] (in, out), row-major over (r, c)."""
    u = jnp.einsum("ri,ijab,cj->rcab", _G, kernel, _G)
    return tuple(u[r, c] for r in range(4) for c in range(4))


def _bt(d0: jax.Array, d1: jax.Array, d2: jax.Array, d3: jax.Array) -> tuple[jax.Array, ...]:
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3  # B^T d along one axis


def _at(m0: jax.Array, m1: jax.Array, m2: jax.Array, m3: jax.Array) -> tuple[jax.Array, jax.Array]:
    return m0 + m1 + m2, m1 - m2 - m3  # A^T m along one axis


def winograd_conv(x: jax.Array, tiles: tuple[jax.Array, ...]) -> jax.Array:
    """(B, H, W, in) NHWC, H and W even -> (B, H, W, out): the 3x3 "same" conv of `winograd_kernel` tiles."""
    b, h, w, c = x.shape
    th, tw = h // 2, w // 2
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    even, odd = padded[:, 0::2], padded[:, 1::2]  # tile t covers padded rows 2t .. 2t+3
    products: list[jax.Array] = []
    for rows in _bt(even[:, :th], odd[:, :th], even[:, 1:], odd[:, 1:]):
        even_c, odd_c = rows[:, :, 0::2], rows[:, :, 1::2]
        for v in _bt(even_c[:, :, :tw], odd_c[:, :, :tw], even_c[:, :, 1:], odd_c[:, :, 1:]):
            products.append((v.reshape(b * th * tw, c) @ tiles[len(products)]).reshape(b, th, tw, -1))
    by_column = [_at(*(products[4 * r + col] for r in range(4))) for col in range(4)]  # (row 0, row 1) each
    out = [_at(*(by_column[col][row] for col in range(4))) for row in range(2)]  # out[row][col] of each tile
    tiled = jnp.stack([jnp.stack(out[row], axis=3) for row in range(2)], axis=2)  # (B, th, 2, tw, 2, out)
    return tiled.reshape(b, h, w, -1)


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
        Affine((winograd_kernel if winograd else _identity)(_value(params["convs"][i]["conv"]["kernel"])),
               *_fold_bn(params["convs"][i]["bn"], stats["convs"][i]["bn"], eps))
        for i, winograd in enumerate(winograd_plan(net.spec))
    )
    dense = tuple(
        Affine(oriented(_value(params["dense"][i]["linear"]["kernel"])),
               *_fold_bn(params["dense"][i]["bn"], stats["dense"][i]["bn"], eps))
        for i in range(len(net.spec.hidden))
    )
    head = params["head"]
    return ServingWeights(convs, dense, oriented(_value(head["kernel"])), _value(head["bias"]))


def _identity(kernel: jax.Array) -> jax.Array:
    return kernel


def _dense(x: jax.Array, kernel: jax.Array, layout: DenseLayout) -> jax.Array:
    contracted = 1 if layout is DenseLayout.GEMV else 0
    return jax.lax.dot_general(x, kernel, (((1,), (contracted,)), ((), ())))


def forward(net: NetDef, weights: ServingWeights, images: jax.Array, layout: DenseLayout) -> jax.Array:
    """(B, 64, 64, 1) images -> (B, n_outputs) raw outputs; eval mode, the same arithmetic as `apply_eval`."""
    spec, x, layer = net.spec, images, 0
    winograd = winograd_plan(spec)
    for conv_set, pooled in zip(spec.conv_sets, spec.pool_after):
        for _ in conv_set:
            conv = weights.convs[layer]
            if winograd[layer]:
                x = winograd_conv(x, conv.kernel)
            else:
                x = jax.lax.conv_general_dilated(x, conv.kernel, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x * conv.scale + conv.shift)
            layer += 1
        if pooled:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = jnp.mean(x, axis=(1, 2)) if spec.global_pool else x.reshape(x.shape[0], -1)
    for fc in weights.dense:
        x = jax.nn.relu(_dense(x, fc.kernel, layout) * fc.scale + fc.shift)
    return _dense(x, weights.head_kernel, layout) + weights.head_bias
