"""The run's state machine: table contents, guards, machine behaviour, legality check, diagram."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import hashlib
import json
import os
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepspm.fsm import (
    GUARDS,
    NON_TERMINAL_STATES,
    TABLE,
    TERMINAL_STATES,
    TRIGGERS,
    ConcurrentTrigger,
    DecisionContext,
    GuardRejected,
    IllegalTransition,
    MissingContext,
    RunModel,
    State,
    Transition,
    UnknownTrigger,
    build_machine,
    canonical_json,
    is_legal,
    legal_destinations,
    mermaid,
    table_as_records,
    table_hash,
)
from deepspm.fsm.machine import validate_table

S = State
GOLDEN = Path(__file__).parent / "golden" / "fsm.mmd"
FSM_DIR = Path(__file__).parents[1] / "deepspm" / "fsm"

CONTEXTS = [
    DecisionContext(training, count, in_episode, threshold)
    for training in (False, True)
    for count in (0, 2, 3, 9, 10, 11)
    for in_episode in (False, True)
    for threshold in (3, 10)
]

# design.md section 4, restated independently of deepspm.fsm.table: (trigger, source, dest, guard).
EXPECTED_EDGES = {
    ("start", S.idle, S.approaching, None),
    ("approached", S.approaching, S.settling, None),
    ("settled", S.settling, S.selecting, None),
    ("region_selected", S.selecting, S.scanning, None),
    ("area_exhausted", S.selecting, S.moving, None),
    ("moved", S.moving, S.approaching, None),
    ("frame_recorded", S.scanning, S.classifying, None),
    ("scan_aborted", S.scanning, S.classifying, None),
    ("contact_lost", S.scanning, S.recovering, None),
    ("contact_lost", S.classifying, S.recovering, None),
    ("crashed", S.scanning, S.recovering, None),
    ("crashed", S.classifying, S.recovering, None),
    ("recovered", S.recovering, S.scanning, None),
    ("sample_bad", S.classifying, S.selecting, None),
    ("probe_good", S.classifying, S.selecting, "operation_mode"),
    ("probe_good", S.classifying, S.resetting, "training_mode"),
    ("probe_bad", S.classifying, S.selecting, "still_counting"),
    ("probe_bad", S.classifying, S.conditioning, "episode_starts"),
    ("conditioned", S.conditioning, S.selecting, None),
    ("no_room", S.conditioning, S.selecting, None),
    ("reset_continues", S.classifying, S.resetting, None),
    ("reset_over", S.classifying, S.selecting, None),
    ("reset_done", S.resetting, S.selecting, None),
    *{("stop", s, S.stopped, None) for s in State if s not in (S.stopped, S.fault)},
    *{("fail", s, S.fault, None) for s in State if s is not S.fault},
}

EDGES = [(row, source) for row in TABLE for source in row.sources]


class Recorder:
    """The on_transition callback: records (trigger, source, dest) and the task it ran in."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, State, State]] = []
        self.tasks: list[asyncio.Task | None] = []

    def __call__(self, trigger: str, source: State, dest: State) -> None:
        self.calls.append((trigger, source, dest))
        self.tasks.append(asyncio.current_task())


def fresh(state: State = S.idle) -> tuple[RunModel, Recorder]:
    model, recorder = RunModel(), Recorder()
    machine = build_machine(model, recorder)
    if state is not S.idle:
        machine.set_state(state, model)
    return model, recorder


def ctx_for(guard: str | None) -> DecisionContext | None:
    return None if guard is None else next(c for c in CONTEXTS if GUARDS[guard](c))


def path_from_idle(target: State) -> list[Transition]:
    """Shortest list of rows leading from idle to `target` (breadth-first over the table)."""
    previous: dict[State, tuple[State, Transition] | None] = {S.idle: None}
    queue = deque([S.idle])
    while queue:
        state = queue.popleft()
        for row in TABLE:
            if state in row.sources and row.dest not in previous:
                previous[row.dest] = (state, row)
                queue.append(row.dest)
    assert target in previous, f"{target} is unreachable from idle"
    path: list[Transition] = []
    while (step := previous[target]) is not None:
        target, row = step
        path.append(row)
    return path[::-1]


# --- the table --------------------------------------------------------------------------------


def test_table_has_exactly_the_rows_of_the_design() -> None:
    assert {(row.trigger, source, row.dest, row.guard) for row, source in EDGES} == EXPECTED_EDGES
    assert len(EDGES) == len(EXPECTED_EDGES)  # no duplicated (row, source)


def test_states_and_terminal_states() -> None:
    assert [s.value for s in State] == [
        "idle", "approaching", "settling", "selecting", "scanning", "classifying",
        "conditioning", "resetting", "moving", "recovering", "stopped", "fault",
    ]  # fmt: skip
    assert TERMINAL_STATES == {S.stopped, S.fault}
    assert [s for s in State if s.terminal] == [S.stopped, S.fault]
    assert set(NON_TERMINAL_STATES) | TERMINAL_STATES == set(State)
    assert str(S.classifying) == "classifying" and S.classifying == "classifying"


def test_rows_are_frozen_and_triggers_listed_in_table_order() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TABLE[0].dest = S.fault  # type: ignore[misc]
    assert TRIGGERS[:3] == ("start", "approached", "settled")
    assert set(TRIGGERS) == {row.trigger for row in TABLE} and len(TRIGGERS) == 21


def test_every_guard_named_in_the_table_exists() -> None:
    assert {row.guard for row in TABLE} - {None} == set(GUARDS)


def test_records_are_json_and_the_hash_is_reproducible_from_them() -> None:
    records = table_as_records()
    assert json.loads(json.dumps(records)) == records
    assert records[0] == {
        "trigger": "start", "sources": ["idle"], "dest": "approaching", "guard": None,
        "note": "begin the run with a coarse approach",
    }  # fmt: skip
    digest = table_hash()
    assert len(digest) == 64 and digest == table_hash()
    assert digest == hashlib.sha256(canonical_json(json.loads(json.dumps(records))).encode()).hexdigest()


def test_the_hash_changes_when_any_row_changes() -> None:
    changed = (dataclasses.replace(TABLE[0], dest=S.settling),) + TABLE[1:]
    reordered = (TABLE[1], TABLE[0]) + TABLE[2:]
    assert len({table_hash(), table_hash(changed), table_hash(reordered)}) == 3


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ((Transition("go", (S.idle,), S.fault, "no_such_guard", ""),), "unknown guard"),
        ((Transition("go", (S.idle,), S.idle, None, ""),), "reflexive"),
        ((Transition("state", (S.idle,), S.fault, None, ""),), "collides"),
        ((Transition("may_go", (S.idle,), S.fault, None, ""),), "collides"),
        (
            (Transition("go", (S.idle,), S.fault, None, ""), Transition("go", (S.idle,), S.stopped, "training_mode", "")),
            "all need guards",
        ),
    ],
)
def test_validate_table_rejects_ambiguous_tables(table: tuple[Transition, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_table(table)
    with pytest.raises(ValueError, match=message):
        build_machine(RunModel(), Recorder(), table=table)


# --- guards -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "in_episode", "dest"),
    [
        (1, False, S.selecting),
        (9, False, S.selecting),  # the 9th consecutive bad image: keep counting
        (10, False, S.conditioning),  # the 10th starts the episode (the paper; the original needed 11)
        (11, False, S.conditioning),
        (0, True, S.conditioning),  # already in an episode
        (3, True, S.conditioning),
    ],
)
@pytest.mark.parametrize("training", [False, True])
async def test_probe_bad_destination(count: int, in_episode: bool, dest: State, training: bool) -> None:
    model, recorder = fresh(S.classifying)
    ctx = DecisionContext(training=training, bad_probe_count=count, in_episode=in_episode)
    assert await model.probe_bad(ctx=ctx) is True
    assert model.state is dest
    assert recorder.calls == [("probe_bad", S.classifying, dest)]


async def test_probe_bad_honours_a_configured_threshold() -> None:
    for count, dest in ((2, S.selecting), (3, S.conditioning)):
        model, _ = fresh(S.classifying)
        assert await model.fire("probe_bad", DecisionContext(False, count, False, bad_probe_threshold=3)) is dest


@pytest.mark.parametrize(
    ("training", "in_episode", "dest"),
    [(False, False, S.selecting), (False, True, S.selecting), (True, False, S.resetting), (True, True, S.resetting)],
)
async def test_probe_good_destination(training: bool, in_episode: bool, dest: State) -> None:
    model, recorder = fresh(S.classifying)
    assert await model.fire("probe_good", DecisionContext(training, 0, in_episode)) is dest
    assert recorder.calls == [("probe_good", S.classifying, dest)]


@given(
    training=st.booleans(),
    count=st.integers(min_value=0, max_value=1000),
    in_episode=st.booleans(),
    threshold=st.integers(min_value=1, max_value=1000),
)
def test_guards_of_a_shared_trigger_are_complementary(training: bool, count: int, in_episode: bool, threshold: int) -> None:
    ctx = DecisionContext(training, count, in_episode, threshold)
    for trigger in TRIGGERS:
        for source in State:
            guards = [row.guard for row in TABLE if row.trigger == trigger and source in row.sources]
            if len(guards) > 1:
                assert sum(GUARDS[str(g)](ctx) for g in guards) == 1, (trigger, source, ctx)
    assert GUARDS["episode_starts"](ctx) == (in_episode or count >= threshold)


def test_decision_context_validates_and_serialises() -> None:
    with pytest.raises(ValueError, match="bad_probe_count"):
        DecisionContext(False, -1, False)
    with pytest.raises(ValueError, match="bad_probe_threshold"):
        DecisionContext(False, 0, False, bad_probe_threshold=0)
    ctx = DecisionContext(True, 4, False)
    assert ctx.bad_probe_threshold == 10
    assert json.loads(json.dumps(ctx.as_record())) == ctx.as_record()
    assert DecisionContext(**ctx.as_record()) == ctx


# --- the machine ------------------------------------------------------------------------------


def test_machine_transitions_mirror_the_table() -> None:
    model = RunModel()
    machine = build_machine(model, Recorder())
    assert set(machine.events) == set(TRIGGERS)
    for row, source in EDGES:
        (transition,) = machine.get_transitions(row.trigger, source, row.dest)
        assert len(transition.conditions) == (row.guard is not None)
    assert model.state is S.idle
    assert not [name for name in vars(model) if name.startswith("to_")]  # auto_transitions=False


@pytest.mark.parametrize(("row", "source"), EDGES, ids=[f"{r.trigger}:{s.value}->{r.dest.value}" for r, s in EDGES])
async def test_every_row_is_reachable_from_idle_and_fires(row: Transition, source: State) -> None:
    model, recorder = fresh()
    expected = []
    for step in path_from_idle(source):
        before = model.state
        await model.fire(step.trigger, ctx_for(step.guard))
        expected.append((step.trigger, before, step.dest))
    assert model.state is source
    assert await model.fire(row.trigger, ctx_for(row.guard)) is row.dest
    assert recorder.calls == expected + [(row.trigger, source, row.dest)]


async def test_on_transition_runs_once_per_transition_in_the_firing_task_before_fire_returns() -> None:
    model, recorder = fresh()
    await model.start()
    assert recorder.calls == [("start", S.idle, S.approaching)]
    await model.approached()
    assert len(recorder.calls) == 2
    assert recorder.tasks == [asyncio.current_task()] * 2


async def test_an_on_transition_error_propagates_after_the_state_changed() -> None:
    def failing(trigger: str, source: State, dest: State) -> None:
        raise OSError("journal disk full")

    model = RunModel()
    build_machine(model, failing)
    with pytest.raises(OSError, match="journal disk full"):
        await model.start()
    assert model.state is S.approaching


async def test_illegal_trigger_raises_naming_trigger_and_state() -> None:
    model, recorder = fresh(S.scanning)
    with pytest.raises(IllegalTransition, match="'probe_good' from state 'scanning'") as info:
        await model.fire("probe_good", DecisionContext(False, 0, False))
    assert (info.value.trigger, info.value.state) == ("probe_good", S.scanning)
    with pytest.raises(IllegalTransition):
        await model.start()
    assert model.state is S.scanning and recorder.calls == []


async def test_unknown_trigger_and_unattached_model() -> None:
    model, _ = fresh()
    with pytest.raises(UnknownTrigger, match="unknown trigger 'explode'"):
        await model.fire("explode")
    with pytest.raises(RuntimeError, match="not attached"):
        await RunModel().fire("start")


async def test_guarded_trigger_without_context_raises_and_changes_nothing() -> None:
    model, recorder = fresh(S.classifying)
    with pytest.raises(MissingContext, match="probe_bad"):
        await model.probe_bad()
    with pytest.raises(MissingContext):
        await model.probe_bad(ctx={"training": False})
    assert model.state is S.classifying and recorder.calls == []


async def test_unguarded_triggers_accept_and_ignore_a_context() -> None:
    model, _ = fresh()
    assert await model.fire("start", DecisionContext(True, 99, True)) is S.approaching


async def test_only_the_ctx_keyword_is_accepted() -> None:
    model, _ = fresh()
    with pytest.raises(TypeError, match="only the keyword argument ctx"):
        await model.start(DecisionContext(False, 0, False))
    with pytest.raises(TypeError, match="only the keyword argument ctx"):
        await model.start(reason="x")
    assert model.state is S.idle


async def test_guard_rejection_is_loud() -> None:
    never = Transition("go", (S.idle,), S.approaching, "training_mode", "")
    model, recorder = RunModel(), Recorder()
    build_machine(model, recorder, table=(never,))
    with pytest.raises(GuardRejected, match="no guard passed for trigger 'go' from state 'idle'") as info:
        await model.go(ctx=DecisionContext(False, 0, False))
    assert info.value.ctx == DecisionContext(False, 0, False)
    assert model.state is S.idle and recorder.calls == []


async def test_stopped_accepts_only_fail_and_fault_accepts_nothing() -> None:
    for trigger in TRIGGERS:
        model, recorder = fresh(S.fault)
        with pytest.raises(IllegalTransition):
            await model.fire(trigger, CONTEXTS[0])
        assert model.state is S.fault and recorder.calls == []

        model, recorder = fresh(S.stopped)
        if trigger == "fail":
            assert await model.fire(trigger) is S.fault
        else:
            with pytest.raises(IllegalTransition):
                await model.fire(trigger, CONTEXTS[0])
            assert model.state is S.stopped and recorder.calls == []


async def test_stop_and_fail_from_every_non_terminal_state() -> None:
    for source in NON_TERMINAL_STATES:
        for trigger, dest in (("stop", S.stopped), ("fail", S.fault)):
            model, recorder = fresh(source)
            assert await model.fire(trigger) is dest
            assert recorder.calls == [(trigger, source, dest)]


async def test_a_second_trigger_while_one_is_in_progress_is_refused() -> None:
    model, recorder = fresh(S.classifying)
    first = asyncio.create_task(model.fire("probe_bad", DecisionContext(False, 10, False)))
    await asyncio.sleep(0)  # one loop iteration: `first` is now awaiting its guard (asyncio.gather)
    assert model.machine is not None and model.machine.firing == "probe_bad"
    with pytest.raises(ConcurrentTrigger, match="'crashed' fired while 'probe_bad'"):
        await model.crashed()
    assert await first is S.conditioning  # the first trigger was not disturbed (the library would cancel it)
    assert recorder.calls == [("probe_bad", S.classifying, S.conditioning)]
    assert model.machine.firing is None


async def test_cancelling_the_firing_task_raises_cancelled_error_not_false() -> None:
    model, recorder = fresh(S.classifying)
    task = asyncio.create_task(model.fire("probe_bad", DecisionContext(False, 10, False)))
    await asyncio.sleep(0)
    assert model.machine is not None and model.machine.firing == "probe_bad"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert model.state is S.classifying and recorder.calls == [] and model.machine.firing is None


async def test_a_timeout_around_a_guarded_trigger_surfaces_as_timeout_error() -> None:
    model, recorder = fresh(S.classifying)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):  # expires at the first yield; no wall-clock wait
            await model.fire("probe_good", DecisionContext(False, 0, False))
    assert model.state is S.classifying and recorder.calls == []
    assert await model.fire("probe_good", DecisionContext(False, 0, False)) is S.selecting  # still usable


# --- legality ---------------------------------------------------------------------------------


async def test_is_legal_agrees_with_the_machine_for_every_trigger_and_source() -> None:
    model, recorder = RunModel(), Recorder()
    machine = build_machine(model, recorder)
    for trigger in TRIGGERS:
        for source in State:
            guarded = any(row.guard for row in TABLE if row.trigger == trigger and source in row.sources)
            for ctx in CONTEXTS if guarded else [None, CONTEXTS[-1]]:
                machine.set_state(source, model)
                try:
                    outcome: State | None = await model.fire(trigger, ctx)
                except IllegalTransition:
                    outcome = None
                legal = [dest for dest in State if is_legal(trigger, source, dest, ctx)]
                assert legal == ([] if outcome is None else [outcome]), (trigger, source, ctx)
                # without a context, the machine's choice is among the structurally legal destinations
                assert outcome is None or is_legal(trigger, source.value, outcome.value)


def test_is_legal_without_context_accepts_any_guarded_destination() -> None:
    assert legal_destinations("probe_bad", S.classifying) == (S.selecting, S.conditioning)
    assert is_legal("probe_good", "classifying", "resetting")
    assert not is_legal("probe_good", "classifying", "resetting", DecisionContext(False, 0, False))
    assert not is_legal("probe_good", "scanning", "selecting")
    assert not is_legal("no_such_trigger", "idle", "approaching")
    assert not is_legal("start", "no_such_state", "approaching")
    assert not is_legal("start", "idle", "no_such_state")


# --- the diagram ------------------------------------------------------------------------------


def test_mermaid_matches_the_golden_file() -> None:
    text = mermaid()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text, encoding="utf-8", newline="\n")
        pytest.skip(f"rewrote {GOLDEN}; review and commit the diff")
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "the FSM diagram changed. If the change to deepspm/fsm is deliberate, regenerate the golden file with\n"
        "    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_fsm.py -k golden\n"
        "and commit tests/golden/fsm.mmd together with the FSM change."
    )


def test_mermaid_has_one_labelled_edge_per_row_and_source() -> None:
    lines = mermaid().splitlines()
    assert lines[0] == "stateDiagram-v2"
    edges = [line.strip() for line in lines if "-->" in line and "[*]" not in line]
    assert len(edges) == len(EDGES)
    assert "classifying --> conditioning : probe_bad [episode_starts]" in edges
    assert "classifying --> resetting : probe_good [training_mode]" in edges
    assert "idle --> approaching : start" in edges
    assert "    [*] --> idle" in lines and "    fault --> [*]" in lines and "    stopped --> [*]" in lines
    assert mermaid() == mermaid()


# --- purity -----------------------------------------------------------------------------------


def test_fsm_imports_only_stdlib_transitions_and_itself() -> None:
    allowed = {"__future__", "asyncio", "collections", "dataclasses", "enum", "hashlib", "json", "types", "typing", "transitions"}
    for path in FSM_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
