"""The `deepspm` command end to end: each subcommand a user runs, through the real entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import pytest

from deepspm.cli import main
from deepspm.controller.journal import read_journal
from deepspm.nets.checkpoints import save_net
from deepspm.nets.model import NetDef

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", "--frames", "25", "--seed", "1", "--out", str(run_dir), "--quiet"]) == 0
    return run_dir


def test_run_writes_a_complete_journal(short_run: Path, capsys) -> None:
    records = read_journal(short_run)
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "stop"
    assert records[-1]["status"] == "completed" and records[-1]["counters"]["frames"] == 25


def test_replay_says_identical(short_run: Path, capsys) -> None:
    assert main(["replay", str(short_run)]) == 0
    assert "identical" in capsys.readouterr().out


def copy_with_start(run_dir: Path, to: Path, **changes) -> Path:
    """A copy of a run whose start record is changed as another machine or a tamperer would see it."""
    shutil.copytree(run_dir, to)
    lines = (to / "journal.jsonl").read_text().splitlines(keepends=True)
    start = json.loads(lines[0])
    for key, value in changes.items():
        start[key] = {**start[key], **value}
    lines[0] = json.dumps(start) + "\n"
    (to / "journal.jsonl").write_text("".join(lines))
    return to


def test_recompute_replay_of_a_run_copied_from_another_machine(short_run: Path, tmp_path: Path, capsys) -> None:
    elsewhere = {"classifier": "/elsewhere/deepspm/weights/classifier", "agent": "/elsewhere/deepspm/weights/agent"}
    copied = copy_with_start(short_run, tmp_path / "copied", checkpoint_paths=elsewhere)
    assert main(["replay", str(copied), "--mode", "recompute"]) == 0  # the shipped weights, found here, verified
    assert "identical" in capsys.readouterr().out
    tampered = copy_with_start(short_run, tmp_path / "other-weights", checkpoint_paths=elsewhere,
                               checkpoints={"classifier": "classifier@000000000000"})
    assert main(["replay", str(tampered), "--mode", "recompute"]) == 2
    assert "are not the ones the run used (classifier@000000000000)" in capsys.readouterr().err
    own = copy_with_start(short_run, tmp_path / "own-weights", checkpoint_paths=elsewhere,
                          config={"classifier": {"checkpoint": "/elsewhere/my-classifier"}})
    assert main(["replay", str(own), "--mode", "recompute"]) == 2
    assert "checkpoint /elsewhere/deepspm/weights/classifier is not on this machine" in capsys.readouterr().err


def test_what_if_replay_with_another_classifier_reports_decisions_and_agreement(short_run: Path, tmp_path: Path,
                                                                               capsys) -> None:
    net = NetDef.of("tiny", 1)
    other = save_net(tmp_path / "other", net, net.init(jax.random.key(5)), kind="classifier")
    assert main(["replay", str(short_run), "--classifier", str(other)]) == 0
    out = capsys.readouterr().out
    assert "what-if" in out and "re-classification of every recorded frame" in out
    assert "diverged at seq" in out and "decision points" in out  # a random net disagrees at once


def test_report_and_status(short_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(short_run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["frames_classified"] == 25
    assert main(["status", str(short_run)]) == 0
    assert "STOPPED" in capsys.readouterr().out


def test_dataset_synth_gallery_and_classifier_evaluation(tmp_path: Path, capsys) -> None:
    data = tmp_path / "synth"
    assert main(["dataset", "synth", "--n", "24", "--out", str(data), "--seed", "11"]) == 0
    assert len(list((data / "good").glob("*.npy"))) + len(list((data / "bad").glob("*.npy"))) == 24
    assert main(["dataset", "gallery", str(data), "--out", str(tmp_path / "g.png"), "--per-class", "4"]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000
    from deepspm.controller.session import checkpoint_path

    shipped = checkpoint_path("shipped", "classifier")
    assert main(["evaluate", "classifier", "--checkpoint", str(shipped), "--data", str(data),
                 "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert "roc_auc" in json.dumps(metrics) and "accuracy" in json.dumps(metrics)
    ckpt = tmp_path / "tiny"
    assert main(["train", "classifier", "--data", str(data), "--out", str(ckpt), "--preset", "tiny", "--epochs", "3",
                 "--keep", "best", "--good-weight", "1"]) == 0
    summary = json.loads((ckpt / "metrics.json").read_text())
    aucs = [h["val"]["roc_auc"] for h in summary["history"]]
    assert summary["options"]["keep"] == "best" and summary["epoch"] == aucs.index(max(aucs)) + 1
    kept = {k: v for k, v in summary["metrics"].items() if k != "by_kind"}  # by_kind: added for synthetic sets
    assert kept == summary["history"][summary["epoch"] - 1]["val"]
    assert f"kept epoch {summary['epoch']} of 3 (best)" in capsys.readouterr().out


def test_config_errors_are_one_clear_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "lab.toml"
    bad.write_text("[scan]\npixls = 64\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "scan.pixls" in err and "pixels" in err
    assert main(["config", "show", "--set", "scan.pixels=128"]) == 0
    assert "pixels = 128" in capsys.readouterr().out


def test_resume_of_a_finished_run_is_refused_clearly(short_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", "--resume", str(short_run), "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "typo"), "--quiet"]) == 2
    assert f"no journal in {tmp_path / 'typo'}" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()  # a mistyped directory is not created


def test_fsm_diagram(capsys) -> None:
    assert main(["fsm", "--mermaid"]) == 0
    assert capsys.readouterr().out.startswith("stateDiagram-v2")


def test_run_against_an_external_nanonis_address(tmp_path: Path) -> None:
    """`--host/--port`: the real-instrument path (no embedded simulator), here against `deepspm simulate`'s server
    on its own thread; wall-clock waits are shortened by config, as a lab config could."""
    from deepspm.simulator.fake_nanonis import SimulatorServer
    from deepspm.simulator.threaded import LoopThread

    sim = SimulatorServer(seed=8, time_scale=0.0)
    with LoopThread() as thread:
        port = thread.call(lambda: sim.start(0))
        try:
            code = main(["run", "--host", "127.0.0.1", "--port", str(port), "--frames", "5", "--quiet",
                         "--out", str(tmp_path / "run"), "--set", "run.settle_s=0", "--set", "approach.poll_s=0.001",
                         # the envelope's fastest scan: a frame's nominal time, which the client waits out on the
                         # wall clock against a real instrument, is 1.3 s instead of 16 s
                         "--set", "scan.fwd_speed_mps=1e-6", "--set", "scan.bwd_speed_mps=1e-6"])
        finally:
            thread.call(sim.close)
    assert code == 0
    records = read_journal(tmp_path / "run")
    assert records[0]["instrument"]["simulated"] is False and records[0]["instrument"]["port"] == port
    assert records[-1]["counters"]["frames"] == 5
