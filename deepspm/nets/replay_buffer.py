"""Fixed-capacity FIFO replay memory for the double DQN (reference section 4.3).

Preallocated numpy rings (the original kept an ever-growing list and reloaded it whole on resume). Each
experience counts four times (four rows): as recorded, flipped left-right, up-down, and both (the same
transform on s and s'; the action, reward and the allowed-action mask of s' are flip-invariant because an
action is executed at the centre of the largest empty square, whose size a flip does not change).

Memory: the rows are virtual. An experience is stored once and its flipped copies are made when a batch is
sampled, so `capacity` rows (15 000) hold capacity / 4 experiences in two (capacity / 4, 64, 64) float32 image
rings, ~123 MB at 15 000 (it was ~0.5 GB with the four copies stored). Row r is copy r % 4 of experience slot
r // 4, the layout the stored copies had, so sampling draws the same rows as before. numpy allocates pages
lazily, so a fresh buffer costs what it holds. Not thread-safe by itself: the `Learner` guards it with a lock.
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


def _flipped(images: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """(B, H, W) images, each as its copy `copies[i]` of `four_flips` (0 identity, 1 left-right, 2 up-down, 3 both)."""
    out = np.array(images)  # a copy: the caller's batch, never a view of the ring
    lr = (copies == 1) | (copies == 3)
    ud = (copies == 2) | (copies == 3)
    out[lr] = out[lr][:, :, ::-1]
    out[ud] = out[ud][:, ::-1, :]
    return out


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
        copies = 4 if augment else 1
        if capacity < copies or capacity % copies:
            raise ValueError(f"capacity must be a multiple of the {copies} rows of an experience, got {capacity}")
        self.capacity = capacity
        self.n_actions = n_actions
        self.augment = augment
        self.side = image_side_px
        slots = capacity // copies
        self._states = np.zeros((slots, image_side_px, image_side_px), np.float32)
        self._next_states = np.zeros((slots, image_side_px, image_side_px), np.float32)
        self._actions = np.zeros(slots, np.int32)
        self._rewards = np.zeros(slots, np.float32)
        self._dones = np.zeros(slots, bool)
        self._next_masks = np.zeros((slots, n_actions), bool)
        self.size = 0  # filled rows
        self.cursor = 0  # next row to write (a multiple of the copies)
        self.added = 0  # experiences ever added (each one is 4 rows with augmentation)
        self._rng = np.random.default_rng(seed)

    @property
    def copies(self) -> int:
        return 4 if self.augment else 1

    def __len__(self) -> int:
        return self.size

    def add(
        self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, done: bool, next_mask: Any
    ) -> None:
        """Store one experience (its rows: the flipped copies); the oldest rows are overwritten when full."""
        next_mask = np.asarray(next_mask, dtype=bool)
        if next_mask.shape != (self.n_actions,):
            raise ValueError(f"mask must have {self.n_actions} entries, got shape {next_mask.shape}")
        if not 0 <= int(action) < self.n_actions:
            raise ValueError(f"action {action} out of range 0..{self.n_actions - 1}")
        slot = self.cursor // self.copies
        self._states[slot] = state
        self._next_states[slot] = next_state
        self._actions[slot] = action
        self._rewards[slot] = reward
        self._dones[slot] = done
        self._next_masks[slot] = next_mask
        self.cursor = (self.cursor + self.copies) % self.capacity
        self.size = min(self.size + self.copies, self.capacity)
        self.added += 1

    def rows(self, idx: np.ndarray) -> Batch:
        """The rows `idx` (their flipped copies made now)."""
        idx = np.asarray(idx)
        slots, copies = idx // self.copies, idx % self.copies
        return Batch(
            _flipped(self._states[slots], copies), self._actions[slots], self._rewards[slots],
            _flipped(self._next_states[slots], copies), self._dones[slots], self._next_masks[slots],
        )

    def sample(self, batch_size: int) -> Batch:
        """Uniformly with replacement from the filled rows (seeded)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        return self.rows(self._rng.integers(0, self.size, batch_size))

    def ordered_rows(self) -> np.ndarray:
        """Indices of the filled rows from oldest to newest."""
        if self.size < self.capacity:
            return np.arange(self.size)
        return (np.arange(self.capacity) + self.cursor) % self.capacity

    def state_dict(self, rows: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: `arrays` (the filled rows in storage order, so sampled
        indices mean the same rows after a resume; the checkpoint layout of the stored copies) and `meta`
        (JSON-able: sizes, cursor, RNG state). `rows=False`: the state of this memory emptied, its sampling RNG
        where it is (for a run whose journal holds the experience)."""
        size = self.size if rows else 0
        batch = self.rows(np.arange(size))  # new arrays: the caller may write them out while the actor adds
        arrays = {name: getattr(batch, name) for name in self._ARRAYS}
        meta = {
            "capacity": self.capacity, "n_actions": self.n_actions, "augment": self.augment,
            "image_side_px": self.side, "size": size, "cursor": self.cursor if rows else 0,
            "added": self.added if rows else 0, "rng_state": self._rng.bit_generator.state,
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
        expected = (self.capacity, self.n_actions, self.side)
        found = (int(meta["capacity"]), int(meta["n_actions"]), int(meta["image_side_px"]))
        if found != expected:
            raise ValueError(f"buffer layout (capacity, n_actions, side) {found} != this buffer's {expected}")
        self.augment = bool(meta["augment"])
        size = int(meta["size"])
        if size % self.copies:
            raise ValueError(f"buffer of {size} rows is not whole experiences of {self.copies} rows")
        for name in self._ARRAYS:  # copy 0 of each experience (rows 0, 4, 8, ...) is the experience as recorded
            getattr(self, f"_{name}")[:size // self.copies] = arrays[name][:size:self.copies]
        self.size = size
        self.cursor = int(meta["cursor"])
        self.added = int(meta["added"])
        self._rng.bit_generator.state = meta["rng_state"]
