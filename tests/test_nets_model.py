"""The CNN presets, the functional core and compiled inference (deepspm.nets.model / inference)."""

from __future__ import annotations

import asyncio
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspm.nets import serving
from deepspm.nets.inference import Predictor, predict_async
from deepspm.nets.model import NetDef, apply_eval, apply_train, count_params
from deepspm.nets.presets import PRESETS, NetSpec, get_preset

N_ACTIONS = 12  # the agent head size; tests elsewhere check it against deepspm.io.actions


@pytest.fixture(scope="module")
def tiny() -> tuple[NetDef, object]:
    net = NetDef.of("tiny", 1)
    return net, net.init(jax.random.key(0))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.5, 1.5, (n, 64, 64)).astype(np.float32)


# --- parameter counts (reference section 4.1), computed abstractly: `paper` would need 2.25 GB --------


def test_paper_and_original_match_the_reference_parameter_counts() -> None:
    paper_clf, paper_dqn = count_params("paper", 1), count_params("paper", N_ACTIONS)
    original_clf, original_dqn14 = count_params("original", 1), count_params("original", 14)
    assert paper_clf.trainable == 561_490_113
    assert paper_dqn.trainable == 561_535_180
    assert paper_clf.batch_stats == 22_144
    assert original_clf.trainable == 42_429_633
    assert original_dqn14.trainable == 42_442_958  # the released code's 14-output head
    assert original_clf.batch_stats == 9_856


def test_compact_is_a_few_hundred_thousand_parameters() -> None:
    assert 100_000 < count_params("compact", 1).trainable < 1_000_000
    assert count_params("tiny", 1).trainable < 5_000


def test_wide_is_compact_with_twice_the_maps() -> None:
    """The H:Si(100) recipe's members: the same depth, pools and dense layers as compact, every conv twice as wide."""
    compact, wide = get_preset("compact"), get_preset("wide")
    assert wide.conv_sets == tuple(tuple(2 * m for m in s) for s in compact.conv_sets)
    assert (wide.pool_after, wide.hidden, wide.global_pool) == (compact.pool_after, compact.hidden, compact.global_pool)
    assert 2 * count_params("compact", 1).trainable < count_params("wide", 1).trainable < 1_000_000


def test_presets_round_trip_through_json_dicts() -> None:
    for spec in PRESETS.values():
        assert NetSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_spec_rejects_inconsistent_plans() -> None:
    with pytest.raises(ValueError):
        NetSpec("bad", ((4,),), (True, True), (8,))


# --- functional core ---------------------------------------------------------------------------------


def test_initialisation_is_deterministic_and_glorot(tiny) -> None:
    net, variables = tiny
    again = net.init(jax.random.key(0))
    other = net.init(jax.random.key(1))
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, again))
    assert all(same)
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, other)))
    kernel = np.asarray(variables.params["convs"][1]["conv"]["kernel"][...])  # 3x3, 4 -> 8 maps
    limit = np.sqrt(6.0 / (9 * 4 + 9 * 8))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.5 * limit
    bias = np.asarray(variables.params["head"]["bias"][...])  # +-sqrt(3 / n_out) as in the original
    assert np.abs(bias).max() <= np.sqrt(3.0) and np.any(bias != 0)


def test_conv_and_hidden_layers_have_no_bias_and_the_head_has_one(tiny) -> None:
    net, variables = tiny
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables.params)}
    biases = [n for n in names if "'bias'" in n and "'bn'" not in n]
    assert biases == ["['head']['bias'].value"]


def test_eval_is_per_sample_and_train_updates_running_statistics(tiny) -> None:
    net, variables = tiny
    x = jnp.asarray(images(4)[..., None])
    together = apply_eval(net, variables, x)
    alone = apply_eval(net, variables, x[:1])
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-5)  # BN running stats: no batch coupling
    _, stats = apply_train(net, variables, x, jax.random.key(3))
    before = np.asarray(variables.batch_stats["convs"][0]["bn"]["mean"][...])
    after = np.asarray(stats["convs"][0]["bn"]["mean"][...])
    assert not np.allclose(before, after)
    # momentum 0.9: new = 0.9 old + 0.1 batch mean, and the old running mean was 0
    conv_out = jax.lax.conv_general_dilated(
        x, variables.params["convs"][0]["conv"]["kernel"][...], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(after, 0.1 * np.asarray(conv_out.mean(axis=(0, 1, 2))), rtol=1e-4, atol=1e-6)


# --- the serving forward (what Predictor runs) ---------------------------------------------------------


def perturbed(variables, seed: int):
    """Every variable moved off its init (BN running means and variances included), so folding is exercised."""
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(variables))))

    def move(path, leaf):
        noise = jax.random.uniform(next(keys), leaf.shape, leaf.dtype, -1.0, 1.0)
        return leaf * jnp.exp(0.3 * noise) if "var" in jax.tree_util.keystr(path) else leaf + 0.2 * noise

    return jax.tree_util.tree_map_with_path(move, variables)


WINOGRAD_SPEC = NetSpec("winograd", ((16,), (64,)), (False, True), (16,), global_pool=True)  # conv 2: Winograd


@pytest.mark.parametrize("spec", [get_preset("tiny"), NetSpec("tiny-flat", ((4,), (8, 8)), (True, True), (16, 8)),
                                  get_preset("compact"), WINOGRAD_SPEC], ids=lambda s: s.name)
@pytest.mark.parametrize("batch", [1, 3])
def test_serving_forward_matches_the_module_in_both_dense_layouts(spec: NetSpec, batch: int) -> None:
    net = NetDef.of(spec, N_ACTIONS)
    variables = perturbed(net.init(jax.random.key(4)), seed=5)
    x = jnp.asarray(images(batch, seed=6)[..., None])
    expected = np.asarray(apply_eval(net, variables, x))
    for layout in serving.DenseLayout:
        weights = serving.prepare(net, variables, layout)
        got = np.asarray(jax.jit(serving.forward, static_argnums=(0, 3))(net, weights, x, layout))
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * float(np.max(np.abs(expected))))


@pytest.mark.parametrize(("batch", "side", "maps_in", "maps_out"), [(1, 8, 3, 5), (2, 6, 16, 4), (1, 16, 64, 32)])
def test_winograd_conv_equals_the_direct_conv(batch: int, side: int, maps_in: int, maps_out: int) -> None:
    keys = jax.random.split(jax.random.key(side), 2)
    x = jax.random.normal(keys[0], (batch, side, side, maps_in))
    kernel = jax.random.normal(keys[1], (3, 3, maps_in, maps_out))
    direct = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = serving.winograd_conv(x, serving.winograd_kernel(kernel))
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(direct))))


def test_winograd_runs_where_the_work_hides_its_transforms() -> None:
    assert serving.winograd_plan(WINOGRAD_SPEC) == (False, True)  # 1 -> 16 maps at 64 px: 1.2 MFLOP; 16 -> 64: 75
    assert serving.winograd_plan(get_preset("paper")) == (False,) + (True,) * 11
    assert not any(serving.winograd_plan(get_preset("compact")))
    assert not any(serving.winograd_plan(get_preset("paper"), backend="gpu"))  # measured slower there


def test_gemv_layout_holds_dense_kernels_transposed_and_only_serves_batch_one() -> None:
    net = NetDef.of("compact", 1)
    variables = net.init(jax.random.key(0))
    gemv = serving.prepare(net, variables, serving.DenseLayout.GEMV)
    gemm = serving.prepare(net, variables, serving.DenseLayout.GEMM)
    assert gemv.dense[0].kernel.shape == (256, net.spec.flat_features) == gemm.dense[0].kernel.shape[::-1]
    assert [serving.layout_for(b) for b in (1, 2, 64)] == [serving.DenseLayout.GEMV, *[serving.DenseLayout.GEMM] * 2]


# --- Predictor ----------------------------------------------------------------------------------------


def test_predictor_traces_once_per_shape(tiny) -> None:
    net, variables = tiny
    predictor = Predictor(net, variables)
    predictor.compile([1, 3])
    assert predictor.traces["forward"] == 2
    for _ in range(3):
        p1 = predictor(images(1))
        p3 = predictor(images(3, seed=1))
        predictor.set_variables(variables)  # new variables of the same structure: no retrace
    assert predictor.traces["forward"] == 2
    assert p1.shape == (1,) and p3.shape == (3,)
    assert np.all((p3 > 0) & (p3 < 1))
    predictor(images(5))  # an unseen batch size compiles once more, then is cached
    predictor(images(5))
    assert predictor.traces["forward"] == 3


def test_predictor_matches_the_functional_eval_and_accepts_image_layouts(tiny) -> None:
    net, variables = tiny
    x = images(2)
    expected = np.asarray(jax.nn.sigmoid(apply_eval(net, variables, jnp.asarray(x[..., None]))))[:, 0]
    predictor = Predictor(net, variables)
    np.testing.assert_allclose(predictor(x), expected, rtol=1e-5)
    np.testing.assert_allclose(predictor(x[..., None]), expected, rtol=1e-5)
    np.testing.assert_allclose(predictor(x[0]), expected[:1], rtol=1e-5)
    with pytest.raises(ValueError, match="64x64"):
        predictor(np.zeros((1, 32, 32), np.float32))


def test_predictor_serves_per_call_variables_without_changing_its_own(tiny) -> None:
    net, first = tiny
    second = perturbed(first, seed=9)
    x = images(1)

    def reference(variables):
        return np.asarray(jax.nn.sigmoid(apply_eval(net, variables, jnp.asarray(x[..., None]))))[:, 0]

    predictor = Predictor(net, first)
    np.testing.assert_allclose(predictor(x, second), reference(second), rtol=1e-5)
    np.testing.assert_allclose(predictor(x), reference(first), rtol=1e-5)  # per-call variables do not stick
    np.testing.assert_allclose(predictor(x, second), reference(second), rtol=1e-5)  # served from its cache
    predictor.set_variables(second)
    np.testing.assert_allclose(predictor(np.concatenate([x, x])), np.repeat(reference(second), 2), rtol=1e-5)
    assert predictor.traces["prepare gemv"] == 1 and predictor.traces["prepare gemm"] == 1


def test_predict_batched_pads_to_one_shape(tiny) -> None:
    net, variables = tiny
    predictor = Predictor(net, variables)
    x = images(7)
    batched = predictor.predict_batched(x, batch_size=3)
    np.testing.assert_allclose(batched, predictor(x), rtol=1e-5)
    assert predictor.traces["forward"] == 2  # batch 3 (padded chunks) and batch 7 (the direct call)


def test_q_value_predictor_returns_one_value_per_action() -> None:
    net = NetDef.of("tiny", N_ACTIONS)
    predictor = Predictor(net, net.init(jax.random.key(2)), "values")
    q = predictor(images(2))
    assert q.shape == (2, N_ACTIONS) and q.dtype == np.float32


async def test_event_loop_keeps_ticking_while_inference_runs(tiny) -> None:
    """The predictor blocks its thread until the loop has ticked 20 times: only possible if the loop runs."""
    net, variables = tiny
    real = Predictor(net, variables)
    real.compile([2])
    loop_ticked = threading.Event()

    def slow_predictor(batch: np.ndarray) -> np.ndarray:
        assert loop_ticked.wait(timeout=30), "the event loop was blocked during inference"
        return real(batch)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while ticks < 20:
            ticks += 1
            await asyncio.sleep(0)
        loop_ticked.set()

    x = images(2)
    result, _ = await asyncio.gather(predict_async(slow_predictor, x), ticker())
    assert ticks == 20
    np.testing.assert_allclose(result, real(x))
    np.testing.assert_allclose(await predict_async(real, x), real(x))
