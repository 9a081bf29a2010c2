"""The simulated sample: deterministic per (seed, area), lazy, physically sized features."""

from __future__ import annotations

import math

import numpy as np

from deepspm.simulator.sample import (
    AG100_STEP_M,
    MOLECULE_HARD_CORE_M,
    TILE_M,
    Sample,
    SampleArea,
    SampleConfig,
    area_rng,
)

NM = 1e-9


def test_same_seed_and_area_give_the_same_surface_in_any_visiting_order() -> None:
    a = Sample(11).area((2, -3))
    b = Sample(11).area((2, -3))
    box = (-30 * NM, 30 * NM, 10 * NM, 70 * NM)
    b.components_in(100 * NM, 140 * NM, 100 * NM, 140 * NM)  # visit other tiles first
    assert np.array_equal(a.components_in(*box), b.components_in(*box))
    assert a.steps == b.steps and a.patches == b.patches
    c = Sample(11).area((2, -2))
    assert not np.array_equal(a.molecules_in(*box), c.molecules_in(*box))
    d = Sample(12).area((2, -3))
    assert not np.array_equal(a.molecules_in(*box), d.molecules_in(*box))


def test_generation_is_lazy() -> None:
    area = Sample(1).area((0, 0))
    assert len(area._tiles) == 0
    area.components_in(0.0, 10 * NM, 0.0, 10 * NM)
    assert 0 < len(area._tiles) <= 16  # a 10 nm box touches a handful of 20 nm tiles, not the 1800 of the area


def test_molecules_keep_a_hard_core_across_tile_borders_and_match_the_density() -> None:
    cfg = SampleConfig(bad_patch_density_per_um2=0.0, molecule_density_spread=0.0)
    area = SampleArea(5, (0, 0), cfg)
    half = 100 * NM
    mol = area.molecules_in(-half, half, -half, half)
    d = np.hypot(mol[0][:, None] - mol[0][None, :], mol[1][:, None] - mol[1][None, :])
    np.fill_diagonal(d, np.inf)
    assert d.min() >= MOLECULE_HARD_CORE_M
    density_per_nm2 = mol.shape[1] / (2 * half / NM) ** 2
    assert abs(density_per_nm2 - cfg.molecule_density_per_nm2) < 0.15 * cfg.molecule_density_per_nm2
    # two rotational domains near +-22.5 degrees
    assert np.all(np.abs(np.abs(np.degrees(mol[2])) - 22.5) < 15)


def test_steps_are_monatomic_ag100() -> None:
    area = Sample(3).area((0, 0))
    assert area.steps
    assert all(math.isclose(abs(s.height_m), AG100_STEP_M) for s in area.steps)
    s = area.steps[0]
    # just either side of the step line (away from the meander's influence at this point)
    along = 0.0
    x0 = s.nx * s.offset_m - s.ny * along
    y0 = s.ny * s.offset_m + s.nx * along
    shift = s.meander_amp_m * math.sin(s.meander_phase)
    x0, y0 = x0 + s.nx * shift, y0 + s.ny * shift
    h_in = area.terrace_height(np.array([x0 + s.nx * 1e-10]), np.array([y0 + s.ny * 1e-10]))
    h_out = area.terrace_height(np.array([x0 - s.nx * 1e-10]), np.array([y0 - s.ny * 1e-10]))
    assert math.isclose(float(h_in[0] - h_out[0]), s.height_m, rel_tol=1e-9)


def test_rough_patches_exist_at_the_configured_density_and_hold_no_molecules() -> None:
    cfg = SampleConfig(bad_patch_density_per_um2=6.0)
    counts = [len(SampleArea(seed, (0, 0), cfg).patches) for seed in range(40)]
    expected = 6.0 * 0.85**2
    assert abs(np.mean(counts) - expected) < 0.35 * expected
    area = next(SampleArea(s, (0, 0), cfg) for s in range(40) if SampleArea(s, (0, 0), cfg).patches)
    p = area.patches[0]
    assert area.is_rough(p.x_m, p.y_m)
    r = 0.5 * p.radius_m
    assert area.molecules_in(p.x_m - r, p.x_m + r, p.y_m - r, p.y_m + r).shape[1] == 0
    blobs = area.components_in(p.x_m - r, p.x_m + r, p.y_m - r, p.y_m + r)
    assert blobs.shape[1] > 50  # dense clusters


def test_debris_appears_where_added_and_only_after() -> None:
    area = Sample(4).area((0, 0))
    before = area.components_in(0.0, 4 * NM, 0.0, 4 * NM)
    area.add_debris(2 * NM, 2 * NM, 2 * NM, 5e-10, area_rng(1, 2))
    after = area.components_in(0.0, 4 * NM, 0.0, 4 * NM)
    assert after.shape[1] > before.shape[1]
    assert area.components_in(0.0, 4 * NM, 0.0, 4 * NM, debris_before=0).shape == before.shape
    far = area.components_in(200 * NM, 204 * NM, 200 * NM, 204 * NM)
    assert far.shape == area.components_in(200 * NM, 204 * NM, 200 * NM, 204 * NM, debris_before=0).shape
    assert area.debris_sites == [(2 * NM, 2 * NM, 2 * NM)]


def test_area_rng_is_keyed() -> None:
    assert np.array_equal(area_rng(1, 2, -3).random(4), area_rng(1, 2, -3).random(4))
    assert not np.array_equal(area_rng(1, 2, -3).random(4), area_rng(1, 2, 3).random(4))
    assert TILE_M == 20 * NM
