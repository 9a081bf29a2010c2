"""Synthetic H:Si(100) tip-state frames in the real set's representation, with domain randomisation.

`synth_hsi_npz` writes an `.npz` in the layout of `hsi100_tipstates_64.npz` (images uint8 (N, 64, 64),
scores (N, 6) over the same categories, n_responses, names, orig_shape, categories), so `deepspm train
classifier --data X.npz` and `deepspm evaluate classifier` read it exactly as the real set, with the same
binary mapping (frames of the rows state are left out of a binary set, as Rows-only frames of the real one).

One frame: an H:Si(100) area with randomised physics (`HsiSampleConfig`: corrugation = height scale, atom
width, defect densities), a tip state (`hsi_probe`), rendered at the real set's scan sizes (300 px frames of
3-5.5 nm, or 512 px frames of 5-25 nm) by the simulator's renderer with drift and creep displacing the lines,
then the instrument (`artefacts`: white, 1/f and line noise, line glitches, feedback ringing, z creep,
streaks of unstable tips), then the real set's processing (line flattening, min-max stretch to 8 bits,
bilinear resize to 64 x 64). Every knob is drawn per frame from `Randomisation` ranges.

A Tip Change frame switches the tip state at one to three lines (sometimes only for a band of a few lines),
with the apparent height jumping there, as an apex that changes length does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepspm.io.atomic import save_figure
from deepspm.simulator import artefacts
from deepspm.simulator.hsi import ANGSTROM, NM, HsiSampleArea, HsiSampleConfig
from deepspm.simulator.hsi_probe import REAL_SET_CLASS, TIP_CHANGE_CLASS, HsiTipState, make_hsi_probe
from deepspm.simulator.probe import ProbeState
from deepspm.simulator.render import FrameGeometry, render_topography
from deepspm.simulator.sample import area_rng

CATEGORIES = ("Asymmetries", "Individual Atoms", "Dimers", "Rows", "Tip Change", "Bad/Blurry")
TIP_CHANGE = "tip_change"
_P_FRAME = 501


@dataclass(frozen=True)
class Randomisation:
    """Domain randomisation: each knob is drawn uniformly from its (low, high) range for every frame."""

    # what is imaged
    frame_small_m: tuple[float, float] = (3.0e-9, 5.5e-9)  # 300 px scans
    frame_large_m: tuple[float, float] = (5e-9, 25e-9)  # 512 px scans
    large_fraction: float = 0.15
    lattice_amp_m: tuple[float, float] = (0.5 * ANGSTROM, 1.4 * ANGSTROM)  # the height scale of the corrugation
    atom_sigma_m: tuple[float, float] = (0.06 * NM, 0.085 * NM)
    dangling_bond_density_per_nm2: tuple[float, float] = (0.0, 0.08)
    missing_dimer_density_per_nm2: tuple[float, float] = (0.0, 0.05)
    adsorbate_density_per_nm2: tuple[float, float] = (0.0, 0.02)
    cluster_density_per_nm2: tuple[float, float] = (0.0, 0.004)
    mean_terrace_width_m: tuple[float, float] = (15e-9, 120e-9)
    # the instrument
    white_noise_m: tuple[float, float] = (0.5e-12, 6e-12)
    pink_noise_m: tuple[float, float] = (0.0, 8e-12)
    pink_exponent: tuple[float, float] = (0.8, 1.6)
    line_offset_m: tuple[float, float] = (0.0, 30e-12)
    glitch_rate_per_line: tuple[float, float] = (0.0, 0.02)
    glitch_m: tuple[float, float] = (10e-12, 60e-12)
    ringing_probability: float = 0.4
    ringing_period_px: tuple[float, float] = (6.0, 40.0)  # at the scan's own pixel count
    ringing_damping: tuple[float, float] = (0.1, 0.6)
    drift_m: tuple[float, float] = (0.0, 0.4e-9)  # per axis, over the frame (signed, uniform magnitude)
    creep_m: tuple[float, float] = (0.0, 1.0e-9)
    creep_tau_lines: tuple[float, float] = (5.0, 60.0)
    z_creep_m: tuple[float, float] = (0.0, 50e-12)
    tip_change_jump_m: tuple[float, float] = (0.2 * ANGSTROM, 2.0 * ANGSTROM)
    line_fit_order1_fraction: float = 0.5


# how often each class is drawn (a tip change frame mixes states)
DEFAULT_MIX: dict[str, float] = {
    HsiTipState.ATOMS.value: 0.12, HsiTipState.DIMERS.value: 0.24, HsiTipState.ASYMMETRIC.value: 0.1,
    HsiTipState.ROWS.value: 0.08, HsiTipState.DOUBLE.value: 0.1, HsiTipState.MULTIPLE.value: 0.08,
    HsiTipState.BLURRY.value: 0.16, TIP_CHANGE: 0.12,
}


@dataclass(frozen=True)
class HsiFrame:
    image: np.ndarray  # uint8 (64, 64), the real set's representation
    label: str  # a tip state value or "tip_change"
    states: tuple[str, ...]  # the tip states shown, in scan order
    pixels: int
    width_m: float
    scores: np.ndarray  # (6,) one-hot votes over CATEGORIES


def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1]))


def _sample_config(rng: np.random.Generator, r: Randomisation) -> HsiSampleConfig:
    return HsiSampleConfig(
        lattice_amp_m=_u(rng, r.lattice_amp_m), atom_sigma_m=_u(rng, r.atom_sigma_m),
        dangling_bond_density_per_nm2=_u(rng, r.dangling_bond_density_per_nm2),
        missing_dimer_density_per_nm2=_u(rng, r.missing_dimer_density_per_nm2),
        adsorbate_density_per_nm2=_u(rng, r.adsorbate_density_per_nm2),
        cluster_density_per_nm2=_u(rng, r.cluster_density_per_nm2),
        mean_terrace_width_m=_u(rng, r.mean_terrace_width_m), bad_patch_density_per_um2=0.0,
    )


def _tip_change_segments(lines: int, rng: np.random.Generator) -> list[tuple[int, HsiTipState]]:
    """(first line, state) of each stretch of a tip-change frame; consecutive states differ."""
    states = list(HsiTipState)
    n_changes = 1 + int(rng.integers(0, 3))
    rows = sorted(int(x) for x in rng.integers(int(0.08 * lines), int(0.92 * lines), n_changes))
    current = states[int(rng.integers(0, len(states)))]
    segments = [(0, current)]
    band = rng.random() < 0.3  # a transient: the tip changes for a few lines and changes back
    for i, row in enumerate(rows):
        if band and i == 0:
            other = states[int(rng.integers(0, len(states)))]
            if other is current:
                other = HsiTipState.BLURRY if current is not HsiTipState.BLURRY else HsiTipState.DIMERS
            segments.append((row, other))
            segments.append((min(lines - 1, row + 1 + int(rng.integers(1, max(2, lines // 16)))), current))
            continue
        nxt = current
        while nxt is current:
            nxt = states[int(rng.integers(0, len(states)))]
        segments.append((row, nxt))
        current = nxt
    return sorted(segments, key=lambda s: s[0])


def render_hsi_frame(seed: int, index: int, label: str, r: Randomisation = Randomisation(), side_px: int = 64) -> HsiFrame:
    """One synthetic frame of class `label` (a tip state value or 'tip_change'), deterministic in (seed, index)."""
    rng = area_rng(seed, _P_FRAME, index)
    cfg = _sample_config(rng, r)
    area = HsiSampleArea(seed, (index, -1 - (index % 7)), cfg)
    large = rng.random() < r.large_fraction
    pixels = 512 if large else 300
    if large:
        width = float(math.exp(rng.uniform(math.log(r.frame_large_m[0]), math.log(r.frame_large_m[1]))))
    else:
        width = _u(rng, r.frame_small_m)
    cx, cy = rng.uniform(-300e-9, 300e-9, 2)
    geom = FrameGeometry(float(cx), float(cy), width, width, 0.0, pixels, pixels, True)
    sign = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731
    du, dv = artefacts.drift_rows(
        pixels, (sign() * _u(rng, r.drift_m), sign() * _u(rng, r.drift_m)),
        (sign() * _u(rng, r.creep_m), sign() * _u(rng, r.creep_m)), _u(rng, r.creep_tau_lines) * pixels / 64)
    if label == TIP_CHANGE:
        segments = _tip_change_segments(pixels, rng)
    else:
        segments = [(0, HsiTipState(label))]
    z = np.empty((pixels, pixels))
    probes: dict[tuple[int, HsiTipState], ProbeState] = {}
    offset = 0.0
    streak_rate = 0.0
    for k, (row0, state) in enumerate(segments):
        row1 = segments[k + 1][0] if k + 1 < len(segments) else pixels
        if row1 <= row0:
            continue
        probe = probes.get((k, state)) or make_hsi_probe(state, rng)
        probes[(k, state)] = probe
        topo = render_topography(area, probe.apices, geom, du, dv, None, probe.buckling)
        if probe.flicker_apices and probe.flicker_rate > 0:
            alt = render_topography(area, probe.flicker_apices, geom, du, dv, None, probe.buckling)
            flips = np.cumsum(rng.random(pixels) < probe.flicker_rate * 64 / pixels) % 2 == 1
            topo[flips] = alt[flips]
        if k:
            offset += sign() * _u(rng, r.tip_change_jump_m)
            col = int(rng.integers(0, pixels))  # the change happens part-way along its line
            if row0 > 0:
                z[row0 - 1, col:] = topo[row0 - 1, col:] + offset
        z[row0:row1] = topo[row0:row1] + offset
        streak_rate = max(streak_rate, probe.streak_rate)
    shape = z.shape
    z += rng.standard_normal(shape) * _u(rng, r.white_noise_m)
    z += artefacts.pink_noise(shape, _u(rng, r.pink_noise_m), _u(rng, r.pink_exponent), rng)
    z += artefacts.line_offsets(shape, _u(rng, r.line_offset_m), _u(rng, r.glitch_rate_per_line) * 64 / pixels,
                                _u(rng, r.glitch_m), rng)
    z += artefacts.thermal_z_creep(shape, sign() * _u(rng, r.z_creep_m), _u(rng, r.creep_tau_lines) * pixels / 64)
    if streak_rate > 0:
        for row in np.flatnonzero(rng.random(pixels) < streak_rate * 64 / pixels):
            c0 = int(rng.integers(0, pixels))
            length = int(rng.geometric(1 / (6 * pixels / 64)))
            z[row, c0:c0 + length] += float(rng.uniform(0.5, 2.5)) * ANGSTROM * (1.0 if rng.random() < 0.7 else -0.6)
    if rng.random() < r.ringing_probability:
        z = artefacts.feedback_ringing(z, _u(rng, r.ringing_period_px) * pixels / 300, _u(rng, r.ringing_damping))
    order = 1 if rng.random() < r.line_fit_order1_fraction else 0
    image = artefacts.real_set_processing(z, order, side_px)
    states = tuple(s.value for _, s in segments)
    scores = np.zeros(len(CATEGORIES), dtype=np.float32)
    scores[CATEGORIES.index(TIP_CHANGE_CLASS if label == TIP_CHANGE else REAL_SET_CLASS[HsiTipState(label)])] = 1.0
    return HsiFrame(image, label, states, pixels, width, scores)


def draw_labels(n: int, seed: int, mix: dict[str, float] | None = None) -> list[str]:
    """`n` class labels drawn from `mix` (default `DEFAULT_MIX`), deterministic in the seed."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    valid = {s.value for s in HsiTipState} | {TIP_CHANGE}
    unknown = set(mix) - valid
    if unknown:
        raise ValueError(f"unknown H:Si classes {sorted(unknown)}; valid: {sorted(valid)}")
    names = sorted(mix)
    p = np.array([mix[k] for k in names], dtype=float)
    if np.any(p < 0) or p.sum() <= 0:
        raise ValueError("class fractions must be >= 0 and not all 0")
    rng = area_rng(seed, _P_FRAME, -1)
    return [names[i] for i in rng.choice(len(names), n, p=p / p.sum())]


def synth_hsi_frames(n: int, seed: int, r: Randomisation = Randomisation(), mix: dict[str, float] | None = None,
                     progress: bool = False) -> list[HsiFrame]:
    from tqdm import tqdm

    labels = draw_labels(n, seed, mix)
    return [render_hsi_frame(seed, i, lab, r) for i, lab in enumerate(tqdm(labels, desc="synthesising H:Si frames",
                                                                          unit="frame", disable=not progress))]


def write_npz(frames: list[HsiFrame], out: str | Path) -> Path:
    """The frames as an .npz in the real set's layout (plus `labels` and `states` for the ground truth)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=np.stack([f.image for f in frames]).astype(np.uint8),
        scores=np.stack([f.scores for f in frames]).astype(np.float32),
        n_responses=np.ones(len(frames), dtype=np.int32),
        names=np.array([f"sim_hsi_{i:06d}_{f.label}" for i, f in enumerate(frames)]),
        orig_shape=np.array([(f.pixels, f.pixels) for f in frames], dtype=np.int64),
        categories=np.array(CATEGORIES),
        labels=np.array([f.label for f in frames]),
        states=np.array(["+".join(f.states) for f in frames]),
        width_m=np.array([f.width_m for f in frames]),
    )
    return out


def synth_hsi_npz(n: int, out: str | Path, seed: int = 0, r: Randomisation = Randomisation(),
                  mix: dict[str, float] | None = None, progress: bool = True) -> Path:
    if n <= 0:
        raise ValueError(f"the number of frames must be positive, got {n}")
    return write_npz(synth_hsi_frames(n, seed, r, mix, progress), out)




def mix_with_good_fraction(good_fraction: float | None) -> dict[str, float]:
    """`DEFAULT_MIX` rescaled so the good tip states (atoms, dimers, asymmetric) make up `good_fraction`."""
    if good_fraction is None:
        return dict(DEFAULT_MIX)
    if not 0.0 <= good_fraction <= 1.0:
        raise ValueError(f"good_fraction must be in [0, 1], got {good_fraction}")
    good = {s.value for s in HsiTipState if s.is_good}
    g = sum(v for k, v in DEFAULT_MIX.items() if k in good)
    b = sum(v for k, v in DEFAULT_MIX.items() if k not in good)
    return {k: v * (good_fraction / g if k in good else (1.0 - good_fraction) / b) for k, v in DEFAULT_MIX.items()}


def synth_hsi_command(out: str | Path, *, n: int, seed: int = 0, good_fraction: float | None = None,
                      progress: bool = True) -> int:
    """`deepspm dataset synth --sample hsi`: write the .npz and print what it holds."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_suffix(".npz") if out.suffix == "" else out.parent / (out.name + ".npz")
    path = synth_hsi_npz(n, out, seed=seed, mix=mix_with_good_fraction(good_fraction), progress=progress)
    with np.load(path) as z:
        labels, counts = np.unique(z["labels"], return_counts=True)
    print(f"wrote {n} H:Si(100) frames to {path}: " + ", ".join(f"{lab} {c}" for lab, c in zip(labels, counts)))
    return 0


def gallery(sim_npz: str | Path, out_png: str | Path, real_npz: str | Path | None = None, per_class: int = 6,
            seed: int = 0) -> Path:
    """Simulated frames per tip state (left) next to real frames of the matching class (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    with np.load(sim_npz) as z:
        sim_images, sim_labels = z["images"], z["labels"]
    real = None
    if real_npz is not None:
        with np.load(real_npz) as z:
            real = (z["images"], z["scores"], [str(c) for c in z["categories"]])
    classes = [c for c in DEFAULT_MIX if np.any(sim_labels == c)]
    real_class = {**{s.value: REAL_SET_CLASS[s] for s in HsiTipState}, TIP_CHANGE: TIP_CHANGE_CLASS}
    cols = per_class * (2 if real is not None else 1)
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.3 * cols + 0.2, 1.45 * len(classes) + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, c in enumerate(classes):
        idx = np.flatnonzero(sim_labels == c)
        for j, k in enumerate(rng.permutation(idx)[:per_class]):
            axes[i, j].imshow(sim_images[k], cmap="gray", vmin=0, vmax=254)
        axes[i, 0].set_title(f"sim: {c}", fontsize=8, loc="left")
        if real is not None:
            images, scores, cats = real
            col = cats.index(real_class[c])
            # real frames voted unanimously into the class (and, for good states, into no bad class)
            ok = scores[:, col] >= 0.99
            if HsiTipState(c).is_good if c != TIP_CHANGE else False:
                ok &= scores[:, [cats.index("Tip Change"), cats.index("Bad/Blurry")]].max(axis=1) == 0
            ridx = np.flatnonzero(ok)
            for j, k in enumerate(rng.permutation(ridx)[:per_class]):
                axes[i, per_class + j].imshow(images[k], cmap="gray", vmin=0, vmax=254)
            axes[i, per_class].set_title(f"real: {real_class[c]}", fontsize=8, loc="left")
    fig.suptitle("H:Si(100) tip states: simulated (left)" + (", real frames of the class (right)" if real is not None else ""),
                 fontsize=9)
    return save_figure(fig, out_png, dpi=80)


# -- frames as the run sees them (for a tip-state classifier that drives `deepspm run --target-state`) ----------

RUN_FRAMES_PURPOSE = 503
RUN_STATES: tuple[str, ...] = tuple(s.value for s in HsiTipState)
RUN_FRAMES_CONFIG_OVERRIDES = {"degradation_per_frame": 0.0, "spontaneous_changes": False, "z_jump_rate_per_s": 0.0}


def synth_hsi_run_frames(
    n: int, out: str | Path, seed: int = 0, *, progress: bool = True, frames_per_area: int = 200,
    pixels: int = 64, frame_m: float = 10e-9,
) -> Path:
    """`n` frames of the simulated microscope imaging H:Si(100) exactly as `deepspm run` scans them (the run's
    64 px, 10 nm frames, raw heights in metres, a move and a settle wait before each), each with a tip state
    drawn uniformly from `HsiTipState`, written to an .npz: `frames` float32 (N, 64, 64), `states` (N,) the
    true tip state, `area` (N, 2), `xy_m` (N, 2). Unlike `synth_hsi_npz` (the real set's representation) these
    are what the run's classifier is given after levelling. Bad-sample frames (raw peak-to-peak >= 6 Angstrom,
    the run's rule) and non-finite ones are skipped, as the run never judges them."""
    from tqdm import tqdm

    from deepspm.simulator.clock import SimClock
    from deepspm.simulator.dataset import ready_to_scan, scan_at_random
    from deepspm.simulator.microscope import Z_INDEX, SimConfig, SimulatedMicroscope

    if n <= 0:
        raise ValueError(f"the number of frames must be positive, got {n}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clock = SimClock(0.0)
    m = SimulatedMicroscope(seed, clock, SimConfig(surface="hsi", **RUN_FRAMES_CONFIG_OVERRIDES))  # type: ignore[arg-type]
    m.set_scan_buffer([Z_INDEX], pixels, pixels)
    rng = area_rng(seed, RUN_FRAMES_PURPOSE)
    half = m.config.piezo_xy_range_m / 2 * 0.95 - frame_m
    frames: list[np.ndarray] = []
    states: list[str] = []
    areas: list[tuple[int, int]] = []
    xys: list[tuple[float, float]] = []
    in_area = 0
    with tqdm(total=n, desc="synthesising H:Si run frames", unit="frame", disable=not progress) as bar:
        while len(frames) < n:
            in_area = ready_to_scan(m, clock, rng, in_area, frames_per_area)
            state = HsiTipState(RUN_STATES[int(rng.integers(0, len(RUN_STATES)))])
            m.set_probe(state, rng)
            x, y, data = scan_at_random(m, clock, rng, half, frame_m)
            in_area += 1
            if data is None:
                continue
            frames.append(data)
            states.append(state.value)
            areas.append(m.approach_area())
            xys.append((float(x), float(y)))
            bar.update(1)
    np.savez_compressed(out, frames=np.stack(frames), states=np.array(states), area=np.array(areas, dtype=np.int64),
                        xy_m=np.array(xys), seed=np.int64(seed), frame_m=np.float64(frame_m))
    return out
