"""One policy, two engines: the synchronous engine (training in simulation) makes the decisions the async run
loop made, given the same inputs.

A run goes through the real path (TCP to the fake Nanonis, shipped nets) with lost contact, a crash, bad
samples, area moves and conditioning episodes. Its journal then feeds the synchronous engine: every instrument
operation is answered with the recorded reply and every net with its recorded output. The synchronous engine
must issue the same commands with the same arguments, journal the same decisions and take the same
transitions, in the same order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepspm.controller.brain import ActionDecision
from deepspm.controller.commands import Command
from deepspm.controller.config import config_from_dict
from deepspm.controller.documents import Document, Reply
from deepspm.controller.executor import result_from_record
from deepspm.controller.journal import load_frame, read_journal
from deepspm.controller.plans import RunState
from deepspm.controller.replay import recorded_calls, same
from deepspm.controller.session import run_session
from deepspm.controller.sim_engine import SyncEngine
from tests.test_run_e2e import config, eventful_simulator

pytestmark = pytest.mark.timeout(300)
FRAMES = 60


class RecordedInstrument:
    """Answers each operation with the journal's reply, in order, and checks it is the one recorded."""

    def __init__(self, records: list[dict[str, Any]], run_dir: Path) -> None:
        self.calls = recorded_calls(records)
        self.run_dir = run_dir
        self.pos = 0

    def wait(self, seconds: float) -> None:
        pass

    def __getattr__(self, op: str) -> Any:
        def call(**args: Any) -> Any:
            recorded = self.calls[self.pos]
            assert recorded.op == op and all(same(recorded.args[k], v) for k, v in args.items()), (recorded, op, args)
            self.pos += 1
            reply = recorded.outcome.doc if recorded.outcome is not None else None
            assert isinstance(reply, Reply), recorded
            return result_from_record(reply.result, lambda ref: load_frame(self.run_dir, ref))

        return call


class RecordedNets:
    def __init__(self, decisions: list[dict[str, Any]]) -> None:
        self.p_good = [d["p_good"] for d in decisions if d["decision"] == "classify" and d.get("lines") is None]
        self.p_lines = [d["p_good"] for d in decisions if d["decision"] == "lines"]
        self.actions = [d for d in decisions if d["decision"] == "action" and "action" in d]

    def classify(self, image: np.ndarray) -> float:
        return float(self.p_good.pop(0))

    def classify_lines(self, image: np.ndarray) -> float:
        return float(self.p_lines.pop(0))

    def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision:
        d = self.actions.pop(0)
        return ActionDecision(d["action"], d["q_values"], d["epsilon"], d["explored"], d["agent"])

    def store(self, *args: Any) -> None:
        pass

    def learn(self) -> None:
        pass


class LoggingEngine(SyncEngine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[dict[str, Any]] = []
        self.documents: list[dict[str, Any]] = []

    def perform(self, message: Any) -> Any:
        if isinstance(message, Command):
            self.commands.append(message.to_record())
        if isinstance(message, Document):
            self.documents.append({"kind": message.kind, **message.to_record()})
        return super().perform(message)


@pytest.fixture(scope="module")
def journaled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("engines") / "run"

    def events(sim: Any) -> None:
        sim.at(300.0, lambda m: m.inject_z_jump(-300e-9))
        sim.at(900.0, lambda m: m.inject_z_jump(+900e-9))

    result = asyncio.run(run_session(config(FRAMES, **{"run.seed": 5}), run_dir, simulator=eventful_simulator(5),
                                     on_simulator=events))
    assert result.status == "completed", result.reason
    return run_dir


def test_the_synchronous_engine_makes_the_run_loops_decisions(journaled_run: Path) -> None:
    records = read_journal(journaled_run)
    cfg = config_from_dict(records[0]["config"])
    decisions = [r for r in records if r["kind"] == "decision"]
    engine = LoggingEngine(RunState.new(cfg, classifier_version=records[0]["checkpoints"]["classifier"]),
                           RecordedInstrument(records, journaled_run), RecordedNets(decisions))  # type: ignore[arg-type]
    frames = cfg.run.frames
    assert frames is not None
    engine.run(done=lambda: engine.run_state.counters.frames >= frames)

    header = ("seq", "t_mono", "t_wall", "kind")
    journal_commands = [{k: v for k, v in r.items() if k not in header} for r in records if r["kind"] == "command"]
    journal_transitions = [(r["trigger"], r["source"], r["dest"]) for r in records if r["kind"] == "transition"]
    # the .sxm file a judged frame was written to is the async engine's output, not a decision
    journal_documents = [{k: v for k, v in r.items() if k not in (*header[:3], "sxm")}
                         for r in records if r["kind"] in ("decision", "note")]
    for doc in engine.documents:
        doc.pop("sxm", None)
    # the async loop then stops at its safe point: one withdraw and the stop transition
    assert len(journal_documents) >= FRAMES and len(journal_commands) > 3 * FRAMES
    assert journal_commands[-1]["op"] == "withdraw" and journal_transitions[-1][0] == "stop"
    assert same(engine.commands, journal_commands[:-1])
    assert [(t, s.value, d.value) for t, s, d in engine.transitions] == journal_transitions[:-1]
    assert same(engine.documents, journal_documents)
    # the run was eventful enough to mean something
    triggers = {t for t, _, _ in engine.transitions}
    assert {"contact_lost", "crashed", "recovered", "sample_bad", "conditioned", "area_exhausted"} <= triggers, triggers
