"""Tip states on H:Si(100)-(2x1) and how conditioning moves between them (the dynamics as a table).

What a tip state does to the image of the dimer rows (see `hsi`): the tip is a sum of Gaussian apices
(`probe.Apex`); the blur of the main apex decides which periods survive (0.24 nm atoms in a dimer, 0.384 nm
dimers along a row, 0.768 nm rows), extra apices repeat every feature, and a tip that makes the dimers
flip under it shows them buckled (`ProbeState.buckling`).

| state       | apex (Gaussian sigma)            | what the image shows                              | real-set class   |
|-------------|----------------------------------|---------------------------------------------------|------------------|
| atoms       | one, 0.01-0.04 nm                | both atoms of every dimer                         | Individual Atoms |
| dimers      | one, 0.04-0.13 nm                | bean-shaped dimers along the rows                 | Dimers           |
| asymmetric  | one, 0.02-0.10 nm, buckling 0.4-1 | dimers buckled in zigzag / p(2x2) patterns        | Asymmetries      |
| rows        | one, 0.14-0.24 nm                | the 0.77 nm rows only                             | Rows             |
| double      | two, 0.4-2 nm apart              | every feature twice                               | Bad/Blurry       |
| multiple    | three or four                    | features smeared into several copies              | Bad/Blurry       |
| blurry      | one, 0.2-0.8 nm, unstable        | no lattice, blobs; flicker and streaks            | Bad/Blurry       |

A tip change within a frame (the kernel switches at some line, `microscope` / `hsi_dataset`) is the real
set's Tip Change class. Atoms, dimers and asymmetric are good (the real set's good classes); rows is not
(dimer resolution is what H:Si work needs), nor are the others.

Conditioning (`TRANSITIONS`): each physical event falls into one bin (pulse strength s as in `conditioning`:
weak < 3 <= medium < 6 <= strong; dip indentation delta = depth - gap: none <= 0 < shallow <= 1 nm < deep),
and the next state is drawn from that bin's row of the table: the dynamics ARE the table, nothing else.
Why the rows look the way they do (the practice on H:Si, e.g. Rashidi & Wolkow 2018, Gordon et al. 2019/2020):
gentle contacts with a clean Si patch (shallow dips) re-form the apex and are the most reliable fix for
double, multiple and blunt tips; deep contacts mostly leave a blunt or multiple tip; medium pulses drop or
pick up an adsorbate (sharpen a rows tip, free a blurry unstable one); strong pulses mostly damage.
`SCAN_TRANSITIONS` is the per-frame (64 lines) drift of the state while scanning; `CRASH_WEIGHTS` a crash.
"""

from __future__ import annotations

import math
from enum import Enum
from types import MappingProxyType

import numpy as np

from deepspm.simulator.conditioning import DipEvent, Event, PulseEvent
from deepspm.simulator.probe import NM, Apex, ProbeState, jitter_probe


class HsiTipState(str, Enum):
    ATOMS = "atoms"
    DIMERS = "dimers"
    ASYMMETRIC = "asymmetric"
    ROWS = "rows"
    DOUBLE = "double"
    MULTIPLE = "multiple"
    BLURRY = "blurry"

    @property
    def is_good(self) -> bool:
        return self in GOOD_STATES


GOOD_STATES = frozenset({HsiTipState.ATOMS, HsiTipState.DIMERS, HsiTipState.ASYMMETRIC})
BAD_STATES: tuple[HsiTipState, ...] = (HsiTipState.ROWS, HsiTipState.DOUBLE, HsiTipState.MULTIPLE, HsiTipState.BLURRY)
# the real set's categories (deepspm.nets.data.HSI100_CATEGORIES) each tip state is voted into
REAL_SET_CLASS = MappingProxyType({
    HsiTipState.ASYMMETRIC: "Asymmetries", HsiTipState.ATOMS: "Individual Atoms", HsiTipState.DIMERS: "Dimers",
    HsiTipState.ROWS: "Rows", HsiTipState.DOUBLE: "Bad/Blurry", HsiTipState.MULTIPLE: "Bad/Blurry",
    HsiTipState.BLURRY: "Bad/Blurry",
})
TIP_CHANGE_CLASS = "Tip Change"

EVENT_BINS = ("pulse_weak", "pulse_medium", "pulse_strong", "dip_none", "dip_shallow", "dip_deep")

S = HsiTipState
_T = {
    # state          bin              next-state probabilities (each row sums to 1)
    S.ATOMS: {
        "pulse_weak": {S.ATOMS: 0.85, S.DIMERS: 0.1, S.ASYMMETRIC: 0.05},
        "pulse_medium": {S.ATOMS: 0.45, S.DIMERS: 0.25, S.ASYMMETRIC: 0.1, S.ROWS: 0.1, S.BLURRY: 0.1},
        "pulse_strong": {S.DIMERS: 0.1, S.ROWS: 0.2, S.DOUBLE: 0.2, S.MULTIPLE: 0.15, S.BLURRY: 0.35},
        "dip_none": {S.ATOMS: 1.0},
        "dip_shallow": {S.ATOMS: 0.2, S.DIMERS: 0.2, S.DOUBLE: 0.35, S.ROWS: 0.1, S.BLURRY: 0.15},
        "dip_deep": {S.DIMERS: 0.05, S.ROWS: 0.15, S.DOUBLE: 0.15, S.MULTIPLE: 0.3, S.BLURRY: 0.35},
    },
    S.DIMERS: {
        "pulse_weak": {S.DIMERS: 0.85, S.ATOMS: 0.05, S.ASYMMETRIC: 0.05, S.ROWS: 0.05},
        "pulse_medium": {S.DIMERS: 0.45, S.ATOMS: 0.1, S.ASYMMETRIC: 0.1, S.ROWS: 0.2, S.BLURRY: 0.15},
        "pulse_strong": {S.DIMERS: 0.1, S.ROWS: 0.2, S.DOUBLE: 0.2, S.MULTIPLE: 0.15, S.BLURRY: 0.35},
        "dip_none": {S.DIMERS: 1.0},
        "dip_shallow": {S.DIMERS: 0.35, S.ATOMS: 0.05, S.DOUBLE: 0.3, S.ROWS: 0.15, S.BLURRY: 0.15},
        "dip_deep": {S.DIMERS: 0.05, S.ROWS: 0.15, S.DOUBLE: 0.15, S.MULTIPLE: 0.3, S.BLURRY: 0.35},
    },
    S.ASYMMETRIC: {
        "pulse_weak": {S.ASYMMETRIC: 0.8, S.DIMERS: 0.15, S.ATOMS: 0.05},
        "pulse_medium": {S.ASYMMETRIC: 0.3, S.DIMERS: 0.35, S.ATOMS: 0.1, S.ROWS: 0.15, S.BLURRY: 0.1},
        "pulse_strong": {S.DIMERS: 0.1, S.ROWS: 0.2, S.DOUBLE: 0.2, S.MULTIPLE: 0.15, S.BLURRY: 0.35},
        "dip_none": {S.ASYMMETRIC: 1.0},
        "dip_shallow": {S.ASYMMETRIC: 0.2, S.DIMERS: 0.2, S.DOUBLE: 0.3, S.ROWS: 0.15, S.BLURRY: 0.15},
        "dip_deep": {S.DIMERS: 0.05, S.ROWS: 0.15, S.DOUBLE: 0.15, S.MULTIPLE: 0.3, S.BLURRY: 0.35},
    },
    S.ROWS: {
        "pulse_weak": {S.ROWS: 0.9, S.DIMERS: 0.1},
        "pulse_medium": {S.ROWS: 0.35, S.DIMERS: 0.3, S.ATOMS: 0.1, S.ASYMMETRIC: 0.05, S.BLURRY: 0.2},
        "pulse_strong": {S.ROWS: 0.2, S.DIMERS: 0.1, S.DOUBLE: 0.2, S.MULTIPLE: 0.15, S.BLURRY: 0.35},
        "dip_none": {S.ROWS: 1.0},
        "dip_shallow": {S.ROWS: 0.3, S.DIMERS: 0.3, S.ATOMS: 0.05, S.DOUBLE: 0.2, S.BLURRY: 0.15},
        "dip_deep": {S.ROWS: 0.2, S.DIMERS: 0.1, S.DOUBLE: 0.1, S.MULTIPLE: 0.25, S.BLURRY: 0.35},
    },
    S.DOUBLE: {
        "pulse_weak": {S.DOUBLE: 0.95, S.MULTIPLE: 0.05},
        "pulse_medium": {S.DOUBLE: 0.65, S.DIMERS: 0.1, S.ROWS: 0.1, S.BLURRY: 0.1, S.MULTIPLE: 0.05},
        "pulse_strong": {S.DOUBLE: 0.3, S.DIMERS: 0.05, S.ROWS: 0.1, S.MULTIPLE: 0.2, S.BLURRY: 0.35},
        "dip_none": {S.DOUBLE: 1.0},
        "dip_shallow": {S.DOUBLE: 0.3, S.DIMERS: 0.35, S.ATOMS: 0.05, S.ROWS: 0.15, S.BLURRY: 0.15},
        "dip_deep": {S.DOUBLE: 0.15, S.DIMERS: 0.1, S.ROWS: 0.1, S.MULTIPLE: 0.3, S.BLURRY: 0.35},
    },
    S.MULTIPLE: {
        "pulse_weak": {S.MULTIPLE: 1.0},
        "pulse_medium": {S.MULTIPLE: 0.7, S.DOUBLE: 0.15, S.BLURRY: 0.1, S.DIMERS: 0.05},
        "pulse_strong": {S.MULTIPLE: 0.4, S.DOUBLE: 0.15, S.BLURRY: 0.35, S.DIMERS: 0.05, S.ROWS: 0.05},
        "dip_none": {S.MULTIPLE: 1.0},
        "dip_shallow": {S.MULTIPLE: 0.35, S.DOUBLE: 0.2, S.DIMERS: 0.2, S.ROWS: 0.1, S.BLURRY: 0.15},
        "dip_deep": {S.MULTIPLE: 0.25, S.DIMERS: 0.25, S.ATOMS: 0.05, S.ROWS: 0.15, S.BLURRY: 0.3},
    },
    S.BLURRY: {
        "pulse_weak": {S.BLURRY: 0.95, S.ROWS: 0.05},
        "pulse_medium": {S.BLURRY: 0.5, S.ROWS: 0.2, S.DIMERS: 0.2, S.DOUBLE: 0.1},
        "pulse_strong": {S.BLURRY: 0.55, S.ROWS: 0.1, S.DIMERS: 0.1, S.DOUBLE: 0.1, S.MULTIPLE: 0.15},
        "dip_none": {S.BLURRY: 1.0},
        "dip_shallow": {S.BLURRY: 0.4, S.DIMERS: 0.25, S.ROWS: 0.15, S.DOUBLE: 0.15, S.ATOMS: 0.05},
        "dip_deep": {S.BLURRY: 0.3, S.DIMERS: 0.3, S.ATOMS: 0.05, S.ROWS: 0.15, S.MULTIPLE: 0.2},
    },
}
TRANSITIONS = MappingProxyType(
    {s: MappingProxyType({b: MappingProxyType(row) for b, row in bins.items()}) for s, bins in _T.items()}
)

# per 64-line frame of scanning: where each state drifts by itself (adsorbates picked up or lost)
SCAN_TRANSITIONS = MappingProxyType({
    S.ATOMS: MappingProxyType({S.ATOMS: 0.97, S.DIMERS: 0.015, S.BLURRY: 0.005, S.DOUBLE: 0.005, S.ROWS: 0.005}),
    S.DIMERS: MappingProxyType(
        {S.DIMERS: 0.975, S.ATOMS: 0.005, S.ASYMMETRIC: 0.005, S.ROWS: 0.005, S.BLURRY: 0.005, S.DOUBLE: 0.005}
    ),
    S.ASYMMETRIC: MappingProxyType({S.ASYMMETRIC: 0.96, S.DIMERS: 0.03, S.BLURRY: 0.005, S.DOUBLE: 0.005}),
    S.ROWS: MappingProxyType({S.ROWS: 0.96, S.DIMERS: 0.02, S.BLURRY: 0.02}),
    S.DOUBLE: MappingProxyType({S.DOUBLE: 0.97, S.DIMERS: 0.01, S.BLURRY: 0.01, S.MULTIPLE: 0.01}),
    S.MULTIPLE: MappingProxyType({S.MULTIPLE: 0.98, S.DOUBLE: 0.01, S.BLURRY: 0.01}),
    S.BLURRY: MappingProxyType({S.BLURRY: 0.92, S.ROWS: 0.04, S.DIMERS: 0.03, S.DOUBLE: 0.01}),
})
CRASH_WEIGHTS = MappingProxyType({S.BLURRY: 0.5, S.MULTIPLE: 0.35, S.DOUBLE: 0.15})
del S


def event_bin(event: Event) -> str:
    """Which row of the table a physical event uses."""
    if isinstance(event, PulseEvent):
        s = event.strength
        return "pulse_weak" if s < 3.0 else "pulse_medium" if s < 6.0 else "pulse_strong"
    if isinstance(event, DipEvent):
        d = event.indentation_nm
        return "dip_none" if d <= 0 else "dip_shallow" if d <= 1.0 else "dip_deep"
    raise TypeError(f"not a conditioning event: {event!r}")


def _draw(row: MappingProxyType, rng: np.random.Generator) -> HsiTipState:
    states = list(row)
    p = np.array([row[s] for s in states], dtype=float)
    return states[int(rng.choice(len(states), p=p / p.sum()))]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _offset(rng: np.random.Generator, r_lo_nm: float, r_hi_nm: float) -> tuple[float, float]:
    r = _u(rng, r_lo_nm, r_hi_nm) * NM
    a = _u(rng, 0.0, 2.0 * math.pi)
    return r * math.cos(a), r * math.sin(a)


def make_hsi_probe(state: HsiTipState, rng: np.random.Generator) -> ProbeState:
    """A fresh tip in `state` with randomly drawn geometry (noise in metres rms, see `probe.ProbeState`)."""
    state = HsiTipState(state)
    sev = _u(rng, 0.0, 1.0)
    if state is HsiTipState.ATOMS:
        return ProbeState(state, (Apex(0.0, 0.0, _u(rng, 0.01, 0.04) * NM, 1.0),), 0.0, _u(rng, 1.0, 2.5) * 1e-12, 1.5e-12)
    if state is HsiTipState.DIMERS:
        return ProbeState(state, (Apex(0.0, 0.0, _u(rng, 0.04, 0.13) * NM, 1.0),), 0.0, _u(rng, 1.0, 2.5) * 1e-12, 1.5e-12)
    if state is HsiTipState.ASYMMETRIC:
        return ProbeState(state, (Apex(0.0, 0.0, _u(rng, 0.02, 0.1) * NM, 1.0),), 0.0, _u(rng, 1.0, 2.5) * 1e-12, 1.5e-12,
                          buckling=_u(rng, 0.4, 1.0))
    if state is HsiTipState.ROWS:
        return ProbeState(state, (Apex(0.0, 0.0, _u(rng, 0.14, 0.24) * NM, 1.0),), sev, _u(rng, 1.5, 3.0) * 1e-12, 2e-12)
    if state is HsiTipState.DOUBLE:
        dx, dy = _offset(rng, 0.4 + 0.4 * sev, 1.0 + 1.0 * sev)
        main = Apex(0.0, 0.0, _u(rng, 0.1, 0.35) * NM, 1.0)
        second = Apex(dx, dy, _u(rng, 0.1, 0.4) * NM, _u(rng, 0.3, 1.0))
        return ProbeState(state, (main, second), sev, _u(rng, 1.5, 4.0) * 1e-12, 2.5e-12)
    if state is HsiTipState.MULTIPLE:
        apices = [Apex(0.0, 0.0, _u(rng, 0.12, 0.4) * NM, 1.0)]
        for _ in range(2 + int(rng.integers(0, 2))):
            dx, dy = _offset(rng, 0.3, 1.2 + 1.0 * sev)
            apices.append(Apex(dx, dy, _u(rng, 0.12, 0.45) * NM, _u(rng, 0.2, 1.0)))
        return ProbeState(state, tuple(apices), sev, _u(rng, 2.0, 5.0) * 1e-12, 3e-12)
    if state is HsiTipState.BLURRY:
        main = Apex(0.0, 0.0, (0.2 + 0.6 * sev) * NM, 1.0)
        dx, dy = _offset(rng, 0.2, 0.8)
        alt = Apex(dx, dy, _u(rng, 0.3, 0.9) * NM, 1.0)
        return ProbeState(state, (main,), sev, _u(rng, 3.0, 9.0) * 1e-12, 5e-12, streak_rate=0.02 + 0.2 * sev,
                          flicker_apices=(alt,), flicker_rate=0.1 * sev)
    raise ValueError(f"unknown H:Si tip state {state!r}")


def _next(current: ProbeState, state: HsiTipState, rng: np.random.Generator) -> ProbeState:
    return jitter_probe(current, rng, 0.05) if state is current.kind else make_hsi_probe(state, rng)


def apply_hsi_event(probe: ProbeState, event: Event, rng: np.random.Generator) -> ProbeState:
    """The tip after one physical conditioning event: one draw from `TRANSITIONS[state][event_bin(event)]`."""
    return _next(probe, _draw(TRANSITIONS[HsiTipState(probe.kind)][event_bin(event)], rng), rng)


def hsi_crash_damage(rng: np.random.Generator) -> ProbeState:
    return make_hsi_probe(_draw(CRASH_WEIGHTS, rng), rng)


def hsi_spontaneous_change(probe: ProbeState, frames: float, rng: np.random.Generator) -> ProbeState | None:
    """A tip change while scanning `frames` 64-line frames (the table scaled to that length), or None."""
    state = HsiTipState(probe.kind)
    row = SCAN_TRANSITIONS[state]
    p_stay = row.get(state, 0.0) ** max(frames, 0.0)
    if rng.random() < p_stay:
        return None
    others = {s: p for s, p in row.items() if s is not state}
    return make_hsi_probe(_draw(MappingProxyType(others), rng), rng)


def transition_matrix(event_bin_name: str) -> tuple[tuple[HsiTipState, ...], np.ndarray]:
    """The table's rows for one event bin as a (states x states) row-stochastic matrix."""
    if event_bin_name not in EVENT_BINS:
        raise ValueError(f"unknown event bin {event_bin_name!r}; one of {', '.join(EVENT_BINS)}")
    states = tuple(HsiTipState)
    m = np.zeros((len(states), len(states)))
    for i, s in enumerate(states):
        for t, p in TRANSITIONS[s][event_bin_name].items():
            m[i, states.index(t)] = p
    return states, m
