"""Instrument artefacts with physical meaning, applied to a rendered frame, and the real set's processing.

All functions take and return (lines, pixels) arrays in acquisition order (row 0 = first line scanned,
columns in the fast-scan direction) and draw from a given generator (deterministic, no global RNG).

- `pink_noise`: 1/f^alpha noise of the z signal in time. The frame is one raster (line after line), so the
  noise is generated along the raster sequence: its slow part shows as line-to-line bands, its fast part as
  grain along the lines.
- `line_offsets`: a random offset per scan line (the z piezo's hysteresis and thermal jumps between lines),
  plus glitches: a line where the offset jumps part-way through (an adsorbate hopping under the tip).
- `feedback_ringing`: the z feedback as an under-damped second-order loop, run along each line in the scan
  direction: z_measured follows z_true with a lag, overshoots after steep edges and rings at a period of
  `period_px` pixels with damping ratio `damping` (a loop with too high a gain).
- `drift_rows`: lateral displacement of each line (metres along the fast and slow axes) from linear thermal
  drift during the frame plus the exponentially decaying piezo creep after the move to the frame; passed to
  the renderer so the lattice is sheared, stretched or bent exactly as drift does.
- `thermal_z_creep`: a slow exponential approach of z over the frame (removed by line flattening except for
  its within-line part, as on the instrument).
- `real_set_processing`: what the authors of the real H:Si(100) set did to their scans and the set's maker did
  after: line flattening (each line minus its mean, or minus a least-squares line), min-max stretch to the
  8-bit index 0..254, and a bilinear resize to 64 x 64.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter, lfilter_zi


def pink_noise(shape: tuple[int, int], rms_m: float, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """1/f^exponent noise along the raster (power spectrum ~ f^-exponent), scaled to `rms_m`."""
    n = shape[0] * shape[1]
    if rms_m <= 0:
        return np.zeros(shape)
    spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.arange(n // 2 + 1, dtype=float)
    f[0] = 1.0
    spec *= f ** (-exponent / 2.0)
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    x *= rms_m / max(float(x.std()), 1e-30)
    return x.reshape(shape)


def line_offsets(shape: tuple[int, int], rms_m: float, glitch_rate: float, glitch_m: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Per-line offsets (rms `rms_m`) and glitch lines (rate per line) that jump by ~`glitch_m` part-way."""
    lines, pixels = shape
    out = np.repeat(rng.normal(0.0, rms_m, lines)[:, None], pixels, axis=1) if rms_m > 0 else np.zeros(shape)
    if glitch_rate > 0:
        for r in np.flatnonzero(rng.random(lines) < glitch_rate):
            start = int(rng.integers(0, pixels))
            length = int(rng.integers(1, max(2, pixels // 3)))
            out[r, start:start + length] += glitch_m * float(rng.uniform(0.3, 1.0)) * (1.0 if rng.random() < 0.6 else -1.0)
    return out


def feedback_ringing(z: np.ndarray, period_px: float, damping: float) -> np.ndarray:
    """Each line through a unit-gain under-damped 2nd-order low-pass (poles r e^(+-i theta)) along the scan."""
    if period_px <= 0:
        return z
    theta = 2.0 * np.pi / period_px
    r = float(np.exp(-damping * theta))
    a = np.array([1.0, -2.0 * r * np.cos(theta), r * r])
    b = np.array([a.sum()])  # unit DC gain
    zi = lfilter_zi(b, a)[None, :] * z[:, :1]
    out, _ = lfilter(b, a, z, axis=1, zi=zi)
    return out


def drift_rows(
    lines: int, drift_m: tuple[float, float], creep_m: tuple[float, float], creep_tau_lines: float
) -> tuple[np.ndarray, np.ndarray]:
    """(du, dv) per line in metres: linear drift over the frame plus decaying creep (tau in lines)."""
    t = np.arange(lines, dtype=float)
    frac = t / max(lines - 1, 1)
    decay = np.exp(-t / max(creep_tau_lines, 1e-9))
    du = drift_m[0] * frac - creep_m[0] * decay
    dv = drift_m[1] * frac - creep_m[1] * decay
    return du, dv


def thermal_z_creep(shape: tuple[int, int], amplitude_m: float, tau_lines: float) -> np.ndarray:
    """z creeping exponentially over the raster (the part within each line survives line flattening)."""
    lines, pixels = shape
    t = (np.arange(lines)[:, None] + np.arange(pixels)[None, :] / pixels)
    return amplitude_m * np.exp(-t / max(tau_lines, 1e-9))


def flatten_lines(z: np.ndarray, order: int = 0) -> np.ndarray:
    """Subtract from each line its mean (order 0) or its least-squares straight line (order 1)."""
    z = np.asarray(z, dtype=np.float64)
    if order == 0:
        return z - z.mean(axis=1, keepdims=True)
    if order != 1:
        raise ValueError(f"line flattening order must be 0 or 1, got {order}")
    x = np.linspace(-1.0, 1.0, z.shape[1])
    slope = (z * x).sum(axis=1, keepdims=True) / (x * x).sum()
    return z - z.mean(axis=1, keepdims=True) - slope * x


def real_set_processing(z: np.ndarray, order: int = 0, side_px: int = 64) -> np.ndarray:
    """Line-flatten, min-max stretch to 0..254, quantise, bilinear resize to side x side: uint8 (side, side)."""
    from PIL import Image

    flat = flatten_lines(z, order)
    lo, hi = float(flat.min()), float(flat.max())
    index = np.zeros(flat.shape) if hi <= lo else (flat - lo) / (hi - lo) * 254.0
    img = Image.fromarray(np.round(index).astype(np.uint8))
    if img.size != (side_px, side_px):
        img = img.resize((side_px, side_px), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
