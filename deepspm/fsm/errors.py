"""Errors raised when the controller fires a trigger the FSM does not allow."""

from __future__ import annotations

from transitions import MachineError

from .states import State


class IllegalTransition(MachineError):
    """`trigger` has no row from `state` (a MachineError, so code catching the library's error still works)."""

    def __init__(self, trigger: str, state: State, reason: str | None = None) -> None:
        self.trigger = trigger
        self.state = state
        self.reason = reason or f"no transition for trigger {trigger!r} from state {state.value!r}"
        super().__init__(self.reason)

    def __str__(self) -> str:
        return self.reason


class GuardRejected(IllegalTransition):
    """Rows exist for (trigger, state) but no guard passed; the library would silently return False."""

    def __init__(self, trigger: str, state: State, ctx: object) -> None:
        super().__init__(trigger, state, f"no guard passed for trigger {trigger!r} from state {state.value!r} with {ctx!r}")
        self.ctx = ctx


class UnknownTrigger(IllegalTransition):
    """The trigger name is not in the table at all."""

    def __init__(self, trigger: str, state: State) -> None:
        super().__init__(trigger, state, f"unknown trigger {trigger!r} (state {state.value!r})")


class MissingContext(TypeError):
    """A guarded trigger was fired without `ctx=DecisionContext(...)`."""


class ConcurrentTrigger(RuntimeError):
    """A trigger was fired while another was still being processed on the same machine.

    transitions 0.9.3 would cancel the running one and report False; we forbid the overlap instead
    (design.md: exactly one task, the controller loop, fires triggers).
    """
