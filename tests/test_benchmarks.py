"""Smoke runs of the `make bench` modules (tiny nets, a few frames, one repetition) so that they cannot rot.

Nothing here is a timed assertion: the checks are on structure and on what must hold at any speed (the
analytic FLOP counts against the reference, PyTorch computing the same function as JAX, a completed run).
The PyTorch parts run only where torch is installed (the `bench` extra, not the `test` extra).
"""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_controller, bench_linewindow, bench_nets, bench_sim
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


# --- bench_gpu_serving: the serving form against a plain jit of apply_eval and PyTorch eager, per backend ------


def test_gpu_serving_quick_run_writes_every_row(tmp_path) -> None:
    import json

    from benchmarks import bench_gpu_serving as bench

    payload = bench.main(["--quick", "--out", str(tmp_path)])
    rows = payload["rows"]
    assert {(r["preset"], r["batch"]) for r in rows} == {(p, b) for p in ("tiny", "compact") for b in (1, 8)}
    for r in rows:
        assert not r["skipped"] and set(r["median_s"]) == set(bench.FORMS)
        for form in bench.JAX_FORMS:  # every JAX form measured, reps samples each, the same function as the reference
            assert len(r["samples_s"][form]) == 3 and 0 < r["best_s"][form] <= r["median_s"][form] < math.inf
            assert r["max_abs_diff"][form] < 1e-4 * max(1.0, r["output_scale"])
        assert r["max_abs_diff"]["plain"] == 0.0
        if HAS_TORCH:
            assert r["median_s"]["eager"] > 0 and r["max_abs_diff"]["eager"] < 1e-4 * max(1.0, r["output_scale"])
        else:
            assert r["median_s"]["eager"] is None and r["errors"]["eager"] == "torch not installed"
        assert r["serving_over_plain"] == pytest.approx(r["median_s"]["serving"] / r["median_s"]["plain"])
        timed = {f: t for f, t in r["median_s"].items() if t is not None}
        assert r["fastest"] == min(timed, key=timed.get) and r["jax_pick"] in bench.JAX_FORMS
    written = json.loads((tmp_path / "gpu_serving.json").read_text())
    assert written["rows"] == json.loads(json.dumps(rows)) and written["backend"]["jax_backend"] == "cpu"
    assert sum(len(presets) for by_form in written["picks_by_batch"].values() for presets in by_form.values()) == 4


def test_gpu_serving_deadline_skips_rows_not_begun(tmp_path) -> None:
    from benchmarks import bench_gpu_serving as bench

    payload = bench.main(["--presets", "tiny", "--batches", "1,2", "--deadline", "1e-9", "--out", str(tmp_path)])
    assert [(r["preset"], r["batch"], r["skipped"]) for r in payload["rows"]] == [("tiny", 1, "deadline"),
                                                                                ("tiny", 2, "deadline")]
    assert payload["picks_by_batch"] == {} and all(r["fastest"] is None for r in payload["rows"])


def test_gpu_serving_picks_the_fastest_form() -> None:
    from benchmarks.bench_gpu_serving import Row, picks_by_batch, table_rows

    a = Row("a", 64, median_s={"serving": 4.0, "direct": 2.0, "plain": 2.5, "eager": 1.0})
    b = Row("b", 64, median_s={"serving": 1.0, "direct": None, "plain": 3.0, "eager": None},
            first_call_s=dict.fromkeys(("serving", "direct", "plain", "eager")), max_abs_diff={})
    assert (a.fastest, a.jax_pick, a.ratio("serving", "plain")) == ("eager", "direct", 1.6)
    assert (b.fastest, b.jax_pick, b.ratio("plain", "eager")) == ("serving", "serving", None)
    assert picks_by_batch([a, b]) == {64: {"serving": ["b"], "direct": ["a"], "plain": []}}
    (cells,) = table_rows([b])
    assert cells[:6] == ("b", 64, "1e+03", "n/a", "3e+03", "n/a") and "n/a" in cells[-1]


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--batches", ","], ["--presets", "huge"], ["--reps", "-1"],
                                  ["--deadline", "0"], ["--warmup", "x"]])
def test_gpu_serving_refuses_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_gpu_serving as bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_linewindow_smoke() -> None:
    result = bench_linewindow.main(smoke=True)
    assert [r["lines"] for r in result["rows"]] == list(bench_linewindow.LINE_COUNTS)
    assert result["line_time_s"] == pytest.approx(0.1875)
    assert all(r["judgements"] > 0 and 0 < r["total_median_s"] <= r["total_p95_s"] for r in result["rows"])


def test_ensemble_smoke() -> None:
    from benchmarks import bench_ensemble

    result = bench_ensemble.main(smoke=True)
    assert result["k"] == bench_ensemble.K and len(result["rows"]) == 4  # one member, batched, K calls, 8 views
    assert all(r["median_s"] > 0 and r["median_s"] <= r["p95_s"] for r in result["rows"])
