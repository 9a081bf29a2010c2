"""The vectorised JAX environment against the numpy simulator: the same tables, the same statistics."""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspm.controller import preprocess
from deepspm.controller.locator import action_mask
from deepspm.io.actions import ACTIONS, N_ACTIONS
from deepspm.simulator import jaxenv as je
from deepspm.simulator.conditioning import apply_event, event_for_action, fix_probability
from deepspm.simulator.dataset import synth_dataset
from deepspm.simulator.probe import ProbeKind, make_probe
from deepspm.simulator.sample import area_rng

WEIGHTS = Path(__file__).parents[1] / "deepspm" / "weights"


@pytest.fixture(scope="module")
def tables() -> je.Tables:
    return je.tables()


def test_tables_are_the_numpy_model(tables: je.Tables) -> None:
    for a in ACTIONS:
        event = event_for_action(a)
        for i, kind in enumerate(je.KINDS):
            want = 0.0 if event is None else fix_probability(kind, event)
            assert float(tables.fix[i, a.index]) == pytest.approx(want, abs=1e-7)
            if event is not None and want > 0:  # the severity scaling read off the numpy function
                assert want * (1 - tables.severity_slope * 0.7) == pytest.approx(fix_probability(kind, event, 0.7), rel=1e-6)
    assert bool(tables.stall[0]) and not bool(np.any(np.asarray(tables.stall[1:])))
    assert je.CLIP_LIMIT == preprocess.CLIP_LIMIT and je.EMPTY_TOLERANCE == preprocess.EMPTY_TOLERANCE
    # the locator's rule: an action needs a clean square of its side; 64 px over 10 nm
    for side_px in range(0, 40):
        empty = np.zeros((64, 64), bool)
        empty[1:1 + side_px, 1:1 + side_px] = True
        got = np.asarray(je.allowed_actions(jnp.asarray(empty), tables))
        np.testing.assert_array_equal(got, action_mask(side_px * 10e-9 / 64), err_msg=f"side {side_px} px")


def test_render_shapes_determinism_and_range(tables: je.Tables) -> None:
    probes = je.initial_probes(jax.random.key(0), 6, tables)
    step = jax.jit(je.step)
    actions = jnp.arange(6, dtype=jnp.int32) * 2
    a = step(jax.random.key(1), probes, actions)
    b = step(jax.random.key(1), probes, actions)
    c = step(jax.random.key(2), probes, actions)
    after, frames, masks, seen = a
    assert frames.shape == (6, 64, 64) and frames.dtype == jnp.float32
    assert masks.shape == (6, N_ACTIONS) and masks.dtype == jnp.bool_
    assert after.kind.shape == (6,) and seen.apex.shape == (6, je.APEX_SLOTS, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(frames), np.asarray(c[1]))
    assert float(frames.min()) >= -1.5 and float(frames.max()) <= 1.5
    assert np.all(np.asarray(masks[:, :6]))  # stall and pulses need no room


@pytest.mark.parametrize("kind", list(ProbeKind))
def test_transition_frequencies_per_action_match_numpy(tables: je.Tables, kind: ProbeKind) -> None:
    """After each action: P(good) and the distribution of the new kind, JAX against `conditioning.apply_event`."""
    n = 1500
    i = je.KINDS.index(kind)
    rng = area_rng(5, i)
    act = jax.jit(lambda k, p, a: je.act(k, p, a, tables).kind)
    for a in ACTIONS[1:]:
        event = event_for_action(a)
        assert event is not None
        ref = np.zeros(len(je.KINDS))
        for _ in range(n):
            ref[je.KINDS.index(apply_event(make_probe(kind, rng), event, rng).kind)] += 1  # type: ignore[arg-type]
        probes = je.draw_probes(jax.random.key(a.index), jnp.full((n,), i, jnp.int32), tables)
        kinds = np.asarray(act(jax.random.key(100 + a.index), probes, jnp.full((n,), a.index, jnp.int32)))
        got = np.bincount(kinds, minlength=len(je.KINDS)).astype(float)
        # two binomial samples of n: 5 standard errors of the difference, at least 0.02
        p = (ref + got) / (2 * n)
        tol = np.maximum(5 * np.sqrt(2 * p * (1 - p) / n), 0.02)
        np.testing.assert_array_less(np.abs(got / n - ref / n), tol, err_msg=f"{kind.value}, {a.name}")


def test_spontaneous_changes_match_numpy(tables: je.Tables) -> None:
    from deepspm.simulator.conditioning import spontaneous_change

    n = 4000
    for kind in (ProbeKind.GOOD, ProbeKind.UNSTABLE, ProbeKind.DOUBLE):
        i = je.KINDS.index(kind)
        rng = area_rng(6, i)
        ref = sum(spontaneous_change(make_probe(kind, rng), 0.01, 94 / 64, rng) is not None for _ in range(n)) / n
        probes = je.draw_probes(jax.random.key(i), jnp.full((n,), i, jnp.int32), tables)
        after = je.scan_changes(jax.random.key(50 + i), probes, 94.0, tables)
        got = float(np.mean(np.asarray(after.kind) != i))  # a change to the same kind never happens
        assert abs(got - ref) < max(5 * np.sqrt(2 * ref * (1 - ref) / n), 0.01), kind.value


@pytest.fixture(scope="module")
def numpy_frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The numpy simulator's frames (dataset synth: a move, a settle wait, a scan; 4 per approach area, so the
    per-area molecule density is sampled well), levelled by the run's RANSAC."""
    out = synth_dataset(240, tmp_path_factory.mktemp("synth"), seed=3, progress=False, frames_per_area=4)
    frames: dict[str, list[np.ndarray]] = {}
    with open(out / "labels.csv") as f:
        for row in csv.DictReader(f):
            frames.setdefault(row["kind"], []).append(preprocess.preprocess(np.load(out / row["file"]), 0).normalised)
    return {k: np.stack(v) for k, v in frames.items()}


def _jax_frames(kind_index: int, n: int, tables: je.Tables) -> np.ndarray:
    key = jax.random.key(kind_index)
    probes = je.draw_probes(key, jnp.full((n,), kind_index, jnp.int32), tables)
    probes = probes._replace(density=je._area_density(jax.random.fold_in(key, 1), (n,)))
    return np.asarray(jax.jit(je.render)(jax.random.fold_in(key, 2), probes)[0])


def _image_stats(frames: np.ndarray) -> np.ndarray:
    """Per tip state: mean height, std, contrast (1st-99th percentile range), fraction of clean substrate."""
    contrast = np.percentile(frames, 99, axis=(1, 2)) - np.percentile(frames, 1, axis=(1, 2))
    empty = np.abs(frames + 1.0) <= 0.1
    return np.array([frames.mean(), frames.std(axis=(1, 2)).mean(), contrast.mean(), empty.mean()])


def test_image_statistics_and_classifier_per_tip_state_match_numpy(
    tables: je.Tables, numpy_frames: dict[str, np.ndarray]
) -> None:
    from deepspm.nets.checkpoints import load_net
    from deepspm.nets.model import apply_eval

    clf = load_net(WEIGHTS / "classifier", expect_kind="classifier")
    p_good = jax.jit(lambda x: jax.nn.sigmoid(apply_eval(clf.net, clf.variables, x[..., None])[:, 0]))
    for i, kind in enumerate(je.KINDS):
        ref = numpy_frames[kind.value]
        ours = _jax_frames(i, 60, tables)
        s_ref, s_ours = _image_stats(ref), _image_stats(ours)
        # mean within 0.1 (10 pm), std and contrast within 20 %, clean fraction within 0.15
        assert abs(s_ours[0] - s_ref[0]) < 0.1, (kind.value, s_ours, s_ref)
        assert s_ours[1] == pytest.approx(s_ref[1], rel=0.2), (kind.value, s_ours, s_ref)
        assert s_ours[2] == pytest.approx(s_ref[2], rel=0.2), (kind.value, s_ours, s_ref)
        assert abs(s_ours[3] - s_ref[3]) < 0.15, (kind.value, s_ours, s_ref)
        # the shipped classifier judges both alike: the fraction called good (p > 0.9) within 0.1
        good_ref = float(np.mean(np.asarray(p_good(jnp.asarray(ref))) > 0.9))
        good_ours = float(np.mean(np.asarray(p_good(jnp.asarray(ours))) > 0.9))
        assert abs(good_ours - good_ref) < 0.1, (kind.value, good_ours, good_ref)
        assert (good_ours > 0.9) == kind.is_good


def test_substrate_bank_follows_density_and_width() -> None:
    """The pre-rendered layouts: denser strata carry more molecules, wider apices blur them lower, the frame's
    centre is the canvas' middle, the Boltzmann bank is exp(beta h) of the canvas, and a displaced apex reads the
    canvas shifted by its whole-pixel offset."""
    lay = je.layouts()
    canvas, centre = np.asarray(lay.canvas), np.asarray(lay.centre)
    assert canvas.shape == (je.LAYOUTS, je.WIDTH_BINS, 64 + 2 * je.PAD_PX, 64 + 2 * je.PAD_PX)
    inner = canvas[:, :, je.PAD_PX:-je.PAD_PX, je.PAD_PX:-je.PAD_PX]
    # the banks a frame reads are float16: the heights within 1e-3 relative, exp(beta h) likewise
    assert centre.dtype == np.float16 and lay.boltzmann.dtype == jnp.float16
    np.testing.assert_allclose(centre.astype(np.float32), inner, rtol=1e-3, atol=1e-6)
    boltzmann = np.asarray(lay.boltzmann).astype(np.float32)
    np.testing.assert_allclose(boltzmann, np.exp(je._BETA_PER_A * canvas), rtol=1e-3)
    per = je.LAYOUTS // je.DENSITY_STRATA
    covered = (canvas[:, 0] > 0.05).mean(axis=(1, 2)).reshape(je.DENSITY_STRATA, per).mean(axis=1)
    assert covered[-1] > 1.5 * covered[0], covered
    peaks = canvas.max(axis=(2, 3)).mean(axis=0)  # per width bin
    assert np.all(np.diff(peaks) < 0), peaks
    # a double tip whose second apex (equal weight, same width) sits 5 px to the right, 3 px down
    t = je.tables()
    p = je.draw_probes(jax.random.key(0), jnp.full((1,), je.KINDS.index(ProbeKind.DOUBLE), jnp.int32), t)
    w = 0.15
    apex = np.zeros((1, je.APEX_SLOTS, 4), np.float32)
    apex[0, 0] = (0.0, 0.0, w, 1.0)
    apex[0, 1] = (5 * 10 / 64, 3 * 10 / 64, w, 1.0)
    p = p._replace(apex=jnp.asarray(apex), kernel=jnp.zeros((1, je.APEX_SLOTS), jnp.int32),
                   noise_a=jnp.zeros(1), line_noise_a=jnp.zeros(1), streak_rate=jnp.zeros(1),
                   density=jnp.full((1,), 0.06))
    one = p._replace(apex=p.apex.at[0, 1, 3].set(0.0))
    frame2 = np.asarray(jax.jit(je.render)(jax.random.key(3), p)[0][0])
    frame1 = np.asarray(jax.jit(je.render)(jax.random.key(3), one)[0][0])
    # the second apex adds a ghost of the same molecules: pixel (v, u) shows what the first sees at (v + 3, u + 5)
    assert not np.allclose(frame1, frame2)
    ghost = frame2[:-3, :-5] - frame1[:-3, :-5]
    assert np.corrcoef(ghost.ravel(), frame1[3:, 5:].ravel())[0, 1] > 0.3
    assert np.corrcoef(ghost[3:, 5:].ravel(), frame1[:-6, :-10].ravel())[0, 1] < 0.3  # not the other way round


def test_plane_fit_is_least_squares_and_packed_erosion_is_the_locators_rule(tables: je.Tables) -> None:
    """`level_plane` subtracts numpy's least-squares plane over the clean pixels (a tilted frame with molecules
    outside the mask comes out flat on the mask); the erosion over packed bits equals a plain sliding-window test."""
    rng = np.random.default_rng(0)
    v, u = np.mgrid[0:64, 0:64].astype(np.float64)
    for trial in range(5):
        clean = rng.random((64, 64)) < (0.3, 0.9, 0.05, 0.6, 0.99)[trial]
        bumps = np.where(clean, rng.normal(0, 0.05, (64, 64)), rng.uniform(0.5, 2.0, (64, 64)))
        z = 0.7 - 0.02 * v + 0.013 * u + bumps
        a = np.stack([np.ones(int(clean.sum())), v[clean], u[clean]], axis=1)
        coef = np.linalg.lstsq(a, z[clean], rcond=None)[0]
        want = z - (coef[0] + coef[1] * v + coef[2] * u)
        got = np.asarray(jax.jit(je.level_plane)(jnp.asarray(z, jnp.float32), jnp.asarray(clean)))
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=f"trial {trial}")
    empty = rng.random((200, 64, 64)) < rng.choice([0.97, 0.99, 0.995, 0.999], size=(200, 1, 1))
    got_mask = np.asarray(jax.jit(lambda e: je.allowed_actions(e, tables))(jnp.asarray(empty)))
    for a_index, side in enumerate(tables.required_px):
        if side == 0:
            assert got_mask[:, a_index].all()
            continue
        win = np.lib.stride_tricks.sliding_window_view(empty, (side, side), axis=(1, 2)).all(axis=(-2, -1))
        np.testing.assert_array_equal(got_mask[:, a_index], win.any(axis=(1, 2)), err_msg=f"side {side}")
    assert 0 < got_mask[:, -1].mean() < 1  # the masks exercise both outcomes for the largest square
