"""What a plan may yield besides a `Command` (performed on the instrument) and a `Document` (journaled).

Each message is plain data; an engine acts on it and sends the result back into the plan (None where
there is none). The async engine (`loop.RunLoop`) runs nets and CPU work in worker threads; the
synchronous one (`sim_engine.SyncEngine`) calls them directly. Neither changes what a plan decides.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepspm.fsm.guards import DecisionContext
from deepspm.io.instrument import Frame


@dataclass(frozen=True)
class Fire:
    """Fire an FSM trigger; a plan ends after it."""

    trigger: str
    ctx: DecisionContext | None = None


@dataclass(frozen=True, eq=False)
class Compute:
    """CPU-bound work (levelling a frame): `fn(*args)`, off the event loop in the async engine."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class Classify:
    """p(good probe) of a normalised (64, 64) image -> float."""

    image: np.ndarray


@dataclass(frozen=True, eq=False)
class ClassifyLines:
    """p(good probe) of a partial frame's normalised image (unscanned rows filled) by the line-window net -> float."""

    image: np.ndarray


@dataclass(frozen=True, eq=False)
class Choose:
    """A conditioning action for `image` among the allowed ones (`mask`) -> `brain.ActionDecision`; `rng`
    draws the exploration (the run's agent stream, so a replay draws the same)."""

    image: np.ndarray
    mask: np.ndarray
    rng: np.random.Generator


@dataclass(frozen=True)
class ActionDecision:
    """What `Choose` answers: the action, the Q-values it was chosen from, and how."""

    action: int
    q_values: list[float]
    epsilon: float
    explored: bool  # drawn at random (epsilon-greedy) rather than greedy
    net_version: str


@dataclass(frozen=True, eq=False)
class Experience:
    """One completed conditioning step for the agent's replay memory."""

    state: np.ndarray
    action: int
    reward: float
    next_state: np.ndarray
    terminal: bool
    next_mask: np.ndarray


@dataclass(frozen=True)
class Learn:
    """Run the learner updates that are due now. Learning happens only here, at points the journal fixes
    (after each stored experience), so a replay or a resume reproduces the weights exactly."""


@dataclass(frozen=True, eq=False)
class Scanned:
    """What a `Scan` command gives back to a plan: the frame and its content reference in the journal."""

    frame: Frame
    ref: str


Plan = Generator[Any, Any, Any]


class UnknownMessage(TypeError):
    """A plan yielded something no engine performs (a bug in the plan)."""
