"""The conditioning Markov model: defect-dependent, learnable, and damaging where the reset needs it."""

from __future__ import annotations

import numpy as np
import pytest

from deepspm.io.actions import ACTIONS, RESET_ACTIONS, ActionKind
from deepspm.simulator.conditioning import (
    REFERENCE_GAP_M,
    DipEvent,
    PulseEvent,
    apply_event,
    best_action_for,
    damage_probability,
    debris_for,
    event_for_action,
    fix_probability,
    spontaneous_change,
)
from deepspm.simulator.environment import ConditioningEnv, oracle_policy, random_policy, run_episode
from deepspm.simulator.probe import BAD_KINDS, ProbeKind, make_probe

NM = 1e-9


def test_oracle_needs_far_fewer_actions_than_random() -> None:
    """>= 500 episodes each, fixed seeds; the requirement is >= 40 % fewer actions, we demand 50 %."""
    oracle_env = ConditioningEnv(seed=101, render=False)
    random_env = ConditioningEnv(seed=202, render=False)
    oracle = [run_episode(oracle_env, oracle_policy) for _ in range(500)]
    random = [run_episode(random_env, random_policy) for _ in range(500)]
    assert np.mean(oracle) <= 0.5 * np.mean(random), (np.mean(oracle), np.mean(random))
    assert np.mean(oracle) <= 0.6 * np.mean(random)  # the bar, stated explicitly


def test_each_defect_has_its_own_cure() -> None:
    best = {k: ACTIONS[best_action_for(k)] for k in BAD_KINDS}
    assert best[ProbeKind.UNSTABLE].kind is ActionKind.PULSE
    assert {best[k].kind for k in (ProbeKind.DOUBLE, ProbeKind.MULTIPLE, ProbeKind.BLUNT)} == {ActionKind.DIP}
    depths = {k: best[k].dip_depth_m for k in (ProbeKind.DOUBLE, ProbeKind.MULTIPLE, ProbeKind.BLUNT)}
    assert depths[ProbeKind.DOUBLE] < depths[ProbeKind.MULTIPLE] < depths[ProbeKind.BLUNT]  # blunt needs the deepest
    for kind in BAD_KINDS:
        p = [fix_probability(kind, e) if (e := event_for_action(a)) else 0.0 for a in ACTIONS]
        assert max(p) >= 0.45
        assert np.mean(p) <= 0.25  # a random action rarely helps


def test_the_sampler_follows_the_stated_probabilities() -> None:
    rng = np.random.default_rng(0)
    event = DipEvent(1.8 * NM)
    n = 4000
    for kind in (ProbeKind.MULTIPLE, ProbeKind.DOUBLE):
        fixed = sum(apply_event(make_probe(kind, rng), event, rng).is_good for _ in range(n)) / n
        expected = np.mean([fix_probability(kind, event, make_probe(kind, rng).severity) for _ in range(n)])
        assert fixed == pytest.approx(expected, abs=0.03)


def test_reset_actions_usually_turn_a_good_probe_bad() -> None:
    rng = np.random.default_rng(1)
    rates = []
    for index in RESET_ACTIONS:
        event = event_for_action(ACTIONS[index])
        bad = sum(not apply_event(make_probe(ProbeKind.GOOD, rng), event, rng).is_good for _ in range(1000)) / 1000
        rates.append(bad)
        assert bad > 0.55, ACTIONS[index].name
    assert np.mean(rates) > 0.8
    gentle = event_for_action(ACTIONS[1])  # +2.5 V pulse
    assert damage_probability(gentle) < 0.02


def test_deeper_dips_and_larger_pulses_leave_more_debris() -> None:
    radii = [debris_for(DipEvent(d * NM))[0] for d in (0.8, 1.2, 2.5, 5.0)]
    heights = [debris_for(DipEvent(d * NM))[1] for d in (0.8, 1.2, 2.5, 5.0)]
    assert radii == sorted(radii) and heights == sorted(heights) and radii[0] > 0
    assert debris_for(PulseEvent(-8.0, 0.2))[0] > debris_for(PulseEvent(-4.0, 0.2))[0] > 0
    assert debris_for(PulseEvent(2.5, 0.2)) == (0.0, 0.0)


def test_physical_parameters_matter() -> None:
    # a dip that does not reach the sample does nothing; a pulse from far away has no field
    assert fix_probability(ProbeKind.DOUBLE, DipEvent(0.5 * NM, gap_m=REFERENCE_GAP_M)) == 0.0
    assert damage_probability(DipEvent(3 * NM, gap_m=10 * NM)) == 0.0
    assert PulseEvent(-8.0, 0.2, gap_m=100 * NM).strength < 0.1
    assert fix_probability(ProbeKind.UNSTABLE, PulseEvent(-4.0, 0.2)) > fix_probability(ProbeKind.UNSTABLE, PulseEvent(-2.5, 0.2))
    assert PulseEvent(-4.0, 1.0).strength > PulseEvent(-4.0, 0.05).strength


def test_scanning_degrades_good_probes_and_unstable_ones_settle() -> None:
    rng = np.random.default_rng(2)
    good = make_probe(ProbeKind.GOOD, rng)
    changes = sum(spontaneous_change(good, 0.1, 1.0, rng) is not None for _ in range(2000)) / 2000
    assert changes == pytest.approx(0.1, abs=0.02)
    assert all(spontaneous_change(good, 0.0, 1.0, rng) is None for _ in range(200))
    unstable = make_probe(ProbeKind.UNSTABLE, rng)
    settled = [spontaneous_change(unstable, 0.0, 1.0, rng) for _ in range(3000)]
    to_good = sum(p is not None and p.is_good for p in settled) / 3000
    assert to_good == pytest.approx(0.12 * 0.6, abs=0.02)
