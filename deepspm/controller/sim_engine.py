"""The synchronous engine: the run's plans driven in-process, for training and evaluation in simulation.

Like bluesky's `simulate_plan`, it runs the very plans the async run loop runs (`plans.py`), over an
`InProcessInstrument` (the simulated microscope, no TCP), with the nets called directly and the FSM's
transitions taken from the same table (`fsm.machine.next_state`). Nothing is journaled: documents go to an
optional callback. So the conditioning logic of training cannot drift from the run's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from deepspm.controller.brain import ActionDecision
from deepspm.controller.commands import Command, Settle, Wait
from deepspm.controller.documents import Document
from deepspm.controller.journal import frame_ref
from deepspm.controller.messages import (
    Choose,
    Classify,
    ClassifyLines,
    Compute,
    Experience,
    Fire,
    Learn,
    Scanned,
    UnknownMessage,
)
from deepspm.controller.plans import RunState, plan_for
from deepspm.fsm.machine import next_state
from deepspm.fsm.states import State
from deepspm.io.instrument import Frame
from deepspm.simulator.inprocess import InProcessInstrument


class SyncNets(Protocol):
    """What the plans ask of the nets, answered at once."""

    def classify(self, image: np.ndarray) -> float: ...
    def classify_lines(self, image: np.ndarray) -> float: ...
    def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision: ...
    def store(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, terminal: bool,
              next_mask: np.ndarray) -> None: ...
    def learn(self) -> None: ...


class SyncEngine:
    """Runs `plans.py` step by step on an in-process simulated microscope."""

    def __init__(self, run_state: RunState, instrument: InProcessInstrument, nets: SyncNets,
                 on_document: Callable[[Document], None] | None = None) -> None:
        self.run_state = run_state
        self.instrument = instrument
        self.nets = nets
        self.on_document = on_document
        self.state = State.idle
        self.transitions: list[tuple[str, State, State]] = []  # every trigger taken, in order

    def step(self) -> None:
        """Run the plan of the current state to its end."""
        plan = plan_for(self.state, self.run_state)
        result: Any = None
        try:
            while True:
                try:
                    message = plan.send(result)
                except StopIteration:
                    return
                result = self.perform(message)
        finally:
            plan.close()

    def run(self, done: Callable[[], bool], max_steps: int | None = None) -> None:
        """Step until `done()` (checked between steps, the run's safe points) or `max_steps`."""
        steps = 0
        while not done() and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1

    def perform(self, message: Any) -> Any:
        if isinstance(message, Command):
            return self._execute(message)
        if isinstance(message, Document):
            if self.on_document is not None:
                self.on_document(message)
            return None
        if isinstance(message, Fire):
            dest = next_state(message.trigger, self.state, message.ctx)
            self.transitions.append((message.trigger, self.state, dest))
            self.state = dest
            return None
        if isinstance(message, Compute):
            return message.fn(*message.args)
        if isinstance(message, Classify):
            return self.nets.classify(message.image)
        if isinstance(message, ClassifyLines):
            return self.nets.classify_lines(message.image)
        if isinstance(message, Choose):
            return self.nets.choose(message.image, message.mask, message.rng)
        if isinstance(message, Experience):
            self.nets.store(message.state, message.action, message.reward, message.next_state, message.terminal,
                            message.next_mask)
            return None
        if isinstance(message, Learn):
            self.nets.learn()
            return None
        raise UnknownMessage(f"a plan yielded {message!r}, which no engine performs")

    def _execute(self, command: Command) -> Any:
        if isinstance(command, (Settle, Wait)):
            self.instrument.wait(command.seconds)
            return None
        if not command.touches_instrument:
            return None
        result = getattr(self.instrument, command.op)(**command.instrument_kwargs())
        if isinstance(result, Frame):
            return Scanned(result, frame_ref(result.data_m))
        return result
