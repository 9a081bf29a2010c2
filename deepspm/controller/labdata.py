"""`deepspm dataset import`: a lab's own Nanonis `.sxm` scans as a data set that `train classifier` reads.

Layout written (the original DeepSPM one, which `deepspm.nets.data.load_deepspm_folders` reads):
`OUT/good/*.npy`, `OUT/bad/*.npy` and `OUT/unlabelled/*.npy`: one channel, one direction, raw values in the
file's unit (heights in metres for Z) resampled to 64 x 64, row 0 at the top; levelling is left to the
loader, which applies the run loop's own RANSAC plane exactly as to a live frame. `OUT/manifest.csv` has a
row per frame: its file, label, the source `.sxm`, channel, direction, the physical size of the imported
square (metres), the source pixels, bias, setpoint and recording time.

Labels: a CSV (`file,class`: the .sxm's name or its path relative to an imported folder; class `good`,
`bad` or empty/`unlabelled`), else the name of the folder holding the file (`good/` or `bad/`), else
unlabelled. Conflicting labels are an error.

Input checks, all before anything is written (the set appears whole, through a rename, or not at all):
an `.sxm` named on the command line that cannot be read is an error; inside a folder, files that are not
`.sxm` are skipped with a reason, and an unreadable `.sxm` is an error (or, with `skip_bad`, a skip with its
reason). Incomplete scans (NaN pixels) and scans without the channel are skipped with a reason.

Resampling: the central square of the scan (non-square scans are cropped and the crop recorded), then
2 x 2 means when the side is 64 x 2^k (what the loader itself does), else an area-weighted linear zoom.
"""

from __future__ import annotations

import csv
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepspm.io.atomic import save_figure
from deepspm.io.sxm import SxmError, SxmScan, read_sxm
from deepspm.nets.data import DataError, halve_to

SIDE_PX = 64
LABELS = ("good", "bad")
UNLABELLED = "unlabelled"
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "label", "source", "channel", "direction", "width_m", "height_m", "source_pixels_x",
                    "source_pixels_y", "crop", "bias_V", "setpoint_A", "setpoint_unit", "recorded", "scan_dir")


class LabImportError(DataError):
    """The import cannot be done as asked; nothing was written."""


@dataclass(frozen=True)
class Candidate:
    path: Path
    relative: str  # name as given in a labels CSV: relative to the folder it was found in, or the file name
    folder_label: str | None


@dataclass(frozen=True)
class Imported:
    name: str
    label: str
    array: np.ndarray
    row: dict[str, Any]


def resample_square(image: np.ndarray, side_px: int = SIDE_PX) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The central square of `image` brought to side_px x side_px; returns it and the crop (row0, col0, side)."""
    lines, pixels = image.shape
    side = min(lines, pixels)
    if side < side_px // 4:
        raise DataError(f"a {lines}x{pixels} scan is too small to resample to {side_px}x{side_px}")
    r0, c0 = (lines - side) // 2, (pixels - side) // 2
    square = np.asarray(image[r0:r0 + side, c0:c0 + side], np.float64)
    factor = side / side_px
    if side >= side_px and side % side_px == 0 and (int(factor) & (int(factor) - 1)) == 0:
        out = halve_to(square, side_px)
    else:
        from scipy.ndimage import zoom

        if side > side_px:  # average over each output pixel's footprint first (no aliasing), then interpolate
            from scipy.ndimage import uniform_filter

            square = uniform_filter(square, size=max(1, int(math.floor(factor))), mode="nearest")
        out = zoom(square, side_px / side, order=1, mode="nearest", grid_mode=True)
    return np.asarray(out, np.float32), (r0, c0, side)


def _collect(inputs: Sequence[Path | str]) -> tuple[list[Candidate], list[str]]:
    candidates: list[Candidate] = []
    skipped: list[str] = []
    for given in map(Path, inputs):
        if given.is_file():
            if given.suffix.lower() != ".sxm":
                raise LabImportError(f"{given}: not an .sxm file")
            candidates.append(Candidate(given, given.name, given.parent.name if given.parent.name in LABELS else None))
        elif given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file())
            for path in found:
                if path.suffix.lower() != ".sxm":
                    skipped.append(f"{path}: skipped, not an .sxm file")
                    continue
                label = path.parent.name if path.parent.name in LABELS else None
                candidates.append(Candidate(path, path.relative_to(given).as_posix(), label))
        else:
            raise LabImportError(f"{given}: no such file or folder")
    if not candidates:
        raise LabImportError(f"no .sxm files in {', '.join(map(str, inputs))}")
    return candidates, skipped


def read_labels(path: Path | str) -> dict[str, str]:
    """`file,class` rows (a header row naming `file` and `class` or `label`) -> {file: good|bad|unlabelled}."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in reader.fieldnames or []]
            if "file" not in fields or not ({"class", "label"} & set(fields)):
                raise LabImportError(f"{path}: the first row must name the columns 'file' and 'class'")
            key_of = {c.strip().lower(): c for c in reader.fieldnames or []}
            cls = key_of.get("class", key_of.get("label"))
            out: dict[str, str] = {}
            for number, row in enumerate(reader, start=2):
                name = (row.get(key_of["file"]) or "").strip()
                value = (row.get(cls) or "").strip().lower() or UNLABELLED
                if not name:
                    raise LabImportError(f"{path}: line {number} has no file name")
                if value not in (*LABELS, UNLABELLED):
                    raise LabImportError(f"{path}: line {number}: class {value!r} is not good, bad or unlabelled")
                if name in out and out[name] != value:
                    raise LabImportError(f"{path}: {name} is labelled twice ({out[name]}, {value})")
                out[name] = value
            return out
    except FileNotFoundError:
        raise LabImportError(f"{path}: no such labels file") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabImportError(f"{path}: not a CSV file ({exc})") from None


def _label_of(c: Candidate, labels: dict[str, str]) -> str:
    from_csv = labels.get(c.relative, labels.get(c.path.name))
    if from_csv is not None and c.folder_label is not None and from_csv != c.folder_label and from_csv != UNLABELLED:
        raise LabImportError(f"{c.path}: labels CSV says {from_csv} but its folder says {c.folder_label}")
    return from_csv or c.folder_label or UNLABELLED


def _import_one(scan: SxmScan, c: Candidate, label: str, channel: str, direction: str) -> tuple[Imported | None, str | None]:
    try:
        image = scan.image(channel, direction)
    except SxmError as exc:
        return None, f"{c.path}: skipped, {exc.problem}"
    missing = int(np.count_nonzero(~np.isfinite(image)))
    if missing:
        return None, f"{c.path}: skipped, incomplete scan ({missing} of {image.size} pixels not recorded)"
    array, (r0, c0, side) = resample_square(image)
    lines, pixels = image.shape
    width = scan.range_m[0] * side / pixels
    height = scan.range_m[1] * side / lines
    setpoint = scan.setpoint
    row = {
        "source": str(c.path), "channel": channel, "direction": direction, "width_m": repr(width),
        "height_m": repr(height), "source_pixels_x": pixels, "source_pixels_y": lines,
        "crop": "" if side == lines == pixels else f"rows {r0}-{r0 + side - 1}, columns {c0}-{c0 + side - 1}",
        "bias_V": "" if scan.bias_v is None else repr(scan.bias_v),
        "setpoint_A": "" if setpoint is None else repr(setpoint[0]), "setpoint_unit": "" if setpoint is None else setpoint[1],
        "recorded": "" if scan.recorded is None else scan.recorded.isoformat(), "scan_dir": "up" if scan.scan_up else "down",
    }
    return Imported(c.path.stem, label, array, row), None


def import_sxm_command(
    inputs: Sequence[Path | str], out: Path | str, *, labels: Path | str | None = None, channel: str = "Z",
    direction: str = "forward", skip_bad: bool = False, overwrite: bool = False,
) -> dict[str, Any]:
    """Import `.sxm` files and folders into the data set folder `out` (see the module doc). Prints every skip
    with its reason and a summary; returns {"out", "n", "counts", "skipped"}. Raises `DataError` subclasses."""
    out = Path(out)
    if direction not in ("forward", "backward"):
        raise LabImportError(f"--direction must be forward or backward, got {direction!r}")
    if out.exists() and not overwrite:
        raise LabImportError(f"{out} exists (pass --overwrite to replace it)")
    candidates, skipped = _collect(inputs)
    label_table = read_labels(labels) if labels is not None else {}
    known = {c.relative for c in candidates} | {c.path.name for c in candidates}
    unknown = sorted(set(label_table) - known)
    if unknown:
        raise LabImportError(f"{labels}: {len(unknown)} labelled file(s) not among the inputs, e.g. {unknown[0]}")
    imported: list[Imported] = []
    for c in candidates:
        label = _label_of(c, label_table)
        try:
            scan = read_sxm(c.path)
        except SxmError as exc:
            if not skip_bad:
                raise
            skipped.append(f"{c.path}: skipped, {exc.problem}")
            continue
        item, reason = _import_one(scan, c, label, channel, direction)
        if reason is not None:
            skipped.append(reason)
        elif item is not None:
            imported.append(item)
    for line in skipped:
        print(line)
    if not imported:
        raise LabImportError(f"nothing to import: all {len(candidates)} .sxm file(s) were skipped")
    names: dict[str, int] = {}
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for item in imported:
            count = names.get(f"{item.label}/{item.name}", 0)
            names[f"{item.label}/{item.name}"] = count + 1
            relative = f"{item.label}/{item.name}{'' if count == 0 else f'_{count}'}.npy"
            (staging / item.label).mkdir(exist_ok=True)
            np.save(staging / relative, item.array, allow_pickle=False)
            rows.append({"file": relative, "label": item.label, **item.row})
        with open(staging / MANIFEST, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    counts = {label: sum(r["label"] == label for r in rows) for label in (*LABELS, UNLABELLED)}
    print(f"imported {len(rows)} frame(s) into {out}: {counts['good']} good, {counts['bad']} bad, "
          f"{counts['unlabelled']} unlabelled ({channel} {direction}, {SIDE_PX}x{SIDE_PX}); {len(skipped)} skipped")
    return {"out": str(out), "n": len(rows), "counts": counts, "skipped": skipped}


def manifest_gallery(dataset: Path | str, out_png: Path | str, *, columns: int = 4, max_frames: int = 48) -> Path:
    """A montage of an imported set: each frame as the classifier sees it (the run loop's RANSAC levelling,
    v = h / 1 A - 1 from -1.5 to 1.5), titled with its label, source and physical size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepspm.controller.preprocess import preprocess

    root = Path(dataset)
    with open(root / MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))[:max_frames]
    if not rows:
        raise LabImportError(f"{root / MANIFEST} lists no frames")
    n_rows = max(1, math.ceil(len(rows) / columns))
    fig, axes = plt.subplots(n_rows, columns, figsize=(2.6 * columns, 2.9 * n_rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    colours = {"good": "tab:green", "bad": "tab:red", UNLABELLED: "black"}
    for i, (ax, r) in enumerate(zip(axes.ravel(), rows)):
        raw = np.load(root / r["file"], allow_pickle=False).astype(np.float64)
        levelled = preprocess(raw, i).normalised
        ax.imshow(levelled, cmap="afmhot", vmin=-1.5, vmax=1.5, interpolation="nearest")
        size_nm = float(r["width_m"]) * 1e9
        ax.set_title(f"{r['label']}: {Path(r['source']).stem[:22]}\n{size_nm:.3g} nm, {r['channel']} {r['direction']}",
                     fontsize=8, color=colours.get(r["label"], "black"))
    fig.suptitle("Imported scans as the classifier sees them (RANSAC-levelled, -1.5 to 1.5 = -0.5 to 2.5 A)",
                 fontsize=9)
    out = save_figure(fig, out_png, dpi=90)
    print(f"wrote {out}")
    return out
