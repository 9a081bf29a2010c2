"""The training and evaluation workflows (deepspm.controller.training) end to end on tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepspm.controller import training
from deepspm.controller.preprocess import normalise, preprocess
from deepspm.controller.training import (
    derived_seed,
    evaluate_classifier_command,
    load_labelled,
    load_labelled_sets,
    normalise_frames,
    synth_dataset_command,
    train_classifier_command,
)
from deepspm.nets.checkpoints import load_net
from deepspm.nets.data import HSI100_CATEGORIES, DataError

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
HSI100 = SHARED_DATA / "hsi100_tipstates_64.npz"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    synth_dataset_command(out, n=96, seed=11, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_classifier(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "classifier"
    train_classifier_command([synth], out, preset="tiny", epochs=2, seed=3, batch_size=16, progress=False)
    return out


# --- data ---------------------------------------------------------------------------------------------------


def test_a_synthetic_folder_is_levelled_as_the_run_loop_does(synth: Path) -> None:
    images, labels, info = load_labelled(synth, seed=5, progress=False)
    files = sorted((synth / "good").glob("*.npy")) + sorted((synth / "bad").glob("*.npy"))
    assert images.shape == (96, 64, 64) and images.dtype == np.float32
    assert info["kind"] == "folders" and info["n"] == 96
    assert labels.tolist() == [1] * info["n_good"] + [0] * len(list((synth / "bad").glob("*.npy")))
    assert np.all(images >= -1.5) and np.all(images <= 1.5)
    # the per-file RANSAC seed depends on the file, not on its position in the set
    for i in (0, len(files) - 1):
        relative = files[i].relative_to(synth).as_posix()
        expected = preprocess(np.load(files[i]), derived_seed(5, relative)).normalised
        np.testing.assert_array_equal(images[i], expected)
    # labels.csv of a synthetic set names each frame's probe kind
    kinds = info["kinds"]
    assert len(kinds) == 96 and set(kinds) <= {"good", "blunt", "double", "multiple", "unstable"}
    assert all((k == "good") == bool(y) for k, y in zip(kinds, labels))


def test_levelled_files_are_only_normalised(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    tilted = (np.add.outer(np.arange(64), np.arange(64)) * 1e-11 + 2e-6).astype(np.float32)
    levelled = (rng.normal(0, 3e-11, (64, 64))).astype(np.float32)
    np.save(tmp_path / "good" / "a_Ransac.npy", levelled)
    np.save(tmp_path / "bad" / "b.npy", tilted)
    images, labels, info = load_labelled(tmp_path, progress=False)
    assert labels.tolist() == [1, 0] and info["n_levelled_files"] == 1 and info["kinds"] is None
    np.testing.assert_array_equal(images[0], normalise(levelled))  # no plane removed
    np.testing.assert_allclose(images[1], -1.0, atol=0.01)  # the 1.3 nm tilt is gone (float32 steps ~2 pm)


def test_the_process_pool_gives_the_same_frames(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted((synth / "good").glob("*.npy"))[:6]
    frames = np.stack([np.load(f) for f in files])
    seeds = [derived_seed(1, i) for i in range(len(files))]
    flags = np.zeros(len(files), bool)
    serial = normalise_frames(frames, flags, seeds, workers=1, progress=False)
    monkeypatch.setattr(training, "_POOL_MIN_FRAMES", 0)
    pooled = normalise_frames(frames, flags, seeds, workers=2, progress=False)
    np.testing.assert_array_equal(serial, pooled)


def _fake_hsi100(path: Path) -> Path:
    """A few rows in the H:Si(100) npz layout: 2 good, 2 bad, 1 Rows-only (left out in binary mode)."""
    scores = np.zeros((5, 6), np.float32)
    scores[0, 1] = scores[1, 2] = 1.0  # atoms, dimers: good
    scores[2, 4] = scores[3, 5] = 1.0  # tip change, blurry: bad
    scores[4, 3] = 1.0  # rows only
    np.savez(
        path, images=np.random.default_rng(1).integers(0, 255, (5, 64, 64)).astype(np.uint8), scores=scores,
        n_responses=np.array([3, 1, 2, 2, 1], np.int32), names=np.array([f"img{i}.png" for i in range(5)]),
        orig_shape=np.full((5, 2), 300, np.int32), categories=np.array(HSI100_CATEGORIES),
    )
    return path


def test_an_npz_dispatches_to_the_hsi100_loader(tmp_path: Path) -> None:
    npz = _fake_hsi100(tmp_path / "hsi.npz")
    images, labels, info = load_labelled(npz)
    assert info["kind"] == "hsi100_npz" and info["mode"] == "binary"
    assert labels.tolist() == [1, 1, 0, 0] and (info["n_good"], info["n_bad"]) == (2, 2)
    assert images.dtype == np.float32 and images.min() >= -1.0 and images.max() <= 1.0
    images, labels, info = load_labelled(npz, multiclass=True)
    assert labels.shape == (5, 6) and info["class_names"] == list(HSI100_CATEGORIES)
    _, labels, _ = load_labelled(npz, min_responses=2)
    assert labels.tolist() == [1, 0, 0]


def test_unsupported_inputs_are_refused(tmp_path: Path, synth: Path) -> None:
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(DataError):
        load_labelled(tmp_path / "x.txt")
    with pytest.raises(DataError):
        load_labelled(synth, multiclass=True)
    with pytest.raises(DataError):
        load_labelled_sets([])


# --- the classifier -------------------------------------------------------------------------------------------


def test_train_classifier_command_writes_a_loadable_checkpoint_and_metrics(tiny_classifier: Path, synth: Path) -> None:
    ckpt = load_net(tiny_classifier, expect_kind="classifier")
    assert ckpt.net.spec.name == "tiny" and ckpt.net.n_outputs == 1
    summary = json.loads((tiny_classifier / "metrics.json").read_text())
    assert summary["options"]["seed"] == 3 and summary["n_train"] + summary["n_val"] == 96
    assert summary["metrics"]["n"] == summary["n_val"] and "roc_auc" in summary["metrics"]
    assert sum(m["n"] for m in summary["metrics"]["by_kind"].values()) == summary["n_val"]
    assert len(summary["history"]) == 2
    assert ckpt.metadata["metrics"]["accuracy"] == summary["metrics"]["accuracy"]
    split = json.loads((tiny_classifier / "split.json").read_text())
    assert len(split["val_indices"]) == summary["n_val"]
    with pytest.raises(FileExistsError):
        train_classifier_command([synth], tiny_classifier, preset="tiny", epochs=1, progress=False)


def test_evaluate_classifier_command_reproduces_the_validation_metrics(
    tiny_classifier: Path, synth: Path, tmp_path: Path
) -> None:
    summary = json.loads((tiny_classifier / "metrics.json").read_text())
    result = evaluate_classifier_command(tiny_classifier, synth, out_json=tmp_path / "eval.json", progress=False)
    metrics = result["metrics"]
    assert metrics["n"] == 96 and set(metrics["by_kind"]) <= {"good", "blunt", "double", "multiple", "unstable"}
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["accuracy"] == metrics["accuracy"]
    # the validation rows of the training run, levelled with the training seed: the same numbers as then
    again = evaluate_classifier_command(tiny_classifier, [synth], seed=3, split=tiny_classifier / "split.json",
                                        progress=False)["metrics"]
    assert again["n"] == summary["n_val"]
    for key in ("accuracy", "precision", "recall", "roc_auc"):
        assert again[key] == pytest.approx(summary["metrics"][key]), key
    assert again["by_kind"] == summary["metrics"]["by_kind"]


# --- the real H:Si(100) set (not in a fresh clone) ---------------------------------------------------------------


@pytest.mark.skipif(not HSI100.exists(), reason="../shared/data/hsi100_tipstates_64.npz is not present")
def test_the_hsi100_set_trains_and_evaluates_on_a_small_subset(tmp_path: Path) -> None:
    images, labels, info = load_labelled(HSI100, min_responses=3)
    assert info["kind"] == "hsi100_npz" and set(np.unique(labels)) == {0, 1}
    assert images.shape[1:] == (64, 64)
    out = tmp_path / "hsi"
    summary = train_classifier_command([HSI100], out, preset="tiny", epochs=1, seed=0, min_responses=3,
                                       progress=False)
    assert summary["data"]["sets"][0]["kind"] == "hsi100_npz" and summary["metrics"]["roc_auc"] is not None
    result = evaluate_classifier_command(out, HSI100, min_responses=3, progress=False)
    assert result["metrics"]["n"] == labels.size
    held_out = evaluate_classifier_command(out, HSI100, min_responses=3, split=out / "split.json", progress=False)
    assert held_out["metrics"]["n"] == summary["n_val"]
    assert held_out["metrics"]["roc_auc"] == pytest.approx(summary["metrics"]["roc_auc"])
