"""The sample: MgPc-like molecules on Ag(100), one lazily generated surface per approach area.

Coordinates: metres in the fine-piezo frame of an approach area (x = y = 0 at the area's centre, the piezo
reaches +-425 nm). Heights: metres above the lowest-order terrace; the renderer adds piezo z and tilt.

Every feature is a sum of isotropic Gaussians ("components": x, y, sigma, amplitude), except monatomic
steps, which are meandering lines. That keeps rendering cheap (Gaussian blur of a Gaussian is a Gaussian,
and a sum of Gaussians on a pixel grid is one small matrix product).

What an area holds (all deterministic from (seed, area index), generated only where a frame looks):
- terraces separated by monatomic Ag(100) steps (2.04 Angstrom), mostly a staircase, gently meandering;
- molecules (four lobes + a centre, ~1.5 nm across, ~2 Angstrom apparent height), two rotational domains
  (+-22.5 deg), placed by random sequential adsorption with a 1.7 nm hard core, in 20 nm tiles;
- a few adatoms/impurities (small round protrusions);
- rough, contaminated patches ("bad sample"): discs of dense random clusters, several Angstrom high;
- debris, added at run time where conditioning actions were applied (`add_debris`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

NM = 1e-9
ANGSTROM = 1e-10
AREA_PITCH_M = 850e-9  # one approach area = the fine piezo range
HALF_AREA_M = AREA_PITCH_M / 2
TILE_M = 20e-9
AG100_STEP_M = 2.04 * ANGSTROM

# apparent-shape parameters of one MgPc molecule (chosen so a good tip images it ~2 Angstrom high, 1.5 nm wide)
LOBE_RADIUS_M = 0.56 * NM
LOBE_SIGMA_M = 0.17 * NM
LOBE_AMP_M = 3.1 * ANGSTROM
CENTRE_SIGMA_M = 0.28 * NM
CENTRE_AMP_M = 1.0 * ANGSTROM
MOLECULE_HARD_CORE_M = 1.7 * NM

_MAX_LOCAL_FOOTPRINT_M = 8 * NM  # 4 sigma + centre offset of any tile-stored component (debris radius <= 5 nm)
_PURPOSE = {"layout": 1, "tile": 2, "patch_blobs": 3}


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a bijective scramble of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def area_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator keyed by the root seed and integer keys (negative keys allowed).

    Philox with a 128-bit key derived from the keys: independent streams per key tuple, and about twice as
    cheap to create as a SeedSequence-seeded PCG64 (the simulator creates a few per frame).
    """
    h = _mix64(int(seed) & _MASK64)
    for k in keys:
        h = _mix64(h ^ (int(k) & _MASK64))
    return np.random.Generator(np.random.Philox(key=(h << 64) | _mix64(h ^ 0x5851F42D4C957F2D)))


@dataclass(frozen=True)
class SampleConfig:
    molecule_density_per_nm2: float = 0.06  # mean over areas (sub-monolayer: ~6 molecules per 10 nm frame)
    molecule_density_spread: float = 0.35  # per-area log-normal spread of the density
    adatom_density_per_nm2: float = 0.004
    mean_terrace_width_m: float = 150e-9
    bad_patch_density_per_um2: float = 2.5  # rough patches per square micrometre (~1.8 per area)
    bad_patch_radius_m: tuple[float, float] = (20e-9, 90e-9)
    bad_patch_roughness_m: tuple[float, float] = (3 * ANGSTROM, 8 * ANGSTROM)
    tilt_rms: float = 0.004  # sample slope relative to the piezo plane (rad), per axis
    tile_cache_size: int = 4096


@dataclass(frozen=True)
class Step:
    """A monatomic step: height `height_m` is added where signed_distance >= 0."""

    nx: float
    ny: float
    offset_m: float
    height_m: float
    meander_amp_m: float
    meander_k_per_m: float
    meander_phase: float

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        along = -self.ny * x + self.nx * y
        meander = self.meander_amp_m * np.sin(self.meander_k_per_m * along + self.meander_phase)
        return self.nx * x + self.ny * y - self.offset_m - meander


@dataclass(frozen=True)
class Patch:
    x_m: float
    y_m: float
    radius_m: float
    roughness_m: float

    def contains(self, x: np.ndarray | float, y: np.ndarray | float, margin_m: float = 0.0) -> np.ndarray | bool:
        return (np.asarray(x) - self.x_m) ** 2 + (np.asarray(y) - self.y_m) ** 2 <= (self.radius_m + margin_m) ** 2


def make_patches(rng: np.random.Generator, density_per_um2: float, radius_m: tuple[float, float],
                 roughness_m: tuple[float, float]) -> tuple[Patch, ...]:
    """An approach area's bad patches: a Poisson number at `density_per_um2`, placed uniformly, radius and
    roughness drawn from their ranges (every surface draws them in this order, so an area is reproducible)."""
    n = int(rng.poisson(density_per_um2 * (AREA_PITCH_M / 1e-6) ** 2))
    patches = []
    for _ in range(n):
        x, y = rng.uniform(-HALF_AREA_M, HALF_AREA_M, 2)
        patches.append(Patch(float(x), float(y), float(rng.uniform(*radius_m)), float(rng.uniform(*roughness_m))))
    return tuple(patches)


def step_table(steps: Sequence[Step]) -> np.ndarray:
    """(n, 7) columns nx, ny, offset, height, meander amplitude, meander k, phase: the steps, for vectorised queries."""
    return np.array(
        [(st.nx, st.ny, st.offset_m, st.height_m, st.meander_amp_m, st.meander_k_per_m, st.meander_phase)
         for st in steps]
    ).reshape(-1, 7)


def _empty() -> np.ndarray:
    return np.zeros((4, 0))


def molecule_components(x: np.ndarray, y: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Five Gaussians per molecule (four lobes and the centre) as a (4, 5n) array: x, y, sigma, amplitude."""
    n = len(x)
    lobe_angles = angle[:, None] + np.arange(4)[None, :] * (math.pi / 2)
    lx = x[:, None] + LOBE_RADIUS_M * np.cos(lobe_angles)
    ly = y[:, None] + LOBE_RADIUS_M * np.sin(lobe_angles)
    cx = np.concatenate([lx.ravel(), x])
    cy = np.concatenate([ly.ravel(), y])
    sig = np.concatenate([np.full(4 * n, LOBE_SIGMA_M), np.full(n, CENTRE_SIGMA_M)])
    amp = np.concatenate([np.full(4 * n, LOBE_AMP_M), np.full(n, CENTRE_AMP_M)])
    return np.stack([cx, cy, sig, amp])


class SampleArea:
    """The surface of one approach area. Cheap to create; tiles are generated on demand and cached."""

    def __init__(self, seed: int, index: tuple[int, int], config: SampleConfig) -> None:
        self.seed = seed
        self.index = (int(index[0]), int(index[1]))
        self.config = config
        rng = area_rng(seed, _PURPOSE["layout"], *self.index)
        c = config
        spread = math.exp(c.molecule_density_spread * float(rng.normal()))
        self.molecule_density_per_m2 = c.molecule_density_per_nm2 * spread / NM**2
        self.tilt = (float(rng.normal(0.0, c.tilt_rms)), float(rng.normal(0.0, c.tilt_rms)))
        self.base_z_m = float(rng.normal(0.0, 60e-9))  # macroscopic height of this area relative to its neighbours
        # Matern-II thinning keeps a fraction (1 - exp(-x)) / x of candidates, x = candidate density * core area
        core = math.pi * MOLECULE_HARD_CORE_M**2
        target = min(self.molecule_density_per_m2 * core, 0.95)
        self._candidate_density_per_m2 = -math.log(1.0 - target) / core
        self.steps = self._make_steps(rng)
        self.step_table = step_table(self.steps)
        self.patches = make_patches(rng, c.bad_patch_density_per_um2, c.bad_patch_radius_m, c.bad_patch_roughness_m)
        self._raw_tiles: dict[tuple[int, int], np.ndarray] = {}
        self._tiles: dict[tuple[int, int], np.ndarray] = {}
        self._debris: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}  # tile -> (cluster number, comps)
        self.debris_sites: list[tuple[float, float, float]] = []  # (x, y, radius) of every debris cluster
        patch_bases = [
            (p.x_m, p.y_m, p.radius_m / 2.0, 0.8 * p.roughness_m) for p in self.patches
        ]
        self._patch_bases = np.array(patch_bases, dtype=float).T if patch_bases else _empty()

    # --- layout -------------------------------------------------------------------------------------------
    def _make_steps(self, rng: np.random.Generator) -> tuple[Step, ...]:
        span = 1.6 * AREA_PITCH_M  # steps may cross the area anywhere, corners included
        n = int(rng.poisson(span / self.config.mean_terrace_width_m))
        theta0 = float(rng.uniform(0, 2 * math.pi))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        steps = []
        for offset in np.sort(rng.uniform(-span / 2, span / 2, n)):
            theta = theta0 + float(rng.normal(0.0, 0.12))
            s = sign if rng.random() < 0.9 else -sign
            steps.append(
                Step(math.cos(theta), math.sin(theta), float(offset), s * AG100_STEP_M,
                     float(rng.uniform(2e-9, 12e-9)), 2 * math.pi / float(rng.uniform(80e-9, 300e-9)),
                     float(rng.uniform(0, 2 * math.pi)))
            )
        return tuple(steps)

    # --- tiles --------------------------------------------------------------------------------------------
    def _raw_molecules(self, key: tuple[int, int]) -> np.ndarray:
        """Candidate molecules of one tile (4, n): x, y, angle, priority mark."""
        cached = self._raw_tiles.get(key)
        if cached is not None:
            return cached
        rng = area_rng(self.seed, _PURPOSE["tile"], *self.index, *key)
        n = int(rng.poisson(self._candidate_density_per_m2 * TILE_M**2))
        xy = rng.uniform(0.0, TILE_M, (2, n)) + np.array([[key[0] * TILE_M], [key[1] * TILE_M]])
        domain = np.where(rng.random(n) < 0.5, 1.0, -1.0)
        angles = domain * math.radians(22.5) + rng.normal(0.0, math.radians(3.0), n)
        raw = np.vstack([xy, angles, rng.random(n)])
        if len(self._raw_tiles) >= self.config.tile_cache_size:
            self._raw_tiles.clear()
        self._raw_tiles[key] = raw
        return raw

    def molecules_in_tile(self, key: tuple[int, int]) -> np.ndarray:
        """Final molecules (3, n: x, y, angle) of a tile.

        Hard core by Matern type-II thinning: a candidate survives unless another candidate (in this tile or
        a neighbouring one) closer than the hard core has a smaller priority mark. The result depends only on
        (seed, area, tile), never on the order in which tiles are visited; molecules avoid rough patches.
        """
        raw = self._raw_molecules(key)
        if raw.shape[1] == 0:
            return raw[:3]
        tx, ty = key
        near = np.concatenate([self._raw_molecules((tx + i, ty + j)) for i in (-1, 0, 1) for j in (-1, 0, 1)], axis=1)
        d2 = (raw[0][:, None] - near[0][None, :]) ** 2 + (raw[1][:, None] - near[1][None, :]) ** 2
        beaten = (d2 < MOLECULE_HARD_CORE_M**2) & (near[3][None, :] < raw[3][:, None])
        keep = ~np.any(beaten, axis=1)
        for p in self.patches:
            keep &= ~np.asarray(p.contains(raw[0], raw[1], margin_m=1 * NM), dtype=bool)
        return raw[:3, keep]

    def _tile_components(self, key: tuple[int, int]) -> np.ndarray:
        cached = self._tiles.get(key)
        if cached is not None:
            return cached
        mol = self.molecules_in_tile(key)
        parts = [molecule_components(mol[0], mol[1], mol[2])]
        rng = area_rng(self.seed, _PURPOSE["patch_blobs"], *self.index, *key)
        x0, y0 = key[0] * TILE_M, key[1] * TILE_M
        n_ad = int(rng.poisson(self.config.adatom_density_per_nm2 * (TILE_M / NM) ** 2))
        ad = rng.uniform(0.0, TILE_M, (n_ad, 2)) + (x0, y0)
        if n_ad:
            parts.append(np.stack([ad[:, 0], ad[:, 1], np.full(n_ad, 0.25 * NM), rng.uniform(0.6, 1.0, n_ad) * ANGSTROM]))
        for p in self.patches:
            if not self._tile_touches_disc(key, p.x_m, p.y_m, p.radius_m):
                continue
            n = int(rng.poisson(0.7 * (TILE_M / NM) ** 2))
            pts = rng.uniform(0.0, TILE_M, (n, 2)) + (x0, y0)
            r = np.hypot(pts[:, 0] - p.x_m, pts[:, 1] - p.y_m)
            inside = rng.random(n) < 1.0 / (1.0 + np.exp((r - p.radius_m) / (3 * NM)))
            pts = pts[inside]
            m = len(pts)
            if m:
                sig = rng.uniform(0.3, 1.4, m) * NM
                amp = rng.uniform(0.15, 0.7, m) * p.roughness_m * rng.choice([1.0, 1.0, 1.0, -0.6], m)
                parts.append(np.stack([pts[:, 0], pts[:, 1], sig, amp]))
        comps = np.concatenate(parts, axis=1) if parts else _empty()
        if len(self._tiles) >= self.config.tile_cache_size:
            self._tiles.clear()
        self._tiles[key] = comps
        return comps

    @staticmethod
    def _tile_touches_disc(key: tuple[int, int], x: float, y: float, r: float) -> bool:
        x0, y0 = key[0] * TILE_M, key[1] * TILE_M
        cx = min(max(x, x0), x0 + TILE_M)
        cy = min(max(y, y0), y0 + TILE_M)
        return (cx - x) ** 2 + (cy - y) ** 2 <= (r + 10 * NM) ** 2

    @staticmethod
    def _tile_keys(xmin: float, xmax: float, ymin: float, ymax: float) -> list[tuple[int, int]]:
        tx0, tx1 = math.floor(xmin / TILE_M), math.floor(xmax / TILE_M)
        ty0, ty1 = math.floor(ymin / TILE_M), math.floor(ymax / TILE_M)
        return [(tx, ty) for tx in range(tx0, tx1 + 1) for ty in range(ty0, ty1 + 1)]

    # --- queries ------------------------------------------------------------------------------------------
    def components_in(
        self, xmin: float, xmax: float, ymin: float, ymax: float, margin_m: float = 2 * NM, debris_before: int | None = None,
    ) -> np.ndarray:
        """All Gaussian components (4, n) whose 4-sigma footprint touches the box (expanded by `margin_m`).

        `debris_before`: only debris clusters added before that many clusters existed (a frame started
        earlier must not show debris added later); None = all.
        """
        xmin, xmax, ymin, ymax = xmin - margin_m, xmax + margin_m, ymin - margin_m, ymax + margin_m
        reach = _MAX_LOCAL_FOOTPRINT_M  # a component stored in a neighbouring tile may still reach into the box
        keys = self._tile_keys(xmin - reach, xmax + reach, ymin - reach, ymax + reach)
        parts = [self._tile_components(k) for k in keys]
        limit = len(self.debris_sites) if debris_before is None else debris_before
        for k in keys:
            parts.extend(comps for seq, comps in self._debris.get(k, ()) if seq < limit)
        if self._patch_bases.shape[1]:
            parts.append(self._patch_bases)
        comps = np.concatenate(parts, axis=1) if parts else _empty()
        x, y, s = comps[0], comps[1], 4.0 * comps[2]
        inside = (x + s >= xmin) & (x - s <= xmax) & (y + s >= ymin) & (y - s <= ymax)
        return comps[:, inside]

    def molecules_in(self, xmin: float, xmax: float, ymin: float, ymax: float) -> np.ndarray:
        """Molecule centres and angles (3, n) inside the box (ground truth, for tests and evaluation)."""
        keys = self._tile_keys(xmin, xmax, ymin, ymax)
        mol = np.concatenate([self.molecules_in_tile(k) for k in keys], axis=1)
        inside = (mol[0] >= xmin) & (mol[0] <= xmax) & (mol[1] >= ymin) & (mol[1] <= ymax)
        return mol[:, inside]

    def terrace_height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Sharp terrace height (no blur) at points, metres."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        if not self.steps:
            return np.zeros(x.shape)
        t = self.step_table
        xf, yf = x.reshape(1, -1), y.reshape(1, -1)
        along = -t[:, 1:2] * xf + t[:, 0:1] * yf
        sd = t[:, 0:1] * xf + t[:, 1:2] * yf - t[:, 2:3] - t[:, 4:5] * np.sin(t[:, 5:6] * along + t[:, 6:7])
        return ((sd >= 0) * t[:, 3:4]).sum(axis=0).reshape(x.shape)

    def is_rough(self, x: float, y: float) -> bool:
        """Ground truth: whether (x, y) lies in a contaminated patch."""
        return any(bool(p.contains(x, y)) for p in self.patches)

    def add_debris(self, x_m: float, y_m: float, radius_m: float, height_m: float, rng: np.random.Generator) -> None:
        """Leave a cluster of material at (x, y): a central mound of `height_m` and smaller blobs around it."""
        if radius_m <= 0 or height_m <= 0:
            return
        n = 3 + int(6 * radius_m / NM)
        dx, dy = rng.normal(0.0, radius_m / 2.0, (2, n))
        sig = rng.uniform(0.25, 0.6, n) * NM
        amp = rng.uniform(0.3, 0.8, n) * height_m
        blobs = np.stack([x_m + dx, y_m + dy, sig, amp])
        mound = np.array([[x_m], [y_m], [max(radius_m / 2.5, 0.3 * NM)], [0.6 * height_m]])
        comps = np.concatenate([blobs, mound], axis=1)
        tx = np.floor(comps[0] / TILE_M).astype(int)
        ty = np.floor(comps[1] / TILE_M).astype(int)
        seq = len(self.debris_sites)
        for key in sorted(set(zip(tx.tolist(), ty.tolist()))):
            self._debris.setdefault(key, []).append((seq, comps[:, (tx == key[0]) & (ty == key[1])]))
        self.debris_sites.append((x_m, y_m, radius_m))


AreaT = TypeVar("AreaT")


class AreaCache(Generic[AreaT]):
    """The approach areas of one sample, made by `make(key)` on first use and kept (any surface)."""

    def __init__(self, make: Callable[[tuple[int, int]], AreaT]) -> None:
        self._make = make
        self._areas: dict[tuple[int, int], AreaT] = {}

    def area(self, index: tuple[int, int]) -> AreaT:
        key = (int(index[0]), int(index[1]))
        area = self._areas.get(key)
        if area is None:
            area = self._areas[key] = self._make(key)
        return area


class Sample(AreaCache[SampleArea]):
    """All approach areas of one sample; areas are created on first use and kept."""

    def __init__(self, seed: int, config: SampleConfig | None = None) -> None:
        self.seed = seed
        self.config = config or SampleConfig()
        super().__init__(lambda key: SampleArea(self.seed, key, self.config))
