"""The line-window classifier (issue 11, nets half): partial-frame pre-processing, random truncation in training,
evaluation by visible lines for every data layout, and the shipped line-window net."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from deepspm.cli import main
from deepspm.controller import preprocess as pp
from deepspm.controller.partial_data import load_partial_sets
from deepspm.controller.preprocess import PartialFrameError, preprocess, preprocess_partial, scan_order, scanned_lines
from deepspm.controller.session import WEIGHTS_DIR
from deepspm.controller.training import (
    evaluate_classifier_command,
    load_labelled,
    synth_dataset_command,
    train_classifier_command,
)
from deepspm.nets import linewindow as lw
from deepspm.nets.checkpoints import load_net
from deepspm.nets.classifier import ClassifierConfig, make_train_step
from deepspm.nets.data import HSI100_CATEGORIES, DataError
from deepspm.nets.inference import Predictor
from deepspm.nets.metrics import binary_metrics
from deepspm.nets.model import NetDef

SHIPPED_LINES = WEIGHTS_DIR / "classifier_lines"


def _tilted_frame(seed: int = 0, side: int = 64) -> np.ndarray:
    """A raw frame (m): a tilted plane (1 pm per row, 0.5 pm per column), 1 pm noise, a 2 Å bump at rows 40-47."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices((side, side))
    z = 2e-9 + 1e-12 * rows + 0.5e-12 * cols + rng.normal(0, 1e-12, (side, side))
    z[40:48, 20:28] += 2e-10
    return z


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    synth_dataset_command(out, n=48, seed=21, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_lines(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "lines"
    train_classifier_command([synth], out, preset="tiny", epochs=1, seed=3, batch_size=16, progress=False,
                             lines=True, min_lines=8)
    return out


def _fake_hsi100(path: Path) -> Path:
    """Six rows in the H:Si(100) npz layout: 3 good, 3 bad."""
    scores = np.zeros((6, 6), np.float32)
    scores[:3, 1] = 1.0
    scores[3:, 5] = 1.0
    np.savez(path, images=np.random.default_rng(1).integers(0, 255, (6, 64, 64)).astype(np.uint8), scores=scores,
             n_responses=np.full(6, 2, np.int32), names=np.array([f"img{i}.png" for i in range(6)]),
             orig_shape=np.full((6, 2), 300, np.int32), categories=np.array(HSI100_CATEGORIES))
    return path


# --- pre-processing of partial frames ------------------------------------------------------------------------


def test_a_complete_frame_is_preprocessed_exactly_as_today() -> None:
    z = _tilted_frame()
    image, lines = preprocess_partial(z, seed=4)
    assert lines == 64 and image.dtype == np.float32 and image.shape == (64, 64)
    np.testing.assert_array_equal(image, preprocess(z, seed=4).normalised)


def test_a_partial_frame_is_levelled_from_its_scanned_rows_only() -> None:
    z = _tilted_frame()
    partial = z.copy()
    partial[20:] = np.nan
    image, lines = preprocess_partial(partial, seed=4)
    assert lines == 20
    assert np.all(image[20:] == lw.UNSCANNED_FILL) and pp.UNSCANNED_FILL == lw.UNSCANNED_FILL
    # the tilt (up to 95 pm over the frame) is removed from the scanned rows: they sit on the plane (-1 +- noise)
    assert np.abs(image[:20] + 1.0).max() < 0.08
    # what the unscanned rows would have held does not matter: the same image as the 20-row frame's own levelling
    top, _ = preprocess_partial(z[:20], seed=4)
    np.testing.assert_array_equal(image[:20], top)


def test_a_line_being_scanned_does_not_count_and_junk_after_a_gap_is_refused() -> None:
    z = _tilted_frame()
    z[10:] = np.nan
    z[10, :30] = 2e-9  # half of line 10 scanned
    image, lines = preprocess_partial(z, seed=0)
    assert lines == 10 and scanned_lines(z) == 10 and np.all(image[10:] == lw.UNSCANNED_FILL)
    z[30, 5] = 2e-9
    with pytest.raises(PartialFrameError, match="not in scan order"):
        preprocess_partial(z, seed=0)


def test_an_up_scan_is_mapped_to_scan_order() -> None:
    # a Frame stores the top row first; an up-scan acquires the bottom line first: after 12 lines the
    # bottom 12 rows of Frame.data_m hold data
    full = _tilted_frame()
    frame_data = full.copy()
    frame_data[:52] = np.nan
    with pytest.raises(PartialFrameError, match="scan order"):
        preprocess_partial(frame_data, seed=0)
    ordered = scan_order(frame_data, scan_up=True)
    image, lines = preprocess_partial(ordered, seed=0)
    assert lines == 12
    np.testing.assert_array_equal(ordered[0], frame_data[63])  # the first line scanned comes first
    assert scan_order(frame_data, scan_up=False) is not None
    np.testing.assert_array_equal(scan_order(frame_data, scan_up=False), frame_data)
    np.testing.assert_array_equal(scan_order(scan_order(frame_data, True), True), frame_data)


def test_nothing_scanned_and_wrong_shapes_are_typed_errors() -> None:
    with pytest.raises(PartialFrameError, match="no complete scan line"):
        preprocess_partial(np.full((64, 64), np.nan), seed=0)
    with pytest.raises(PartialFrameError, match="2-D"):
        preprocess_partial(np.zeros(64), seed=0)
    with pytest.raises(PartialFrameError, match="1..64"):
        pp.truncate_rows(_tilted_frame(), 0)


# --- masking and truncation ----------------------------------------------------------------------------------


def test_mask_rows_keeps_the_first_rows_of_each_image() -> None:
    images = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    masked = lw.mask_rows(images, [1, 32, 64])
    for image, out, n in zip(images, masked, (1, 32, 64)):
        np.testing.assert_array_equal(out[:n], image[:n])
        assert np.all(out[n:] == lw.UNSCANNED_FILL)
    assert lw.mask_rows(images[0], 5).shape == (64, 64)
    with pytest.raises(ValueError, match="1..64"):
        lw.mask_rows(images, 65)


def test_random_truncation_draws_per_image_line_counts_in_range() -> None:
    images = np.random.default_rng(0).uniform(-1, 1, (128, 64, 64, 1)).astype(np.float32)
    truncate = jax.jit(lw.random_truncation, static_argnums=2)
    out = np.asarray(truncate(images, jax.random.key(7), 4))
    scanned = (out[..., 0] != lw.UNSCANNED_FILL).any(axis=2)  # (B, rows): a scanned row has data
    lines = scanned.sum(axis=1)
    assert lines.min() >= 4 and lines.max() <= 64 and len(set(lines.tolist())) > 20
    for k in range(128):  # the kept rows are the first ones, untouched; the rest all unscanned
        np.testing.assert_array_equal(out[k, : lines[k]], images[k, : lines[k]])
        assert np.all(out[k, lines[k] :] == lw.UNSCANNED_FILL)
    np.testing.assert_array_equal(out, np.asarray(truncate(images, jax.random.key(7), 4)))


def test_the_train_step_truncates_only_for_a_line_window_net() -> None:
    net = NetDef.of("tiny", 1)
    images = jax.numpy.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 64, 64, 1)).astype(np.float32))
    labels = jax.numpy.asarray(np.array([0, 1] * 4, np.float32))

    variables = net.init(jax.random.key(0))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(variables.params)

    def loss(min_lines: int) -> float:
        step = make_train_step(net, optimizer, ClassifierConfig(line_window_min_lines=min_lines), donate=False)
        return float(step(variables, opt_state, images, labels, jax.random.key(1))[2])

    assert loss(1) != loss(0)  # the same key, flips and dropout: only the truncation differs
    with pytest.raises(ValueError, match="line_window_min_lines"):
        ClassifierConfig(line_window_min_lines=-1)


# --- training and evaluation by lines ------------------------------------------------------------------------


def test_a_line_window_checkpoint_says_so(tiny_lines: Path) -> None:
    ckpt = load_net(tiny_lines, expect_kind="classifier")
    assert lw.is_line_window(ckpt.metadata) and ckpt.metadata["line_window"]["min_lines"] == 8
    assert ckpt.metadata["options"]["lines"] is True
    assert [r["lines"] for r in ckpt.metadata["by_lines"]] == [8, 16, 32, 64]
    assert json.loads((tiny_lines / "metrics.json").read_text())["lines"] is True


def test_folder_sets_are_levelled_from_the_visible_rows(synth: Path, tmp_path: Path) -> None:
    by_n, labels, info = load_partial_sets([synth], [10, 64], seed=2, progress=False)
    full, full_labels, _ = load_labelled(synth, seed=2, progress=False)
    np.testing.assert_array_equal(labels, full_labels)
    np.testing.assert_array_equal(by_n[64], full)  # 64 visible lines: exactly today's frames
    assert np.all(by_n[10][:, 10:] == lw.UNSCANNED_FILL)
    assert not np.array_equal(by_n[10][:, :10], full[:, :10])  # re-levelled from 10 rows, not masked
    assert info["kinds"] is not None and len(info["kinds"]) == labels.size
    # an already levelled file (*Ransac.npy) is only normalised, then masked
    (tmp_path / "good").mkdir()
    np.save(tmp_path / "good" / "a_Ransac.npy", np.full((64, 64), 1e-10))
    by_n, _, _ = load_partial_sets([tmp_path], [3], progress=False)
    assert np.allclose(by_n[3][0, :3], 0.0, atol=1e-6) and np.all(by_n[3][0, 3:] == lw.UNSCANNED_FILL)


def test_evaluate_by_lines_on_every_layout(tiny_lines: Path, synth: Path, tmp_path: Path) -> None:
    result = evaluate_classifier_command(tiny_lines, synth, lines=[8, 64], out_json=tmp_path / "e.json",
                                         progress=False)
    assert result["line_window_net"] and [r["lines"] for r in result["by_lines"]] == [8, 64]
    plain = evaluate_classifier_command(tiny_lines, synth, progress=False)
    assert result["by_lines"][1]["metrics"] == plain["metrics"]  # 64 lines is the full-frame evaluation
    assert "by_kind" in result["by_lines"][0]["metrics"]
    assert json.loads((tmp_path / "e.json").read_text())["lines"] == [8, 64]
    # the npz layout, and a training run's validation split
    npz = _fake_hsi100(tmp_path / "hsi.npz")
    result = evaluate_classifier_command(tiny_lines, npz, lines=[16, 32], progress=False)
    images, labels, _ = load_labelled(npz)
    ckpt = load_net(tiny_lines)
    expected = binary_metrics(labels, Predictor(ckpt.net, ckpt.variables)(lw.mask_rows(images, 16)), 0.9)
    got = result["by_lines"][0]["metrics"]
    assert "calibration" in got and {k: v for k, v in got.items() if k != "calibration"} == expected
    split = evaluate_classifier_command(tiny_lines, [synth], lines=[32], seed=3, split=tiny_lines / "split.json",
                                        progress=False)
    assert split["by_lines"][0]["metrics"]["n"] == len(json.loads((tiny_lines / "split.json").read_text())["val_indices"])


def test_the_cli_evaluates_a_list_of_line_counts_and_refuses_bad_counts(tiny_lines: Path, synth: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.json"
    assert main(["evaluate", "classifier", "--checkpoint", str(tiny_lines), "--data", str(synth),
                 "--lines", "8", "16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lines=8 " in printed and "lines=16 " in printed
    assert [r["lines"] for r in json.loads(out.read_text())["by_lines"]] == [8, 16]
    for bad in ("0", "65", "x"):
        code = main(["evaluate", "classifier", "--checkpoint", str(tiny_lines), "--data", str(synth), "--lines", bad])
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "--lines" in err


def test_bad_line_counts_are_data_errors() -> None:
    with pytest.raises(DataError, match="no visible-line counts"):
        load_partial_sets([Path("x")], [], progress=False)


# --- the shipped line-window net -----------------------------------------------------------------------------


@pytest.mark.skipif(not SHIPPED_LINES.exists(), reason="no shipped line-window classifier")
def test_the_shipped_line_window_net_judges_partial_synthetic_frames(tmp_path: Path) -> None:
    ckpt = load_net(SHIPPED_LINES, expect_kind="classifier")
    assert lw.is_line_window(ckpt.metadata) and ckpt.net.spec.name == "compact"
    size = sum(f.stat().st_size for f in SHIPPED_LINES.rglob("*") if f.is_file())
    assert size < 4e6
    synth_dataset_command(tmp_path / "unseen", n=120, seed=424243, progress=False)
    result = evaluate_classifier_command(SHIPPED_LINES, tmp_path / "unseen", lines=[16, 64], seed=1, progress=False)
    aucs = {r["lines"]: r["metrics"]["roc_auc"] for r in result["by_lines"]}
    assert aucs[64] >= 0.97 and aucs[16] >= 0.9, aucs
