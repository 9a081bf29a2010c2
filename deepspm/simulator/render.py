"""Images: the sample seen through the probe, plus the piezo's z, noise and scan artefacts.

Pipeline for one frame (all vectorised numpy, no per-pixel Python):
1. topography per apex: every Gaussian component blurred by the apex (variances add, volume is kept) and
   shifted by the apex offset, evaluated on the pixel grid as one matrix product (the Gaussians separate in
   the frame's own axes, so rotation costs nothing); steps as error-function edges per pixel;
2. apices combined by the tunnelling sum (see `probe`), per kernel; a kernel map picks, pixel by pixel,
   which kernel was on the tip (tip changes mid-scan, flicker of unstable tips);
3. absolute z: the piezo z needed for the setpoint (drift, creep, jumps, evaluated at each line's time) +
   sample tilt + topography + white noise + a per-line offset random walk + streaks, clipped to the z limits
   (lost contact reads the low limit, a crash the high limit, exactly constant: the piezo is saturated);
4. xy creep after a move: each line is displaced along the move; the fast-axis part is applied by
   resampling an extended render, the slow-axis part by moving the line.

Frame geometry: the frame's u axis is the fast scan axis, v the slow axis; the Nanonis angle is clockwise
positive. Rows are returned in acquisition order (row 0 = first line scanned: the bottom line of an up-scan,
the top line of a down-scan); columns left to right (-u to +u) for both forward and backward data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import ndtr

from deepspm.simulator.probe import ANGSTROM, BETA_PER_M, Apex
from deepspm.simulator.sample import SampleArea, area_rng

if TYPE_CHECKING:
    from deepspm.simulator.hsi import HsiSampleArea

try:  # installed with scikit-learn; optional here
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

NM = 1e-9
STEP_EDGE_WIDTH_M = 0.12 * NM
CURRENT_SATURATION_A = 1e-8  # the preamplifier's limit (10 V at 1e9 V/A)
_NOISE_PURPOSE = 41


@dataclass(frozen=True)
class FrameGeometry:
    centre_x_m: float
    centre_y_m: float
    width_m: float
    height_m: float
    angle_deg: float
    pixels: int
    lines: int
    scan_up: bool = True

    def axes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Unit vectors of the fast (u) and slow (v) axes in sample coordinates (angle clockwise positive)."""
        a = math.radians(self.angle_deg)
        return (math.cos(a), -math.sin(a)), (math.sin(a), math.cos(a))

    @property
    def pixel_m(self) -> float:
        return self.width_m / self.pixels

    def u(self) -> np.ndarray:
        return (np.arange(self.pixels) + 0.5) * (self.width_m / self.pixels) - self.width_m / 2

    def v(self) -> np.ndarray:
        """Slow-axis coordinate of each row, in acquisition order."""
        v = (np.arange(self.lines) + 0.5) * (self.height_m / self.lines) - self.height_m / 2
        return v if self.scan_up else v[::-1].copy()

    def corners(self, margin_m: float = 0.0) -> tuple[float, float, float, float]:
        """Bounding box (xmin, xmax, ymin, ymax) of the frame in sample coordinates."""
        (ux, uy), (vx, vy) = self.axes()
        hw, hh = self.width_m / 2 + margin_m, self.height_m / 2 + margin_m
        xs = [self.centre_x_m + su * hw * ux + sv * hh * vx for su in (-1, 1) for sv in (-1, 1)]
        ys = [self.centre_y_m + su * hw * uy + sv * hh * vy for su in (-1, 1) for sv in (-1, 1)]
        return min(xs), max(xs), min(ys), max(ys)


class _SingleThreadBlas:
    """Run the small per-frame matrix products on one BLAS thread.

    OpenBLAS splits even 64 x 150 x 64 products over all cores, which halves the frame rate on this
    2-core machine (thread hand-off costs more than the product). The limit is applied only around the
    product (about 8 us), never process-wide.
    """

    def __init__(self) -> None:
        self._blas: Any = None  # threadpoolctl's controller, selected on first use

    def __call__(self):  # -> context manager
        if ThreadpoolController is None:
            return contextlib.nullcontext()
        if self._blas is None:
            self._blas = ThreadpoolController().select(user_api="blas")
        return self._blas.limit(limits=1)


_single_thread_blas = _SingleThreadBlas()


def _gaussian_layers(
    comps: np.ndarray, apices: tuple[Apex, ...], geom: FrameGeometry, u: np.ndarray, v: np.ndarray
) -> np.ndarray:
    """Gaussian part of the topography seen by each apex, (apices, lines, len(u)) float32 in Angstrom.

    Runs in float32 with nanometre/Angstrom units (values near 1, no denormals): for every apex the blurred
    components are tabulated along each frame axis and summed by one (batched) matrix product.
    """
    k = len(apices)
    if comps.shape[1] == 0:
        return np.zeros((k, len(v), len(u)), dtype=np.float32)
    (ux, uy), (vx, vy) = geom.axes()
    ox = np.array([geom.centre_x_m + a.dx_m for a in apices])[:, None]
    oy = np.array([geom.centre_y_m + a.dy_m for a in apices])[:, None]
    s2 = np.array([a.width_m**2 for a in apices])[:, None]
    cx, cy, sig, amp = comps
    sig2 = sig * sig
    var = sig2[None, :] + s2
    a = (amp * sig2 / var / ANGSTROM).astype(np.float32)
    cu = (((cx - ox) * ux + (cy - oy) * uy) / NM).astype(np.float32)
    cv = (((cx - ox) * vx + (cy - oy) * vy) / NM).astype(np.float32)
    inv = (-0.5 * NM * NM / var).astype(np.float32)
    gx = _gauss_table(inv, cu, (u / NM).astype(np.float32))
    gy = _gauss_table(inv, cv, (v / NM).astype(np.float32))
    gx *= a[:, :, None]
    with _single_thread_blas():
        return np.matmul(gy.transpose(0, 2, 1), gx)


def _gauss_table(inv: np.ndarray, centre: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """exp(inv * (axis - centre)^2) as (apices, components, len(axis)) float32, floored at exp(-27)."""
    arg = axis[None, None, :] - centre[:, :, None]
    arg *= arg
    arg *= inv[:, :, None]
    np.maximum(arg, np.float32(-27.0), out=arg)  # floor at 2e-12: products stay far above float32's denormals
    np.exp(arg, out=arg)
    return arg


def _steps(
    area: SampleArea | HsiSampleArea, apices: tuple[Apex, ...], geom: FrameGeometry, u: np.ndarray, v: np.ndarray
) -> list[np.ndarray | float]:
    """Terrace height seen by each apex (metres): a constant where no step crosses, error-function edges otherwise."""
    (ux, uy), (vx, vy) = geom.axes()
    ox = np.array([geom.centre_x_m + a.dx_m for a in apices])
    oy = np.array([geom.centre_y_m + a.dy_m for a in apices])
    edge = np.sqrt(np.array([a.width_m**2 for a in apices]) + STEP_EDGE_WIDTH_M**2)
    cu = np.array([u[0], u[-1], u[0], u[-1]])
    cv = np.array([v.min(), v.min(), v.max(), v.max()])
    t = area.step_table
    # the linear part of the signed distance at the corners bounds it over the whole frame: (apices, steps, 4)
    cx = ox[:, None] + (cu * ux + cv * vx)[None, :]
    cy = oy[:, None] + (cu * uy + cv * vy)[None, :]
    lin = t[None, :, 0:1] * cx[:, None, :] + t[None, :, 1:2] * cy[:, None, :] - t[None, :, 2:3]
    slack = t[None, :, 4] + 6 * edge[:, None]
    above = lin.min(axis=2) > slack
    crossing = ~above & (lin.max(axis=2) >= -slack)
    out: list[np.ndarray | float] = []
    for k in range(len(apices)):
        h: np.ndarray | float = float(t[above[k], 3].sum())
        for i in np.flatnonzero(crossing[k]):
            s = area.steps[i]
            x = ox[k] + u[None, :] * ux + v[:, None] * vx
            y = oy[k] + u[None, :] * uy + v[:, None] * vy
            h = h + s.height_m * ndtr(s.signed_distance(x, y) / edge[k])
        out.append(h)
    return out


def render_topography(
    area: SampleArea | HsiSampleArea, apices: tuple[Apex, ...], geom: FrameGeometry,
    du_rows: np.ndarray | None = None, dv_rows: np.ndarray | None = None, debris_before: int | None = None,
    buckling: float = 0.0,
) -> np.ndarray:
    """Apparent height (lines, pixels) in metres of the frame seen through a probe kernel.

    `du_rows`/`dv_rows` displace each row along the fast/slow axis (metres; xy creep, hysteresis).
    `buckling`: tip-induced dimer buckling on the H:Si(100) surface (0 = none; other samples take only 0).
    """
    u = geom.u()
    v = geom.v() if dv_rows is None else geom.v() + dv_rows
    px = geom.pixel_m
    margin = 0
    if du_rows is not None and np.any(du_rows != 0.0):
        margin = int(math.ceil(float(np.max(np.abs(du_rows))) / px)) + 1
        u = np.concatenate([u[0] - px * np.arange(margin, 0, -1), u, u[-1] + px * np.arange(1, margin + 1)])
    reach = max(math.hypot(a.dx_m, a.dy_m) + 4 * a.width_m for a in apices) + margin * px
    xmin, xmax, ymin, ymax = geom.corners(margin_m=reach + (0.0 if dv_rows is None else float(np.max(np.abs(dv_rows)))))
    extra = {"buckling": buckling} if buckling else {}
    comps = area.components_in(xmin, xmax, ymin, ymax, margin_m=0.0, debris_before=debris_before, **extra)
    layers = _gaussian_layers(comps, apices, geom, u, v)  # Angstrom, float32
    if area.steps:
        for i, terrace in enumerate(_steps(area, apices, geom, u, v)):
            layers[i] += np.asarray(np.asarray(terrace) / ANGSTROM, dtype=np.float32)
    if len(apices) == 1:
        img = layers[0]
    else:
        w = np.array([a.weight for a in apices], dtype=np.float32)
        w /= w.sum()
        top = layers.max(axis=0)
        layers -= top
        layers *= np.float32(BETA_PER_M * ANGSTROM)
        np.exp(layers, out=layers)
        img = top + np.log(np.tensordot(w, layers, axes=1)) / np.float32(BETA_PER_M * ANGSTROM)
    img = img.astype(np.float64) * ANGSTROM
    if margin and du_rows is not None:  # margin > 0 only with du_rows
        # linear resampling of each row at its displaced positions (always inside the extended columns)
        pos = np.add.outer(du_rows / px, np.arange(margin, margin + geom.pixels, dtype=float))
        i0 = pos.astype(np.intp)
        f = pos - i0
        flat = img.ravel()
        idx = i0 + (np.arange(img.shape[0]) * img.shape[1])[:, None]
        left = flat[idx]
        img = left + (flat[idx + 1] - left) * f
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Streak:
    row: int
    col: int
    length: int
    amplitude_m: float


@dataclass(frozen=True)
class ScanPlan:
    """Everything needed to render one frame, fixed when the scan starts (so rendering can be lazy)."""

    seed: int
    scan_id: int
    area: SampleArea | HsiSampleArea
    geometry: FrameGeometry
    t_start_s: float
    fwd_line_s: float
    bwd_line_s: float
    kernels: tuple[tuple[Apex, ...], ...]
    kernel_map: np.ndarray  # (lines, pixels) index into kernels, in acquisition order
    noise_m: float
    line_noise_m: float
    streaks: tuple[Streak, ...]
    z_needed: Callable[[np.ndarray], np.ndarray]  # piezo z for the setpoint over bare terrace at area origin
    # (evaluated once, at construction, for every line: later changes of the instrument do not leak in)
    z_low_m: float
    z_high_m: float
    z_mode: str  # "feedback" | "hold" (controller off, z held at z_hold_m)
    z_hold_m: float
    setpoint_A: float
    bias_V: float
    creep_m: tuple[float, float]  # (x, y) displacement still to come at creep_t0_s (sample coordinates)
    creep_t0_s: float
    creep_tau_s: float
    debris_count: int  # debris clusters present on the area when the scan started
    hysteresis_m: float = 0.25 * NM  # backward lines are displaced by this along +u
    kernel_buckling: tuple[float, ...] = ()  # per kernel (H:Si tip-induced buckling); empty = none
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        times = np.concatenate([*self.pixel_times(True), *self.pixel_times(False)])
        z = np.asarray(self.z_needed(times), dtype=float).reshape(4, -1)
        self._cache[("zline", True)] = (z[0], z[1])
        self._cache[("zline", False)] = (z[2], z[3])

    @property
    def line_s(self) -> float:
        return self.fwd_line_s + self.bwd_line_s

    @property
    def duration_s(self) -> float:
        return self.geometry.lines * self.line_s

    def pixel_times(self, forward: bool) -> tuple[np.ndarray, np.ndarray]:
        """Times (lines,) at which each line's first and last pixel (in column order) are acquired."""
        k = np.arange(self.geometry.lines) * self.line_s + self.t_start_s
        if forward:
            return k, k + self.fwd_line_s
        return k + self.fwd_line_s + self.bwd_line_s, k + self.fwd_line_s  # backward runs right to left

    def _creep_rows(self, forward: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        cx, cy = self.creep_m
        (ux, uy), (vx, vy) = self.geometry.axes()
        t_first, t_last = self.pixel_times(forward)
        t_mid = 0.5 * (t_first + t_last)
        if self.creep_tau_s > 0:
            decay = np.exp(-np.maximum(t_mid - self.creep_t0_s, 0.0) / self.creep_tau_s)
        else:
            decay = np.zeros_like(t_mid)
        du = -(cx * ux + cy * uy) * decay
        dv = -(cx * vx + cy * vy) * decay
        if not forward:
            du = du + self.hysteresis_m
        if np.max(np.abs(du)) < 1e-3 * self.geometry.pixel_m:
            du = None
        if np.max(np.abs(dv)) < 1e-3 * self.geometry.pixel_m:
            dv = None
        return du, dv

    def topography(self, forward: bool) -> np.ndarray:
        key = ("topo", forward)
        if key not in self._cache:
            du, dv = self._creep_rows(forward)
            used = np.unique(self.kernel_map) if len(self.kernels) > 1 else (0,)
            buckle = self.kernel_buckling or (0.0,) * len(self.kernels)
            if len(used) == 1:
                k = int(used[0])
                topo = render_topography(self.area, self.kernels[k], self.geometry, du, dv, self.debris_count, buckle[k])
            else:
                topo = np.empty((self.geometry.lines, self.geometry.pixels))
                for i in used:
                    img = render_topography(self.area, self.kernels[int(i)], self.geometry, du, dv, self.debris_count,
                                            buckle[int(i)])
                    mask = self.kernel_map == i
                    topo[mask] = img[mask]
            self._cache[key] = topo
        return self._cache[key]

    def _z_base(self, forward: bool) -> np.ndarray:
        """Piezo z for the setpoint over the bare terrace at each pixel (drift in time, tilt in space)."""
        g = self.geometry
        z0, z1 = self._cache[("zline", forward)]
        frac = (np.arange(g.pixels) + 0.5) / g.pixels
        (ux, uy), (vx, vy) = g.axes()
        sx, sy = self.area.tilt
        along_u = (sx * ux + sy * uy) * g.u()  # the sample's tilt along each frame axis
        along_v = (sx * vx + sy * vy) * g.v() + sx * g.centre_x_m + sy * g.centre_y_m
        return np.add.outer(z0 + along_v, along_u) + np.multiply.outer(z1 - z0, frac)

    def _surface(self, forward: bool) -> np.ndarray:
        """z the feedback wants at each pixel (before noise and limits): drift + tilt + topography + streaks."""
        key = ("surface", forward)
        if key in self._cache:
            return self._cache[key]
        g = self.geometry
        surface = self._z_base(forward) + self.topography(forward)
        for s in self.streaks:
            end = min(g.pixels, s.col + s.length)
            tail = np.exp(-np.arange(end - s.col) / max(1.0, s.length / 2.0))
            cols = slice(s.col, end) if forward else slice(g.pixels - end, g.pixels - s.col)
            surface[s.row, cols] += s.amplitude_m * (tail if forward else tail[::-1])
        self._cache[key] = surface
        return surface

    def _rng(self, forward: bool, channel: int) -> np.random.Generator:
        return area_rng(self.seed, _NOISE_PURPOSE, self.scan_id, int(forward), channel)

    def z(self, forward: bool) -> np.ndarray:
        """Absolute z (lines, pixels) in metres, float32, acquisition order."""
        key = ("z", forward)
        if key in self._cache:
            return self._cache[key]
        g = self.geometry
        surface = self._surface(forward)
        if self.z_mode == "feedback":
            rng = self._rng(forward, 0)
            noise = rng.standard_normal((g.lines, g.pixels)) * self.noise_m
            noise += (np.cumsum(rng.standard_normal(g.lines)) * self.line_noise_m)[:, None]
            z = np.clip(surface + noise, self.z_low_m, self.z_high_m)
        else:
            z = np.full_like(surface, self.z_hold_m)
        out = z.astype(np.float32)
        self._cache[key] = out
        return out

    def current(self, forward: bool) -> np.ndarray:
        """Tunnelling current (lines, pixels) in amperes, float32, acquisition order."""
        key = ("current", forward)
        if key in self._cache:
            return self._cache[key]
        surface = self._surface(forward)
        noise = self._rng(forward, 1).standard_normal(surface.shape)
        if self.z_mode == "feedback":
            # in range the loop holds the setpoint, with an error on slopes along the scan direction; beyond
            # the z limits the gap is off by how far the piezo could not follow
            slope = np.gradient(self.topography(forward), axis=1) * (1.0 if forward else -1.0)
            beyond = surface - np.clip(surface, self.z_low_m, self.z_high_m)
            exponent = BETA_PER_M * (0.2 * slope + beyond) + 0.03 * noise
        else:
            exponent = BETA_PER_M * (surface - self.z_hold_m) + 0.03 * noise
        current = self.setpoint_A * np.exp(np.clip(exponent, -700.0, 50.0))
        current = np.minimum(current, CURRENT_SATURATION_A) * math.copysign(1.0, self.bias_V or 1.0)
        out = current.astype(np.float32)
        self._cache[key] = out
        return out
