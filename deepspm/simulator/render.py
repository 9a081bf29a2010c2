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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

from deepspm.simulator.probe import ANGSTROM, BETA_PER_M, Apex
from deepspm.simulator.sample import SampleArea, area_rng

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


def _apex_topography(area: SampleArea, comps: np.ndarray, apex: Apex, geom: FrameGeometry, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Topography (lines, len(u)) in metres seen by one apex; u may be wider than the frame (creep resampling).

    The Gaussian part runs in float32 with nanometre/Angstrom units (values near 1, no denormals): the
    blurred components are tabulated along each axis and summed by one matrix product.
    """
    (ux, uy), (vx, vy) = geom.axes()
    ox, oy = geom.centre_x_m + apex.dx_m, geom.centre_y_m + apex.dy_m
    if comps.shape[1]:
        cx, cy, sig, amp = comps
        sig2 = sig * sig
        var = sig2 + apex.width_m**2
        a = (amp * (sig2 / var) / ANGSTROM).astype(np.float32)
        cu = (((cx - ox) * ux + (cy - oy) * uy) / NM).astype(np.float32)
        cv = (((cx - ox) * vx + (cy - oy) * vy) / NM).astype(np.float32)
        inv = (-0.5 * NM * NM / var).astype(np.float32)
        gx = _gauss_table(inv, cu, (u / NM).astype(np.float32))
        gy = _gauss_table(inv, cv, (v / NM).astype(np.float32))
        img = (gy.T @ (a[:, None] * gx)).astype(np.float64) * ANGSTROM
    else:
        img = np.zeros((len(v), len(u)))
    if area.steps:
        img += _steps(area, apex, geom, u, v)
    return img


def _gauss_table(inv: np.ndarray, centre: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """exp(inv * (axis - centre)^2) as (components, len(axis)) float32, with negligible values set to 0."""
    arg = axis[None, :] - centre[:, None]
    arg *= arg
    arg *= inv[:, None]
    small = arg < -27.0
    np.exp(arg, out=arg)
    arg[small] = 0.0
    return arg


def _steps(area: SampleArea, apex: Apex, geom: FrameGeometry, u: np.ndarray, v: np.ndarray) -> np.ndarray | float:
    """Terrace height seen by one apex: a constant for steps that miss the frame, error-function edges otherwise."""
    (ux, uy), (vx, vy) = geom.axes()
    ox, oy = geom.centre_x_m + apex.dx_m, geom.centre_y_m + apex.dy_m
    edge = math.sqrt(apex.width_m**2 + STEP_EDGE_WIDTH_M**2)
    cu = np.array([u[0], u[-1], u[0], u[-1]])
    cv = np.array([v.min(), v.min(), v.max(), v.max()])
    t = area.step_table
    # the linear part of the signed distance at the corners bounds it over the whole frame
    lin = t[:, 0:1] * (ox + cu * ux + cv * vx) + t[:, 1:2] * (oy + cu * uy + cv * vy) - t[:, 2:3]
    slack = t[:, 4] + 6 * edge
    above = lin.min(axis=1) > slack
    crossing = ~above & (lin.max(axis=1) >= -slack)
    out: np.ndarray | float = float(t[above, 3].sum())
    for i in np.flatnonzero(crossing):
        s = area.steps[i]
        x = ox + u[None, :] * ux + v[:, None] * vx
        y = oy + u[None, :] * uy + v[:, None] * vy
        out = out + s.height_m * ndtr(s.signed_distance(x, y) / edge)
    return out


def render_topography(
    area: SampleArea, apices: tuple[Apex, ...], geom: FrameGeometry,
    du_rows: np.ndarray | None = None, dv_rows: np.ndarray | None = None, debris_before: int | None = None,
) -> np.ndarray:
    """Apparent height (lines, pixels) in metres of the frame seen through a probe kernel.

    `du_rows`/`dv_rows` displace each row along the fast/slow axis (metres; xy creep, hysteresis).
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
    comps = area.components_in(xmin, xmax, ymin, ymax, margin_m=0.0, debris_before=debris_before)
    layers = [_apex_topography(area, comps, a, geom, u, v) for a in apices]
    if len(layers) == 1:
        img = layers[0]
    else:
        w = np.array([a.weight for a in apices], dtype=float)
        w = w / w.sum()
        stack = np.stack(layers)
        top = stack.max(axis=0)
        img = top + np.log(np.tensordot(w, np.exp(BETA_PER_M * (stack - top)), axes=1)) / BETA_PER_M
    if margin:
        pos = np.arange(geom.pixels)[None, :] + margin + du_rows[:, None] / px
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, len(u) - 2)
        f = np.clip(pos - i0, 0.0, 1.0)
        img = np.take_along_axis(img, i0, axis=1) * (1 - f) + np.take_along_axis(img, i0 + 1, axis=1) * f
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
    area: SampleArea
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
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for forward in (True, False):
            t_first, t_last = self.pixel_times(forward)
            self._cache[("zline", forward)] = (np.asarray(self.z_needed(t_first), float), np.asarray(self.z_needed(t_last), float))

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
        decay = np.exp(-np.maximum(t_mid - self.creep_t0_s, 0.0) / self.creep_tau_s) if self.creep_tau_s > 0 else np.zeros_like(t_mid)
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
            if len(used) == 1:
                topo = render_topography(self.area, self.kernels[int(used[0])], self.geometry, du, dv, self.debris_count)
            else:
                topo = np.empty((self.geometry.lines, self.geometry.pixels))
                for i in used:
                    img = render_topography(self.area, self.kernels[int(i)], self.geometry, du, dv, self.debris_count)
                    mask = self.kernel_map == i
                    topo[mask] = img[mask]
            self._cache[key] = topo
        return self._cache[key]

    def _z_base(self, forward: bool) -> np.ndarray:
        """Piezo z for the setpoint over the bare terrace at each pixel (drift in time, tilt in space)."""
        g = self.geometry
        z0, z1 = self._cache[("zline", forward)]
        frac = (np.arange(g.pixels) + 0.5) / g.pixels
        z = z0[:, None] + (z1 - z0)[:, None] * frac[None, :]
        (ux, uy), (vx, vy) = g.axes()
        sx, sy = self.area.tilt
        u, v = g.u(), g.v()
        z += sx * (g.centre_x_m + u[None, :] * ux + v[:, None] * vx) + sy * (g.centre_y_m + u[None, :] * uy + v[:, None] * vy)
        return z

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
