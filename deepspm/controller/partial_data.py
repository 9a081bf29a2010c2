"""Labelled sets seen as partial frames: the data behind `deepspm evaluate classifier --lines N [N ...]`.

For each visible-line count N, every image shows only its first N rows (rows 0..N-1 of the stored array are
"scanned first", the net's orientation; `deepspm.nets.linewindow`), as a partial `Scan.FrameDataGrab` returns
it, and is brought to the nets' input the way the run does it:

- raw frames in metres (the original DeepSPM folders, our synthetic sets, imported .sxm sets): rows N.. are set
  to NaN and the frame goes through `preprocess_partial` (RANSAC plane on the N scanned rows only, seeded with
  `derived_seed(seed, file)` as `load_labelled` levels full frames), so the levelling sees what the run sees;
- frames already levelled (`*Ransac.npy`) and the H:Si(100) set (already in the nets' range, its heights
  min-max stretched by its authors): only normalised, then rows N.. are set to the unscanned fill.

RANSAC is Python-bound: many frames are spread over spawned worker processes as `load_labelled` does.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from deepspm.controller.preprocess import PartialFrameError, normalise, preprocess_truncated
from deepspm.controller.seeds import derived_seed
from deepspm.controller.training import folder_set_info, read_hsi100_set
from deepspm.nets.data import DataError, load_deepspm_folders
from deepspm.nets.linewindow import check_lines, mask_rows

_POOL_MIN_JOBS = 256  # below this, levelling in-process beats starting worker processes


def _part(path: Path, multiclass: bool, min_responses: int, seed: int) -> dict[str, Any]:
    """One set: normalised images (None where raw), raw frames (None where normalised), seeds, labels, info."""
    if path.is_file() and path.suffix == ".npz":
        data, info = read_hsi100_set(path, multiclass, min_responses)
        n = len(data)
        return {"normalised": list(data.images.astype(np.float32)), "raw": [None] * n, "seeds": [0] * n,
                "labels": data.labels, "info": info, "names": [f"{path} image {i}" for i in data.indices]}
    if path.is_dir():
        if multiclass:
            raise DataError(f"{path}: a good/bad folder set has binary labels only")
        folder = load_deepspm_folders(path)
        seeds = [derived_seed(seed, p.relative_to(path).as_posix()) for p in folder.paths]
        normalised = [normalise(img) if levelled else None for img, levelled in zip(folder.images, folder.levelled)]
        raw = [None if levelled else img for img, levelled in zip(folder.images, folder.levelled)]
        return {"normalised": normalised, "raw": raw, "seeds": seeds, "labels": folder.labels,
                "info": folder_set_info(path, folder, seed),
                "names": [str(p) for p in folder.paths]}
    raise DataError(f"{path}: neither a .npz file nor a folder with good/ and bad/")


def load_partial_sets(
    paths: Sequence[Path | str], lines: Sequence[int], *, rows: np.ndarray | None = None, multiclass: bool = False,
    min_responses: int = 1, seed: int = 0, workers: int | None = None, progress: bool = True,
) -> tuple[dict[int, np.ndarray], np.ndarray, dict[str, Any]]:
    """`({N: images float32 (M, 64, 64)}, labels (M,...), info)` for the concatenated sets `paths` (one layout of
    labels), keeping `rows` of the concatenation (default all, M = every image) and each N of `lines`.

    `info` is `load_labelled_sets`' (counts over the whole sets, `kinds` per kept row or None).
    """
    if not paths:
        raise DataError("no data given")
    counts = list(dict.fromkeys(int(n) for n in lines))
    if not counts:
        raise DataError("no visible-line counts given")
    parts = [_part(Path(p), multiclass, min_responses, seed) for p in paths]
    if len({np.asarray(p["labels"]).shape[1:] for p in parts}) != 1:
        raise DataError("the data sets have different label layouts (binary vs multi-class)")
    normalised: list[np.ndarray | None] = [a for p in parts for a in p["normalised"]]
    raw: list[np.ndarray | None] = [a for p in parts for a in p["raw"]]
    seeds: list[int] = [a for p in parts for a in p["seeds"]]
    names: list[str] = [a for p in parts for a in p["names"]]
    labels = np.concatenate([p["labels"] for p in parts])
    kinds = [p["info"].get("kinds") for p in parts]
    all_kinds: list[str] | None = [k for ks in kinds for k in ks] if all(k is not None for k in kinds) else None
    info = {"n": int(labels.shape[0]), "sets": [p["info"] for p in parts], "class_names": parts[0]["info"]["class_names"],
            "kinds": all_kinds}
    if labels.ndim == 1:
        info.update(n_good=int(labels.sum()), n_bad=int(labels.size - labels.sum()))
    keep = np.arange(labels.shape[0]) if rows is None else np.asarray(rows, dtype=int)
    if keep.size and (keep.min() < 0 or keep.max() >= labels.shape[0]):
        raise DataError(f"row {keep.max() if keep.max() >= labels.shape[0] else keep.min()} is not in the data "
                        f"({labels.shape[0]} images)")
    side = next(np.shape(a)[0] for a in (normalised + raw) if a is not None) if keep.size else 64
    for n in counts:
        try:
            check_lines(n, side)
        except ValueError as e:
            raise DataError(str(e)) from None
    if all_kinds is not None:
        info["kinds"] = [all_kinds[i] for i in keep]

    out = {n: np.empty((keep.size, side, side), np.float32) for n in counts}
    jobs = [(n, k) for n in counts for k, i in enumerate(keep) if raw[i] is not None]
    for n in counts:
        for k, i in enumerate(keep):
            if normalised[i] is not None:
                out[n][k] = mask_rows(normalised[i], n)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = tqdm(total=len(jobs), desc="levelling partial frames (RANSAC)", unit="frame", disable=not progress or not jobs)
    frames = (raw[keep[k]] for _, k in jobs)
    job_lines = (n for n, _ in jobs)
    job_seeds = (int(seeds[keep[k]]) for _, k in jobs)
    pool = None
    results: Iterator[np.ndarray]
    if workers == 1 or len(jobs) < _POOL_MIN_JOBS:
        results = map(preprocess_truncated, frames, job_lines, job_seeds)
    else:  # spawned workers import only the light preprocess module (the pickled function's home)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(preprocess_truncated, frames, job_lines, job_seeds, chunksize=32)
    done = 0
    try:
        for (n, k), image in zip(jobs, results):
            out[n][k] = image
            done += 1
            bar.update(1)
    except PartialFrameError as e:
        n, k = jobs[done]
        raise DataError(f"{names[keep[k]]} with {n} visible lines: {e}") from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return out, labels[keep], info


__all__ = ["load_partial_sets"]
