"""Labelled image sets for the classifier: raw arrays and labels, no levelling.

Two layouts:
- the original DeepSPM folders `<root>/good/*.npy`, `<root>/bad/*.npy` (reference section 7): heights in
  metres, returned raw (RANSAC levelling and the v = h / 1 Å - 1 mapping belong to the controller);
  files named `*Ransac.npy` are flagged as already levelled;
- the real H:Si(100) tip-state set (`hsi100_tipstates_64.npz`, see its README): returned already mapped to
  the nets' input range, because its absolute heights are lost.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABEL_FOLDERS = {"good": 1, "bad": 0}
LEVELLED_SUFFIX = "Ransac.npy"


class DataError(ValueError):
    """A data set cannot be read as asked (missing folders, unsupported image sizes...)."""


@dataclass
class FolderDataset:
    """Images (N, side, side) float32 raw heights in metres, labels (N,) int (1 = good probe)."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[Path]
    levelled: np.ndarray  # (N,) bool: file name ends in `Ransac.npy` (already plane-levelled)
    rejected: list[tuple[Path, tuple[int, ...]]] = field(default_factory=list)  # (file, shape) not loaded

    def __len__(self) -> int:
        return int(self.labels.size)


def halve_to(image: np.ndarray, side_px: int) -> np.ndarray:
    """Downsample a square image whose side is side_px * 2^k by repeated 2x2 means; other sizes refused.

    (The original zoomed 128 -> 64 with a cubic spline; a 2x2 mean is the cheap exact-halving equivalent.)
    """
    image = np.asarray(image)
    side = image.shape[0]
    if image.ndim != 2 or image.shape[1] != side or side < side_px or side % side_px:
        raise DataError(f"cannot bring an image of shape {image.shape} to {side_px}x{side_px}")
    factor = side // side_px
    if factor & (factor - 1):
        raise DataError(f"image side {side} is not {side_px} times a power of two")
    while image.shape[0] > side_px:
        n = image.shape[0] // 2
        image = image.reshape(n, 2, n, 2).mean(axis=(1, 3))
    return image


def _supported(shape: tuple[int, ...], side_px: int) -> bool:
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < side_px or shape[0] % side_px:
        return False
    factor = shape[0] // side_px
    return factor & (factor - 1) == 0


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"{path} is not a .npy array file ({e})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} is an .npz archive, not a .npy array file")
    return array


def load_deepspm_folders(
    roots: Path | str | Iterable[Path | str],
    *,
    pattern: str = "*.npy",
    side_px: int = 64,
    strict: bool = True,
) -> FolderDataset:
    """Read `<root>/good/<pattern>` and `<root>/bad/<pattern>` for each root (exactly one level deep).

    The label comes from the file's immediate parent folder name (`good` or `bad`), never from a substring
    of the path. Images of side `side_px * 2^k` are halved by 2x2 means; any other shape is an error listing
    the offending files (`strict`), or the files are skipped and listed in `rejected`.
    """
    root_list = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    if not root_list:
        raise DataError("no data roots given")
    files: list[tuple[Path, int]] = []
    for root in root_list:
        found = [(root / name) for name in LABEL_FOLDERS if (root / name).is_dir()]
        if not found:
            raise DataError(f"{root} has neither a good/ nor a bad/ folder")
        for folder in found:
            files.extend((path, LABEL_FOLDERS[path.parent.name]) for path in sorted(folder.glob(pattern)) if path.is_file())
    images, labels, paths, rejected = [], [], [], []
    for path, label in files:
        array = _load_npy(path)
        if not _supported(array.shape, side_px):
            rejected.append((path, tuple(array.shape)))
            continue
        images.append(halve_to(array.astype(np.float64), side_px).astype(np.float32))
        labels.append(label)
        paths.append(path)
    if rejected and strict:
        listing = "\n".join(f"  {p}: shape {s}" for p, s in rejected[:20])
        more = f"\n  ... and {len(rejected) - 20} more" if len(rejected) > 20 else ""
        raise DataError(
            f"{len(rejected)} file(s) are not square with a side of {side_px} x 2^k px:\n{listing}{more}"
        )
    if not images:
        raise DataError(f"no {pattern} files under good/ or bad/ of {', '.join(map(str, root_list))}")
    return FolderDataset(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        levelled=np.array([p.name.endswith(LEVELLED_SUFFIX) for p in paths], dtype=bool),
        rejected=rejected,
    )


HSI100_CATEGORIES = ("Asymmetries", "Individual Atoms", "Dimers", "Rows", "Tip Change", "Bad/Blurry")
_GOOD_CLASSES = [0, 1, 2]  # asymmetries, individual atoms, dimers: a sharp tip resolves them
_BAD_CLASSES = [4, 5]  # tip change, bad/blurry

GORDON2020_CATEGORIES = ("rows", "atoms", "dimers/asymmetries", "bad/blurry")
"""The four tip-state categories of Gordon et al. 2020 ("Select Tip State")."""

HSI100_TO_GORDON2020 = {
    "Asymmetries": "dimers/asymmetries",
    "Individual Atoms": "atoms",
    "Dimers": "dimers/asymmetries",
    "Rows": "rows",
    "Tip Change": "bad/blurry",
    "Bad/Blurry": "bad/blurry",
}
"""Each of the six crowd classes in the four categories (a category is on when any of its classes is)."""

BINARY_FROM_MULTICLASS_RULE = "p(good) = max(p Asymmetries, p Individual Atoms, p Dimers) x (1 - max(p Tip Change, p Bad/Blurry))"
"""How a six-output model gives p(good): the binary labels' own rule (`load_hsi100_npz`, mode "binary": a good
class voted and no bad one; Rows alone is neither), read as probabilities."""


def four_categories(six: np.ndarray) -> np.ndarray:
    """(N, 6) multi-hot labels or probabilities of the crowd classes -> (N, 4) in `GORDON2020_CATEGORIES`
    order: per category the max over its classes (for labels: any; for independent sigmoids: the largest)."""
    six = np.asarray(six)
    if six.ndim != 2 or six.shape[1] != len(HSI100_CATEGORIES):
        raise DataError(f"expected (N, {len(HSI100_CATEGORIES)}) class columns, got shape {six.shape}")
    columns = [[HSI100_CATEGORIES.index(c) for c, cat in HSI100_TO_GORDON2020.items() if cat == category]
               for category in GORDON2020_CATEGORIES]
    return np.stack([six[:, cols].max(axis=1) for cols in columns], axis=1)


def binary_from_multiclass(probabilities: np.ndarray) -> np.ndarray:
    """(N, 6) class probabilities -> (N,) p(good) by `BINARY_FROM_MULTICLASS_RULE`."""
    p = np.asarray(probabilities)
    if p.ndim != 2 or p.shape[1] != len(HSI100_CATEGORIES):
        raise DataError(f"expected (N, {len(HSI100_CATEGORIES)}) class probabilities, got shape {p.shape}")
    return p[:, _GOOD_CLASSES].max(axis=1) * (1.0 - p[:, _BAD_CLASSES].max(axis=1))


@dataclass
class NpzDataset:
    """Images (N, 64, 64) float32 in [-1, 1]; labels (N,) int (binary) or (N, 6) int multi-hot."""

    images: np.ndarray
    labels: np.ndarray
    names: np.ndarray
    scores: np.ndarray  # (N, 6) mean crowd vote per class
    categories: tuple[str, ...]
    indices: np.ndarray  # rows of the npz that were kept

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def hsi100_to_input_range(height_index: np.ndarray) -> np.ndarray:
    """uint8 height index 0..254 -> float32 in [-1, 1] (index / 254 scaled), the nets' range for a flat
    surface (-1) up to a ~2 Å feature (+1). The images are min-max stretched by their authors, so only
    relative topography survives; this is the best available stand-in for v = h / 1 Å - 1."""
    return (np.asarray(height_index, dtype=np.float32) / 254.0) * 2.0 - 1.0


def load_hsi100_npz(path: Path | str, *, mode: str = "binary", min_responses: int = 1) -> NpzDataset:
    """Read the labelled H:Si(100) set; images already mapped to the nets' input range (see above).

    mode="binary": good = max(Asymmetries, Individual Atoms, Dimers) >= 0.99 and max(Tip Change,
    Bad/Blurry) == 0; bad = max(Tip Change, Bad/Blurry) >= 0.99 and the three good classes are 0 (the
    README's mapping); Rows-only and mixed votes are left out. Labels (N,) with 1 = good.
    mode="multiclass": every image, labels (N, 6) multi-hot, a class is on when its mean vote >= 0.5
    (an image can be in several classes).
    `min_responses` keeps images with at least that many votes (>= 2 is the cleaner subset).
    """
    check_hsi100_npz(path)
    with np.load(Path(path), allow_pickle=False) as npz:
        images = npz["images"]
        scores = npz["scores"].astype(np.float32)
        names = npz["names"]
        responses = npz["n_responses"]
        categories = tuple(str(c) for c in npz["categories"])
    keep = responses >= min_responses
    if mode == "binary":
        good_vote = scores[:, _GOOD_CLASSES].max(axis=1)
        bad_vote = scores[:, _BAD_CLASSES].max(axis=1)
        good = (good_vote >= 0.99) & (bad_vote == 0)
        bad = (bad_vote >= 0.99) & (good_vote == 0)
        keep &= good | bad
        labels = good.astype(np.int64)
    elif mode == "multiclass":
        labels = (scores >= 0.5).astype(np.int64)
    else:
        raise DataError(f"unknown mode {mode!r}; use 'binary' or 'multiclass'")
    indices = np.flatnonzero(keep)
    return NpzDataset(
        images=hsi100_to_input_range(images[indices]),
        labels=labels[indices],
        names=names[indices],
        scores=scores[indices],
        categories=categories,
        indices=indices,
    )


HSI100_ARRAYS = ("images", "scores", "names", "n_responses", "categories")


def check_hsi100_npz(path: Path | str) -> None:
    """`DataError` unless `path` is a readable .npz with the H:Si(100) set's arrays and categories (cheap: the
    images are not read)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is a single .npy array, not an .npz archive")
            missing = [name for name in HSI100_ARRAYS if name not in npz.files]
            if missing:
                raise DataError(f"{path} is not the H:Si(100) tip-state set: it lacks the arrays {', '.join(missing)}")
            categories = tuple(str(c) for c in npz["categories"])
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path} is not a readable .npz archive ({e})") from None
    if categories != HSI100_CATEGORIES:
        raise DataError(f"{path}: unexpected categories {categories}; expected {HSI100_CATEGORIES}")


def check_labelled_path(path: Path | str) -> str:
    """Which supported layout `path` is, checked cheaply before any image is read: "npz" (the H:Si(100) set)
    or "folders" (good/ and/or bad/ holding .npy files). `DataError` naming the path and the problem otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path} is neither an .npz file nor a folder with good/ and bad/")
        check_hsi100_npz(path)
        return "npz"
    if not path.is_dir():
        raise DataError(f"{path} is neither a file nor a folder")
    folders = [path / name for name in LABEL_FOLDERS if (path / name).is_dir()]
    if not folders:
        raise DataError(f"{path} has neither a good/ nor a bad/ folder")
    try:
        found = any(p.is_file() for folder in folders for p in folder.glob("*.npy"))
    except OSError as e:
        raise DataError(f"cannot list {path}: {e.strerror or e}") from None
    if not found:
        raise DataError(f"{path}: no .npy files in {' or '.join(f.name + '/' for f in folders)}")
    return "folders"


def class_names(dataset: NpzDataset | FolderDataset) -> Sequence[str] | None:
    """Names of the label columns for a multi-label set, None for a binary one."""
    if isinstance(dataset, NpzDataset) and dataset.labels.ndim == 2:
        return dataset.categories
    return None


HSI100_HOLDOUT_FRACTION = 0.2
HSI100_HOLDOUT_SEED = 0


def hsi100_holdout_rows(
    path: Path | str, fraction: float = HSI100_HOLDOUT_FRACTION, seed: int = HSI100_HOLDOUT_SEED,
) -> np.ndarray:
    """The fixed evaluation hold-out of the H:Si(100) set: sorted npz rows, carved once (seeded) from ALL rows,
    so the binary and the six-class views hold out the same images. Stratified by the binary mapping's three
    states (good, bad, neither: Rows-only and mixed votes), `fraction` of each (rounded)."""
    check_hsi100_npz(path)
    with np.load(Path(path), allow_pickle=False) as npz:
        scores = npz["scores"].astype(np.float32)
    good_vote, bad_vote = scores[:, _GOOD_CLASSES].max(axis=1), scores[:, _BAD_CLASSES].max(axis=1)
    state = np.where((good_vote >= 0.99) & (bad_vote == 0), 1, np.where((bad_vote >= 0.99) & (good_vote == 0), 0, 2))
    rng = np.random.default_rng([seed, 0x401D])
    held = [rng.permutation(np.flatnonzero(state == s))[: int(round(fraction * np.sum(state == s)))] for s in (0, 1, 2)]
    return np.sort(np.concatenate(held))
