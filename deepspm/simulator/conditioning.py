"""How conditioning actions and scanning change the probe: a Markov model over probe kinds.

The simulator is driven through Nanonis commands, so the model reacts to PHYSICAL events, not to action
indexes: a bias pulse of V volts and width w at the current tip height, or a dip (tip shaper) of depth d
towards the sample. What matters physically:

- pulse strength s = |V| * (w / 0.2 s)^0.1 * min(1, g0 / g), the field at the apex (g = tip-sample gap,
  g0 = 0.6 nm, the gap at the reference setpoint 25 pA / 1 V). A withdrawn tip feels no field.
- dip indentation delta = d - g (nm): how far the apex is pushed into the sample; delta <= 0 touches nothing.

One action has three possible outcomes, drawn in this order:
1. fixed: the probe becomes good (new sharp apex), probability p_fix(kind, event);
2. damaged: with probability p_damage(event) the probe becomes a freshly drawn bad kind (the kind
   distribution depends on the event: strong pulses leave loose material -> unstable/blunt, shallow contacts
   leave a second mini-tip -> double, deep contacts -> blunt/multiple);
3. otherwise the probe keeps its kind, with slightly changed geometry.
A good probe cannot be "fixed"; it only risks damage.

Fix probabilities (sigma = logistic function; severity in [0, 1] scales them by 1 - 0.35 severity):

| kind     | pulse                                              | dip (delta in nm)             |
|----------|----------------------------------------------------|-------------------------------|
| unstable | 0.75 sigma((s-3)/0.6) (1 - 0.8 sigma((s-6)/0.8)) x pol | 0.15 sigma((delta-0.1)/0.15)  |
| double   | 0.08 sigma((s-3)/1)                                | 0.60 exp(-((delta-0.5)/0.45)^2)|
| multiple | 0.05 sigma((s-3)/1)                                | 0.50 exp(-((delta-1.2)/0.6)^2) |
| blunt    | 0.20 sigma((s-6.5)/0.8)                            | 0.55 sigma((delta-1.5)/0.5)   |

pol = 1 for negative sample bias, 0.8 for positive (loose adsorbates leave the apex more easily one way).
Damage: pulse sigma((s-6)/0.8) (so +-8 V pulses usually damage, +-2.5 V almost never); dip
sigma(delta/0.3) when delta > 0 (a 0.8 nm dip at the reference gap damages a good probe ~2/3 of the time,
a 1.2 nm dip ~9 in 10, deep dips always: the reset actions usually turn a good probe bad).

Scanning (per frame of 64 lines; scaled by lines/64): a good probe turns bad with the configured
degradation probability; an unstable probe settles by itself with probability 0.12 (to good 60 %, else
another defect); other bad probes change spontaneously with probability 0.03 (to good 30 %).
Crashes and lateral coarse moves with the tip in contact always damage (blunt 50 %, multiple 40 %, double 10 %).

Debris left on the sample: dips leave a mound of radius 0.4 + 0.45 delta nm and height
min(1.5 + 0.8 delta, 8) Angstrom; pulses with s >= 3 leave a cluster of radius 0.15 |V| nm and height
(1 + 0.2 |V|) Angstrom.

With these numbers a policy that knows the defect (unstable -> -4 V pulse, double -> ~1.1 nm dip,
multiple -> 1.8 nm dip, blunt -> 5 nm dip) succeeds with p ~ 0.5-0.6 per action, against ~0.1-0.2 for a
uniformly random choice among the 12 actions, so the RL task is learnable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepspm.io.actions import ACTIONS, ActionKind, ConditioningAction
from deepspm.simulator.probe import ANGSTROM, BAD_KINDS, NM, ProbeKind, ProbeState, jitter_probe, make_probe

REFERENCE_GAP_M = 0.6 * NM  # tip-sample gap at 25 pA and 1 V
REFERENCE_PULSE_WIDTH_S = 0.2


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


@dataclass(frozen=True)
class PulseEvent:
    bias_V: float
    width_s: float
    gap_m: float = REFERENCE_GAP_M

    @property
    def strength(self) -> float:
        w = min(max(self.width_s, 1e-3), 5.0)
        field = min(1.0, REFERENCE_GAP_M / max(self.gap_m, 1e-12))
        return abs(self.bias_V) * (w / REFERENCE_PULSE_WIDTH_S) ** 0.1 * field


@dataclass(frozen=True)
class DipEvent:
    depth_m: float  # towards the sample, positive
    gap_m: float = REFERENCE_GAP_M
    bias_V: float = 0.02
    hold_s: float = 0.2

    @property
    def indentation_nm(self) -> float:
        return (self.depth_m - self.gap_m) / NM


Event = PulseEvent | DipEvent


def event_for_action(action: ConditioningAction, gap_m: float = REFERENCE_GAP_M) -> Event | None:
    """The physical event an action-table row produces at a given gap (None for the stall)."""
    if action.kind is ActionKind.PULSE:
        return PulseEvent(action.bias_V, action.duration_s, gap_m)
    if action.kind is ActionKind.DIP:
        return DipEvent(action.dip_depth_m, gap_m, action.bias_V, action.duration_s)
    return None


def fix_probability(kind: ProbeKind, event: Event, severity: float = 0.0) -> float:
    """Probability that `event` turns a probe of `kind` into a good one."""
    if kind is ProbeKind.GOOD:
        return 0.0
    scale = 1.0 - 0.35 * severity
    if isinstance(event, PulseEvent):
        s = event.strength
        if kind is ProbeKind.UNSTABLE:
            pol = 1.0 if event.bias_V < 0 else 0.8
            p = 0.75 * _sig((s - 3.0) / 0.6) * (1.0 - 0.8 * _sig((s - 6.0) / 0.8)) * pol
        elif kind is ProbeKind.DOUBLE:
            p = 0.08 * _sig((s - 3.0) / 1.0)
        elif kind is ProbeKind.MULTIPLE:
            p = 0.05 * _sig((s - 3.0) / 1.0)
        else:
            p = 0.20 * _sig((s - 6.5) / 0.8)
        return p * scale
    d = event.indentation_nm
    if d <= 0:
        return 0.0
    if kind is ProbeKind.UNSTABLE:
        p = 0.15 * _sig((d - 0.1) / 0.15)
    elif kind is ProbeKind.DOUBLE:
        p = 0.60 * math.exp(-(((d - 0.5) / 0.45) ** 2))
    elif kind is ProbeKind.MULTIPLE:
        p = 0.50 * math.exp(-(((d - 1.2) / 0.6) ** 2))
    else:
        p = 0.55 * _sig((d - 1.5) / 0.5)
    return p * scale


def damage_probability(event: Event) -> float:
    if isinstance(event, PulseEvent):
        return _sig((event.strength - 6.0) / 0.8)
    d = event.indentation_nm
    return _sig(d / 0.3) if d > 0 else 0.0


def _damage_kind_weights(event: Event) -> dict[ProbeKind, float]:
    if isinstance(event, PulseEvent):
        return {ProbeKind.UNSTABLE: 0.4, ProbeKind.BLUNT: 0.3, ProbeKind.DOUBLE: 0.15, ProbeKind.MULTIPLE: 0.15}
    deep = _sig((event.indentation_nm - 1.5) / 0.5)
    shallow = {ProbeKind.DOUBLE: 0.45, ProbeKind.UNSTABLE: 0.25, ProbeKind.MULTIPLE: 0.2, ProbeKind.BLUNT: 0.1}
    deep_w = {ProbeKind.BLUNT: 0.45, ProbeKind.MULTIPLE: 0.35, ProbeKind.DOUBLE: 0.1, ProbeKind.UNSTABLE: 0.1}
    return {k: (1 - deep) * shallow[k] + deep * deep_w[k] for k in BAD_KINDS}


CRASH_KIND_WEIGHTS = {ProbeKind.BLUNT: 0.5, ProbeKind.MULTIPLE: 0.4, ProbeKind.DOUBLE: 0.1}
# bad kinds: (probability of a change per 64-line frame, fraction of changes that end good); a good probe's
# probability is the configured degradation rate (SimConfig.degradation_per_frame), and it never changes to good
SPONTANEOUS_CHANGE = {ProbeKind.UNSTABLE: (0.12, 0.6), ProbeKind.BLUNT: (0.03, 0.3), ProbeKind.DOUBLE: (0.03, 0.3),
                      ProbeKind.MULTIPLE: (0.03, 0.3)}
DEGRADE_KIND_WEIGHTS = {ProbeKind.DOUBLE: 0.35, ProbeKind.UNSTABLE: 0.3, ProbeKind.BLUNT: 0.2, ProbeKind.MULTIPLE: 0.15}


def draw_kind(weights: dict[ProbeKind, float], rng: np.random.Generator) -> ProbeKind:
    kinds = list(weights)
    p = np.array([weights[k] for k in kinds], dtype=float)
    return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]


def apply_event(probe: ProbeState, event: Event, rng: np.random.Generator) -> ProbeState:
    """The probe after one physical conditioning event (one draw of the Markov model)."""
    if not isinstance(probe.kind, ProbeKind):
        raise ValueError(f"the conditioning model is for Ag(100) probe kinds, not {probe.kind!r} (see hsi_probe)")
    u = float(rng.random())
    p_fix = fix_probability(probe.kind, event, probe.severity)
    if u < p_fix:
        return make_probe(ProbeKind.GOOD, rng)
    p_dmg = damage_probability(event)
    if u < p_fix + (1.0 - p_fix) * p_dmg:
        return make_probe(draw_kind(_damage_kind_weights(event), rng), rng)
    return probe if probe.kind is ProbeKind.GOOD else jitter_probe(probe, rng)


def crash_damage(rng: np.random.Generator) -> ProbeState:
    return make_probe(draw_kind(CRASH_KIND_WEIGHTS, rng), rng)


def spontaneous_change(
    probe: ProbeState, degradation_per_frame: float, frames: float, rng: np.random.Generator
) -> ProbeState | None:
    """A tip change during `frames` frames of scanning, or None. `frames` = lines / 64."""
    if probe.kind is ProbeKind.GOOD:
        p, to_good = degradation_per_frame, 0.0
    else:  # a kind outside the table changes as the other bad kinds do
        p, to_good = SPONTANEOUS_CHANGE[probe.kind if isinstance(probe.kind, ProbeKind) else ProbeKind.BLUNT]
    p = 1.0 - (1.0 - p) ** max(frames, 0.0)
    if rng.random() >= p:
        return None
    if rng.random() < to_good:
        return make_probe(ProbeKind.GOOD, rng)
    weights = {k: w for k, w in DEGRADE_KIND_WEIGHTS.items() if k is not probe.kind}
    return make_probe(draw_kind(weights, rng), rng)


def debris_for(event: Event) -> tuple[float, float]:
    """(radius_m, height_m) of the material an event leaves on the sample; (0, 0) for none."""
    if isinstance(event, DipEvent):
        d = event.indentation_nm
        if d <= 0:
            return 0.0, 0.0
        return (0.4 + 0.45 * d) * NM, min(1.5 + 0.8 * d, 8.0) * ANGSTROM
    if event.strength >= 3.0:
        v = abs(event.bias_V)
        return 0.15 * v * NM, (1.0 + 0.2 * v) * ANGSTROM
    return 0.0, 0.0


def best_action_for(kind: ProbeKind, gap_m: float = REFERENCE_GAP_M) -> int:
    """Index of the action-table row with the highest fix probability for a defect (the oracle's choice)."""
    best, best_p = 0, -1.0
    for a in ACTIONS:
        event = event_for_action(a, gap_m)
        p = 0.0 if event is None else fix_probability(kind, event)
        if p > best_p:
            best, best_p = a.index, p
    return best
