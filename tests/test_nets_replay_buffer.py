"""The fixed-capacity replay ring (deepspm.nets.replay_buffer)."""

from __future__ import annotations

import numpy as np
import pytest

from deepspm.nets.replay_buffer import ReplayBuffer, four_flips

N_ACTIONS = 12
SIDE = 8


def image(value: float) -> np.ndarray:
    """An asymmetric image tagged by `value` (so flips and identity are distinguishable)."""
    img = np.arange(SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE) / 100.0
    return img + value


def mask_of(*allowed: int) -> np.ndarray:
    m = np.zeros(N_ACTIONS, bool)
    m[list(allowed)] = True
    return m


def test_four_flips() -> None:
    a = np.array([[1, 2], [3, 4]])
    flips = four_flips(a)
    np.testing.assert_array_equal(flips[0], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(flips[1], [[2, 1], [4, 3]])  # left-right
    np.testing.assert_array_equal(flips[2], [[3, 4], [1, 2]])  # up-down
    np.testing.assert_array_equal(flips[3], [[4, 3], [2, 1]])  # both = 180 degrees


def test_each_experience_is_stored_with_the_same_flip_on_s_and_s_next() -> None:
    buf = ReplayBuffer(N_ACTIONS, capacity=20, image_side_px=SIDE)
    buf.add(image(1), 4, -1.0, image(2), False, mask_of(0, 4))
    assert len(buf) == 4
    rows = buf.rows(np.arange(4))
    for k in range(4):
        np.testing.assert_array_equal(rows.states[k], four_flips(image(1))[k])
        np.testing.assert_array_equal(rows.next_states[k], four_flips(image(2))[k])
    assert np.all(rows.actions == 4) and np.all(rows.rewards == -1.0) and not rows.dones.any()
    assert np.all(rows.next_masks == mask_of(0, 4))


def test_an_experience_is_stored_once_and_its_copies_are_made_when_sampled() -> None:
    """The four copies are virtual rows: a capacity of 15 000 rows holds 3750 images a side (~123 MB, not ~0.5 GB),
    and a seeded sample draws exactly the rows the stored copies gave (row r = copy r % 4 of experience r // 4)."""
    buf = ReplayBuffer(N_ACTIONS, capacity=16, image_side_px=SIDE, seed=5)
    assert buf._states.shape == (4, SIDE, SIDE)
    for i in range(6):  # wraps: experiences 2..5 remain
        buf.add(image(10 * i), i, float(i), image(10 * i + 1), i == 5, mask_of(i))
    stored = {(e % 4) * 4 + k: (four_flips(image(10 * e))[k], four_flips(image(10 * e + 1))[k], e)
              for e in range(6) for k in range(4)}  # the rows as the ring of copies held them
    idx = np.random.default_rng(5).integers(0, 16, 32)
    batch = buf.sample(32)
    for j, row in enumerate(idx):
        s, s2, e = stored[int(row)]
        np.testing.assert_array_equal(batch.states[j], s)
        np.testing.assert_array_equal(batch.next_states[j], s2)
        assert batch.actions[j] == e and batch.rewards[j] == e and batch.dones[j] == (e == 5)
    with pytest.raises(ValueError, match="multiple of the 4 rows"):
        ReplayBuffer(N_ACTIONS, capacity=10, image_side_px=SIDE)


def test_ring_wraps_and_keeps_the_newest() -> None:
    buf = ReplayBuffer(N_ACTIONS, capacity=12, image_side_px=SIDE)  # room for 3 experiences
    for i in range(7):
        buf.add(image(10 * i), i % N_ACTIONS, float(i), image(10 * i + 1), i == 6, mask_of(i))
    assert len(buf) == 12 and buf.added == 7
    rows = buf.rows(buf.ordered_rows())
    # 28 rows were written; the last 12 are experiences 4, 5 and 6 (all copies), oldest first
    for j, (e, k) in enumerate((e, k) for e in (4, 5, 6) for k in range(4)):
        np.testing.assert_array_equal(rows.states[j], four_flips(image(10 * e))[k])
        assert rows.rewards[j] == e and rows.next_masks[j].argmax() == e
    assert rows.dones[-1]
    sampled = buf.sample(200)
    assert set(np.unique(sampled.rewards)) <= {4.0, 5.0, 6.0}  # nothing older survives


def test_sampling_is_seeded_and_shapes_are_right() -> None:
    def filled(seed: int) -> ReplayBuffer:
        buf = ReplayBuffer(N_ACTIONS, capacity=40, image_side_px=SIDE, seed=seed)
        for i in range(5):
            buf.add(image(i), i, float(i), image(i + 0.5), False, mask_of(i))
        return buf

    a, b = filled(1).sample(16), filled(1).sample(16)
    np.testing.assert_array_equal(a.states, b.states)
    assert a.states.shape == (16, SIDE, SIDE) and a.next_masks.shape == (16, N_ACTIONS)
    assert not np.array_equal(filled(2).sample(16).rewards, a.rewards)


def test_state_dict_round_trip_resumes_the_same_samples() -> None:
    buf = ReplayBuffer(N_ACTIONS, capacity=12, image_side_px=SIDE, seed=3)
    for i in range(5):  # wraps once
        buf.add(image(i), i, float(i), image(i + 0.5), i % 2 == 0, mask_of(i, 11))
    buf.sample(3)  # advance the RNG
    state = buf.state_dict()
    fresh = ReplayBuffer(N_ACTIONS, capacity=12, image_side_px=SIDE, seed=99)
    fresh.load_state_dict(state)
    assert len(fresh) == len(buf) and fresh.added == buf.added
    x, y = buf.sample(8), fresh.sample(8)
    np.testing.assert_array_equal(x.rewards, y.rewards)
    np.testing.assert_array_equal(x.next_states, y.next_states)
    # new additions overwrite the oldest rows in both
    buf.add(image(9), 9, 9.0, image(9), False, mask_of(9))
    fresh.add(image(9), 9, 9.0, image(9), False, mask_of(9))
    np.testing.assert_array_equal(buf.rows(np.arange(12)).rewards, fresh.rows(np.arange(12)).rewards)
    with pytest.raises(ValueError, match="layout"):
        ReplayBuffer(N_ACTIONS, capacity=16, image_side_px=SIDE).load_state_dict(state)


def test_invalid_experiences_are_rejected() -> None:
    buf = ReplayBuffer(N_ACTIONS, capacity=8, image_side_px=SIDE)
    with pytest.raises(ValueError, match="mask"):
        buf.add(image(0), 0, 0.0, image(0), False, np.ones(5, bool))
    with pytest.raises(ValueError, match="action"):
        buf.add(image(0), N_ACTIONS, 0.0, image(0), False, mask_of(0))
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
