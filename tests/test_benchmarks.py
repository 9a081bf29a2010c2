"""Smoke runs of the `make bench` modules (tiny nets, a few frames, one repetition) so that they cannot rot.

Nothing here is a timed assertion: the checks are on structure and on what must hold at any speed (the
analytic FLOP counts against the reference, PyTorch computing the same function as JAX, a completed run).
The PyTorch parts run only where torch is installed (the `bench` extra, not the `test` extra).
"""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_controller, bench_nets, bench_sim
from deepspm.nets.model import NetDef
from deepspm.nets.presets import get_preset

HAS_TORCH = bench_nets.torch is not None


def test_flop_counts_match_the_reference() -> None:
    # reference: ~6.25 GFLOP (paper) and ~2.94 GFLOP (original) per 64x64 image
    assert bench_nets.forward_flops(get_preset("paper")) == pytest.approx(6.25e9, rel=0.01)
    assert bench_nets.forward_flops(get_preset("original")) == pytest.approx(2.94e9, rel=0.01)
    assert bench_nets.forward_flops(get_preset("compact")) < bench_nets.forward_flops(get_preset("original")) / 100


def test_weight_bytes_are_four_per_variable() -> None:
    # ~561.5 M trainable parameters for paper, plus BN running statistics
    assert 561e6 * 4 < bench_nets.weight_bytes(NetDef.of("paper", 1)) < 562e6 * 4


def test_random_vars_have_the_net_structure_and_sane_values() -> None:
    net = NetDef.of(bench_nets.SMOKE_SPECS[1], 1)
    variables = bench_nets.random_vars(net, seed=3)
    abstract = net.abstract_vars()
    from deepspm.nets.checkpoints import flatten_named

    arrays, shapes = flatten_named(variables), flatten_named(abstract)
    assert {k: a.shape for k, a in arrays.items()} == {k: a.shape for k, a in shapes.items()}
    kernel = arrays["params.convs.1.conv.kernel.value"]
    assert 0 < float(abs(kernel).max()) <= math.sqrt(6 / (9 * (4 + 8)))
    assert float(arrays["batch_stats.convs.1.bn.var.value"].min()) == 1.0


def test_nets_smoke() -> None:
    payload = bench_nets.main(smoke=True)
    rows = payload["latency"]
    assert {(r["preset"], r["batch"]) for r in rows} == {(s.name, b) for s in bench_nets.SMOKE_SPECS for b in (1, 8)}
    assert all(math.isfinite(r["jax_s"]) and r["jax_s"] > 0 and r["floor_s"] > 0 for r in rows)
    if HAS_TORCH:  # the same weights give the same outputs: PyTorch runs the same architecture
        assert all(r["eager_s"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)
    assert payload["dqn"][0]["steps"] >= 1 and payload["dqn"][0]["steps_per_s"] > 0


def test_nets_without_torch_report_na(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_nets, "torch", None)
    rates = bench_nets.MachineRates({"probe": 1e10}, {"probe": 1e10})
    (row,) = bench_nets.bench_preset("tiny", (1,), rates, bench_nets.StreamProbes(1 << 20), with_compile=False,
                                     smoke=True)
    assert row.eager_s is None and row.compiled_s is None and row.compiled_note == "n/a (no torch)"
    assert row.floor_s > 0 and row.floor_ratio == pytest.approx(row.jax_s / row.floor_s)


def test_layer_costs_add_up_to_the_net() -> None:
    for name in ("tiny", "compact", "paper"):
        net = NetDef.of(name, 12)
        layers = bench_nets.layer_costs(net.spec, 12)
        assert sum(layer.weight_bytes for layer in layers) == bench_nets.weight_bytes(net)
        assert len(layers) == sum(map(len, net.spec.conv_sets)) + len(net.spec.hidden) + 1


def test_per_layer_floor_sums_each_layers_own_bound() -> None:
    layers = [bench_nets.LayerCost("conv", 100, 10), bench_nets.LayerCost("fc", 10, 1000)]
    floor = bench_nets.roofline_floor(layers, 1, compute_flops=10.0, bandwidth=10.0)
    assert floor.layered_s == pytest.approx(10 + 100)  # the conv computes 10 s, then the FC streams 100 s
    assert floor.overlapped_s == pytest.approx(max(110 / 10, 1010 / 10))
    assert floor.bound == "memory"
    assert bench_nets.roofline_floor(layers, 100, 10.0, 10.0).bound == "compute"  # 1000 s of conv at batch 100


def test_sim_smoke() -> None:
    rates = bench_sim.main(smoke=True)
    assert {(r.pixels, r.path) for r in rates} == {
        (p, path) for p in (64, 256) for path in ("in-process", "tcp client", "tcp instrument")
    }
    assert all(r.frames > 0 and r.frames_per_s > 0 for r in rates)


def test_controller_smoke() -> None:
    (row,) = bench_controller.main(smoke=True)
    assert row.status.startswith("completed"), row.status
    assert row.frames >= 4 and row.scans >= row.frames
    assert 0 < row.instrument_s < row.loop_s and 0 < row.nets_s < row.loop_s
    # the session module is left as it was
    from deepspm.controller import session
    from deepspm.controller.loop import RunLoop
    from deepspm.io.instrument import NanonisInstrument

    assert session.RunLoop is RunLoop and session.NanonisInstrument is NanonisInstrument
