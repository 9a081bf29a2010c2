"""The H:Si(100)-(2x1) sample: hydrogen-terminated silicon dimer rows, one lazily generated surface per area.

Same interface as `sample.SampleArea` (Gaussian components, monatomic steps as meandering lines, debris), so
the renderer and the simulated microscope image it unchanged. Coordinates in metres in the fine-piezo frame
of an approach area; heights in metres.

The crystal (Si(100), surface lattice constant a = 0.384 nm):
- the 2x1 reconstruction pairs surface atoms into dimers; dimers line up in rows along one <110> direction.
  Rows are 2a = 0.768 nm apart, dimers a = 0.384 nm apart along a row, the two atoms of a dimer
  `dimer_atom_separation_m` (0.24 nm, the Si-Si bond plus the tilt of the Si-H bonds) apart ACROSS the row;
- every atom is an isotropic Gaussian (sigma `atom_sigma_m`, amplitude `lattice_amp_m`): a sharp tip shows
  the individual atoms, a slightly wider one merges each pair into a bean-shaped dimer, a wider one still
  leaves only the 0.768 nm row corrugation, and a blunt tip nothing (the Gaussian blur removes the shorter
  periods first: contrast of a period L falls as exp(-2 pi^2 sigma^2 / L^2));
- single-layer steps (0.136 nm, a/4 * sqrt 2 ... the Si(100) interlayer spacing) separate terraces; the dimer
  rows turn by 90 degrees from one terrace to the next (the two 2x1 / 1x2 domains), and each terrace has its
  own lateral registry;
- the crystal's azimuth relative to the scan frame is drawn per area (mostly near 0, 45, 90, 135 degrees, as
  samples are usually mounted along a flat, sometimes anywhere);
- defects: dangling bonds (a missing H: a bright protrusion ~0.5 nm across, 1-1.8 Angstrom), missing dimers
  (both atoms gone, a shallow depression), adsorbates (single blobs 0.7-1.6 nm across, 1.5-4 Angstrom) and
  clusters (several blobs within ~1-2 nm, up to 5 Angstrom); rough contaminated patches as the other sample;
- buckling: a tip close to a dimer can make it appear buckled (one atom up, one down). The pattern is a
  property of the sample (each terrace carries a c(4x2)-like zigzag or a p(2x2) pattern of up-atoms); how
  strongly it shows is a property of the tip (`components_in(..., buckling=b)` adds b * lattice amplitude
  with the pattern's sign to every lattice atom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepspm.simulator.sample import (
    AREA_PITCH_M,
    AreaCache,
    Step,
    area_rng,
    make_patches,
    step_table,
)

NM = 1e-9
ANGSTROM = 1e-10
SI_A_M = 0.384 * NM  # surface lattice constant of Si(100)
ROW_PITCH_M = 2 * SI_A_M  # 0.768 nm between dimer rows
SI100_STEP_M = 1.36 * ANGSTROM  # single-layer step height
HSI_TILE_M = 8e-9
_REACH_M = 4 * NM  # largest 4-sigma footprint of a tile-stored component (clusters) plus its offset
_PURPOSE = {"layout": 11, "tile": 12, "defects": 13}
# component classes (the fifth row of the internal tables): lattice atoms carry their buckling sign
_LATTICE, _DEFECT = 1.0, 0.0


@dataclass(frozen=True)
class HsiSampleConfig:
    """Physical knobs of the H:Si(100) surface. Densities per nm^2, lengths in metres."""

    lattice_amp_m: float = 0.9 * ANGSTROM  # amplitude of one atom's Gaussian (sets the corrugation: the height scale)
    atom_sigma_m: float = 0.085 * NM
    dimer_atom_separation_m: float = 0.24 * NM
    dangling_bond_density_per_nm2: float = 0.02
    dangling_bond_amp_m: tuple[float, float] = (1.0 * ANGSTROM, 1.8 * ANGSTROM)
    missing_dimer_density_per_nm2: float = 0.02
    adsorbate_density_per_nm2: float = 0.004
    cluster_density_per_nm2: float = 0.001
    mean_terrace_width_m: float = 40e-9
    bad_patch_density_per_um2: float = 1.0
    bad_patch_radius_m: tuple[float, float] = (15e-9, 60e-9)
    bad_patch_roughness_m: tuple[float, float] = (3 * ANGSTROM, 8 * ANGSTROM)
    tilt_rms: float = 0.004
    azimuth_deg: float | None = None  # crystal azimuth in the scan frame; None: drawn per area
    tile_cache_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("lattice_amp_m", "atom_sigma_m", "dimer_atom_separation_m", "mean_terrace_width_m"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HsiSampleConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("dangling_bond_density_per_nm2", "missing_dimer_density_per_nm2", "adsorbate_density_per_nm2",
                     "cluster_density_per_nm2", "bad_patch_density_per_um2", "tilt_rms"):
            if getattr(self, name) < 0:
                raise ValueError(f"HsiSampleConfig.{name} must be >= 0, got {getattr(self, name)}")


def _empty(rows: int = 4) -> np.ndarray:
    return np.zeros((rows, 0))


class HsiSampleArea:
    """The H:Si(100) surface of one approach area (the `SampleArea` interface)."""

    def __init__(self, seed: int, index: tuple[int, int], config: HsiSampleConfig) -> None:
        self.seed = seed
        self.index = (int(index[0]), int(index[1]))
        self.config = c = config
        rng = area_rng(seed, _PURPOSE["layout"], *self.index)
        self.tilt = (float(rng.normal(0.0, c.tilt_rms)), float(rng.normal(0.0, c.tilt_rms)))
        self.base_z_m = float(rng.normal(0.0, 60e-9))
        if c.azimuth_deg is not None:
            az = c.azimuth_deg
        elif rng.random() < 0.7:
            az = 45.0 * int(rng.integers(0, 4)) + float(rng.normal(0.0, 4.0))
        else:
            az = float(rng.uniform(0.0, 180.0))
        self.azimuth_rad = math.radians(az)
        self.steps = self._make_steps(rng)
        self.step_table = step_table(self.steps)
        # per terrace (indexed by the number of steps below it, offset so indices are >= 0): lattice registry
        # (fractions of a along and across the rows) and the buckling pattern (0 zigzag c(4x2), 1 p(2x2))
        n_t = len(self.steps) + 1
        self._terrace_shift = rng.uniform(0.0, 1.0, (n_t, 2))
        self._terrace_pattern = rng.integers(0, 2, n_t)
        self._terrace_parity0 = int(rng.integers(0, 2))
        self.patches = make_patches(rng, c.bad_patch_density_per_um2, c.bad_patch_radius_m, c.bad_patch_roughness_m)
        self._tiles: dict[tuple[int, int], np.ndarray] = {}
        self._debris: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        self.debris_sites: list[tuple[float, float, float]] = []
        bases = [(p.x_m, p.y_m, p.radius_m / 2.0, 0.8 * p.roughness_m, _DEFECT) for p in self.patches]
        self._patch_bases = np.array(bases, dtype=float).T if bases else _empty(5)

    # --- layout -------------------------------------------------------------------------------------------
    def _make_steps(self, rng: np.random.Generator) -> tuple[Step, ...]:
        span = 1.6 * AREA_PITCH_M
        n = int(rng.poisson(span / self.config.mean_terrace_width_m))
        theta0 = self.azimuth_rad + (math.pi / 4 if rng.random() < 0.5 else 0.0) + float(rng.normal(0.0, 0.2))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        steps: list[Step] = []
        for offset in np.sort(rng.uniform(-span / 2, span / 2, n)):
            theta = theta0 + float(rng.normal(0.0, 0.1))
            # S_A steps are straight-ish, S_B steps rough: alternate meander amplitudes
            rough = len(steps) % 2 == 1
            amp = float(rng.uniform(1e-9, 4e-9)) if rough else float(rng.uniform(0.2e-9, 1.5e-9))
            k = 2 * math.pi / float(rng.uniform(4e-9, 15e-9) if rough else rng.uniform(20e-9, 80e-9))
            steps.append(Step(math.cos(theta), math.sin(theta), float(offset), sign * SI100_STEP_M, amp, k,
                              float(rng.uniform(0, 2 * math.pi))))
        return tuple(steps)

    def terrace_index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """How many steps lie 'below' each point (0..len(steps)): which terrace it is on."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        if not self.steps:
            return np.zeros(x.shape, dtype=int)
        t = self.step_table
        xf, yf = x.reshape(1, -1), y.reshape(1, -1)
        along = -t[:, 1:2] * xf + t[:, 0:1] * yf
        sd = t[:, 0:1] * xf + t[:, 1:2] * yf - t[:, 2:3] - t[:, 4:5] * np.sin(t[:, 5:6] * along + t[:, 6:7])
        return (sd >= 0).sum(axis=0).reshape(x.shape)

    def terrace_height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        if not self.steps:
            return np.zeros(x.shape)
        t = self.step_table
        xf, yf = x.reshape(1, -1), y.reshape(1, -1)
        along = -t[:, 1:2] * xf + t[:, 0:1] * yf
        sd = t[:, 0:1] * xf + t[:, 1:2] * yf - t[:, 2:3] - t[:, 4:5] * np.sin(t[:, 5:6] * along + t[:, 6:7])
        return ((sd >= 0) * t[:, 3:4]).sum(axis=0).reshape(x.shape)

    def row_direction(self, terrace: int) -> tuple[float, float]:
        """Unit vector along the dimer rows of a terrace (turns by 90 degrees at every single-layer step)."""
        a = self.azimuth_rad + (math.pi / 2) * ((terrace + self._terrace_parity0) % 2)
        return math.cos(a), math.sin(a)

    # --- tiles --------------------------------------------------------------------------------------------
    def _lattice(self, x0: float, y0: float, size: float) -> np.ndarray:
        """Lattice atoms (5, n) in the square [x0, x0 + size)^2: x, y, sigma, amplitude, buckling sign."""
        c = self.config
        cx, cy = x0 + size / 2, y0 + size / 2
        half_diag = size / math.sqrt(2) + SI_A_M
        corners_t = self.terrace_index(np.array([x0, x0 + size, x0, x0 + size, cx]), np.array([y0, y0, y0 + size, y0 + size, cy]))
        parts = []
        for terrace in range(int(corners_t.min()) - 1, int(corners_t.max()) + 2):
            if terrace < 0 or terrace > len(self.steps):
                continue
            (rx, ry) = self.row_direction(terrace)
            qx, qy = -ry, rx  # across the rows
            sp, sq = self._terrace_shift[terrace]
            # crystal coordinates of the tile centre, then an index window covering the tile
            p_c = cx * rx + cy * ry
            q_c = cx * qx + cy * qy
            i0 = math.floor((p_c - half_diag) / SI_A_M - sp)
            i1 = math.ceil((p_c + half_diag) / SI_A_M - sp)
            j0 = math.floor((q_c - half_diag) / ROW_PITCH_M - sq)
            j1 = math.ceil((q_c + half_diag) / ROW_PITCH_M - sq)
            ii_grid, jj_grid = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
            ii, jj = ii_grid.ravel(), jj_grid.ravel()
            p = (ii + sp) * SI_A_M
            q = (jj + sq) * ROW_PITCH_M
            d = c.dimer_atom_separation_m / 2
            pattern = self._terrace_pattern[terrace]
            up = np.where(pattern == 0, (-1.0) ** (ii + jj), (-1.0) ** jj)  # zigzag c(4x2) or p(2x2)-like rows
            xs, ys, signs = [], [], []
            for side in (-1.0, 1.0):
                qq = q + side * d
                xs.append(p * rx + qq * qx)
                ys.append(p * ry + qq * qy)
                signs.append(side * up)
            x = np.concatenate(xs)
            y = np.concatenate(ys)
            s = np.concatenate(signs)
            inside = (x >= x0) & (x < x0 + size) & (y >= y0) & (y < y0 + size)
            x, y, s = x[inside], y[inside], s[inside]
            on = self.terrace_index(x, y) == terrace
            x, y, s = x[on], y[on], s[on]
            parts.append(np.stack([x, y, np.full(x.size, c.atom_sigma_m), np.full(x.size, c.lattice_amp_m), s]))
        return np.concatenate(parts, axis=1) if parts else _empty(5)

    def _tile_components(self, key: tuple[int, int]) -> np.ndarray:
        cached = self._tiles.get(key)
        if cached is not None:
            return cached
        c = self.config
        x0, y0 = key[0] * HSI_TILE_M, key[1] * HSI_TILE_M
        lattice = self._lattice(x0, y0, HSI_TILE_M)
        rng = area_rng(self.seed, _PURPOSE["tile"], *self.index, *key)
        area_nm2 = (HSI_TILE_M / NM) ** 2
        n_atoms = lattice.shape[1]
        keep = np.ones(n_atoms, dtype=bool)
        parts = []
        # missing dimers: remove the atoms within one dimer's reach of a picked atom, leave a shallow pit
        n_md = min(int(rng.poisson(c.missing_dimer_density_per_nm2 * area_nm2)), n_atoms)
        if n_md:
            picks = rng.choice(n_atoms, n_md, replace=False)
            px, py = lattice[0, picks], lattice[1, picks]
            d2 = (lattice[0][:, None] - px[None, :]) ** 2 + (lattice[1][:, None] - py[None, :]) ** 2
            keep &= ~np.any(d2 < (c.dimer_atom_separation_m * 1.15) ** 2, axis=1)
            parts.append(np.stack([px, py, np.full(n_md, 0.25 * NM), -rng.uniform(0.3, 0.7, n_md) * ANGSTROM, np.zeros(n_md)]))
        # dangling bonds: a bright protrusion centred on an atom
        n_db = min(int(rng.poisson(c.dangling_bond_density_per_nm2 * area_nm2)), n_atoms)
        if n_db:
            picks = rng.choice(n_atoms, n_db, replace=False)
            parts.append(np.stack([lattice[0, picks], lattice[1, picks], rng.uniform(0.2, 0.3, n_db) * NM,
                                   rng.uniform(*c.dangling_bond_amp_m, n_db), np.zeros(n_db)]))
        # adsorbates: single blobs
        n_ad = int(rng.poisson(c.adsorbate_density_per_nm2 * area_nm2))
        if n_ad:
            xy = rng.uniform(0.0, HSI_TILE_M, (2, n_ad)) + np.array([[x0], [y0]])
            parts.append(np.stack([xy[0], xy[1], rng.uniform(0.3, 0.7, n_ad) * NM, rng.uniform(1.5, 4.0, n_ad) * ANGSTROM,
                                   np.zeros(n_ad)]))
        # clusters: a few blobs together
        for _ in range(int(rng.poisson(c.cluster_density_per_nm2 * area_nm2))):
            m = int(rng.integers(3, 9))
            cx, cy = rng.uniform(0.0, HSI_TILE_M, 2) + (x0, y0)
            r = float(rng.uniform(0.5, 1.5)) * NM
            parts.append(np.stack([cx + rng.normal(0.0, r / 2, m), cy + rng.normal(0.0, r / 2, m),
                                   rng.uniform(0.3, 0.6, m) * NM, rng.uniform(1.5, 5.0, m) * ANGSTROM, np.zeros(m)]))
        for p in self.patches:  # rough patches: dense random blobs, no lattice
            if not _tile_touches_disc(key, p.x_m, p.y_m, p.radius_m):
                continue
            inside = np.asarray(p.contains(lattice[0], lattice[1], margin_m=0.5 * NM), dtype=bool)
            keep &= ~inside
            n = int(rng.poisson(0.7 * area_nm2))
            pts = rng.uniform(0.0, HSI_TILE_M, (n, 2)) + (x0, y0)
            rr = np.hypot(pts[:, 0] - p.x_m, pts[:, 1] - p.y_m)
            pts = pts[rng.random(n) < 1.0 / (1.0 + np.exp((rr - p.radius_m) / (3 * NM)))]
            m = len(pts)
            if m:
                amp = rng.uniform(0.15, 0.7, m) * p.roughness_m * rng.choice([1.0, 1.0, 1.0, -0.6], m)
                parts.append(np.stack([pts[:, 0], pts[:, 1], rng.uniform(0.3, 1.4, m) * NM, amp, np.zeros(m)]))
        comps = np.concatenate([lattice[:, keep], *parts], axis=1)
        if len(self._tiles) >= c.tile_cache_size:
            self._tiles.clear()
        self._tiles[key] = comps
        return comps

    @staticmethod
    def _tile_keys(xmin: float, xmax: float, ymin: float, ymax: float) -> list[tuple[int, int]]:
        tx0, tx1 = math.floor(xmin / HSI_TILE_M), math.floor(xmax / HSI_TILE_M)
        ty0, ty1 = math.floor(ymin / HSI_TILE_M), math.floor(ymax / HSI_TILE_M)
        return [(tx, ty) for tx in range(tx0, tx1 + 1) for ty in range(ty0, ty1 + 1)]

    # --- queries ------------------------------------------------------------------------------------------
    def components_in(
        self, xmin: float, xmax: float, ymin: float, ymax: float, margin_m: float = 2 * NM,
        debris_before: int | None = None, buckling: float = 0.0,
    ) -> np.ndarray:
        """All Gaussian components (4, n) touching the box; `buckling` in [0, 1] makes dimers appear buckled."""
        xmin, xmax, ymin, ymax = xmin - margin_m, xmax + margin_m, ymin - margin_m, ymax + margin_m
        keys = self._tile_keys(xmin - _REACH_M, xmax + _REACH_M, ymin - _REACH_M, ymax + _REACH_M)
        parts = [self._tile_components(k) for k in keys]
        limit = len(self.debris_sites) if debris_before is None else debris_before
        for k in keys:
            parts.extend(comps for seq, comps in self._debris.get(k, ()) if seq < limit)
        if self._patch_bases.shape[1]:
            parts.append(self._patch_bases)
        comps = np.concatenate(parts, axis=1) if parts else _empty(5)
        x, y, s = comps[0], comps[1], 4.0 * comps[2]
        comps = comps[:, (x + s >= xmin) & (x - s <= xmax) & (y + s >= ymin) & (y - s <= ymax)]
        out = comps[:4].copy()
        if buckling:
            out[3] += buckling * self.config.lattice_amp_m * comps[4]
        return out

    def lattice_atoms_in(self, xmin: float, xmax: float, ymin: float, ymax: float) -> np.ndarray:
        """Ground truth: positions (2, n) of the lattice atoms inside the box (defect sites excluded)."""
        comps = np.concatenate([self._tile_components(k) for k in self._tile_keys(xmin, xmax, ymin, ymax)], axis=1)
        lat = comps[:, comps[4] != 0]
        inside = (lat[0] >= xmin) & (lat[0] <= xmax) & (lat[1] >= ymin) & (lat[1] <= ymax)
        return lat[:2, inside]

    def is_rough(self, x: float, y: float) -> bool:
        return any(bool(p.contains(x, y)) for p in self.patches)

    def add_debris(self, x_m: float, y_m: float, radius_m: float, height_m: float, rng: np.random.Generator) -> None:
        """Material left where a conditioning action was applied: a mound and blobs (as on the other sample)."""
        if radius_m <= 0 or height_m <= 0:
            return
        n = 3 + int(6 * radius_m / NM)
        dx, dy = rng.normal(0.0, radius_m / 2.0, (2, n))
        blobs = np.stack([x_m + dx, y_m + dy, rng.uniform(0.25, 0.6, n) * NM, rng.uniform(0.3, 0.8, n) * height_m, np.zeros(n)])
        mound = np.array([[x_m], [y_m], [max(radius_m / 2.5, 0.3 * NM)], [0.6 * height_m], [0.0]])
        comps = np.concatenate([blobs, mound], axis=1)
        tx = np.floor(comps[0] / HSI_TILE_M).astype(int)
        ty = np.floor(comps[1] / HSI_TILE_M).astype(int)
        seq = len(self.debris_sites)
        for key in sorted(set(zip(tx.tolist(), ty.tolist()))):
            self._debris.setdefault(key, []).append((seq, comps[:, (tx == key[0]) & (ty == key[1])]))
        self.debris_sites.append((x_m, y_m, radius_m))


def _tile_touches_disc(key: tuple[int, int], x: float, y: float, r: float) -> bool:
    x0, y0 = key[0] * HSI_TILE_M, key[1] * HSI_TILE_M
    cx = min(max(x, x0), x0 + HSI_TILE_M)
    cy = min(max(y, y0), y0 + HSI_TILE_M)
    return (cx - x) ** 2 + (cy - y) ** 2 <= (r + 10 * NM) ** 2


class HsiSample(AreaCache[HsiSampleArea]):
    """All approach areas of one H:Si(100) sample; areas are created on first use and kept."""

    def __init__(self, seed: int, config: HsiSampleConfig | None = None) -> None:
        self.seed = seed
        self.config = config or HsiSampleConfig()
        super().__init__(lambda key: HsiSampleArea(self.seed, key, self.config))
