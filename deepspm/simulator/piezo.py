"""The z the piezo needs to tunnel: coarse gap, creep after approaches, slow drift and sudden jumps.

`SurfaceZ(t)` is the piezo z (metres, positive away from the sample) at which the tip tunnels at the
reference setpoint (25 pA, 1 V) above the area's origin. It is piecewise analytic: each event (approach,
coarse step, injected jump) starts a new segment

    z(t) = base + A (1 - exp(-(t - t0) / tau)) + rate (t - t0) + jumps in (t0, t]

where A is the creep still to come (z-piezo creep after an approach or a coarse step, the reason the
original waits ~120 s before imaging), `rate` the thermal drift and `jumps` a Poisson process of sudden
height changes (mechanical relaxations). Jumps are drawn lazily from a seeded generator, so z(t) is a pure
function of t for a given history of events: a frame can be rendered for future line times.
"""

from __future__ import annotations

import bisect
import math

import numpy as np


class SurfaceZ:
    def __init__(
        self, base_m: float, t0_s: float, drift_rate_m_per_s: float, creep_tau_s: float,
        jump_rate_per_s: float, jump_scale_m: float, rng: np.random.Generator,
    ) -> None:
        self.base_m = base_m
        self.t0_s = t0_s
        self.creep_m = 0.0
        self.creep_tau_s = creep_tau_s
        self.rate_m_per_s = drift_rate_m_per_s
        self.jump_rate_per_s = jump_rate_per_s
        self.jump_scale_m = jump_scale_m
        self._rng = rng
        self._jump_t: list[float] = []
        self._jump_cum: list[float] = [0.0]  # cumulative jump height after each jump
        self._jumps_until = t0_s
        self._jump_arrays: tuple[np.ndarray, np.ndarray] | None = None

    def _ensure_jumps(self, t_s: float) -> None:
        if self.jump_rate_per_s <= 0:
            return
        while self._jumps_until <= t_s:
            self._jumps_until += float(self._rng.exponential(1.0 / self.jump_rate_per_s))
            self._jump_t.append(self._jumps_until)
            self._jump_cum.append(self._jump_cum[-1] + float(self._rng.normal(0.0, self.jump_scale_m)))

    def _jumps(self, t: np.ndarray) -> np.ndarray:
        if not self._jump_t:
            return np.zeros_like(t)
        if self._jump_arrays is None or len(self._jump_arrays[0]) != len(self._jump_t):
            self._jump_arrays = (np.asarray(self._jump_t), np.asarray(self._jump_cum))
        times, cum = self._jump_arrays
        idx = np.searchsorted(times, t, side="right")
        i0 = bisect.bisect_right(self._jump_t, self.t0_s)
        return cum[idx] - cum[i0]

    def __call__(self, t_s: float | np.ndarray) -> np.ndarray:
        t = np.asarray(t_s, dtype=float)
        self._ensure_jumps(float(np.max(t)) if t.size else self.t0_s)
        dt = np.maximum(t - self.t0_s, 0.0)
        creep = self.creep_m * (1.0 - np.exp(-dt / self.creep_tau_s)) if self.creep_tau_s > 0 else 0.0
        return self.base_m + creep + self.rate_m_per_s * dt + self._jumps(t)

    def value(self, t_s: float) -> float:
        """z at one time (a scalar fast path of __call__)."""
        self._ensure_jumps(t_s)
        dt = max(t_s - self.t0_s, 0.0)
        creep = self.creep_m * (1.0 - math.exp(-dt / self.creep_tau_s)) if self.creep_tau_s > 0 else 0.0
        jumps = 0.0
        if self._jump_t:
            cum, times = self._jump_cum, self._jump_t
            jumps = cum[bisect.bisect_right(times, t_s)] - cum[bisect.bisect_right(times, self.t0_s)]
        return self.base_m + creep + self.rate_m_per_s * dt + jumps

    def rebase(self, t_s: float, delta_m: float = 0.0, new_creep_m: float = 0.0) -> None:
        """Start a new segment at t: shift by `delta_m`, keep the creep still to come and add `new_creep_m`."""
        current = self.value(t_s)
        remaining = self.creep_m * math.exp(-max(t_s - self.t0_s, 0.0) / self.creep_tau_s) if self.creep_tau_s > 0 else 0.0
        self.base_m = current + delta_m
        self.creep_m = remaining + new_creep_m
        self.t0_s = t_s
