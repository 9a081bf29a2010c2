"""What the run loop asks of the nets: p(good) for a frame, an action for a conditioning step, learning.

`Brain` is the loop's view; `NetBrain` implements it with the JAX predictors and the double-DQN learner.
All net work runs in worker threads (`asyncio.to_thread`), so the event loop keeps serving the instrument;
the learner runs as its own task and swaps a new parameter snapshot in atomically after each update, so
acting always reads a consistent copy and never waits for learning.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ActionDecision:
    action: int
    q_values: list[float]
    epsilon: float
    explored: bool  # True when the action was drawn at random (epsilon-greedy)
    net_version: str


class Brain(Protocol):
    classifier_version: str
    agent_version: str

    async def classify(self, image: np.ndarray) -> float: ...

    async def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision: ...

    def store(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, terminal: bool,
              next_mask: np.ndarray) -> None: ...

    async def learner(self) -> None: ...

    def stop_learning(self) -> None: ...


def epsilon_greedy(q_values: np.ndarray, mask: np.ndarray, epsilon: float, rng: np.random.Generator) -> tuple[int, bool]:
    """Greedy over allowed actions, or uniform among them with probability epsilon."""
    allowed = np.flatnonzero(mask)
    if allowed.size == 0:
        raise ValueError("no allowed action")
    if rng.random() < epsilon:
        return int(allowed[rng.integers(allowed.size)]), True
    masked = np.where(mask, q_values, -np.inf)
    return int(np.argmax(masked)), False


class LearnerGate:
    """Wakes the learner task when new experience arrives; `stop()` ends it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.stopped = False

    def notify(self) -> None:
        self._event.set()

    def stop(self) -> None:
        self.stopped = True
        self._event.set()

    async def wait(self) -> bool:
        await self._event.wait()
        self._event.clear()
        return not self.stopped
