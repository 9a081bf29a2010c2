"""The machine factory: a transitions `AsyncMachine` built from `TABLE`, plus a pure legality check.

Conventions (see design.md section 4 and the characterisation tests in tests/test_fsm_library.py):

- Triggers are fired as ``await model.probe_bad(ctx=ctx)`` or ``await model.fire("probe_bad", ctx)``.
  The only argument is the keyword ``ctx`` (a `DecisionContext`); it is required when a row for
  (trigger, current state) has a guard and ignored otherwise. ``send_event=True``: guards are wrapped
  so they receive the context from the event's kwargs and stay pure functions of it.
- No library callbacks at all. ``on_transition(trigger, source, dest)`` is called synchronously by
  our event class, in the firing task, right after the state has changed. transitions 0.9.3 runs
  callback lists through ``asyncio.gather`` (each callback in its own task, concurrently), and a
  cancellation while awaiting them could leave the state changed but the callback not run, i.e. an
  unjournaled transition. Calling it ourselves cannot be separated from the state change.
- What the library does silently, we make loud: an illegal trigger raises `IllegalTransition`;
  "no guard passed" (the library returns False) raises `GuardRejected`; a cancellation or timeout of
  the firing task (the library swallows the CancelledError and returns False) is re-raised as
  ``CancelledError``; a second trigger while one is in progress (the library would cancel the first)
  raises `ConcurrentTrigger`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from transitions.core import EventData
from transitions.extensions.asyncio import AsyncEvent, AsyncMachine

from .errors import ConcurrentTrigger, GuardRejected, IllegalTransition, MissingContext, UnknownTrigger
from .guards import GUARDS, DecisionContext, Guard
from .states import State
from .table import TABLE, Transition, rows_for

OnTransition = Callable[[str, State, State], None]

_RESERVED_PREFIXES = ("may_", "to_", "is_")
_RESERVED_NAMES = frozenset({"state", "trigger", "fire", "machine"})


def validate_table(table: tuple[Transition, ...]) -> None:
    """Reject tables the machine cannot run unambiguously (ValueError naming the bad row)."""
    for row in table:
        if row.guard is not None and row.guard not in GUARDS:
            raise ValueError(f"unknown guard {row.guard!r} in row {row}")
        if row.dest in row.sources:
            raise ValueError(f"reflexive row {row}: every transition must change the state")
        if row.trigger in _RESERVED_NAMES or row.trigger.startswith(_RESERVED_PREFIXES):
            raise ValueError(f"trigger name {row.trigger!r} collides with a model attribute")
    for trigger in dict.fromkeys(row.trigger for row in table):
        for source in State:
            rows = rows_for(trigger, source, table)
            if len(rows) > 1 and any(row.guard is None for row in rows):
                raise ValueError(f"trigger {trigger!r} from {source.value!r} has several rows; all need guards")


def _condition(trigger: str, guard: Guard) -> Callable[[EventData], bool]:
    """Adapt a pure guard to transitions' condition protocol (send_event=True: one EventData)."""

    def check(event: EventData) -> bool:
        ctx = event.kwargs.get("ctx")
        if not isinstance(ctx, DecisionContext):
            raise MissingContext(f"trigger {trigger!r} needs ctx=DecisionContext(...), got {ctx!r}")
        return bool(guard(ctx))

    check.__name__ = guard.__name__
    return check


class _JournaledEvent(AsyncEvent):
    """An event that raises instead of returning False and reports each transition once."""

    machine: RunMachine

    # transitions' stubs declare AsyncEvent.trigger async over Event's synchronous one (with their own ignore)
    async def trigger(self, model: Any, *args: Any, **kwargs: Any) -> bool:  # type: ignore[override]
        machine = self.machine
        source: State = getattr(model, machine.model_attribute)
        if args or set(kwargs) - {"ctx"}:
            raise TypeError(f"trigger {self.name!r} takes only the keyword argument ctx, got {args!r} {sorted(kwargs)!r}")
        ctx = kwargs.get("ctx")
        if source.name not in self.transitions:
            raise IllegalTransition(self.name, source)
        if ctx is not None and not isinstance(ctx, DecisionContext):
            raise MissingContext(f"ctx must be a DecisionContext, got {ctx!r}")
        if ctx is None and any(t.conditions for t in self.transitions[source.name]):
            raise MissingContext(f"trigger {self.name!r} from {source.value!r} is guarded: pass ctx=DecisionContext(...)")
        if machine.firing is not None:
            raise ConcurrentTrigger(f"trigger {self.name!r} fired while {machine.firing!r} is still being processed")
        machine.firing = self.name
        try:
            done = await super().trigger(model, ctx=ctx)
        finally:
            machine.firing = None
            dest: State = getattr(model, machine.model_attribute)
            if dest is not source:
                machine.on_transition(self.name, source, dest)
        if not done:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError(f"cancelled while processing trigger {self.name!r}")
            raise GuardRejected(self.name, source, ctx)
        return True


class RunMachine(AsyncMachine):
    """AsyncMachine with our event class and the bookkeeping callback."""

    event_cls = _JournaledEvent

    def __init__(self, model: Any, on_transition: OnTransition, table: tuple[Transition, ...]) -> None:
        self.on_transition = on_transition
        self.firing: str | None = None
        self.table = table
        super().__init__(
            model=model,
            states=State,
            initial=State.idle,
            transitions=[
                {
                    "trigger": row.trigger,
                    "source": list(row.sources),
                    "dest": row.dest,
                    "conditions": [_condition(row.trigger, GUARDS[row.guard])] if row.guard else None,
                }
                for row in table
            ],
            auto_transitions=False,
            send_event=True,
            queued=False,
        )


class RunModel:
    """Holds the run's `state`; the machine binds one coroutine method per trigger onto it.

    Fire by name with `fire`, or by attribute: ``await model.probe_bad(ctx=ctx)``.
    """

    state: State

    def __init__(self) -> None:
        self.machine: RunMachine | None = None

    async def fire(self, trigger: str, ctx: DecisionContext | None = None) -> State:
        """Fire `trigger` and return the new state (IllegalTransition and friends on refusal)."""
        if self.machine is None:
            raise RuntimeError("RunModel is not attached to a machine; call build_machine(model, on_transition)")
        event = self.machine.events.get(trigger)
        if event is None:
            raise UnknownTrigger(trigger, self.state)
        await event.trigger(self, ctx=ctx)
        return self.state

    def __repr__(self) -> str:
        return f"RunModel(state={getattr(self, 'state', None)!s})"


def build_machine(model: Any, on_transition: OnTransition, *, table: tuple[Transition, ...] = TABLE) -> RunMachine:
    """Attach a fresh machine (state `idle`) to `model`; `on_transition(trigger, source, dest)` runs after each transition.

    `on_transition` must be quick synchronous bookkeeping (journal the transition); an exception it
    raises propagates out of the trigger, after the state has changed.
    """
    validate_table(table)
    machine = RunMachine(model, on_transition, table)
    if isinstance(model, RunModel):
        model.machine = machine
    return machine


def legal_destinations(
    trigger: str, source: State | str, ctx: DecisionContext | None = None, *, table: tuple[Transition, ...] = TABLE
) -> tuple[State, ...]:
    """Where `trigger` may lead from `source`: every row's dest if `ctx` is None, else the one the machine takes.

    With a context, the machine's rule applies: the first row (table order) whose guard passes.
    """
    try:
        source = State(source)
    except ValueError:
        return ()
    rows = rows_for(trigger, source, table)
    if ctx is None:
        return tuple(dict.fromkeys(row.dest for row in rows))
    for row in rows:
        if row.guard is None or GUARDS[row.guard](ctx):
            return (row.dest,)
    return ()


def is_legal(
    trigger: str,
    source: State | str,
    dest: State | str,
    ctx: DecisionContext | None = None,
    *,
    table: tuple[Transition, ...] = TABLE,
) -> bool:
    """Could the machine move `source` -> `dest` on `trigger`? (Replay checks every journaled transition.)

    Without `ctx` guards are not evaluated (any row's destination is legal); with `ctx` only the
    destination the guards select is. Unknown names are simply illegal. Pure: no machine is built.
    """
    try:
        dest = State(dest)
    except ValueError:
        return False
    return dest in legal_destinations(trigger, source, ctx, table=table)


def next_state(
    trigger: str, source: State, ctx: DecisionContext | None = None, *, table: tuple[Transition, ...] = TABLE
) -> State:
    """The state `trigger` leads to from `source`, by the rules the async machine follows, without a machine:
    `IllegalTransition` when no row exists, `MissingContext` for a guarded row without `ctx`, `GuardRejected`
    when no guard passes. The synchronous engine (training in simulation) fires triggers with it."""
    rows = rows_for(trigger, source, table)
    if not rows:
        raise IllegalTransition(trigger, source)
    if ctx is None and any(row.guard is not None for row in rows):
        raise MissingContext(f"trigger {trigger!r} from {source.value!r} is guarded: pass ctx=DecisionContext(...)")
    for row in rows:
        if row.guard is None or (ctx is not None and GUARDS[row.guard](ctx)):  # ctx is there for guarded rows
            return row.dest
    raise GuardRejected(trigger, source, ctx)
