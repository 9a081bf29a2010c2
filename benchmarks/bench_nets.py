"""Probe-CNN inference latency: JAX (compiled `Predictor`) versus the same net in PyTorch, against a roofline.

For each preset and batch size (1 and 8) one process measures, side by side and interleaved (so that load
from other processes hits every contender alike):
- JAX: `deepspm.nets.inference.Predictor`, the functional jitted path, AOT-compiled per batch size;
- PyTorch eager: the same layer plan written with `torch.nn`, loaded with the *same* weights (checked: both
  give the same outputs), under `torch.inference_mode()`;
- PyTorch `torch.compile` (static shapes) where it compiles; a failure or a skipped compile reads "n/a".

Roofline floor per preset and batch, per layer: the layers run one after another (each consumes the
previous one's output), so the floor is the sum over layers of max(layer FLOPs / the best compute rate,
layer weight bytes / the best read bandwidth). FLOPs are counted analytically: 2 per multiply-add of every
conv and FC layer (BN, ReLU and pooling are O(activations), < 1 % here); weights (params and BN statistics,
float32) are read once per batch; activations are ignored. (JAX runs most convs as Winograd F(2x2, 3x3),
which needs 2.25x fewer multiplications than the direct conv counted here.) The whole-net bound max(all FLOPs / rate, all
bytes / bandwidth) is reported beside it: it assumes the 2.1 GB first FC of `paper` streams while the convs
compute, which their data dependence forbids (docs/decisions.md). The compute rate is the best of a large
float32 matmul (numpy and JAX) and a 3x3 conv shaped like the paper's widest layer (JAX, and PyTorch when
installed), measured once. Memory bandwidth drifts on a shared VM by up to 1.7x between minutes, so the
read-bandwidth probes (a 512 MB matrix-vector product in numpy/BLAS and in JAX: a pure weight stream) run
interleaved with the contenders, and every round's latency is divided by that round's floor.

Also: double-DQN learner updates per second (`Learner.update`, batch 64) for `compact` (updates for 5 s)
and `original` (one timed update: each costs ~40 s on this 2-core machine, after ~1 min of compiling).
`torch.compile` times are first-call times; inductor caches compiled artefacts across processes
(/tmp/torchinductor_*), so a repeated run reports shorter compiles than a first one.

Goals (issue 4; reported, never asserted): `paper` at batch 1 within 1.2x of the floor and >= 3x faster
than PyTorch eager; `compact` >= 20x faster than `paper`.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import print_table, write_json
from deepspm.nets.checkpoints import flatten_named, unflatten_named
from deepspm.nets.dqn import DQNConfig, Learner
from deepspm.nets.inference import Predictor
from deepspm.nets.model import NetDef, NetVars, count_leaves
from deepspm.nets.presets import NetSpec, get_preset

try:  # the `bench` extra; the test suite's smoke run works without it
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

GOAL_FLOOR_RATIO = 1.2  # paper, batch 1: JAX latency / roofline floor
GOAL_VS_EAGER = 3.0  # paper, batch 1: PyTorch eager latency / JAX latency
GOAL_COMPACT_SPEEDUP = 20.0  # paper latency / compact latency
N_ACTIONS = 12
DQN_PLAN = (("compact", 5.0), ("original", 0.0))  # (preset, seconds of timed updates after the first; >= 1 update)
SETTLE_S = 0.25  # idle before each timed block (see interleaved_timings)
COMPILE_BUDGET_S = 120.0  # skip torch.compile at further batch sizes of a preset once one compile took longer
# Smoke runs (the test that keeps this module working): `tiny` (global pooling) and a tiny net that flattens,
# which exercises the (h, w, c) -> (c, h, w) permutation of the first FC layer's weights for PyTorch.
SMOKE_SPECS = (get_preset("tiny"), NetSpec("tiny-flat", ((4,), (8,)), (True, True), (16,)))


# --- the architecture, counted ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    name: str
    flops: int  # per image: 2 per multiply-add
    weight_bytes: int  # float32 kernel, BN scale/shift/mean/var or bias: read once per batch


def layer_costs(spec: NetSpec, n_outputs: int = 1) -> list[LayerCost]:
    """Every conv (3x3, same padding, BN) and FC layer (BN on the hidden ones, bias on the head) in order."""
    layers = [LayerCost(f"conv{k + 1}", 2 * side * side * 9 * maps_in * maps_out, 4 * (9 * maps_in * maps_out + 4 * maps_out))
              for k, (side, maps_in, maps_out) in enumerate(spec.conv_shapes())]
    features = spec.flat_features
    for k, width in enumerate(spec.hidden):
        layers.append(LayerCost(f"fc{k + 1}", 2 * features * width, 4 * (features * width + 4 * width)))
        features = width
    layers.append(LayerCost("head", 2 * features * n_outputs, 4 * (features * n_outputs + n_outputs)))
    return layers


def forward_flops(spec: NetSpec, n_outputs: int = 1) -> int:
    """FLOPs of one image's forward pass: 2 per multiply-add of the convs (3x3, same padding) and FC layers."""
    return sum(layer.flops for layer in layer_costs(spec, n_outputs))


def weight_bytes(net: NetDef) -> int:
    """Bytes of every variable (trainable params and BN running statistics), float32."""
    return 4 * count_leaves(net.abstract_vars())


def random_vars(net: NetDef, seed: int) -> NetVars:
    """Glorot-uniform kernels, BN scale/variance 1 and shift/mean/bias 0, drawn with numpy.

    Values do not change latency; `NetDef.init` (threefry at XLA optimisation level 0) takes ~100 s for the
    561 M parameters of `paper` on this machine, numpy a few seconds.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, leaf in flatten_named(net.abstract_vars()).items():
        shape = tuple(leaf.shape)
        if len(shape) >= 2:
            receptive = math.prod(shape[:-2])
            limit = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
            values = rng.random(shape, dtype=np.float32)
            values *= 2 * limit
            values -= limit
        elif name.endswith(("scale.value", "var.value")):
            values = np.ones(shape, np.float32)
        else:
            values = np.zeros(shape, np.float32)
        arrays[name] = jnp.asarray(values)
        del values
    return unflatten_named(net.abstract_vars(), arrays)


# --- the same net in PyTorch --------------------------------------------------------------------------------


def torch_net(net: NetDef, variables: NetVars) -> Any:
    """`torch.nn.Sequential` of the preset's layer plan (NCHW), eval mode, holding `variables`' values.

    Built on the meta device and loaded with `assign=True`, so no memory is spent on a throw-away init.
    Layouts: conv HWIO -> OIHW, dense (in, out) -> (out, in); the first FC's inputs are permuted from JAX's
    (h, w, c) flattening order to PyTorch's (c, h, w).
    """
    from torch import nn

    spec = net.spec
    with torch.device("meta"):
        layers: list[nn.Module] = []
        maps = 1
        for conv_set, pooled in zip(spec.conv_sets, spec.pool_after):
            for out_maps in conv_set:
                layers += [nn.Conv2d(maps, out_maps, 3, padding=1, bias=False),
                           nn.BatchNorm2d(out_maps, eps=spec.bn_epsilon), nn.ReLU()]
                maps = out_maps
            if pooled:
                layers.append(nn.MaxPool2d(2))
        if spec.global_pool:
            layers.append(nn.AdaptiveAvgPool2d(1))
        layers.append(nn.Flatten())
        features = spec.flat_features
        for width in spec.hidden:
            layers += [nn.Linear(features, width, bias=False), nn.BatchNorm1d(width, eps=spec.bn_epsilon), nn.ReLU(),
                       nn.Dropout(spec.dropout_rate)]
            features = width
        layers.append(nn.Linear(features, net.n_outputs))
        module = nn.Sequential(*layers)
    module.load_state_dict(torch_state(net, variables, module), assign=True)
    return module.eval()


def torch_state(net: NetDef, variables: NetVars, module: Any) -> dict[str, Any]:
    """The JAX variables renamed and re-laid-out as `module`'s state dict."""
    from torch import nn

    named = flatten_named(variables)

    def arr(name: str) -> np.ndarray:
        return np.asarray(named[name + ".value"])

    def tensor(a: np.ndarray) -> Any:  # copies only what is not already a writable C-ordered float32 array
        return torch.from_numpy(np.require(a, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))

    state: dict[str, Any] = {}
    convs = [i for i, m in enumerate(module) if isinstance(m, nn.Conv2d)]
    linears = [i for i, m in enumerate(module) if isinstance(m, nn.Linear)]
    spec = net.spec
    for k, i in enumerate(convs):
        state[f"{i}.weight"] = tensor(arr(f"params.convs.{k}.conv.kernel").transpose(3, 2, 0, 1))
        state.update(_bn_state(i + 1, arr, f"convs.{k}.bn", tensor))
    for k, i in enumerate(linears[:-1]):
        kernel = arr(f"params.dense.{k}.linear.kernel")
        if k == 0 and not spec.global_pool:  # one copy: (h, w, c, out) -> (out, c, h, w)
            side, maps = spec.final_side_px, spec.conv_sets[-1][-1]
            weight = kernel.reshape(side, side, maps, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)
        else:
            weight = kernel.T
        state[f"{i}.weight"] = tensor(weight)
        state.update(_bn_state(i + 1, arr, f"dense.{k}.bn", tensor))
    head = linears[-1]
    state[f"{head}.weight"] = tensor(arr("params.head.kernel").T)
    state[f"{head}.bias"] = tensor(arr("params.head.bias"))
    return state


def _bn_state(index: int, arr: Callable[[str], np.ndarray], name: str, tensor: Callable[[np.ndarray], Any]) -> dict:
    return {
        f"{index}.weight": tensor(arr(f"params.{name}.scale")),
        f"{index}.bias": tensor(arr(f"params.{name}.bias")),
        f"{index}.running_mean": tensor(arr(f"batch_stats.{name}.mean")),
        f"{index}.running_var": tensor(arr(f"batch_stats.{name}.var")),
        f"{index}.num_batches_tracked": torch.zeros((), dtype=torch.long),
    }


def torch_forward(module: Any, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """(B, 64, 64, 1) float32 numpy -> numpy outputs: the PyTorch counterpart of `Predictor.__call__`.

    `device`: where `module` lives ("cpu", "cuda"); the batch is copied there and the outputs back (which
    waits for the device), as a run hands numpy images in and reads numpy outputs."""

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # a single input channel: NHWC and NCHW share one memory layout
            images = torch.from_numpy(batch).reshape(batch.shape[0], 1, *batch.shape[1:3]).to(device)
            return module(images).cpu().numpy()

    return forward


# --- the machine --------------------------------------------------------------------------------------------


@dataclass
class MachineRates:
    """Best observed rates; `compute_flops` and `bandwidth_bytes` are the best of the probes at start-up."""

    flops: dict[str, float] = field(default_factory=dict)  # FLOP/s per probe
    bytes_per_s: dict[str, float] = field(default_factory=dict)  # bytes/s per probe

    @property
    def compute_flops(self) -> float:
        return max(self.flops.values())

    @property
    def bandwidth_bytes(self) -> float:
        return max(self.bytes_per_s.values())


class StreamProbes:
    """Read-bandwidth probes to interleave with the contenders: one pass over a matrix, as a matrix-vector
    product (the access pattern of a batch-1 FC layer), in numpy/BLAS and in JAX (the (out, in) layout that
    `serving` uses at batch 1)."""

    def __init__(self, nbytes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        cols = 65536 if nbytes >= (64 << 20) else 4096
        rows = max(1, nbytes // (4 * cols))
        self.nbytes = 4 * rows * cols
        self.matrix = rng.random((rows, cols), dtype=np.float32)
        self.vector = rng.random(cols, dtype=np.float32)
        self.jax_matrix, jax_vector = jnp.asarray(self.matrix), jnp.asarray(self.vector[None])
        gemv = jax.jit(lambda m, v: jax.lax.dot_general(v, m, (((1,), (1,)), ((), ()))))
        self.calls: dict[str, Callable[[], Any]] = {
            "numpy matvec (read)": lambda: self.matrix @ self.vector,
            "jax matvec (read)": lambda: gemv(self.jax_matrix, jax_vector).block_until_ready(),
        }


def best_seconds(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm up (and compile)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(smoke: bool, probes: StreamProbes) -> MachineRates:
    """Matmul and conv FLOP rates and memory bandwidth, best of a few repetitions each."""
    rng = np.random.default_rng(0)
    reps = 1 if smoke else 5
    rates = MachineRates()
    n = 256 if smoke else 2048
    a = rng.standard_normal((n, n), dtype=np.float32)
    rates.flops["numpy matmul"] = 2 * n**3 / best_seconds(lambda: a @ a, reps)
    ja = jnp.asarray(a)
    matmul = jax.jit(lambda x: x @ x)
    rates.flops["jax matmul"] = 2 * n**3 / best_seconds(lambda: matmul(ja).block_until_ready(), reps)
    # the paper's widest layer: 512 -> 512 maps, 3x3, at 16x16, batch 8
    batch, side, maps = (1, 8, 64) if smoke else (8, 16, 512)
    x = jnp.asarray(rng.standard_normal((batch, side, side, maps), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, maps, maps), dtype=np.float32) * 0.01)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                            dimension_numbers=("NHWC", "HWIO", "NHWC")))
    conv_flops = 2 * batch * side * side * 9 * maps * maps
    rates.flops["jax conv"] = conv_flops / best_seconds(lambda: conv(x, w).block_until_ready(), reps)
    if torch is not None:
        tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())

        def torch_conv() -> None:
            with torch.inference_mode():
                torch.nn.functional.conv2d(tx, tw, padding=1)

        rates.flops["torch conv"] = conv_flops / best_seconds(torch_conv, reps)
    size = probes.nbytes
    src = np.ones(size // 4, np.float32)
    dst = np.empty_like(src)
    rates.bytes_per_s["numpy copy (read+write)"] = 2 * size / best_seconds(functools.partial(np.copyto, dst, src), reps)
    del dst
    jsrc = jnp.asarray(src)
    total = jax.jit(jnp.sum)
    rates.bytes_per_s["jax sum (read)"] = size / best_seconds(lambda: total(jsrc).block_until_ready(), reps)
    for name, call in probes.calls.items():
        rates.bytes_per_s[name] = size / best_seconds(call, reps)
    return rates


# --- timing -------------------------------------------------------------------------------------------------


def interleaved_timings(calls: dict[str, Callable[[], Any]], reps: int, min_block_s: float,
                        settle_s: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each callable, one sample per round, measured in alternation (one block of each
    per round) so that other processes' load hits every contender alike. A block repeats a call until it
    lasts about `min_block_s`, so that timer and loop overhead stay negligible for sub-millisecond calls.
    `settle_s` of idling before each block lets the previous contender's worker threads go to sleep: PyTorch's
    OpenMP threads spin after a call, and XLA measured right after PyTorch ran ~15 % slower for it."""
    blocks = {}
    for name, fn in calls.items():
        fn()
        start = time.perf_counter()
        fn()
        blocks[name] = max(1, math.ceil(min_block_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            if settle_s:
                time.sleep(settle_s)
            start = time.perf_counter()
            for _ in range(blocks[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / blocks[name])
    return samples


# --- one preset ---------------------------------------------------------------------------------------------


@dataclass
class LatencyRow:
    preset: str
    batch: int
    gflop: float
    weight_mb: float
    floor_s: float  # per-layer roofline floor, median over rounds (each round at its own bandwidth)
    overlapped_floor_s: float  # whole-net max(compute, memory): perfect overlap, median over rounds
    bound: str  # which term dominates the per-layer floor: "memory" or "compute"
    jax_s: float
    floor_ratio: float = math.nan  # median over rounds of JAX latency / that round's floor
    floor_ratio_best: float = math.nan
    overlap_ratio: float = math.nan  # the same against the whole-net floor
    overlap_ratio_best: float = math.nan
    weights_read_s: float = math.nan  # one read of all weights at the rounds' median bandwidth: nothing is faster
    bandwidth_gbs: float = math.nan  # the stream probes' median read bandwidth over the rounds
    eager_s: float | None = None
    compiled_s: float | None = None
    compile_s: float | None = None  # torch.compile's first call at this batch size
    compiled_note: str = ""
    max_abs_diff: float | None = None  # |JAX - PyTorch| outputs, same weights and input
    # Fastest round: on a shared machine PyTorch's OpenMP threads were seen to suffer more than XLA's from
    # other processes' load, so the goals table shows the best rounds beside the medians.
    jax_best_s: float = math.nan
    eager_best_s: float | None = None


@dataclass(frozen=True)
class Floor:
    layered_s: float
    overlapped_s: float
    bound: str


def roofline_floor(layers: list[LayerCost], batch: int, compute_flops: float, bandwidth: float) -> Floor:
    """Per-layer roofline summed over the layers, and the whole-net bound that assumes perfect overlap."""
    compute = [batch * layer.flops / compute_flops for layer in layers]
    memory = [layer.weight_bytes / bandwidth for layer in layers]
    layered = sum(max(c, m) for c, m in zip(compute, memory))
    memory_share = sum(m for c, m in zip(compute, memory) if m > c)
    return Floor(layered, max(sum(compute), sum(memory)), "memory" if memory_share > layered / 2 else "compute")


def bench_preset(preset: NetSpec | str, batches: tuple[int, ...], rates: MachineRates, probes: StreamProbes, *,
                 with_compile: bool, smoke: bool, seed: int = 0) -> list[LatencyRow]:
    """One preset's rows: one net per framework built once (same weights), every batch size measured."""
    net = NetDef.of(preset, 1)
    name = net.spec.name
    variables = random_vars(net, seed)
    predictor = Predictor(net, variables, "values")
    predictor.compile(batches)
    module = torch_net(net, variables) if torch is not None else None
    rng = np.random.default_rng(seed)
    layers, nbytes = layer_costs(net.spec), weight_bytes(net)
    compiled, compile_spent = None, 0.0
    if module is not None and with_compile:
        compiled = torch.compile(module, dynamic=False)
    rows = []
    for batch in batches:
        images = rng.uniform(-1.5, 1.5, (batch, 64, 64, 1)).astype(np.float32)
        start_floor = roofline_floor(layers, batch, rates.compute_flops, rates.bandwidth_bytes)
        row = LatencyRow(name, batch, batch * sum(layer.flops for layer in layers) / 1e9, nbytes / 1e6,
                         start_floor.layered_s, start_floor.overlapped_s, start_floor.bound, jax_s=math.nan)
        # partials bind this batch's arrays
        calls: dict[str, Callable[[], Any]] = {"jax": functools.partial(predictor, images)}
        if module is not None:
            forward = torch_forward(module)
            reference = predictor(images)
            row.max_abs_diff = float(np.max(np.abs(forward(images) - reference)))
            scale = float(np.max(np.abs(reference))) + 1e-6
            if row.max_abs_diff > 1e-3 * scale:
                print(f"WARNING {name}: PyTorch and JAX outputs differ by {row.max_abs_diff:.3g} (scale {scale:.3g})")
            calls["eager"] = functools.partial(forward, images)
            if compiled is not None and compile_spent > COMPILE_BUDGET_S:
                row.compiled_note = f"n/a (an earlier compile took {compile_spent:.0f} s)"
            elif compiled is not None:
                compiled_forward = torch_forward(compiled)
                try:
                    start = time.perf_counter()
                    compiled_forward(images)
                    row.compile_s = time.perf_counter() - start
                    compile_spent = max(compile_spent, row.compile_s)
                    calls["compiled"] = functools.partial(compiled_forward, images)
                except Exception as exc:  # noqa: BLE001 - any compiler failure reads "n/a"
                    row.compiled_note = f"n/a ({type(exc).__name__})"
            elif not with_compile:
                row.compiled_note = "n/a (not run)"
        else:
            row.compiled_note = "n/a (no torch)"
        calls.update(probes.calls)
        expected_call_s = row.floor_s * 2
        reps = 1 if smoke else (9 if expected_call_s < 0.05 else 5 if batch == 1 else 3)
        samples = interleaved_timings(calls, reps, 0.0 if smoke else 0.05, 0.0 if smoke else SETTLE_S)
        bandwidths = [probes.nbytes / min(round_s) for round_s in zip(*(samples[k] for k in probes.calls))]
        floors = [roofline_floor(layers, batch, rates.compute_flops, bw) for bw in bandwidths]
        ratios = [t / f.layered_s for t, f in zip(samples["jax"], floors)]
        overlap_ratios = [t / f.overlapped_s for t, f in zip(samples["jax"], floors)]
        row.floor_s = statistics.median(f.layered_s for f in floors)
        row.overlapped_floor_s = statistics.median(f.overlapped_s for f in floors)
        row.bound = floors[len(floors) // 2].bound
        row.floor_ratio, row.floor_ratio_best = statistics.median(ratios), min(ratios)
        row.overlap_ratio, row.overlap_ratio_best = statistics.median(overlap_ratios), min(overlap_ratios)
        row.bandwidth_gbs = statistics.median(bandwidths) / 1e9
        row.weights_read_s = nbytes / statistics.median(bandwidths)
        row.jax_s, row.jax_best_s = statistics.median(samples["jax"]), min(samples["jax"])
        if "eager" in samples:
            row.eager_s, row.eager_best_s = statistics.median(samples["eager"]), min(samples["eager"])
        if "compiled" in samples:
            row.compiled_s = statistics.median(samples["compiled"])
        rows.append(row)
    return rows


# --- DQN ----------------------------------------------------------------------------------------------------


@dataclass
class DqnRow:
    preset: str
    batch: int
    compile_s: float  # the first update: tracing, compiling and one step
    steps: int
    steps_per_s: float


def bench_dqn(preset: NetSpec | str, budget_s: float, seed: int = 0) -> DqnRow:
    """Double-DQN gradient updates per second from a filled replay buffer (batch 64)."""
    net = NetDef.of(preset, N_ACTIONS)
    config = DQNConfig()
    learner = Learner(net, random_vars(net, seed), config, seed=seed)
    rng = np.random.default_rng(seed)
    side = net.spec.image_side_px
    for i in range(config.batch_size):  # each experience adds 4 flipped rows
        learner.record(rng.uniform(-1.5, 1.5, (side, side)).astype(np.float32), int(rng.integers(N_ACTIONS)), -1.0,
                       rng.uniform(-1.5, 1.5, (side, side)).astype(np.float32), i % 8 == 7, rng.random(N_ACTIONS) < 0.8)
    start = time.perf_counter()
    learner.update()
    compile_s = time.perf_counter() - start
    steps = 0
    start = time.perf_counter()
    while steps < 1 or time.perf_counter() - start < budget_s:
        learner.update()
        steps += 1
    elapsed = time.perf_counter() - start
    return DqnRow(net.spec.name, config.batch_size, compile_s, steps, steps / elapsed)


# --- the report ---------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3g}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def main(smoke: bool = False, presets: tuple[NetSpec | str, ...] | None = None) -> dict[str, Any]:
    """Run and print everything; `smoke` = two tiny nets, one repetition, no torch.compile, no JSON.

    `presets`: the nets to measure, smallest first (the speed-up goal compares the first with the last).
    """
    if not smoke:
        from deepspm.controller.diagnostics import configure_logging

        configure_logging("warning")
    if presets is None:
        presets = SMOKE_SPECS if smoke else ("compact", "original", "paper")
    names = [get_preset(p).name if isinstance(p, str) else p.name for p in presets]
    small, big = names[0], names[-1]  # the speed-up compared: compact vs paper
    batches = (1, 8)
    probes = StreamProbes((8 << 20) if smoke else (512 << 20))
    rates = measure_machine(smoke, probes)
    print_table("Machine at start-up (best of repetitions; the floors use the best compute rate, and the matvec "
                "probes' bandwidth measured again in every round)",
                ("probe", "rate"),
                [(k, f"{v / 1e9:.1f} GFLOP/s") for k, v in rates.flops.items()]
                + [(k, f"{v / 1e9:.1f} GB/s") for k, v in rates.bytes_per_s.items()])
    rows: list[LatencyRow] = []
    for preset in presets:
        rows += bench_preset(preset, batches, rates, probes, with_compile=not smoke and torch is not None, smoke=smoke)
        if torch is not None:
            torch._dynamo.reset()
        gc.collect()  # free one preset's nets (paper: 2.25 GB per framework) before the next
    threads = f"torch {torch.__version__}, {torch.get_num_threads()} threads" if torch is not None else "torch not installed"
    print_table(
        f"Inference latency, ms (median of interleaved repetitions; JAX {jax.__version__} Predictor AOT; {threads}; "
        f"load average {os.getloadavg()[0]:.1f})",
        ("preset", "batch", "GFLOP", "weights MB", "GB/s", "floor", "bound", "overlap floor", "JAX", "JAX/floor",
         "eager", "eager/JAX", "compiled", "compiled/JAX", "compile s", "max|diff|"),
        [(r.preset, r.batch, f"{r.gflop:.3g}", f"{r.weight_mb:.4g}", f"{r.bandwidth_gbs:.1f}", _ms(r.floor_s), r.bound,
          _ms(r.overlapped_floor_s), _ms(r.jax_s), f"{r.floor_ratio:.2f}", _ms(r.eager_s), _ratio(r.eager_s, r.jax_s),
          _ms(r.compiled_s) if r.compiled_s is not None else (r.compiled_note or "n/a"),
          _ratio(r.compiled_s, r.jax_s), "n/a" if r.compile_s is None else f"{r.compile_s:.1f}",
          "n/a" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}") for r in rows],
    )
    by_key = {(r.preset, r.batch): r for r in rows}
    goals = []
    big1 = by_key[(big, 1)]
    goals.append((f"{big} batch 1: JAX / per-layer floor", f"<= {GOAL_FLOOR_RATIO}", f"{big1.floor_ratio:.2f}",
                  f"{big1.floor_ratio_best:.2f}"))
    goals.append((f"{big} batch 1: JAX / whole-net floor (assumes the convs overlap the FC weight stream)",
                  f"<= {GOAL_FLOOR_RATIO}", f"{big1.overlap_ratio:.2f}", f"{big1.overlap_ratio_best:.2f}"))
    goals.append((f"{big} batch 1: PyTorch eager / JAX", f">= {GOAL_VS_EAGER}", _ratio(big1.eager_s, big1.jax_s),
                  _ratio(big1.eager_best_s, big1.jax_best_s)))
    # Nothing runs faster than one read of its weights, so eager / that caps what eager / JAX can reach.
    goals.append((f"{big} batch 1: PyTorch eager / one read of the weights (the most eager / JAX can be)", "",
                  _ratio(big1.eager_s, big1.weights_read_s), ""))
    for batch in batches:
        big_row, small_row = by_key[(big, batch)], by_key[(small, batch)]
        goals.append((f"{small} vs {big} batch {batch}: {big} / {small} (JAX)", f">= {GOAL_COMPACT_SPEEDUP}",
                      _ratio(big_row.jax_s, small_row.jax_s), _ratio(big_row.jax_best_s, small_row.jax_best_s)))
    print_table("Goals (issue 4; reported, not asserted)", ("measure", "goal", "medians", "best rounds"), goals)
    dqn = [bench_dqn(preset, budget_s) for preset, budget_s in (((presets[0], 0.0),) if smoke else DQN_PLAN)]
    print_table("Double-DQN learner (Learner.update, batch 64, JAX)", ("preset", "batch", "first update s", "steps",
                "steps/s", "ms/step"),
                [(d.preset, d.batch, f"{d.compile_s:.1f}", d.steps, f"{d.steps_per_s:.3g}", f"{1e3 / d.steps_per_s:.4g}")
                 for d in dqn])
    payload = {
        "machine_flops": rates.flops, "machine_bytes_per_s": rates.bytes_per_s,
        "compute_flops": rates.compute_flops, "bandwidth_bytes_per_s": rates.bandwidth_bytes,
        "torch": None if torch is None else torch.__version__, "jax": jax.__version__,
        "latency": [asdict(r) for r in rows],
        "goals": [dict(zip(("measure", "goal", "medians", "best_rounds"), g)) for g in goals],
        "dqn": [asdict(d) for d in dqn],
    }
    if not smoke:
        print("wrote", write_json("nets", payload))
    return payload


if __name__ == "__main__":
    main()
