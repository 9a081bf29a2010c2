"""Data loaders: the original DeepSPM folder layout and the real H:Si(100) npz (deepspm.nets.data)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from deepspm.nets.data import (
    DataError,
    check_labelled_path,
    class_names,
    halve_to,
    hsi100_to_input_range,
    load_deepspm_folders,
    load_hsi100_npz,
)

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
HSI100 = SHARED_DATA / "hsi100_tipstates_64.npz"


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def heights(value: float, side: int = 64) -> np.ndarray:
    return np.full((side, side), value * 1e-10, np.float64)  # metres


def test_folder_layout_labels_from_the_immediate_parent(tmp_path: Path) -> None:
    # A root whose path contains "good" must not turn its bad images good (the original's substring bug).
    root = tmp_path / "goodies_run"
    write(root / "good" / "a.npy", heights(1))
    write(root / "good" / "bRansac.npy", heights(2))
    write(root / "bad" / "c.npy", heights(3))
    write(root / "bad" / "nested" / "good" / "deep.npy", heights(4))  # two levels deep: not read
    write(root / "other" / "x.npy", heights(5))  # not a label folder: not read
    data = load_deepspm_folders(root)
    names = [p.name for p in data.paths]
    assert names == ["a.npy", "bRansac.npy", "c.npy"]
    assert data.labels.tolist() == [1, 1, 0]
    assert data.levelled.tolist() == [False, True, False]
    assert data.images.dtype == np.float32 and data.images.shape == (3, 64, 64)
    np.testing.assert_allclose(data.images[2], 3e-10, rtol=1e-6)  # raw metres, no preprocessing


def test_several_roots_and_a_file_pattern(tmp_path: Path) -> None:
    write(tmp_path / "r1" / "good" / "aRansac.npy", heights(1))
    write(tmp_path / "r1" / "good" / "a-raw.npy", heights(9))
    write(tmp_path / "r2" / "bad" / "bRansac.npy", heights(2))
    data = load_deepspm_folders([tmp_path / "r1", tmp_path / "r2"], pattern="*Ransac.npy")
    assert [p.name for p in data.paths] == ["aRansac.npy", "bRansac.npy"]
    assert data.labels.tolist() == [1, 0] and data.levelled.all()


def test_128_px_images_are_halved_by_2x2_means(tmp_path: Path) -> None:
    big = np.arange(128 * 128, dtype=np.float64).reshape(128, 128)
    write(tmp_path / "good" / "big.npy", big)
    data = load_deepspm_folders(tmp_path)
    assert data.images.shape == (1, 64, 64)
    np.testing.assert_allclose(data.images[0, 0, 0], np.mean([0, 1, 128, 129]))
    np.testing.assert_allclose(halve_to(np.ones((256, 256)), 64), np.ones((64, 64)))


def test_unsupported_sizes_are_reported(tmp_path: Path) -> None:
    write(tmp_path / "good" / "ok.npy", heights(1))
    write(tmp_path / "bad" / "odd.npy", heights(1, side=102))
    write(tmp_path / "bad" / "flat.npy", np.zeros((64, 32)))
    with pytest.raises(DataError, match=r"2 file\(s\)") as error:
        load_deepspm_folders(tmp_path)
    assert "odd.npy: shape (102, 102)" in str(error.value) and "flat.npy" in str(error.value)
    lenient = load_deepspm_folders(tmp_path, strict=False)
    assert len(lenient) == 1 and {p.name for p, _ in lenient.rejected} == {"odd.npy", "flat.npy"}


def test_missing_layout_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither"):
        load_deepspm_folders(tmp_path)
    (tmp_path / "good").mkdir()
    with pytest.raises(DataError, match=r"no \*\.npy files"):
        load_deepspm_folders(tmp_path)


def test_hsi100_height_mapping() -> None:
    mapped = hsi100_to_input_range(np.array([0, 127, 254], np.uint8))
    np.testing.assert_allclose(mapped, [-1.0, 0.0, 1.0], atol=1e-6)


def fake_npz(path: Path) -> None:
    scores = np.array([
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # good (asymmetries)
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # good (dimers)
        [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],  # bad (tip change)
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # rows only: left out
        [1.0, 0.0, 0.0, 0.0, 0.5, 0.0],  # mixed: left out
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # bad (blurry), but one vote only
    ], np.float32)
    np.savez(
        path,
        images=np.arange(6 * 64 * 64).reshape(6, 64, 64).astype(np.uint8) % 255,
        scores=scores,
        n_responses=np.array([2, 3, 2, 2, 2, 1], np.int32),
        names=np.array([f"img{i}.png" for i in range(6)]),
        categories=np.array(["Asymmetries", "Individual Atoms", "Dimers", "Rows", "Tip Change", "Bad/Blurry"]),
        orig_shape=np.full((6, 2), 300),
    )


def test_npz_binary_and_multiclass_modes_on_a_small_file(tmp_path: Path) -> None:
    path = tmp_path / "small.npz"
    fake_npz(path)
    binary = load_hsi100_npz(path)
    assert binary.indices.tolist() == [0, 1, 2, 5] and binary.labels.tolist() == [1, 1, 0, 0]
    assert class_names(binary) is None
    assert load_hsi100_npz(path, min_responses=2).indices.tolist() == [0, 1, 2]
    multi = load_hsi100_npz(path, mode="multiclass")
    assert multi.labels.shape == (6, 6) and multi.labels[4].tolist() == [1, 0, 0, 0, 1, 0]
    assert list(class_names(multi)) == ["Asymmetries", "Individual Atoms", "Dimers", "Rows", "Tip Change", "Bad/Blurry"]
    assert binary.images.dtype == np.float32 and -1.0 <= binary.images.min() and binary.images.max() <= 1.0
    with pytest.raises(DataError, match="mode"):
        load_hsi100_npz(path, mode="ternary")


def test_check_labelled_path_names_the_layout_or_the_problem(tmp_path: Path) -> None:
    fake_npz(tmp_path / "set.npz")
    assert check_labelled_path(tmp_path / "set.npz") == "npz"
    write(tmp_path / "folders" / "bad" / "a.npy", heights(1))
    assert check_labelled_path(tmp_path / "folders") == "folders"
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    (tmp_path / "emptyset" / "good").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("x")
    for name, problem in [("missing", "does not exist"), ("notes.txt", "neither an .npz file nor a folder"),
                          ("junk.npz", "not a readable .npz archive"),
                          ("other.npz", "lacks the arrays scores, names, n_responses, categories"),
                          ("emptyset", "no .npy files in good/"), (".", "neither a good/ nor a bad/ folder")]:
        with pytest.raises(DataError, match=re.escape(problem)):
            check_labelled_path(tmp_path / name)
    with pytest.raises(DataError, match="not a readable .npz archive"):
        load_hsi100_npz(tmp_path / "junk.npz")


def test_a_junk_npy_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    write(tmp_path / "good" / "ok.npy", heights(1))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "junk.npy").write_text("not numpy")
    with pytest.raises(DataError, match=r"junk\.npy is not a \.npy array file"):
        load_deepspm_folders(tmp_path)


@pytest.mark.skipif(not HSI100.exists(), reason="../shared/data is not available")
def test_real_hsi100_set() -> None:
    binary = load_hsi100_npz(HSI100)
    assert binary.images.shape[1:] == (64, 64) and binary.images.dtype == np.float32
    n_good, n_bad = int(binary.labels.sum()), int((binary.labels == 0).sum())
    assert n_good > 500 and n_bad > 500  # a balanced, sizeable binary set
    assert -1.0 <= binary.images.min() and binary.images.max() <= 1.0
    multi = load_hsi100_npz(HSI100, mode="multiclass")
    assert multi.labels.shape[1] == 6 and len(multi) > len(binary)
