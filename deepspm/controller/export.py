"""`deepspm export`: a run's recorded frames (or a data set's frames) as Nanonis .sxm, Gwyddion .gwy or PNG.

A run's frames are found through its journal (read-only): every `scan` reply whose result is a `Frame`
names a content-addressed `frames/<hash>.npy`; the `classify` decision naming the same frame gives its
judgement and p(good). Bias and setpoint are written when the journal records them on the scan (keys
`bias_V` / `setpoint_A` of the reply or of the start record's `imaging` section), and left out otherwise.

A data set (`good/`, `bad/`, `unlabelled/` of raw heights in metres; what `dataset synth` and
`dataset import` write) is exported with the physical size from its `manifest.csv` where one lists the
file, else `frame_size_m`.

Gwyddion files are written with `gwyfile` (the maintained pure-Python implementation of the GWY format),
one data field per file with the metadata in `/0/meta`; PNGs show the frame levelled by the run loop's own
RANSAC plane (v = h / 1 A - 1, from -1.5 to 1.5).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from deepspm.controller.journal import JournalError, load_frame, read_journal
from deepspm.io.atomic import write_atomic
from deepspm.io.sxm import FrameRecordInfo, frame_file_name, write_frame_sxm

EXPORT_FORMATS = ("sxm", "gwy", "png")
FRAME_CHOICES = ("all", "judged")
DATASET_FOLDERS = ("good", "bad", "unlabelled")
MANIFEST = "manifest.csv"


class ExportError(ValueError):
    """The export cannot be done as asked (not a run or data set, unknown format, an existing output file)."""


@dataclass(frozen=True)
class ExportFrame:
    """One frame to export: heights in metres (row 0 at the top) and what is known about it."""

    name: str  # output file stem
    data_m: np.ndarray
    info: FrameRecordInfo
    ransac_seed: int = 0


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def run_frames(run_dir: Path, *, frames: str = "all") -> Iterator[ExportFrame]:
    """The recorded frames of a run, in journal order (`frames="judged"`: only the classified ones)."""
    records = read_journal(run_dir)
    if not records or records[0].get("kind") != "start":
        raise ExportError(f"{run_dir}: the journal does not begin with a start record")
    start = records[0]
    run_id = str(start.get("run_id", Path(run_dir).name))
    imaging = start.get("imaging") or {}
    scan_cfg = (start.get("config") or {}).get("scan") or {}
    decisions = {r["frame"]: r for r in records
                 if r.get("kind") == "decision" and r.get("decision") == "classify" and isinstance(r.get("frame"), str)}
    for r in records:
        result = r.get("result")
        if r.get("kind") != "reply" or r.get("op") not in ("grab_frame", "scan") or not isinstance(result, dict):
            continue
        if result.get("type") != "Frame" or not isinstance(result.get("frame"), str):
            continue
        ref = result["frame"]
        decision = decisions.get(ref)
        if frames == "judged" and decision is None:
            continue
        data = load_frame(run_dir, ref)
        size = float(result.get("size_m", scan_cfg.get("frame_size_m", 0.0)) or 0.0)
        fwd, bwd = scan_cfg.get("fwd_speed_mps"), scan_cfg.get("bwd_speed_mps")
        line_time = (size / fwd, size / bwd) if size > 0 and fwd and bwd else None
        judgement = None
        if decision is not None:
            judgement = "good" if decision.get("good") else "bad"
        info = FrameRecordInfo(
            run_id=run_id, seq=int(r["seq"]), frame_ref=ref,
            centre_m=(float(result.get("centre_x_m", 0.0)), float(result.get("centre_y_m", 0.0))),
            size_m=size, scan_up=bool(result.get("scan_up", True)),
            recorded_utc=datetime.fromtimestamp(float(r.get("t_wall", 0.0)), tz=UTC),
            bias_v=_float_or_none(result.get("bias_V", imaging.get("bias_V", scan_cfg.get("bias_V")))),
            setpoint_a=_float_or_none(result.get("setpoint_A", imaging.get("setpoint_A", scan_cfg.get("setpoint_A")))),
            judgement=judgement, p_good=None if decision is None else _float_or_none(decision.get("p_good")),
            line_time_s=line_time, channel="Z",
        )
        seed = int(decision.get("ransac_seed", 0)) if decision is not None else 0
        yield ExportFrame(frame_file_name(info)[:-4], np.asarray(data, np.float32), info, seed)


def _manifest_rows(root: Path) -> dict[str, dict[str, str]]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f) if row.get("file")}


def dataset_frames(root: Path, *, frame_size_m: float = 10e-9) -> Iterator[ExportFrame]:
    """The frames of a data set folder (good/, bad/, unlabelled/ of .npy raw heights in metres)."""
    rows = _manifest_rows(root)
    stamp = datetime(1970, 1, 1, tzinfo=UTC)
    for folder in DATASET_FOLDERS:
        for i, path in enumerate(sorted((root / folder).glob("*.npy"))):
            relative = f"{folder}/{path.name}"
            data = np.load(path, allow_pickle=False)
            if data.ndim != 2:
                raise ExportError(f"{path}: not a 2-D frame (shape {data.shape})")
            row = rows.get(relative, {})
            size = _float_or_none(row.get("width_m")) or frame_size_m
            recorded = row.get("recorded_utc")
            try:
                when = datetime.fromisoformat(recorded) if recorded else stamp
            except ValueError:
                when = stamp
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            info = FrameRecordInfo(
                run_id=root.name, seq=i, frame_ref=path.stem, centre_m=(0.0, 0.0), size_m=size,
                scan_up=True, recorded_utc=when, bias_v=_float_or_none(row.get("bias_V")),
                setpoint_a=_float_or_none(row.get("setpoint_A")),
                judgement=None if folder == "unlabelled" else folder, p_good=None,
            )
            yield ExportFrame(f"{folder}_{path.stem}", np.asarray(data, np.float32), info, i)


def gwy_bytes(frame: ExportFrame) -> bytes:
    """A Gwyddion container holding the frame as data field 0 (metres), with its metadata."""
    from gwyfile.objects import GwyContainer, GwyDataField, GwySIUnit

    info = frame.info
    lines, pixels = frame.data_m.shape
    width, height = info.size_m, info.size_m * lines / pixels
    field = GwyDataField(
        np.asarray(frame.data_m, np.float64), xreal=width, yreal=height,
        xoff=info.centre_m[0] - width / 2, yoff=info.centre_m[1] - height / 2,
        si_unit_xy=GwySIUnit(unitstr="m"), si_unit_z=GwySIUnit(unitstr="m"),
    )
    meta = GwyContainer()
    for key, value in gwy_metadata(info).items():
        meta[key] = value
    container = GwyContainer()
    container["/0/data/title"] = f"{info.channel} ({frame.name})"
    container["/0/data"] = field
    container["/0/meta"] = meta
    buffer = io.BytesIO()
    container.tofile(buffer)
    return buffer.getvalue()


def gwy_metadata(info: FrameRecordInfo) -> dict[str, str]:
    """The metadata shown by Gwyddion's Metadata browser (text values, units in the names)."""
    meta = {"Comment": info.comment(), "Date (UTC)": info.recorded_utc.isoformat(),
            "Scan direction": "up" if info.scan_up else "down"}
    if info.bias_v is not None:
        meta["Bias (V)"] = repr(info.bias_v)
    if info.setpoint_a is not None:
        meta["Setpoint (A)"] = repr(info.setpoint_a)
    meta.update({k.replace("DeepSPM>", "DeepSPM "): v for k, v in info.extra().items()})
    return meta


def png_bytes(frame: ExportFrame) -> bytes:
    """The frame levelled by the run loop's RANSAC plane, v = h / 1 A - 1 shown from -1.5 to 1.5 (grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepspm.controller.preprocess import preprocess

    data = frame.data_m
    if not np.isfinite(data).any():
        levelled = np.zeros(data.shape, np.float32)
    else:
        filled = np.where(np.isfinite(data), data, np.nanmedian(data))
        levelled = preprocess(filled.astype(np.float64), frame.ransac_seed).normalised
    buffer = io.BytesIO()
    plt.imsave(buffer, levelled, cmap="afmhot", vmin=-1.5, vmax=1.5, format="png")
    return buffer.getvalue()


def export_command(
    source: Path | str, out: Path | str, *, fmt: str = "sxm", frames: str = "all", frame_size_m: float = 10e-9,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export every frame of a run directory (has `journal.jsonl`) or a data set folder to `out`.

    Nothing is written unless every frame can be read; existing output files are refused unless `overwrite`.
    Returns {"source", "out", "format", "n", "files"}.
    """
    source, out = Path(source), Path(out)
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if frames not in FRAME_CHOICES:
        raise ExportError(f"--frames must be one of {', '.join(FRAME_CHOICES)}, got {frames!r}")
    if not source.is_dir():
        raise ExportError(f"{source}: not a run directory or data set folder")
    if (source / "journal.jsonl").is_file():
        try:
            items = list(run_frames(source, frames=frames))
        except JournalError as exc:
            raise ExportError(str(exc)) from None
    elif any((source / f).is_dir() for f in DATASET_FOLDERS):
        items = list(dataset_frames(source, frame_size_m=frame_size_m))
    else:
        raise ExportError(f"{source}: neither a run directory (journal.jsonl) nor a data set (good/, bad/, unlabelled/)")
    if not items:
        raise ExportError(f"{source}: no frames to export")
    targets = [out / f"{item.name}.{fmt}" for item in items]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]} exists ({len(existing)} output file(s) would be replaced; pass --overwrite)")
    files = []
    for item, target in zip(items, targets):
        if fmt == "sxm":
            write_frame_sxm(target, item.data_m, item.info)
        elif fmt == "gwy":
            write_atomic(target, gwy_bytes(item))
        else:
            write_atomic(target, png_bytes(item))
        files.append(str(target))
    print(f"exported {len(files)} frame(s) of {source} as .{fmt} to {out}")
    return {"source": str(source), "out": str(out), "format": fmt, "n": len(files), "files": files}

