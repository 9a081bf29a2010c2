"""The H:Si(100)-(2x1) surface, its tip states, their conditioning table, the artefacts and the synthetic set."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from deepspm.simulator import artefacts
from deepspm.simulator.clock import SimClock
from deepspm.simulator.conditioning import DipEvent, PulseEvent
from deepspm.simulator.hsi import NM, ROW_PITCH_M, SI_A_M, HsiSampleArea, HsiSampleConfig
from deepspm.simulator.hsi_dataset import (
    CATEGORIES,
    mix_with_good_fraction,
    render_hsi_frame,
    synth_hsi_frames,
    write_npz,
)
from deepspm.simulator.hsi_probe import (
    BAD_STATES,
    EVENT_BINS,
    GOOD_STATES,
    SCAN_TRANSITIONS,
    TRANSITIONS,
    HsiTipState,
    apply_hsi_event,
    event_bin,
    make_hsi_probe,
    transition_matrix,
)
from deepspm.simulator.microscope import Z_INDEX, SimConfig, SimulatedMicroscope
from deepspm.simulator.probe import Apex, ProbeKind
from deepspm.simulator.render import FrameGeometry, render_topography
from deepspm.simulator.sample import area_rng

CLEAN = HsiSampleConfig(dangling_bond_density_per_nm2=0.0, missing_dimer_density_per_nm2=0.0, adsorbate_density_per_nm2=0.0,
                        cluster_density_per_nm2=0.0, bad_patch_density_per_um2=0.0, mean_terrace_width_m=1e-3, azimuth_deg=0.0)


# --- the sample --------------------------------------------------------------------------------------------
def test_lattice_has_the_2x1_geometry():
    area = HsiSampleArea(3, (0, 0), CLEAN)
    xy = area.lattice_atoms_in(-2e-9, 2e-9, -2e-9, 2e-9)
    (rx, ry) = area.row_direction(int(area.terrace_index(np.array(0.0), np.array(0.0))))
    p = xy[0] * rx + xy[1] * ry  # along the rows
    q = xy[0] * -ry + xy[1] * rx  # across
    # dimer pairs 0.24 nm apart across the rows; rows every 0.768 nm; dimers every 0.384 nm along a row
    q_sorted = np.unique(np.round(q / 1e-12))
    gaps = np.diff(q_sorted) * 1e-12
    assert np.allclose(sorted(set(np.round(gaps / 1e-12)))[:2], [240, 528], atol=2)  # 0.24 and 0.768 - 0.24
    assert math.isclose(gaps[0] + gaps[1], ROW_PITCH_M, rel_tol=1e-3)
    p_sorted = np.unique(np.round(p / 1e-12))
    assert np.allclose(np.diff(p_sorted) * 1e-12, SI_A_M, rtol=1e-3)


def test_rows_turn_by_90_degrees_at_every_step_and_areas_are_deterministic():
    area = HsiSampleArea(5, (1, 2), HsiSampleConfig(mean_terrace_width_m=20e-9))
    assert len(area.steps) > 5
    for t in range(3):
        a, b = area.row_direction(t), area.row_direction(t + 1)
        assert abs(a[0] * b[0] + a[1] * b[1]) < 1e-12
    again = HsiSampleArea(5, (1, 2), HsiSampleConfig(mean_terrace_width_m=20e-9))
    box = (-5e-9, 5e-9, -5e-9, 5e-9)
    assert np.array_equal(area.components_in(*box), again.components_in(*box))
    other = HsiSampleArea(6, (1, 2), HsiSampleConfig(mean_terrace_width_m=20e-9)).components_in(*box)
    mine = area.components_in(*box)
    assert mine.shape[1] > 100 and (mine.shape != other.shape or not np.array_equal(mine, other))


def test_defects_change_the_surface_and_bad_config_is_refused():
    clean = HsiSampleArea(1, (0, 0), CLEAN)
    dirty = HsiSampleArea(1, (0, 0), HsiSampleConfig(azimuth_deg=0.0, mean_terrace_width_m=1e-3,
                                                     dangling_bond_density_per_nm2=0.2,
                                                     missing_dimer_density_per_nm2=0.2, bad_patch_density_per_um2=0.0))
    box = (-4e-9, 4e-9, -4e-9, 4e-9)
    c, d = clean.components_in(*box), dirty.components_in(*box)
    assert (d[3] < 0).any() and not (c[3] < 0).any()  # missing-dimer pits
    assert d[3].max() > c[3].max()  # dangling bonds stand out
    with pytest.raises(ValueError, match="lattice_amp_m"):
        HsiSampleConfig(lattice_amp_m=0.0)


def _power_at(img: np.ndarray, pixel_m: float, period_m: float) -> float:
    """Fraction of the (mean-free) image power within +-15 % of a spatial period, any direction."""
    x = img - img.mean()
    f = np.abs(np.fft.fft2(x)) ** 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(x.shape[0], pixel_m), np.fft.fftfreq(x.shape[1], pixel_m), indexing="ij"))
    band = np.abs(k - 1.0 / period_m) < 0.15 / period_m
    return float(f[band].sum() / f.sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_tip_sharpness_decides_which_periods_survive(seed):
    area = HsiSampleArea(seed, (0, 0), CLEAN)
    geom = FrameGeometry(0.0, 0.0, 4e-9, 4e-9, 0.0, 128, 128)
    px = geom.pixel_m

    def image(state: HsiTipState) -> np.ndarray:
        probe = make_hsi_probe(state, area_rng(seed, 9, list(HsiTipState).index(state)))
        return render_topography(area, probe.apices, geom)

    atoms, dimers, rows, blurry = (
        image(s) for s in (HsiTipState.ATOMS, HsiTipState.DIMERS, HsiTipState.ROWS, HsiTipState.BLURRY)
    )
    # the 0.384 nm dimer period along the rows: strong for atoms/dimers tips, nearly gone for a rows tip
    assert _power_at(atoms, px, SI_A_M) > 3 * _power_at(rows, px, SI_A_M)
    assert _power_at(dimers, px, SI_A_M) > 3 * _power_at(rows, px, SI_A_M)
    # the rows themselves: a rows tip still shows them, a blurry tip hardly any corrugation at all
    assert rows.std() > 5 * blurry.std()


def test_buckling_shows_only_with_a_buckling_tip():
    area = HsiSampleArea(2, (0, 0), CLEAN)
    geom = FrameGeometry(0.0, 0.0, 3e-9, 3e-9, 0.0, 96, 96)
    apex = (Apex(0.0, 0.0, 0.06 * NM, 1.0),)
    plain = render_topography(area, apex, geom)
    assert np.array_equal(plain, render_topography(area, apex, geom, buckling=0.0))
    buckled = render_topography(area, apex, geom, buckling=0.8)
    assert np.abs(buckled - plain).max() > 0.3 * (plain.max() - plain.min())


# --- tip states and conditioning -------------------------------------------------------------------------------
def test_transition_table_is_complete_and_stochastic():
    assert set(TRANSITIONS) == set(HsiTipState) == set(SCAN_TRANSITIONS)
    for state, bins in TRANSITIONS.items():
        assert set(bins) == set(EVENT_BINS)
        for name, row in bins.items():
            assert all(p >= 0 for p in row.values()) and math.isclose(sum(row.values()), 1.0), (state, name)
        assert bins["dip_none"] == {state: 1.0}  # a dip that does not reach the sample changes nothing
    for row in SCAN_TRANSITIONS.values():
        assert math.isclose(sum(row.values()), 1.0)
    states, m = transition_matrix("dip_shallow")
    assert m.shape == (7, 7) and np.allclose(m.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="unknown event bin"):
        transition_matrix("pulse_huge")


def test_table_encodes_the_conditioning_practice():
    p_good = {s: {b: sum(p for t, p in TRANSITIONS[s][b].items() if t.is_good) for b in EVENT_BINS} for s in HsiTipState}
    # gentle contacts are the best fix for double tips; medium pulses the best for a rows tip; strong pulses damage
    assert max(p_good[HsiTipState.DOUBLE], key=p_good[HsiTipState.DOUBLE].get) == "dip_shallow"
    assert max(p_good[HsiTipState.ROWS], key=p_good[HsiTipState.ROWS].get) in ("pulse_medium", "dip_shallow")
    for good in GOOD_STATES:
        assert p_good[good]["pulse_strong"] < 0.2 < p_good[good]["pulse_weak"]
    for bad in BAD_STATES:
        assert max(p_good[bad].values()) > 0.15  # every bad state can be fixed by something
    assert HsiTipState.ROWS not in GOOD_STATES


def test_events_fall_into_bins_and_draws_follow_the_table():
    assert event_bin(PulseEvent(2.5, 0.2)) == "pulse_weak"
    assert event_bin(PulseEvent(-4.0, 0.2)) == "pulse_medium"
    assert event_bin(PulseEvent(-8.0, 0.2)) == "pulse_strong"
    assert event_bin(DipEvent(0.5e-9)) == "dip_none"  # shallower than the gap
    assert event_bin(DipEvent(1.2e-9)) == "dip_shallow"
    assert event_bin(DipEvent(5e-9)) == "dip_deep"
    rng = np.random.default_rng(0)
    probe = make_hsi_probe(HsiTipState.DOUBLE, rng)
    n = 4000
    drawn = [apply_hsi_event(probe, DipEvent(1.2e-9), rng).kind for _ in range(n)]
    for state, p in TRANSITIONS[HsiTipState.DOUBLE]["dip_shallow"].items():
        assert abs(drawn.count(state) / n - p) < 0.03, state
    assert set(drawn) <= set(TRANSITIONS[HsiTipState.DOUBLE]["dip_shallow"])


# --- the microscope on H:Si -------------------------------------------------------------------------------------
def test_microscope_images_hsi_and_conditions_by_the_table():
    with pytest.raises(ValueError, match="unknown simulated surface"):
        SimConfig(surface="graphite")
    m = SimulatedMicroscope(4, SimClock(0.0), SimConfig(surface="hsi", spontaneous_changes=False))
    gt = m.ground_truth()
    assert gt.kind is HsiTipState.DIMERS and gt.is_good
    m.set_scan_buffer([Z_INDEX], 64, 64)
    m.set_scan_frame(0.0, 0.0, 4e-9, 4e-9, 0.0)
    m.scan_action(0, True)
    m.clock.advance(m.frame_time_s())
    _, data, _ = m.frame_data(Z_INDEX, True)
    assert np.all(np.isfinite(data)) and float(np.ptp(data)) > 2e-11
    m.set_probe(HsiTipState.BLURRY)
    assert not m.ground_truth().is_good
    seen = set()
    for _ in range(40):
        m.set_probe(HsiTipState.DOUBLE)
        m.pulse(0.2, -8.0)
        seen.add(m.ground_truth().kind)
    assert seen <= set(TRANSITIONS[HsiTipState.DOUBLE]["pulse_strong"]) and len(seen) > 2
    # the default surface is untouched
    assert SimulatedMicroscope(4, SimClock(0.0)).ground_truth().kind is ProbeKind.GOOD


# --- artefacts and the real set's processing ---------------------------------------------------------------------
def test_feedback_ringing_keeps_levels_and_overshoots_edges():
    z = np.zeros((2, 200))
    z[:, 50:] = 1.0
    out = artefacts.feedback_ringing(z, period_px=12.0, damping=0.2)
    assert abs(out[0, -1] - 1.0) < 1e-3 and abs(out[0, 10]) < 1e-9
    assert out[0].max() > 1.2  # overshoot after the edge
    assert np.array_equal(artefacts.feedback_ringing(z, 0.0, 0.5), z)


def test_noise_offsets_and_processing():
    rng = np.random.default_rng(0)
    pink = artefacts.pink_noise((64, 64), 1e-11, 1.0, rng)
    assert math.isclose(float(pink.std()), 1e-11, rel_tol=1e-6)
    offs = artefacts.line_offsets((32, 16), 1e-11, 0.0, 0.0, rng)
    assert np.allclose(offs.std(axis=1), 0.0) and offs[:, 0].std() > 0
    tilted = np.add.outer(np.arange(10.0), np.linspace(0, 5, 20))
    assert np.allclose(artefacts.flatten_lines(tilted, 1), 0.0)
    assert np.allclose(artefacts.flatten_lines(tilted, 0).mean(axis=1), 0.0)
    img = artefacts.real_set_processing(rng.standard_normal((300, 300)))
    assert img.shape == (64, 64) and img.dtype == np.uint8 and img.max() <= 254
    with pytest.raises(ValueError, match="order"):
        artefacts.flatten_lines(tilted, 2)


# --- the synthetic set -------------------------------------------------------------------------------------------
def test_frames_are_deterministic_and_in_the_real_sets_layout(tmp_path):
    from deepspm.nets.data import HSI100_CATEGORIES, load_hsi100_npz

    assert CATEGORIES == HSI100_CATEGORIES
    a = render_hsi_frame(7, 3, "tip_change")
    b = render_hsi_frame(7, 3, "tip_change")
    assert np.array_equal(a.image, b.image) and len(a.states) >= 2 and a.scores[CATEGORIES.index("Tip Change")] == 1
    frames = synth_hsi_frames(16, 2, mix={"dimers": 1, "rows": 1, "blurry": 1})
    path = write_npz(frames, tmp_path / "s.npz")
    binary = load_hsi100_npz(path)
    n_rows = sum(f.label == "rows" for f in frames)
    assert len(binary) == 16 - n_rows  # rows frames are left out of the binary set, as Rows-only real frames
    assert set(binary.labels.tolist()) <= {0, 1}
    assert sorted(binary.labels.tolist()) == sorted(int(f.label == "dimers") for f in frames if f.label != "rows")
    mix = mix_with_good_fraction(0.8)
    assert math.isclose(sum(v for k, v in mix.items() if k != "tip_change" and HsiTipState(k).is_good), 0.8)
    with pytest.raises(ValueError, match="unknown H:Si classes"):
        synth_hsi_frames(2, 0, mix={"wobbly": 1.0})


def test_cli_synth_hsi_and_gallery(tmp_path):
    out = tmp_path / "sim.npz"
    run = [sys.executable, "-m", "deepspm.cli"]
    r = subprocess.run([*run, "dataset", "synth", "--sample", "hsi", "--n", "8", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert z["images"].shape == (8, 64, 64)
    r = subprocess.run([*run, "dataset", "gallery", str(out), "--out", str(tmp_path / "g.png"), "--per-class", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.png").stat().st_size > 1000
    r = subprocess.run([*run, "dataset", "synth", "--sample", "hsi", "--n", "8", "--out", str(out), "--good-fraction", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "between 0 and 1" in r.stderr and "Traceback" not in r.stderr
