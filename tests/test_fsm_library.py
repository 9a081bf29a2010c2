"""Characterisation of the transitions 0.9.3 behaviours deepspm.fsm relies on (or defends against).

These tests exercise the *library*, not our wrapper: if an upgrade changes one of them, re-read
transitions/extensions/asyncio.py and revisit deepspm/fsm/machine.py before updating the test.
No wall-clock waits: scheduling is driven with `asyncio.sleep(0)` (one loop iteration) and events.
"""

from __future__ import annotations

import asyncio
import contextvars
from enum import Enum

import pytest
import transitions
from transitions import MachineError
from transitions.extensions.asyncio import AsyncMachine


class Model:
    state: str


class Colour(str, Enum):
    red = "red"
    green = "green"


def machine(model: Model, transitions_: list[dict], **kwargs) -> AsyncMachine:
    kwargs.setdefault("auto_transitions", False)
    return AsyncMachine(model, states=["a", "b", "c"], initial="a", transitions=transitions_, **kwargs)


async def spin_until(predicate, max_iterations: int = 50) -> None:
    """Give other tasks loop iterations (no wall clock) until `predicate()` holds."""
    for _ in range(max_iterations):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def test_pinned_version() -> None:
    assert transitions.__version__ == "0.9.3", "transitions upgraded: re-check these characterisation tests"


@pytest.mark.parametrize(("order", "expected"), [(["b", "c"], "b"), (["c", "b"], "c")])
async def test_first_declared_transition_whose_conditions_pass_wins(order: list[str], expected: str) -> None:
    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": d, "conditions": lambda: True} for d in order])
    assert await model.go() is True
    assert model.state == expected


async def test_a_failing_condition_falls_through_to_the_next_row() -> None:
    model = Model()
    machine(
        model,
        [
            {"trigger": "go", "source": "a", "dest": "b", "conditions": lambda: False},
            {"trigger": "go", "source": "a", "dest": "c", "conditions": lambda: True},
        ],
    )
    assert await model.go() is True
    assert model.state == "c"


async def test_no_passing_condition_returns_false_silently() -> None:
    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": "b", "conditions": lambda: False}])
    assert await model.go() is False  # no exception: our wrapper turns this into GuardRejected
    assert model.state == "a"


async def test_invalid_trigger_for_the_state_raises_machine_error() -> None:
    model = Model()
    machine(model, [{"trigger": "go", "source": "b", "dest": "c"}])
    with pytest.raises(MachineError, match="Can't trigger event go from state a"):
        await model.go()


async def test_conditions_receive_the_trigger_kwargs_directly_without_send_event() -> None:
    seen: list[tuple[tuple, dict]] = []

    def condition(*args, **kwargs) -> bool:
        seen.append((args, kwargs))
        return True

    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": "b", "conditions": condition}])
    await model.go(ctx="the context")
    assert seen == [((), {"ctx": "the context"})]


async def test_conditions_receive_event_data_with_send_event() -> None:
    seen = []
    model = Model()
    machine(
        model,
        [{"trigger": "go", "source": "a", "dest": "b",
          "conditions": lambda event: seen.append((event, event.state.name)) or True}],
        send_event=True,
    )
    await model.go(ctx="the context")
    ((event, state_during_check),) = seen
    assert event.kwargs == {"ctx": "the context"}
    assert event.args == ()
    assert event.event.name == "go"
    assert state_during_check == "a"  # the source state, while conditions are checked
    assert event.state.name == "b"  # the same EventData object is updated in place after the change


def test_auto_transitions_false_binds_no_to_state_methods() -> None:
    without, with_ = Model(), Model()
    AsyncMachine(without, states=Colour, initial=Colour.red, auto_transitions=False)
    AsyncMachine(with_, states=Colour, initial=Colour.red)  # the library's default
    assert not any(name.startswith("to_") for name in vars(without))
    assert hasattr(with_, "to_green")
    assert without.state is Colour.red  # Enum states: the model holds the member itself


async def test_an_exception_inside_a_condition_propagates_and_the_state_is_unchanged() -> None:
    def broken(*_args, **_kwargs) -> bool:
        raise ZeroDivisionError("boom")

    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": "b", "conditions": broken}])
    with pytest.raises(ZeroDivisionError, match="boom"):
        await model.go()
    assert model.state == "a"


async def test_all_conditions_run_even_after_one_fails() -> None:
    called = []
    model = Model()
    machine(
        model,
        [
            {
                "trigger": "go",
                "source": "a",
                "dest": "b",
                "conditions": [lambda: called.append(1) or False, lambda: called.append(2) or True],
            }
        ],
    )
    assert await model.go() is False
    assert called == [1, 2]  # evaluated together through asyncio.gather, no short-circuit


async def test_a_sync_after_callback_runs_once_per_transition_before_the_trigger_returns_but_in_another_task() -> None:
    calls: list[tuple[str, str, bool]] = []
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    firing_task = None

    def after(event) -> None:
        calls.append((event.transition.source, event.transition.dest, asyncio.current_task() is firing_task))
        marker.set("set in callback")

    model = Model()
    machine(
        model,
        [{"trigger": "go", "source": "a", "dest": "b", "after": after},
         {"trigger": "back", "source": "b", "dest": "a", "after": after}],
        send_event=True,
    )
    firing_task = asyncio.current_task()
    await model.go()
    assert calls == [("a", "b", False)]
    await model.back()
    assert calls == [("a", "b", False), ("b", "a", False)]
    # gather wraps each callback in its own task (with a copied context): nothing it binds leaks back.
    assert marker.get() == "unset"


async def test_callback_lists_run_concurrently() -> None:
    log: list[str] = []

    async def first(event) -> None:
        log.append("first starts")
        await asyncio.sleep(0)
        log.append("first ends")

    async def second(event) -> None:
        log.append("second starts")
        log.append("second ends")

    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": "b", "after": [first, second]}], send_event=True)
    await model.go()
    # Sequential execution would give first starts, first ends, second starts, second ends.
    assert log == ["first starts", "second starts", "second ends", "first ends"]


async def test_a_new_trigger_cancels_a_running_callback_and_the_first_trigger_reports_false() -> None:
    log: list[str] = []
    never = asyncio.Event()

    async def slow_after(event) -> None:
        log.append("slow callback starts")
        try:
            await never.wait()
        except asyncio.CancelledError:
            log.append("slow callback cancelled")
            raise

    model = Model()
    machine(
        model,
        [{"trigger": "go", "source": "a", "dest": "b", "after": slow_after}, {"trigger": "onward", "source": "b", "dest": "c"}],
        send_event=True,
    )
    first = asyncio.create_task(model.go())
    await spin_until(lambda: log == ["slow callback starts"])
    assert model.state == "b"  # the state changed before the after-callbacks ran
    assert await model.onward() is True  # fired from another task while `go` is still in its callback
    assert await first is False  # the transition to b happened, yet `go` reports failure
    assert not first.cancelled()
    assert log == ["slow callback starts", "slow callback cancelled"]
    assert model.state == "c"


async def test_cancelling_the_firing_task_is_swallowed_and_the_trigger_returns_false() -> None:
    never = asyncio.Event()

    async def blocking_condition() -> bool:
        await never.wait()
        return True

    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": "b", "conditions": blocking_condition}])
    task = asyncio.create_task(model.go())
    await spin_until(lambda: AsyncMachine.async_tasks.get(id(model)))
    task.cancel()
    assert await task is False  # no CancelledError reaches the awaiter
    assert not task.cancelled()
    assert model.state == "a"


async def test_a_timeout_around_a_trigger_is_swallowed() -> None:
    never = asyncio.Event()

    async def blocking_condition() -> bool:
        await never.wait()
        return True

    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": "b", "conditions": blocking_condition}])
    async with asyncio.timeout(0):  # expires at the first yield; no wall-clock wait
        result = await model.go()
    assert result is False  # no TimeoutError: the expiry was absorbed by the library
    assert model.state == "a"


async def test_a_trigger_without_conditions_or_callbacks_never_yields_to_the_loop() -> None:
    ran: list[str] = []

    async def mark() -> None:
        ran.append("other task ran")

    model = Model()
    machine(model, [{"trigger": "go", "source": "a", "dest": "b"},
                    {"trigger": "guarded", "source": "b", "dest": "c", "conditions": lambda: True}])
    other = asyncio.create_task(mark())
    await model.go()
    assert model.state == "b"
    assert ran == []  # the trigger completed without a single await point
    await model.guarded()  # a condition is evaluated through asyncio.gather: that yields
    assert ran == ["other task ran"]
    await other
