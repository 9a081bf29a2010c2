"""`deepspm replay RUN_DIR`: re-run the unchanged controller against its own journal and say whether it
did exactly the same thing, or where it first did not; and what-if replays with other nets."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepspm.controller.config import config_from_dict
from deepspm.controller.documents import Classification, record_of
from deepspm.controller.journal import JournalError, check_schema, load_frame
from deepspm.controller.loop import RunLoop
from deepspm.controller.preprocess import preprocess
from deepspm.controller.replay import (
    DecisionPoint,
    Divergence,
    ReplayBrain,
    ReplayControl,
    ReplayInstrument,
    ReplayJournal,
)
from deepspm.controller.runfold import relive_journal, survey_journal
from deepspm.controller.session import LINES, check_recorded_nets, load_brain, recorded_checkpoint

MODES = ("recorded", "recompute")


async def _no_wait(seconds: float) -> None:
    return None


@dataclass
class ReplayReport:
    run_dir: Path
    mode: str
    identical: bool
    divergence_seq: int | None = None
    expected: Any = None
    got: Any = None
    records: int = 0
    decisions_checked: int = 0
    max_p_difference: float = 0.0
    decision_points: list[DecisionPoint] = field(default_factory=list)
    agreement: dict[str, int] | None = None  # what-if classifier: recorded verdict x new verdict, every frame
    target_state: str = "good"  # the tip state the run conditioned towards ([probe] target_state)

    def text(self) -> str:
        lines = [f"replay of {self.run_dir} ({self.mode}): "
                 + ("identical" if self.identical else f"diverged at seq {self.divergence_seq}")]
        if not self.identical:
            lines += [f"  journal:    {self.expected}", f"  controller: {self.got}"]
        lines.append(f"  records checked: {self.records}; decisions: {self.decisions_checked}")
        if self.target_state != "good":
            lines.append(f"  target tip state: {self.target_state} (p({self.target_state}) judged each frame)")
        if self.mode != "recorded":
            lines.append(f"  largest |p({self.target_state}) difference|: {self.max_p_difference:.3g}")
        if self.decision_points and self.mode == "what-if":
            lines.append("  decision points (seq, frame, kind, recorded -> new):")
            lines += [f"    {p.seq}  {(p.frame or '')[:12]}  {p.kind}  {p.recorded} -> {p.new}" for p in self.decision_points]
        if self.agreement is not None:
            a = self.agreement
            lines += ["  re-classification of every recorded frame (rows: recorded, columns: new):",
                      "              new good  new bad",
                      f"    was good  {a['good_good']:8d}  {a['good_bad']:7d}",
                      f"    was bad   {a['bad_good']:8d}  {a['bad_bad']:7d}"]
        return "\n".join(lines)


async def replay_run(run_dir: Path, *, mode: str = "recorded", classifier: Path | None = None,
                     agent: Path | None = None) -> ReplayReport:
    """Replay `run_dir`. `mode` "recorded" injects the journal's net outputs (checks the controller alone);
    "recompute" runs the journal's checkpoints and requires the same decisions. A `classifier` or `agent`
    checkpoint makes it a what-if replay that stops at the first decision that differs."""
    if mode not in MODES:
        raise ValueError(f"replay mode must be one of {MODES}, not {mode!r}")
    run_dir = Path(run_dir)
    # read a record at a time, twice: a survey (the start, operator requests, the stop point), then the re-live
    survey = survey_journal(run_dir, classifications=classifier is not None)
    fold = survey.fold
    if survey.first is None or fold.start is None:
        raise JournalError(f"{run_dir}: the journal has no complete record; nothing can be replayed")
    check_schema(survey.first, "replayed")  # this version's schema only
    start = record_of(fold.start)
    cfg = config_from_dict(start.get("config") or {})
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, hours=None))  # the recorded stop point rules
    what_if = classifier is not None or agent is not None
    nets = None
    if what_if or mode == "recompute":
        # Recomputing learns as the run learned (at the journal's points, update for update); a what-if does not.
        learn_online = False if what_if else None
        nets = await asyncio.to_thread(
            load_brain, cfg, Path(classifier) if classifier else recorded_checkpoint(start, "classifier"),
            Path(agent) if agent else recorded_checkpoint(start, "agent"), learn_online,
            recorded_checkpoint(start, LINES))
        check_recorded_nets(start, nets, tuple(name for name, given in (("classifier", classifier), ("agent", agent),
                                                                         (LINES, None)) if given is None))
    relived = relive_journal(run_dir, survey.valid_bytes)
    brain = ReplayBrain(relived.decisions, cfg.classifier.threshold, mode="whatif" if what_if else mode, nets=nets,
                        classifier_version=(fold.start.checkpoints or {}).get("classifier", "journal"))
    journal = ReplayJournal(run_dir, relived.entries)
    instrument = ReplayInstrument(relived.calls, lambda ref: load_frame(run_dir, ref))
    loop = RunLoop(instrument=instrument, journal=journal, brain=brain, config=cfg,
                   control=ReplayControl(journal, survey.relived), sleep=_no_wait, monotonic=lambda: 0.0,
                   schema=fold.schema)
    report = ReplayReport(run_dir, "what-if" if what_if else mode, identical=False, records=fold.records,
                          target_state=cfg.probe.target_state)
    try:
        await loop.run()
        report.identical = not journal.replaying and instrument.exhausted and not journal.extra
        if not report.identical:
            report.expected, report.got = "the rest of the journal", "the run ended"
            report.divergence_seq = journal.next_seq
    except Divergence as d:
        report.divergence_seq, report.expected, report.got = d.seq, d.expected, d.got
    report.decisions_checked = brain.decisions.taken
    report.max_p_difference = brain.max_p_difference
    report.decision_points = brain.points
    if classifier is not None and nets is not None:
        report.agreement = await asyncio.to_thread(_agreement, run_dir, survey.classifications or [], nets,
                                                   cfg.classifier.threshold)
    return report


def _agreement(run_dir: Path, rows: list[Classification], nets: Any, threshold: float) -> dict[str, int]:
    """Re-classify every recorded frame with the new classifier (same pre-processing, same RANSAC seed)."""
    if not rows:
        return {"good_good": 0, "good_bad": 0, "bad_good": 0, "bad_bad": 0}
    images = np.stack([preprocess(load_frame(run_dir, r.frame), r.ransac_seed).normalised for r in rows])
    p_new = nets.classifier.predict_batched(images, 64)
    out = {"good_good": 0, "good_bad": 0, "bad_good": 0, "bad_bad": 0}
    for r, p in zip(rows, p_new):
        out[f"{'good' if r.good else 'bad'}_{'good' if p > threshold else 'bad'}"] += 1
    return out
