"""Rendering: probe kernels show up in images as real STM artefacts; everything is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from deepspm.simulator.clock import SimClock
from deepspm.simulator.dataset import level
from deepspm.simulator.microscope import Z_INDEX, SimConfig, SimulatedMicroscope
from deepspm.simulator.probe import Apex, ProbeKind, make_probe
from deepspm.simulator.render import FrameGeometry, render_topography
from deepspm.simulator.sample import Sample, SampleArea, SampleConfig

NM = 1e-9
A = 1e-10
QUIET = SimConfig(degradation_per_frame=0.0, spontaneous_changes=False, z_jump_rate_per_s=0.0)


def _frames(kind: ProbeKind, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n levelled frames with molecules for a probe kind, with the ideal (point-probe) image of each."""
    clock = SimClock(0.0)
    m = SimulatedMicroscope(seed, clock, QUIET)
    m.set_scan_buffer([Z_INDEX], 64, 64)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        m.set_probe(kind, rng)
        x, y = rng.uniform(-380 * NM, 380 * NM, 2)
        clock.advance(m.set_folme_xy(x, y) + 30.0)
        m.set_scan_frame(x, y, 10 * NM, 10 * NM, 0.0)
        m.scan_action(0, True)
        clock.advance(m.frame_time_s())
        data = m.frame_data(Z_INDEX, True)[1]
        geometry = FrameGeometry(x, y, 10 * NM, 10 * NM, 0.0, 64, 64, True)
        ideal = render_topography(m.area, (Apex(0.0, 0.0, 0.05 * NM, 1.0),), geometry)
        if np.ptp(data) < 6 * A and np.ptp(ideal) > 1.5 * A:  # usable frames (not bad sample) that show molecules
            out.append((level(data), ideal))
    return out


def _hf_energy(img: np.ndarray) -> float:
    """Gradient energy over variance (1/px^2): how much of the image's contrast sits at short length scales."""
    gy, gx = np.gradient(img)
    return float(np.mean(gx**2 + gy**2) / np.var(img))


def _acf_side_lobe(img: np.ndarray) -> float:
    """Largest normalised autocorrelation at lags 0.45-2.5 nm: ghost copies of features raise it."""
    f = np.fft.fft2(img - img.mean())
    ac = np.fft.fftshift(np.fft.ifft2(np.abs(f) ** 2).real)
    ac /= ac.max()
    yy, xx = np.indices(ac.shape)
    r = np.hypot(yy - 32, xx - 32) * (10 / 64)
    return float(ac[(r > 0.45) & (r < 2.5)].max())


def _fidelity(img: np.ndarray, ideal: np.ndarray) -> float:
    return float(np.corrcoef(img.ravel(), ideal.ravel())[0, 1])


@pytest.fixture(scope="module")
def frames_by_kind() -> dict[ProbeKind, list[tuple[np.ndarray, np.ndarray]]]:
    return {k: _frames(k, 30, seed) for seed, k in enumerate((ProbeKind.GOOD, ProbeKind.BLUNT, ProbeKind.DOUBLE), start=21)}


def test_good_probes_image_sharper_molecules_than_blunt_ones(frames_by_kind) -> None:
    good = np.mean([_hf_energy(f) for f, _ in frames_by_kind[ProbeKind.GOOD]])
    blunt = np.mean([_hf_energy(f) for f, _ in frames_by_kind[ProbeKind.BLUNT]])
    assert good > 2.0 * blunt


def test_double_probes_show_ghosts_in_the_autocorrelation(frames_by_kind) -> None:
    good = np.mean([_acf_side_lobe(f) for f, _ in frames_by_kind[ProbeKind.GOOD]])
    double = np.mean([_acf_side_lobe(f) for f, _ in frames_by_kind[ProbeKind.DOUBLE]])
    assert double > good + 0.04


def test_good_probes_image_the_sample_most_faithfully(frames_by_kind) -> None:
    fid = {k: np.mean([_fidelity(f, ideal) for f, ideal in v]) for k, v in frames_by_kind.items()}
    assert fid[ProbeKind.GOOD] > 0.9
    assert fid[ProbeKind.GOOD] > fid[ProbeKind.DOUBLE] + 0.1
    assert fid[ProbeKind.GOOD] > fid[ProbeKind.BLUNT] + 0.15


def test_molecules_are_two_angstrom_high_and_four_lobed_with_a_good_tip() -> None:
    area = SampleArea(2, (0, 0), SampleConfig(bad_patch_density_per_um2=0.0))
    area.steps = ()
    mol = area.molecules_in(-100 * NM, 100 * NM, -100 * NM, 100 * NM)
    x, y, angle = mol[:, 0]
    good = make_probe(ProbeKind.GOOD, np.random.default_rng(0))
    # a 3 nm frame rotated with the molecule (Nanonis angle is clockwise) so lobes lie on the axes' diagonals
    geom = FrameGeometry(x, y, 3 * NM, 3 * NM, -np.degrees(angle), 64, 64)
    img = render_topography(area, good.apices, geom)
    assert 1.6 * A < img.max() < 2.6 * A
    # the four lobes are brighter than the molecule's centre
    centre = img[30:34, 30:34].mean()
    assert img.max() > centre + 0.3 * A


def test_double_apex_duplicates_a_feature_at_its_offset() -> None:
    area = SampleArea(2, (0, 0), SampleConfig(bad_patch_density_per_um2=0.0, molecule_density_per_nm2=1e-6,
                                              adatom_density_per_nm2=0.0))
    area.steps = ()
    area.add_debris(0.0, 0.0, 0.3 * NM, 2 * A, np.random.default_rng(0))
    geom = FrameGeometry(0.0, 0.0, 8 * NM, 8 * NM, 0.0, 64, 64)
    single = render_topography(area, (Apex(0, 0, 0.15 * NM, 1.0),), geom)
    double = render_topography(area, (Apex(0, 0, 0.15 * NM, 1.0), Apex(2 * NM, 0, 0.15 * NM, 0.6)), geom)
    # the second apex sits 2 nm to +x: it meets the feature when the tip is 2 nm to -x (16 px left)
    r, c = np.unravel_index(np.argmax(single), single.shape)
    assert double[r, c - 16] > 0.6 * single[r, c]
    assert single[r, c - 16] < 0.05 * single[r, c]


def test_rotated_frames_image_the_same_surface() -> None:
    area = Sample(9).area((0, 0))
    apex = (Apex(0, 0, 0.15 * NM, 1.0),)
    upright = render_topography(area, apex, FrameGeometry(0, 0, 10 * NM, 10 * NM, 0.0, 64, 64))
    turned = render_topography(area, apex, FrameGeometry(0, 0, 10 * NM, 10 * NM, 90.0, 64, 64))
    # clockwise 90 deg: the fast axis points to -y and the slow axis to +x, so turned[r, c] = upright[63 - c, r]
    assert np.allclose(turned, np.rot90(upright, -1), atol=1e-14)
    assert not np.allclose(turned, upright, atol=1e-12)


def test_same_seed_same_frames_byte_for_byte() -> None:
    def run(seed: int) -> list[bytes]:
        clock = SimClock(0.0)
        m = SimulatedMicroscope(seed, clock, SimConfig(degradation_per_frame=0.2))
        out = []
        for i in range(6):
            m.set_scan_frame(i * 12 * NM, 0.0, 10 * NM, 10 * NM, 0.0)
            m.scan_action(0, i % 2 == 0)
            clock.advance(6.0 if i == 3 else m.frame_time_s())
            out.append(m.frame_data(Z_INDEX, True)[1].tobytes())
            out.append(m.frame_data(Z_INDEX, False)[1].tobytes())
            out.append(m.frame_data(0, True)[1].tobytes())
            if i == 2:
                clock.advance(m.pulse(0.2, -4.0))
        return out

    assert run(17) == run(17)
    assert run(17) != run(18)
