"""What the run loop asks of the nets: p(good) for a frame, an action for a conditioning step, learning.

`Brain` is the loop's view; `NetBrain` implements it with the compiled JAX predictors and the double-DQN
learner of `deepspm.nets`. Net work runs in worker threads (`asyncio.to_thread`), so the event loop keeps
serving the instrument. Learning happens where the plans ask for it (`learn`, after each stored
experience, the updates owed under the update-to-data ratio), never at a time the scheduler picks: the
weights after any journaled step are a function of the journal, so replay recomputes online-learned
decisions exactly and resume rebuilds the weights, not only the replay memory.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

from deepspm.controller.messages import ActionDecision
from deepspm.nets.dqn import Actor, Learner, epsilon_at
from deepspm.nets.inference import Predictor, predict_async


class Brain(Protocol):
    classifier_version: str

    async def classify(self, image: np.ndarray) -> float: ...

    async def classify_lines(self, image: np.ndarray) -> float: ...

    async def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision: ...

    def store(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, terminal: bool,
              next_mask: np.ndarray) -> None: ...

    async def learn(self) -> None: ...


class NetBrain:
    """The classifier and the agent. `epsilon=None` follows the DQN schedule (training); a number fixes it."""

    def __init__(
        self,
        classifier: Predictor,
        learner: Learner,
        *,
        classifier_version: str,
        agent_version: str,
        epsilon: float | None,
        learn_online: bool,
        checkpoint_paths: dict[str, str] | None = None,
        lines: Predictor | None = None,
        lines_version: str | None = None,
    ) -> None:
        self.classifier = classifier
        self.lines = lines  # the line-window classifier (judges partial frames while they are scanned)
        self.lines_version = lines_version
        self.learner = learner
        self.actor = Actor(learner, compile_now=False)
        self.classifier_version = classifier_version
        self.agent_version = agent_version
        self.epsilon = epsilon
        self.learn_online = learn_online
        self.checkpoint_paths = checkpoint_paths or {}  # where the weights came from (journaled, for replay)

    def compile(self) -> None:
        """Compile both nets for batch 1, and the learner's update step when the run learns, before the run
        starts (the first frame, and the first learning step, must not pay for tracing)."""
        self.classifier.compile([1])
        self.actor.predictor.compile([1])
        if self.lines is not None:
            self.lines.compile([1])
        if self.learn_online:
            self.learner.compile()

    async def classify(self, image: np.ndarray) -> float:
        return float((await predict_async(self.classifier, image))[0])

    async def classify_lines(self, image: np.ndarray) -> float:
        if self.lines is None:
            raise RuntimeError("no line-window classifier is loaded (classifier.lines_checkpoint = \"none\")")
        return float((await predict_async(self.lines, image))[0])

    async def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision:
        epsilon = self.epsilon if self.epsilon is not None else epsilon_at(self.learner.env_steps, self.learner.config)
        d = await self.actor.act_async(image, mask, epsilon, rng)
        return ActionDecision(d.action, [float(q) for q in d.q_values], d.epsilon, d.explored,
                              f"{self.agent_version}+{d.net_version}")

    def store(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, terminal: bool,
              next_mask: np.ndarray) -> None:
        if self.learn_online:
            self.learner.record(state, action, reward, next_state, terminal, next_mask)

    async def learn(self) -> None:
        """The learner updates owed now (none when online learning is off), in a worker thread."""
        if self.learn_online:
            await asyncio.to_thread(self.learner.catch_up)
