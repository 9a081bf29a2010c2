"""Episode bookkeeping: bad-probe counter, episodes, rewards, reset phase, labels, persistence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspm.controller.episode import (
    ConditioningStep,
    EpisodeConfig,
    EpisodeTracker,
    ImageLabel,
    Phase,
    ProbeOutcome,
    TerminalReward,
    random_reset_action,
)
from deepspm.fsm.guards import episode_starts, training_mode
from deepspm.io.actions import N_ACTIONS, RESET_ACTIONS

GOOD, BAD, VERY_BAD = 0.95, 0.5, 0.05


class Script:
    """Drives a tracker as the controller does: act if an action is due (on the last frame), then
    observe a new frame with the scripted p(good)."""

    def __init__(self, tracker: EpisodeTracker) -> None:
        self.tracker = tracker
        self.last_frame = "start"
        self._frames = itertools.count()

    def step(self, p_good: float, action: int = 3) -> ProbeOutcome:
        if self.tracker.phase in (Phase.CONDITION, Phase.RESET):
            self.tracker.record_action(action, self.last_frame)
        self.last_frame = f"f{next(self._frames)}"
        return self.tracker.observe(p_good, self.last_frame)

    def start_episode(self) -> None:
        for _ in range(self.tracker.config.bad_probe_threshold):
            outcome = self.step(BAD)
        assert outcome.episode_started


def test_nine_bad_images_do_not_start_an_episode_the_tenth_does() -> None:
    tracker = EpisodeTracker()
    run = Script(tracker)
    outcomes = [run.step(BAD) for _ in range(9)]
    assert [o.trigger for o in outcomes] == ["probe_bad"] * 9
    assert [o.bad_probe_count for o in outcomes] == list(range(1, 10))
    assert all(o.next_phase is Phase.SCAN and not o.episode_started and not o.labels for o in outcomes)
    assert not any(episode_starts(o.decision_context(tracker.config)) for o in outcomes)
    tenth = run.step(BAD)
    assert tenth.trigger == "probe_bad" and tenth.episode_started and tenth.next_phase is Phase.CONDITION
    assert tenth.bad_probe_count == 10 and tenth.in_episode and tenth.episode_index == 1
    assert episode_starts(tenth.decision_context(tracker.config))
    # the ten triggering images belong to the episode: not good images
    assert len(tenth.labels) == 10 and not any(label.good_image for label in tenth.labels)


def test_a_good_probe_resets_the_counter_and_releases_waiting_labels() -> None:
    tracker = EpisodeTracker()
    run = Script(tracker)
    bad = [run.step(BAD) for _ in range(9)]
    good = run.step(GOOD)
    assert good.trigger == "probe_good" and good.bad_probe_count == 0 and good.next_phase is Phase.SCAN
    assert len(good.labels) == 10 and all(label.good_image for label in good.labels)
    assert not any(o.episode_started for o in bad)
    outcomes = [run.step(BAD) for _ in range(10)]
    assert [o.episode_started for o in outcomes] == [False] * 9 + [True]
    # the threshold is p > 0.9, strictly
    assert EpisodeTracker().observe(0.9, "f").trigger == "probe_bad"


def test_rewards_and_the_episode_span() -> None:
    tracker = EpisodeTracker()
    run = Script(tracker)
    run.start_episode()
    s0 = run.last_frame
    first = run.step(BAD, action=7)
    assert first.step == ConditioningStep(s0, 7, -1.0, run.last_frame, terminal=False)
    assert first.reward == -1.0 and first.next_phase is Phase.CONDITION and first.trigger == "probe_bad"
    assert first.labels == (ImageLabel(run.last_frame, False),)
    s1 = run.last_frame
    last = run.step(GOOD, action=2)
    # the paper: -1 for the action plus +10 for the successful episode
    assert last.step == ConditioningStep(s1, 2, 9.0, run.last_frame, terminal=True)
    assert last.trigger == "probe_good" and last.episode_ended and not last.in_episode
    assert last.next_phase is Phase.SCAN and last.bad_probe_count == 0
    assert last.labels == (ImageLabel(run.last_frame, True),)
    assert tracker.episode_actions == 2 and tracker.episode_index == 1
    # after the episode, counting starts from zero again
    assert run.step(BAD).bad_probe_count == 1


def test_code_variant_gives_ten_instead_of_minus_one() -> None:
    tracker = EpisodeTracker(EpisodeConfig(terminal_reward=TerminalReward.CODE))
    run = Script(tracker)
    run.start_episode()
    assert run.step(BAD).reward == -1.0
    assert run.step(GOOD).reward == 10.0


def test_no_room_means_no_transition_and_the_episode_goes_on() -> None:
    tracker = EpisodeTracker()
    run = Script(tracker)
    run.start_episode()
    outcome = tracker.observe(BAD, "g")  # no action was executed (no_room)
    assert outcome.step is None and outcome.next_phase is Phase.CONDITION and tracker.episode_actions == 0


def test_actions_are_only_accepted_when_due() -> None:
    tracker = EpisodeTracker()
    run = Script(tracker)
    with pytest.raises(ValueError):
        tracker.record_action(1, "f")
    run.start_episode()
    tracker.record_action(1, "f")
    with pytest.raises(ValueError):
        tracker.record_action(1, "f")  # one action per image


def test_episode_cap_truncates_and_moves_to_a_new_area() -> None:
    tracker = EpisodeTracker(EpisodeConfig(max_episode_actions=3))
    run = Script(tracker)
    run.start_episode()
    outcomes = [run.step(BAD) for _ in range(3)]
    assert [o.next_phase for o in outcomes] == [Phase.CONDITION, Phase.CONDITION, Phase.NEW_AREA]
    last = outcomes[-1]
    assert last.episode_ended and last.episode_truncated and last.trigger == "probe_bad"
    assert last.step is not None and not last.step.terminal and last.reward == -1.0
    assert not episode_starts(last.decision_context(tracker.config))  # FSM: probe_bad -> selecting
    assert [run.step(BAD).episode_started for _ in range(10)] == [False] * 9 + [True]
    assert tracker.episode_index == 2


def test_training_first_episode_starts_without_reset_and_reset_follows_success() -> None:
    cfg = EpisodeConfig(training=True)
    tracker = EpisodeTracker(cfg)
    run = Script(tracker)
    first = run.step(BAD)
    assert first.episode_started and first.next_phase is Phase.CONDITION and first.episode_index == 1
    assert episode_starts(first.decision_context(cfg))
    success = run.step(GOOD)
    assert success.episode_ended and success.reward == 9.0 and success.next_phase is Phase.RESET
    assert success.trigger == "probe_good" and training_mode(success.decision_context(cfg))
    # reset phase: random actions until p < 0.1; no reward, no transition
    r1 = run.step(BAD, action=5)
    assert r1.trigger is None and r1.next_phase is Phase.RESET and r1.step is None
    r2 = run.step(GOOD, action=9)
    assert r2.trigger is None and r2.next_phase is Phase.RESET
    r3 = run.step(VERY_BAD, action=11)
    assert r3.trigger == "reset_done" and r3.next_phase is Phase.SCAN and r3.step is None
    assert tracker.reset_actions == 3
    assert not any(label.good_image for o in (r1, r2, r3) for label in o.labels)
    # the next image starts the next episode at once (no 10-image trigger in training)
    nxt = run.step(BAD)
    assert nxt.episode_started and nxt.next_phase is Phase.CONDITION and nxt.episode_index == 2


def test_training_reset_gives_up_after_five_and_the_next_episode_ends_immediately() -> None:
    tracker = EpisodeTracker(EpisodeConfig(training=True))
    run = Script(tracker)
    assert run.step(BAD).episode_started
    assert run.step(GOOD).next_phase is Phase.RESET
    resets = [run.step(GOOD, action=6) for _ in range(5)]
    assert [o.trigger for o in resets] == [None] * 4 + ["reset_done"]
    still_good = run.step(GOOD)
    assert still_good.episode_started and still_good.episode_ended and still_good.step is None
    assert still_good.next_phase is Phase.RESET and still_good.trigger == "probe_good"
    assert tracker.episode_index == 2 and tracker.episode_actions == 0


def test_training_first_image_good_is_a_zero_step_episode() -> None:
    tracker = EpisodeTracker(EpisodeConfig(training=True))
    run = Script(tracker)
    outcome = run.step(GOOD)
    assert outcome.episode_started and outcome.episode_ended and outcome.next_phase is Phase.RESET
    assert outcome.labels == (ImageLabel(run.last_frame, True),)





def test_random_reset_action() -> None:
    only_pulse = np.zeros(N_ACTIONS, dtype=bool)
    only_pulse[5] = True
    assert random_reset_action(np.random.default_rng(0), only_pulse) == 5
    draws = [random_reset_action(np.random.default_rng(1), np.ones(N_ACTIONS, bool)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = np.random.default_rng(2)
    seen = {random_reset_action(rng, np.ones(N_ACTIONS, bool)) for _ in range(300)}
    assert seen == set(RESET_ACTIONS)
    with pytest.raises(ValueError):
        random_reset_action(rng, np.zeros(N_ACTIONS, bool))


@settings(max_examples=200, deadline=None)
@given(training=st.booleans(), probabilities=st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.5, 0.9, 0.95, 1.0]), max_size=80))
def test_scripted_runs_keep_the_invariants(training: bool, probabilities: list[float]) -> None:
    """Random classifier outputs: the FSM guards agree with the tracker, every frame gets exactly
    one label, transitions follow actions, and the state survives JSON at every step."""
    cfg = EpisodeConfig(training=training, bad_probe_threshold=3, max_episode_actions=4, reset_max_actions=2)
    tracker = EpisodeTracker(cfg)
    labelled: list[str] = []
    observed: list[str] = []
    last = "start"
    for i, p in enumerate(probabilities):
        acted = tracker.phase in (Phase.CONDITION, Phase.RESET)
        in_episode_before = tracker.in_episode
        if acted:
            tracker.record_action(i % N_ACTIONS, last)
        last = f"frame{i}"
        observed.append(last)
        outcome = tracker.observe(p, last)
        labelled += [label.frame_ref for label in outcome.labels]
        assert 0 <= outcome.bad_probe_count <= cfg.bad_probe_threshold
        if outcome.step is not None:
            assert acted and in_episode_before and outcome.step.next_state_ref == last
            assert outcome.step.reward in (-1.0, 9.0)
            assert outcome.step.terminal == (outcome.reward == 9.0) == outcome.probe_good
        ctx = outcome.decision_context(cfg)
        if outcome.trigger == "probe_bad":
            assert episode_starts(ctx) == (outcome.next_phase is Phase.CONDITION)
        elif outcome.trigger == "probe_good":
            assert training_mode(ctx) == (outcome.next_phase is Phase.RESET)
        else:
            assert training and outcome.next_phase in (Phase.RESET, Phase.SCAN)
        if not training:
            assert outcome.next_phase is not Phase.RESET
            if outcome.episode_started:
                assert outcome.bad_probe_count == cfg.bad_probe_threshold
    labelled += [label.frame_ref for label in tracker.flush_labels()]
    assert sorted(labelled) == sorted(observed)
