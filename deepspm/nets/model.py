"""The VGG-like probe CNN as a Flax NNX module, and the functional core around it.

The module is only used at the edges: a `NetDef` (preset + head size) builds it and `nnx.split`s it once
into a static `graphdef` and a `NetVars` pytree (trainable params + BN running statistics). Everything on
the hot path (`apply_eval`, `apply_train`, training steps, inference) is a pure function of `(NetVars,
batch)` under `jax.jit` with the graphdef closed over, which traces once per shape; calling an NNX module
through `nnx.jit` per inference was measured ~8x slower for the `paper` preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepspm.nets.presets import NetSpec, get_preset

GraphDef = Any  # nnx.GraphDef: the static structure of a ProbeNet (hashable)


def _output_bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Uniform in +-sqrt(3 / n_out): what Glorot-uniform gives a 1-D bias in the original (reference 4.1)."""
    limit = math.sqrt(3.0 / shape[-1])
    return jax.random.uniform(key, shape, dtype, -limit, limit)


_GLOROT = nnx.initializers.glorot_uniform()


class _ConvBlock(nnx.Module):
    """3x3 conv (stride 1, same padding, no bias) -> BN -> ReLU."""

    def __init__(self, in_maps: int, out_maps: int, spec: NetSpec, *, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(in_maps, out_maps, (3, 3), padding="SAME", use_bias=False, kernel_init=_GLOROT, rngs=rngs)
        self.bn = nnx.BatchNorm(out_maps, momentum=spec.bn_momentum, epsilon=spec.bn_epsilon, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class _DenseBlock(nnx.Module):
    """FC (no bias) -> BN -> ReLU -> dropout."""

    def __init__(self, in_features: int, out_features: int, spec: NetSpec, *, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(in_features, out_features, use_bias=False, kernel_init=_GLOROT, rngs=rngs)
        self.bn = nnx.BatchNorm(out_features, momentum=spec.bn_momentum, epsilon=spec.bn_epsilon, rngs=rngs)
        self.dropout = nnx.Dropout(spec.dropout_rate)  # keyless: the key is passed per call

    def __call__(self, x: jax.Array, train: bool, dropout_key: jax.Array | None) -> jax.Array:
        x = jax.nn.relu(self.bn(self.linear(x), use_running_average=not train))
        return self.dropout(x, deterministic=not train, rngs=dropout_key)


class ProbeNet(nnx.Module):
    """Conv sets -> (flatten | global mean) -> hidden FC -> output layer with bias and no BN.

    Input (B, 64, 64, 1) float32 pre-processed heights; output (B, n_outputs) raw values: the logit(s) of the
    classifier or the Q-values of the agent.
    """

    def __init__(self, spec: NetSpec, n_outputs: int, *, rngs: nnx.Rngs) -> None:
        self.spec = spec
        self.n_outputs = n_outputs
        convs: list[_ConvBlock] = []
        in_maps = 1
        for conv_set in spec.conv_sets:
            for maps in conv_set:
                convs.append(_ConvBlock(in_maps, maps, spec, rngs=rngs))
                in_maps = maps
        self.convs = nnx.List(convs)
        dense: list[_DenseBlock] = []
        in_features = spec.flat_features
        for width in spec.hidden:
            dense.append(_DenseBlock(in_features, width, spec, rngs=rngs))
            in_features = width
        self.dense = nnx.List(dense)
        self.head = nnx.Linear(in_features, n_outputs, kernel_init=_GLOROT, bias_init=_output_bias_init, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None) -> jax.Array:
        return self.head_on(self.features(x, train=train), train=train, dropout_key=dropout_key)

    def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """The conv trunk: (B, H, W, 1) images -> (B, F) flattened (or globally pooled) features."""
        layer = 0
        for conv_set, pooled in zip(self.spec.conv_sets, self.spec.pool_after):
            for _ in conv_set:
                x = self.convs[layer](x, train)
                layer += 1
            if pooled:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return jnp.mean(x, axis=(1, 2)) if self.spec.global_pool else x.reshape(x.shape[0], -1)

    def head_on(self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None) -> jax.Array:
        """The FC layers and the output layer on trunk features."""
        keys = jax.random.split(dropout_key, len(self.dense)) if (train and dropout_key is not None) else None
        for i, block in enumerate(self.dense):
            x = block(x, train, None if keys is None else keys[i])
        return self.head(x)


class NetVars(NamedTuple):
    """All arrays of one net: trainable `params` (nnx.Param) and BN running statistics (nnx.BatchStat)."""

    params: nnx.State
    batch_stats: nnx.State


@dataclass(frozen=True)
class NetDef:
    """The static identity of a net: its layer plan and head size. Hashable; its graphdef is derived once."""

    spec: NetSpec
    n_outputs: int

    @classmethod
    def of(cls, spec: NetSpec | str, n_outputs: int) -> NetDef:
        return cls(get_preset(spec) if isinstance(spec, str) else spec, int(n_outputs))

    @cached_property
    def graphdef(self) -> GraphDef:
        return self.abstract_split()[0]

    def abstract_split(self) -> tuple[GraphDef, NetVars]:
        """`(graphdef, NetVars of ShapeDtypeStruct)` without allocating: for counting and restoring."""
        model = nnx.eval_shape(lambda: ProbeNet(self.spec, self.n_outputs, rngs=nnx.Rngs(params=0)))
        # flax types split's result as variadic; two filters give exactly three parts
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)  # type: ignore[misc]
        return graphdef, NetVars(params, batch_stats)

    def abstract_vars(self) -> NetVars:
        return self.abstract_split()[1]

    def init(self, key: jax.Array) -> NetVars:
        """Fresh variables: Glorot-uniform weights, BN scale 1 / shift 0, running mean 0 / variance 1.

        Compiled as one function at XLA optimisation level 0: eager init would compile every initializer
        separately, and optimising threefry costs seconds of compile time for a one-off computation (the
        bits are integer arithmetic, identical at any optimisation level).
        """

        def build(key: jax.Array) -> NetVars:
            model = ProbeNet(self.spec, self.n_outputs, rngs=nnx.Rngs(params=key))
            _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)  # type: ignore[misc]
            return NetVars(params, batch_stats)

        options = {"xla_backend_optimization_level": 0}
        # jax types compiler_options as str | bool values; XLA takes this option as an int
        return jax.jit(build).lower(key).compile(compiler_options=options)(key)  # type: ignore[arg-type]


def apply_eval(net: NetDef, variables: NetVars, images: jax.Array) -> jax.Array:
    """Inference: BN with running statistics, no dropout. Pure; jit it with `net` closed over (static)."""
    model = nnx.merge(net.graphdef, variables.params, variables.batch_stats, copy=True)
    return model(images, train=False)


def apply_train(
    net: NetDef, variables: NetVars, images: jax.Array, dropout_key: jax.Array
) -> tuple[jax.Array, nnx.State]:
    """Training pass: BN with batch statistics (running statistics updated, momentum from the spec), dropout.

    Returns the outputs and the new BN running statistics.
    """
    model = nnx.merge(net.graphdef, variables.params, variables.batch_stats, copy=True)
    outputs = model(images, train=True, dropout_key=dropout_key)
    return outputs, nnx.state(model, nnx.BatchStat)


@dataclass(frozen=True)
class ParamCount:
    trainable: int  # weights, output bias, BN scale and shift
    batch_stats: int  # BN running means and variances (not trainable)


def count_leaves(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def count_params(spec: NetSpec | str, n_outputs: int) -> ParamCount:
    """Parameter counts from an abstract init (no allocation, so safe for the 2 GB `paper` net)."""
    variables = NetDef.of(spec, n_outputs).abstract_vars()
    return ParamCount(count_leaves(variables.params), count_leaves(variables.batch_stats))
