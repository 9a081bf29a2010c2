"""The probe (STM tip) as a kernel of one or more apices, plus its instabilities and noise.

Each apex is an isotropic Gaussian blur (`width_m` = standard deviation) displaced by (`dx_m`, `dy_m`) from
the nominal tip position, with a relative tunnelling weight. The image of a multi-apex probe is the
tunnelling sum over apices, z = ln(sum_k w_k exp(beta h_k)) / beta, where h_k is the sample blurred by apex k
and shifted by its offset, and beta = 2 kappa (about 2.2 per Angstrom). So the apex that is closest to the
surface locally dominates, and a double tip shows every feature twice, at nearly full height, as real
double tips do. A weight w < 1 is the same as that apex sitting ln(1/w)/beta further from the sample.

Ground truth kinds (`ProbeKind`):
- good: one sharp apex (0.11-0.17 nm); four-lobed molecules are resolved.
- blunt: one wide apex (0.35-0.8 nm); molecules are round blobs with low contrast.
- double: two apices 0.5-2.2 nm apart; every feature has a ghost copy.
- multiple: three or four apices; features are smeared into several copies.
- unstable: a sharp-ish apex carrying something loose; the image flickers between two kernels in bands of
  lines, with streaks (spikes along the fast axis) and extra noise.
Only `good` counts as a good probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from deepspm.simulator.hsi_probe import HsiTipState

NM = 1e-9
ANGSTROM = 1e-10
BETA_PER_M = 2.2e10  # 2 * kappa, the decay constant of the tunnelling current (1/m)


class ProbeKind(str, Enum):
    GOOD = "good"
    BLUNT = "blunt"
    DOUBLE = "double"
    MULTIPLE = "multiple"
    UNSTABLE = "unstable"

    @property
    def is_good(self) -> bool:
        return self is ProbeKind.GOOD


BAD_KINDS: tuple[ProbeKind, ...] = (ProbeKind.BLUNT, ProbeKind.DOUBLE, ProbeKind.MULTIPLE, ProbeKind.UNSTABLE)


@dataclass(frozen=True)
class Apex:
    dx_m: float
    dy_m: float
    width_m: float  # Gaussian standard deviation of the apex's blur
    weight: float  # relative tunnelling weight (the main apex has 1)


@dataclass(frozen=True)
class ProbeState:
    """Everything the renderer needs to know about the tip, and the ground truth."""

    kind: ProbeKind | HsiTipState  # the tip state on the H:Si(100) surface (both have `is_good`)
    apices: tuple[Apex, ...]
    severity: float = 0.0  # 0..1, how bad within its kind (conditioning is harder for severe defects)
    noise_m: float = 2.5e-12  # white z noise, rms
    line_noise_m: float = 2e-12  # random walk of the per-line offset, rms step
    streak_rate: float = 0.0  # expected streaks per scan line
    flicker_apices: tuple[Apex, ...] = field(default_factory=tuple)  # alternate kernel of an unstable tip
    flicker_rate: float = 0.0  # probability per line of switching between the two kernels
    buckling: float = 0.0  # H:Si(100): how strongly the tip makes dimers appear buckled (0..1, see `hsi`)

    @property
    def is_good(self) -> bool:
        return self.kind.is_good


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _sharp_apex(rng: np.random.Generator) -> Apex:
    return Apex(0.0, 0.0, _uniform(rng, 0.11, 0.17) * NM, 1.0)


def _offset(rng: np.random.Generator, r_lo_nm: float, r_hi_nm: float) -> tuple[float, float]:
    r = _uniform(rng, r_lo_nm, r_hi_nm) * NM
    a = _uniform(rng, 0.0, 2.0 * math.pi)
    return r * math.cos(a), r * math.sin(a)


def make_probe(kind: ProbeKind, rng: np.random.Generator) -> ProbeState:
    """A fresh probe of the given kind with randomly drawn parameters."""
    severity = _uniform(rng, 0.0, 1.0)
    if kind is ProbeKind.GOOD:
        return ProbeState(kind, (_sharp_apex(rng),), 0.0, _uniform(rng, 1.5, 3.0) * 1e-12, 1.5e-12)
    if kind is ProbeKind.BLUNT:
        width = (0.35 + 0.45 * severity) * NM
        return ProbeState(kind, (Apex(0.0, 0.0, width, 1.0),), severity, _uniform(rng, 2.0, 5.0) * 1e-12, 3e-12)
    if kind is ProbeKind.DOUBLE:
        dx, dy = _offset(rng, 0.6 + 0.4 * severity, 1.2 + 1.0 * severity)
        second = Apex(dx, dy, _uniform(rng, 0.12, 0.25) * NM, _uniform(rng, 0.25, 1.0))
        main = Apex(0.0, 0.0, _uniform(rng, 0.12, 0.22) * NM, 1.0)
        return ProbeState(kind, (main, second), severity, _uniform(rng, 2.0, 4.0) * 1e-12, 2.5e-12)
    if kind is ProbeKind.MULTIPLE:
        n = 3 + int(rng.integers(0, 2))
        apices = [Apex(0.0, 0.0, _uniform(rng, 0.14, 0.3) * NM, 1.0)]
        for _ in range(n - 1):
            dx, dy = _offset(rng, 0.5, 1.4 + 0.8 * severity)
            apices.append(Apex(dx, dy, _uniform(rng, 0.14, 0.35) * NM, _uniform(rng, 0.2, 1.0)))
        return ProbeState(kind, tuple(apices), severity, _uniform(rng, 2.5, 5.0) * 1e-12, 3e-12)
    if kind is ProbeKind.UNSTABLE:
        main = Apex(0.0, 0.0, _uniform(rng, 0.13, 0.25) * NM, 1.0)
        # the loose adsorbate: while it sits on the apex the tip is blunter and shifted
        dx, dy = _offset(rng, 0.2, 0.8)
        alt = Apex(dx, dy, _uniform(rng, 0.3, 0.6) * NM, 1.0)
        return ProbeState(
            kind, (main,), severity, _uniform(rng, 4.0, 9.0) * 1e-12, 6e-12,
            streak_rate=0.05 + 0.25 * severity, flicker_apices=(alt,), flicker_rate=0.04 + 0.16 * severity,
        )
    raise ValueError(f"unknown probe kind {kind!r}")


def jitter_probe(probe: ProbeState, rng: np.random.Generator, scale: float = 0.1) -> ProbeState:
    """The same kind of defect with slightly changed apex geometry (an action that neither fixed nor broke it)."""

    def move(a: Apex) -> Apex:
        f = 1.0 + scale * float(rng.normal())
        return Apex(a.dx_m * f, a.dy_m * f, max(0.1 * NM, a.width_m * (1.0 + scale * float(rng.normal()))), a.weight)

    return replace(probe, apices=tuple(move(a) for a in probe.apices))
