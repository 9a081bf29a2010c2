"""Select tip state (issue 12 part 4): `[probe] target_state` / `--target-state NAME`.

Fast unit checks of the target's resolution and of p(target) from a multi-class classifier; the episode logic,
the FSM context and the journal documents naming the target; the CLI refusals (one line, exit 2, naming the
allowed states; a new agent from an ensemble refused); and one short run end to end through TCP to the fake
Nanonis server on the simulated H:Si(100) surface whose journal, report and status name the target and whose
episodes end on it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from deepspm.cli import main
from deepspm.controller.config import load_config
from deepspm.controller.documents import ActionChosen, Classification, entry_from_record
from deepspm.controller.episode import EpisodeConfig, EpisodeTracker
from deepspm.controller.session import load_brain
from deepspm.controller.targets import (
    TargetPredictor,
    TargetStateError,
    check_target_setting,
    resolve_target,
    target_classifier,
    target_of,
    with_target_threshold,
)
from deepspm.fsm.guards import DecisionContext
from deepspm.nets.checkpoints import load_net, save_net
from deepspm.nets.ensemble import EnsembleDef, EnsembleError, stack_members
from deepspm.nets.inference import Predictor
from deepspm.nets.model import NetDef
from deepspm.simulator.hsi_probe import HsiTipState

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "deepspm" / "weights"
STATES = [s.value for s in HsiTipState]


@pytest.fixture(scope="module")
def states_checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained 7-output classifier whose metadata names the H:Si tip states."""
    net = NetDef.of("tiny", len(STATES))
    variables = net.init(jax.random.key(0))
    return save_net(tmp_path_factory.mktemp("ckpt") / "states", net, variables, kind="classifier",
                    metadata={"class_names": STATES})


@pytest.fixture(scope="module")
def ensemble_checkpoint(tmp_path_factory) -> Path:
    net = NetDef.of("tiny", 1)
    members = [net.init(jax.random.key(k)) for k in range(2)]
    return save_net(tmp_path_factory.mktemp("ckpt") / "ens", EnsembleDef.of_member(net, 2), stack_members(members),
                    kind="classifier")


def test_a_one_output_classifier_offers_good_only() -> None:
    target = resolve_target("good", 1, {}, 0.9)
    assert (target.index, target.states, target.is_good) == (None, ("good",), True)
    with pytest.raises(TargetStateError, match=r"'rows' is not a state .*one output, p\(good\).*allowed: good$") as e:
        resolve_target("rows", 1, {}, 0.9)
    assert e.value.key == "probe.target_state"


def test_a_multi_class_classifier_offers_its_class_names() -> None:
    target = resolve_target("rows", 7, {"data": {"class_names": STATES}}, 0.8)
    assert (target.name, target.index, target.threshold) == ("rows", STATES.index("rows"), 0.8)
    with pytest.raises(TargetStateError, match="allowed: atoms, dimers, asymmetric, rows, double, multiple, blurry"):
        resolve_target("good", 7, {"class_names": STATES}, 0.9)
    assert resolve_target("class_2", 3, None, 0.9).index == 2  # outputs without names are class_K


def test_a_classifier_s_own_threshold_for_a_state_rules() -> None:
    meta = {"class_names": STATES, "thresholds": {**dict.fromkeys(STATES, None), "dimers": 0.55, "atoms": 0.63}}
    assert resolve_target("dimers", 7, meta, 0.9).threshold == 0.55
    with pytest.raises(TargetStateError, match="'rows': .* too rarely .*; allowed: atoms, dimers$"):
        resolve_target("rows", 7, meta, 0.9)
    cfg = with_target_threshold(load_config(None, {"probe.target_state": "dimers"}), resolve_target("dimers", 7, meta, 0.9))
    assert cfg.classifier.threshold == cfg.episode.good_threshold == 0.55


def test_the_target_predictor_is_the_classifier_s_column(states_checkpoint: Path) -> None:
    loaded = load_net(states_checkpoint)
    predictor, target = target_classifier(loaded, "double", 0.9)
    assert isinstance(predictor, TargetPredictor) and target.index == 4
    images = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    full = Predictor(loaded.net, loaded.variables, "probability")(images)
    np.testing.assert_allclose(predictor(images), full[:, 4], rtol=1e-6)
    assert predictor(images).shape == (3,)
    cfg = load_config(None, {"probe.target_state": "dimers", "classifier.checkpoint": str(states_checkpoint)})
    assert check_target_setting(cfg, states_checkpoint).index == 1


def test_the_episode_context_and_documents_name_the_target() -> None:
    tracker = EpisodeTracker(config=EpisodeConfig(training=True, target_state="rows"))
    outcome = tracker.observe(0.95, "f1")  # armed first episode, on target at once
    ctx = outcome.decision_context(tracker.config)
    assert ctx.target == "rows" and ctx.as_record()["target"] == "rows"
    assert DecisionContext(**ctx.as_record()) == ctx
    assert load_config(None, {"probe.target_state": "rows"}).episode.target_state == "rows"  # linked
    fields = dict(frame="f", ransac_seed=1, p_good=0.95, good=True, classifier="c", trigger="probe_good",
                  context=ctx.as_record(), bad_probe_count=0, in_episode=False, episode=1, episode_started=True,
                  episode_ended=True, reward=None, free_side_m=1e-9)
    record = {"seq": 5, "t_mono": 0.0, "t_wall": 0.0, "kind": "decision", **Classification(**fields, target="rows")
              .to_record()}
    assert entry_from_record(record).doc.target == "rows"
    old = {"seq": 5, "t_mono": 0.0, "t_wall": 0.0, "kind": "decision", **Classification(**fields).to_record()}
    assert "target" not in old and entry_from_record(old).doc.target is None  # journals before targets still read
    action = ActionChosen(frame="f", action=1, q_values=[], mask=[], epsilon=1.0, explored=True, agent="a",
                          site_xy_m=[0.0, 0.0], free_side_m=1e-9, target="rows")
    assert action.to_record()["target"] == "rows"


@pytest.mark.parametrize("argv, words", [
    (["run", "--target-state", "rows", "--frames", "2"], ("probe.target_state", "'rows'", "allowed: good")),
    (["train", "agent", "--sim", "--out", "{tmp}/a", "--target-state", "rows", "--classifier", str(WEIGHTS / "classifier")],
     ("probe.target_state", "allowed: good")),
    (["train", "agent", "--sim", "--vectorised", "--target-state", "dimers", "--out", "{tmp}/v"],
     ("--target-state", "vectorised")),
])
def test_the_cli_refuses_a_target_the_classifier_does_not_judge(argv, words, tmp_path: Path, capsys) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err


def test_the_cli_run_refuses_an_unknown_state_of_a_multi_class_classifier(states_checkpoint: Path, tmp_path: Path,
                                                                          capsys) -> None:
    argv = ["run", "--target-state", "terraces", "--set", f"classifier.checkpoint={states_checkpoint}",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'terraces'" in err and "allowed: atoms, dimers" in err and not (tmp_path / "run").exists()


def test_a_new_agent_from_an_ensemble_classifier_is_refused(ensemble_checkpoint: Path, tmp_path: Path,
                                                            capsys) -> None:
    cfg = load_config(None, {"classifier.checkpoint": str(ensemble_checkpoint), "agent.checkpoint": "new",
                             "classifier.lines_checkpoint": "none"})
    with pytest.raises(EnsembleError, match="a new agent from the classifier .* needs a single net, not an ensemble of 2"):
        load_brain(cfg)
    argv = ["train", "agent", "--sim", "--out", str(tmp_path / "agent"), "--classifier", str(ensemble_checkpoint),
            "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs a single net, not an ensemble of 2" in err and err.count("\n") == 1


def test_run_frames_carry_their_true_tip_state(tmp_path: Path) -> None:
    from deepspm.simulator.hsi_dataset import RUN_STATES, synth_hsi_run_frames

    path = synth_hsi_run_frames(6, tmp_path / "f.npz", seed=3, progress=False)
    again = synth_hsi_run_frames(6, tmp_path / "g.npz", seed=3, progress=False)
    with np.load(path) as z, np.load(again) as w:
        assert z["frames"].shape == (6, 64, 64) and z["frames"].dtype == np.float32
        assert set(z["states"].tolist()) <= set(RUN_STATES)
        assert np.isfinite(z["frames"]).all() and float(np.ptp(z["frames"], axis=(1, 2)).max()) < 6e-10
        np.testing.assert_array_equal(z["frames"], w["frames"])  # seeded


# -- end to end through TCP ------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_run_with_a_target_state_names_it_and_ends_episodes_on_it(tmp_path: Path) -> None:
    """The shipped H:Si tip-state classifier, target "dimers", training mode (episodes start at once, the reset
    phase damages the tip after each success), against the simulated H:Si surface over TCP."""
    from deepspm.controller.report import write_report
    from deepspm.controller.session import SimulatorOptions, run_session
    from deepspm.controller.status import status_text
    from deepspm.simulator.microscope import SimConfig

    target = "dimers"
    cfg = load_config(None, {
        "run.frames": 14, "run.settle_s": 0.0, "run.train": True, "probe.target_state": target,
        "classifier.checkpoint": str(WEIGHTS / "hsi_tipstates"), "classifier.lines_checkpoint": "none",
        "agent.checkpoint": "new", "agent.updates_per_action": 1, "simulator.sample": "hsi",
    })
    cfg = with_target_threshold(cfg, target_of(cfg))  # the shipped classifier's own threshold for dimers
    assert cfg.classifier.threshold < 0.9
    brain = load_brain(cfg)
    simulator = SimulatorOptions(seed=4, time_scale=0.0, sim_config=SimConfig(surface="hsi", z_jump_rate_per_s=0.0))
    result = asyncio.run(run_session(cfg, tmp_path / "run", simulator=simulator, brain=brain))
    assert result.status == "completed", result.reason
    records = [json.loads(line) for line in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert records[0]["config"]["probe"]["target_state"] == target
    judged = [r for r in records if r.get("decision") == "classify"]
    assert judged and all(r["target"] == target and r["context"]["target"] == target for r in judged)
    ended = [r for r in judged if r["episode_ended"] and not r.get("episode_truncated")]
    assert ended, "no episode ended"
    assert all(r["good"] and r["p_good"] > cfg.classifier.threshold and r["trigger"] == "probe_good" for r in ended)
    assert all(r["good"] == (r["p_good"] > cfg.classifier.threshold) for r in judged)
    summary = write_report(tmp_path / "run", tmp_path / "report")
    assert summary.target_state == target
    assert f"frames with the probe {target}" in (tmp_path / "report" / "index.html").read_text()
    text = status_text(tmp_path / "run")
    assert f"tip state {target}" in text and f"p({target})" in text
    from deepspm.controller.replay_run import replay_run

    replayed = asyncio.run(replay_run(tmp_path / "run", mode="recorded"))
    assert replayed.identical, replayed.text()
    assert f"target tip state: {target}" in replayed.text()
    # killed part-way (the journal cut after its 5th judgement), the run resumes with its multi-class target
    journal = tmp_path / "run" / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    cut = [r["seq"] for r in records if r.get("decision") == "classify"][4]
    journal.write_text("".join(lines[:cut + 1]))
    assert main(["run", "--quiet", "--resume", str(tmp_path / "run")]) == 0
    resumed = [json.loads(line) for line in journal.read_text().splitlines()]
    assert resumed[-1]["status"] == "completed" and resumed[-1]["counters"]["frames"] == 14
    assert all(r["target"] == target for r in resumed if r.get("decision") == "classify")
