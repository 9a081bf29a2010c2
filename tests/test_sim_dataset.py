"""Synthetic data sets in the original layout, and the gallery."""

from __future__ import annotations

import csv

import numpy as np

from deepspm.simulator.dataset import gallery, synth_dataset


def test_synth_dataset_layout_labels_and_content(tmp_path) -> None:
    out = synth_dataset(24, tmp_path / "data", seed=3, progress=False, good_fraction=0.5)
    good = sorted((out / "good").glob("*.npy"))
    bad = sorted((out / "bad").glob("*.npy"))
    assert len(good) + len(bad) == 24 and good and bad
    assert not any("good" in p.name or "bad" in p.name for p in good + bad)  # labels only from the folder
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    for row in rows:
        assert row["file"].startswith(row["label"] + "/")
        assert (row["kind"] == "good") == (row["label"] == "good")
        frame = np.load(out / row["file"])
        assert frame.shape == (64, 64) and frame.dtype == np.float32
        assert np.ptp(frame) < 6e-10  # bad-sample frames are not stored (the original's 6 Angstrom rule)
    kinds = {row["kind"] for row in rows}
    assert len(kinds) >= 3


def test_same_seed_same_dataset(tmp_path) -> None:
    a = synth_dataset(6, tmp_path / "a", seed=8, progress=False)
    b = synth_dataset(6, tmp_path / "b", seed=8, progress=False)
    for p in sorted(a.rglob("*.npy")):
        assert np.load(p).tobytes() == np.load(b / p.relative_to(a)).tobytes()
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()


def test_gallery_writes_a_png(tmp_path) -> None:
    out = synth_dataset(16, tmp_path / "d", seed=2, progress=False, good_fraction=0.5)
    png = gallery(out, tmp_path / "g.png", n_per_class=4, columns=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
