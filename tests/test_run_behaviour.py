"""The run as the paper runs it (issue 10), read from the journal of a real CLI run with frequent z jumps set
through `--set simulator.…`: settles after every approach, a partial creep frame, imaging conditions first."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from deepspm.cli import main
from deepspm.controller.journal import read_journal
from deepspm.controller.report import write_report
from deepspm.nets.checkpoints import load_learner, load_net

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("behaviour") / "run"
    code = main(["run", "--frames", "40", "--seed", "11", "--out", str(run_dir), "--quiet",
                 "--set", "simulator.z_jump_rate_per_s=0.004", "--set", "simulator.z_jump_scale_m=3e-7"])
    assert code == 0
    return read_journal(run_dir)


def commands(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "command"]


def test_the_simulator_section_reaches_the_embedded_simulator(journal: list[dict[str, Any]]) -> None:
    assert journal[0]["config"]["simulator"]["z_jump_rate_per_s"] == 0.004
    triggers = {r["trigger"] for r in journal if r["kind"] == "transition"}
    assert triggers & {"contact_lost", "crashed"}, "frequent z jumps caused no recovery"


def test_every_approach_is_followed_by_a_settle_before_the_next_scan(journal: list[dict[str, Any]]) -> None:
    approached = False
    approaches = 0
    for c in commands(journal):
        if c["op"] == "start_approach":
            approached, approaches = True, approaches + 1
        elif c["op"] == "settle":
            approached = False
        elif c["op"] == "start_scan":
            assert not approached, f"scan at seq {c['seq']} after an approach with no settle"
    assert approaches >= 2  # the first approach and at least one recovery


def test_the_creep_frame_is_partial_and_costs_under_half_a_judged_frame(journal: list[dict[str, Any]]) -> None:
    durations: dict[str, list[float]] = {"creep": [], "frame": []}
    purpose, started, last_grab, whole = None, 0.0, None, False
    for r in journal + [{"kind": "command", "op": "start_scan", "purpose": None, "t_mono": 0.0}]:
        if r["kind"] == "command" and r["op"] == "start_scan":
            # a frame lasts to its last grab (partial grabs on the way); judged scans are the ones run to their end
            if last_grab is not None and (purpose == "creep" or (purpose == "frame" and whole)):
                durations[purpose].append(last_grab - started)
            purpose, started, last_grab, whole = r["purpose"], r["t_mono"], None, False
        elif r["kind"] == "reply" and r["op"] == "grab_frame":
            last_grab = r["t_mono"]
        elif r["kind"] == "reply" and r["op"] == "wait_scan_end":
            whole = True
    assert durations["creep"] and durations["frame"]
    assert statistics.median(durations["creep"]) < 0.5 * statistics.median(durations["frame"]), durations
    stops = [c for c in commands(journal) if c["op"] == "stop_scan"]
    assert len(stops) >= len(durations["creep"])  # each creep frame is stopped after its lines


def test_bias_and_setpoint_are_set_before_the_first_scan(journal: list[dict[str, Any]]) -> None:
    ops = [c["op"] for c in commands(journal)]
    first_scan = ops.index("start_scan")
    assert "set_bias" in ops[:first_scan] and "set_setpoint" in ops[:first_scan]
    bias = next(c for c in commands(journal) if c["op"] == "set_bias")
    assert bias["bias_V"] == journal[0]["config"]["scan"]["bias_V"]


def run_cli(run_dir: Path, *options: str) -> list[dict[str, Any]]:
    assert main(["run", "--out", str(run_dir), "--quiet", *options]) == 0
    return read_journal(run_dir)


def test_training_without_an_agent_checkpoint_starts_a_new_agent_from_the_classifier(tmp_path: Path) -> None:
    records = run_cli(tmp_path / "run", "--train", "--frames", "12", "--seed", "3")
    start = records[0]
    assert start["checkpoints"]["agent"] == f"new-from-{start['checkpoints']['classifier']}"
    assert "agent" not in start["checkpoint_paths"]  # nothing to load: rebuilt from the classifier and the seed
    actions = [r for r in records if r["kind"] == "decision" and r["decision"] == "action" and "action" in r]
    assert actions and all(r["epsilon"] == 1.0 for r in actions)  # the paper's 500 random steps come first
    assert main(["replay", str(tmp_path / "run"), "--mode", "recompute"]) == 0
    # what it learned is kept: the agent for a later run ([agent] checkpoint), the learner's one pytree beside it
    assert records[-1]["saved"] == {"agent": "checkpoints/agent", "learner": "checkpoints/learner"}
    learner, meta = load_learner(tmp_path / "run" / "checkpoints" / "learner")
    assert learner.env_steps == len(actions) == meta["env_steps"] and len(learner.buffer) == 0
    agent = load_net(tmp_path / "run" / "checkpoints" / "agent", expect_kind="agent")
    for a, b in zip(jax.tree.leaves(agent.variables), jax.tree.leaves(learner.online), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = run_cli(tmp_path / "again", "--train", "--frames", "2", "--seed", "3",
                    "--set", f"agent.checkpoint={tmp_path / 'run' / 'checkpoints' / 'agent'}")
    assert again[0]["checkpoint_paths"]["agent"] == str(tmp_path / "run" / "checkpoints" / "agent")


def test_interleaved_evaluation_alternates_agent_and_random_episodes(tmp_path: Path) -> None:
    records = run_cli(tmp_path / "run", "--evaluate-interleaved", "--frames", "60", "--seed", "4",
                      "--set", "episode.bad_probe_threshold=2", "--set", "simulator.degradation_per_frame=0.2")
    episode, policies = 0, {}
    for r in records:
        if r["kind"] == "decision" and r["decision"] == "classify":
            episode = r["episode"]
        elif r["kind"] == "decision" and r["decision"] == "action" and "action" in r:
            policies.setdefault(episode, set()).add("random" if r["agent"] == "random" else "agent")
    assert len(policies) >= 3, policies
    assert all(p == {"random" if n % 2 == 0 else "agent"} for n, p in policies.items()), policies
    assert main(["replay", str(tmp_path / "run")]) == 0
    summary = write_report(tmp_path / "run", tmp_path / "report")  # both distributions, side by side
    comparison = summary.interleaved
    assert comparison is not None and comparison["agent"]["episodes"] >= 1 and comparison["random"]["episodes"] >= 1
    low, high = comparison["ratio_ci95"]
    assert low <= comparison["ratio_mean"] <= high
    assert (tmp_path / "report" / "agent_vs_random.png").stat().st_size > 0
    labels = [label for r in records if r["kind"] == "decision" and r["decision"] == "classify" for label in r["labels"]]
    assert summary.good_images + summary.not_good_images == len(labels) > 0  # the episode logic's labels, journaled


LINE_NET = Path(__file__).resolve().parents[1] / "deepspm" / "weights" / "classifier_lines"


def test_a_confident_bad_line_judgement_stops_the_scan_early(tmp_path: Path) -> None:
    """Line by line (issue 11): the line-window net judges each frame while it is scanned; a confident bad
    judgement stops the scan, and the partial frame counts as a bad-probe image. Replays identically."""
    lines_net = LINE_NET if LINE_NET.exists() else LINE_NET.parent / "classifier"  # a full-frame net also judges
    records = run_cli(tmp_path / "run", "--frames", "30", "--seed", "9",
                      "--set", f"classifier.lines_checkpoint={lines_net}",
                      "--set", "simulator.degradation_per_frame=0.15")
    triggers = [r["trigger"] for r in records if r["kind"] == "transition"]
    judged = [r for r in records if r["kind"] == "decision" and r["decision"] == "lines"]
    aborts = [r for r in judged if r["abort"]]
    assert triggers.count("scan_aborted") == len(aborts) >= 1
    by_frame = {r["frame"]: r for r in records if r["kind"] == "decision" and r["decision"] == "classify"}
    decisions = [r for r in records if r["kind"] == "decision" and r["decision"] in ("lines", "classify", "sample")]
    for i, r in enumerate(decisions):
        if r["decision"] == "lines" and r["abort"]:  # the stopped frame's verdict follows at once
            verdict = decisions[i + 1]
            assert verdict["frame"] == r["frame"], (r, verdict)
            if verdict["decision"] == "classify":  # (or the roughness rule found a bad sample)
                assert verdict["lines"] == r["lines"] < 64
                assert not verdict["good"] and verdict["p_good"] == r["p_good"] < 0.1  # a bad-probe image
    # a good judgement never shortened a frame: every non-aborted judged frame is whole
    assert all(r.get("lines") is None for f, r in by_frame.items() if f not in {a["frame"] for a in aborts})
    assert all(j["lines"] % 16 == 0 and j["lines"] >= 16 for j in judged)
    stop = records[-1]
    assert stop["counters"]["aborted_frames"] == len(aborts)
    summary = write_report(tmp_path / "run", tmp_path / "report")  # the partial images and p(good) by line
    assert summary.frames_aborted == len(aborts) and (tmp_path / "report" / "line_by_line.png").stat().st_size > 0
    assert main(["replay", str(tmp_path / "run")]) == 0
    assert main(["replay", str(tmp_path / "run"), "--mode", "recompute"]) == 0


def test_a_run_that_learns_online_recompute_replays_identically(tmp_path: Path) -> None:
    """Learning happens at journal-fixed points (after each stored experience), so recomputing a run's nets,
    updates included, reproduces every decision, the online-learned actions too (issue 18)."""
    records = run_cli(tmp_path / "run", "--frames", "90", "--seed", "2", "--set", "episode.bad_probe_threshold=1",
                      "--set", "classifier.threshold=0.99999", "--set", "agent.updates_per_action=1")
    versions = [r["agent"] for r in records if r["kind"] == "decision" and r["decision"] == "action" and "agent" in r]
    learned = [v for v in versions if not v.endswith("+0")]
    assert learned, f"no action was chosen by online-learned weights ({len(versions)} actions)"
    assert main(["replay", str(tmp_path / "run"), "--mode", "recompute"]) == 0
