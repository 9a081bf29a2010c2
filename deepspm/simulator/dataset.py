"""Synthetic labelled frames in the original DeepSPM training-data layout, and a gallery to judge them.

Layout (reference deepspm.md section 7): `<out>/good/*.npy` and `<out>/bad/*.npy`, one 64 x 64 float32
array per file, raw (un-levelled) heights in metres, row 0 = top (+y) edge. File names carry no label
(`sim_000123.npy`); the label is the folder. `labels.csv` repeats it with the probe kind and where the frame
was taken. Frames come from a `SimulatedMicroscope` scanning like the controller: a move, a settle wait so
xy creep has decayed, one scan; bad-sample frames (raw peak-to-peak >= 6 Angstrom, the original's rule) are
skipped, as the original neither classified nor stored them. A quarter of the frames are good (as in the
paper's data set); the bad ones are spread evenly over the defect kinds.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deepspm.io.atomic import save_figure
from deepspm.simulator.clock import SimClock
from deepspm.simulator.environment import approach_and_settle
from deepspm.simulator.microscope import Z_INDEX, MotorDirection, SimConfig, SimulatedMicroscope
from deepspm.simulator.probe import ANGSTROM, BAD_KINDS, ProbeKind
from deepspm.simulator.sample import area_rng

BAD_SAMPLE_PEAK_TO_PEAK_M = 6e-10
DATASET_CONFIG = SimConfig(degradation_per_frame=0.0, spontaneous_changes=False, z_jump_rate_per_s=0.0)
_P_DATA = 401


def synth_dataset(
    n: int, out_dir: str | Path, seed: int, progress: bool = True, good_fraction: float = 0.25,
    frames_per_area: int = 200, pixels: int = 64, frame_m: float = 10e-9,
) -> Path:
    """Write `n` labelled frames under `out_dir` (good/, bad/, labels.csv). Returns the directory."""
    out = Path(out_dir)
    for sub in ("good", "bad"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    clock = SimClock(0.0)
    m = SimulatedMicroscope(seed, clock, DATASET_CONFIG)
    m.set_scan_buffer([Z_INDEX], pixels, pixels)
    rng = area_rng(seed, _P_DATA)
    half = m.config.piezo_xy_range_m / 2 * 0.95 - frame_m
    rows = []
    with tqdm(total=n, desc="synthesising frames", unit="frame", disable=not progress) as bar:
        written = 0
        in_area = 0
        while written < n:
            in_area = ready_to_scan(m, clock, rng, in_area, frames_per_area)
            kind = ProbeKind.GOOD if rng.random() < good_fraction else BAD_KINDS[int(rng.integers(0, len(BAD_KINDS)))]
            m.set_probe(kind, rng)
            x, y, data = scan_at_random(m, clock, rng, half, frame_m)
            in_area += 1
            if data is None:
                continue
            label = "good" if kind is ProbeKind.GOOD else "bad"
            name = f"sim_{written:06d}.npy"
            np.save(out / label / name, data)
            rows.append((f"{label}/{name}", label, kind.value, *m.approach_area(), f"{x:.4e}", f"{y:.4e}"))
            written += 1
            bar.update(1)
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "kind", "area_i", "area_j", "x_m", "y_m"])
        w.writerows(rows)
    return out


def ready_to_scan(m: SimulatedMicroscope, clock: SimClock, rng: np.random.Generator, in_area: int,
                  frames_per_area: int) -> int:
    """Before a synthetic frame: a new approach area every `frames_per_area` frames (a coarse move) and the tip
    back in tunnelling range if it lost contact or touched; returns the frames scanned in the area so far."""
    if in_area >= frames_per_area:
        clock.advance(m.withdraw())
        direction = MotorDirection.X_PLUS if rng.random() < 0.5 else MotorDirection.Y_PLUS
        clock.advance(m.motor_move(direction, int(math.ceil(850e-9 / m.config.motor_step_xy_m))))
        approach_and_settle(m, clock)
        in_area = 0
    gt = m.ground_truth()
    if gt.lost_contact or gt.in_contact:
        clock.advance(m.withdraw())
        approach_and_settle(m, clock)
    return in_area


def scan_at_random(m: SimulatedMicroscope, clock: SimClock, rng: np.random.Generator, half: float,
                   frame_m: float) -> tuple[float, float, np.ndarray | None]:
    """One frame at a random position within +-`half` of the area's centre, in acquisition order as float32;
    None for the data when the frame is unusable (NaN, or the tip crashed through it: a bad sample)."""
    x, y = rng.uniform(-half, half, 2)
    clock.advance(m.set_folme_xy(float(x), float(y)))
    clock.advance(30.0)
    m.set_scan_frame(float(x), float(y), frame_m, frame_m, 0.0)
    m.scan_action(0, True)
    clock.advance(m.frame_time_s())
    _, data, up = m.frame_data(Z_INDEX, True)
    if up and m.config.acquisition_order:
        data = data[::-1]
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)) or float(np.ptp(data)) >= BAD_SAMPLE_PEAK_TO_PEAK_M:
        return float(x), float(y), None
    return float(x), float(y), data


def level(frame_m: np.ndarray) -> np.ndarray:
    """Subtract a plane fitted to the substrate (least squares, then refit on the lower 60 % of residuals)."""
    r, c = np.indices(frame_m.shape)
    a = np.column_stack([np.ones(frame_m.size), r.ravel(), c.ravel()])
    z = frame_m.astype(np.float64).ravel()
    mask = np.ones(z.size, dtype=bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(a[mask], z[mask], rcond=None)
        resid = z - a @ coef
        mask = resid <= np.percentile(resid, 60)
    return (z - a @ coef).reshape(frame_m.shape)


def gallery(dataset_dir: str | Path, out_png: str | Path, n_per_class: int = 12, seed: int = 0, columns: int = 6) -> Path:
    """A labelled montage (good frames first, then bad ones with their kind) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(dataset_dir)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    picked: list[dict] = []
    for label in ("good", "bad"):
        of_label = [r for r in rows if r["label"] == label]
        if label == "bad":  # round-robin over kinds so every defect shows up
            by_kind: dict[str, list[dict]] = {}
            for r in of_label:
                by_kind.setdefault(r["kind"], []).append(r)
            pools = [list(rng.permutation(len(v))) for v in by_kind.values()]
            kinds = list(by_kind)
            chosen: list[dict] = []
            i = 0
            while len(chosen) < min(n_per_class, len(of_label)):
                k = i % len(kinds)
                if pools[k]:
                    chosen.append(by_kind[kinds[k]][pools[k].pop()])
                i += 1
        else:
            chosen = [of_label[j] for j in rng.permutation(len(of_label))[:n_per_class]]
        picked.extend(chosen)
    n_rows = max(1, math.ceil(len(picked) / columns))
    fig, axes = plt.subplots(n_rows, columns, figsize=(2.0 * columns, 2.15 * n_rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), picked):
        img = level(np.load(root / r["file"])) / ANGSTROM
        ax.imshow(img, cmap="afmhot", vmin=-0.5, vmax=2.5, interpolation="nearest")
        colour = "tab:green" if r["label"] == "good" else "tab:red"
        ax.set_title(f"{r['label']}: {r['kind']}", fontsize=9, color=colour)
    fig.suptitle("Synthetic 10 nm x 10 nm frames (plane-levelled, -0.5 to 2.5 Angstrom)", fontsize=10)
    return save_figure(fig, out_png, dpi=90)
