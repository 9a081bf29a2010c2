"""Fixed-capacity FIFO replay memory for the double DQN (reference section 4.3).

Preallocated numpy rings (the original kept an ever-growing list and reloaded it whole on resume). Each
experience is stored four times: as recorded, flipped left-right, up-down, and both (the same transform
on s and s'; the action, reward and the allowed-action mask of s' are flip-invariant because an action is
executed at the centre of the largest empty square, whose size a flip does not change).

Memory: two (capacity, 64, 64) float32 image rings, ~0.5 GB at 15 000; numpy allocates pages lazily, so
a fresh buffer costs what it holds. Not thread-safe by itself: the `Learner` guards it with a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CAPACITY = 15_000


def four_flips(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (4, H, W): identity, left-right, up-down, both (= 180° rotation)."""
    image = np.asarray(image)
    lr = image[:, ::-1]
    return np.stack([image, lr, image[::-1, :], lr[::-1, :]])


@dataclass(frozen=True)
class Batch:
    """A sampled minibatch: states (B, H, W), actions (B,), rewards (B,), next states, dones (B,) and the
    allowed-action masks of the next states (B, n_actions)."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_states: np.ndarray
    dones: np.ndarray
    next_masks: np.ndarray


class ReplayBuffer:
    _ARRAYS = ("states", "next_states", "actions", "rewards", "dones", "next_masks")

    def __init__(
        self,
        n_actions: int,
        capacity: int = DEFAULT_CAPACITY,
        image_side_px: int = 64,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        if capacity < 4:
            raise ValueError("capacity must hold at least one experience's four copies")
        self.capacity = capacity
        self.n_actions = n_actions
        self.augment = augment
        shape = (capacity, image_side_px, image_side_px)
        self.states = np.zeros(shape, np.float32)
        self.next_states = np.zeros(shape, np.float32)
        self.actions = np.zeros(capacity, np.int32)
        self.rewards = np.zeros(capacity, np.float32)
        self.dones = np.zeros(capacity, bool)
        self.next_masks = np.zeros((capacity, n_actions), bool)
        self.size = 0  # filled slots
        self.cursor = 0  # next slot to write
        self.added = 0  # experiences ever added (each one is 4 rows with augmentation)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(
        self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, done: bool, next_mask: Any
    ) -> None:
        """Store one experience (and its flipped copies); the oldest rows are overwritten when full."""
        next_mask = np.asarray(next_mask, dtype=bool)
        if next_mask.shape != (self.n_actions,):
            raise ValueError(f"mask must have {self.n_actions} entries, got shape {next_mask.shape}")
        if not 0 <= int(action) < self.n_actions:
            raise ValueError(f"action {action} out of range 0..{self.n_actions - 1}")
        states = four_flips(state) if self.augment else np.asarray(state)[None]
        next_states = four_flips(next_state) if self.augment else np.asarray(next_state)[None]
        for s, s2 in zip(states, next_states):
            i = self.cursor
            self.states[i] = s
            self.next_states[i] = s2
            self.actions[i] = action
            self.rewards[i] = reward
            self.dones[i] = done
            self.next_masks[i] = next_mask
            self.cursor = (i + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)
        self.added += 1

    def sample(self, batch_size: int) -> Batch:
        """Uniformly with replacement from the filled rows (seeded)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        idx = self._rng.integers(0, self.size, batch_size)
        return Batch(
            self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx], self.dones[idx],
            self.next_masks[idx],
        )

    def ordered_rows(self) -> np.ndarray:
        """Indices of the filled rows from oldest to newest."""
        if self.size < self.capacity:
            return np.arange(self.size)
        return (np.arange(self.capacity) + self.cursor) % self.capacity

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: `arrays` (the filled rows in storage order, so sampled
        indices mean the same rows after a resume) and `meta` (JSON-able: sizes, cursor, RNG state)."""
        n = self.size  # the ring fills rows 0..size-1 before wrapping, so these are all the filled rows
        arrays = {  # copies: the caller may write them out while the actor keeps adding
            name: getattr(self, name)[:n].copy() for name in self._ARRAYS
        }
        meta = {
            "capacity": self.capacity, "n_actions": self.n_actions, "augment": self.augment,
            "image_side_px": int(self.states.shape[1]), "size": self.size, "cursor": self.cursor,
            "added": self.added, "rng_state": self._rng.bit_generator.state,
        }
        return {"arrays": arrays, "meta": meta}

    def sampling_state(self) -> dict[str, Any]:
        """The sampling RNG's state (JSON-able): what decides the next batches, given the same rows."""
        return dict(self._rng.bit_generator.state)

    def load_sampling_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output into this buffer (same capacity, actions and image size)."""
        meta, arrays = state["meta"], state["arrays"]
        expected = (self.capacity, self.n_actions, int(self.states.shape[1]))
        found = (int(meta["capacity"]), int(meta["n_actions"]), int(meta["image_side_px"]))
        if found != expected:
            raise ValueError(f"buffer layout (capacity, n_actions, side) {found} != this buffer's {expected}")
        size = int(meta["size"])
        for name in self._ARRAYS:
            target = getattr(self, name)
            target[:size] = arrays[name][:size]
        self.size = size
        self.cursor = int(meta["cursor"])
        self.added = int(meta["added"])
        self.augment = bool(meta["augment"])
        self._rng.bit_generator.state = meta["rng_state"]
