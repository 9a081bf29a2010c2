"""Every subcommand refuses bad input in one line (issue 19), through the real entry point.

Each case runs `deepspm.cli.main` (what the `deepspm` script and `python -m deepspm.cli` call) and checks: the
exit code (2), exactly one line on stderr that names the argument, no traceback anywhere, and not one file or
folder created or removed in the working folder. A few cases run as a separate process too. Most cases are
refused while the arguments are parsed, before JAX is imported (a subprocess case checks that).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepspm.cli import main
from deepspm.controller import validate

WEIGHTS = Path(__file__).resolve().parents[1] / "deepspm" / "weights"
CLASSIFIER, AGENT = str(WEIGHTS / "classifier"), str(WEIGHTS / "agent")


@pytest.fixture(scope="module")
def busy_port():
    """A port with a listener on it (as another simulator would hold it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A working folder holding one of each thing a user might point a command at by mistake."""
    w = tmp_path_factory.mktemp("bad-input")
    (w / "file.txt").write_text("not what you wanted\n")
    (w / "empty").mkdir()
    (w / "notes.toml").write_text("this is [not toml\n")
    run = w / "run"
    run.mkdir()
    (run / "journal.jsonl").write_text(json.dumps({"kind": "start", "schema": 2, "run_id": "run", "config": {}}) + "\n")
    failed = w / "failed"  # what a run that could not connect leaves: a start record and a stop record
    failed.mkdir()
    (failed / "journal.jsonl").write_text(
        json.dumps({"kind": "start", "schema": 2, "run_id": "failed", "config": {}, "failed_before_start": True}) + "\n"
        + json.dumps({"kind": "stop", "status": "fault", "reason": "ConnectionLost: cannot connect"}) + "\n")
    (w / "emptyjournal").mkdir()
    (w / "emptyjournal" / "journal.jsonl").write_text("")
    (w / "garbage").mkdir()
    (w / "garbage" / "journal.jsonl").write_text("PK\x03\x04 this is no journal\n")
    data = w / "set"  # a (tiny) synthetic set: good/, bad/, labels.csv
    for label in ("good", "bad"):
        (data / label).mkdir(parents=True)
        np.save(data / label / "f0.npy", np.zeros((64, 64)))
    (data / "labels.csv").write_text("file,label,kind\ngood/f0.npy,good,good\nbad/f0.npy,bad,blunt\n")
    multiclass = w / "multiclass"  # a classifier checkpoint with six outputs (meta only: the check reads no arrays)
    (multiclass / "meta").mkdir(parents=True)
    (multiclass / "arrays").mkdir()
    meta = json.loads((WEIGHTS / "classifier" / "meta" / "metadata").read_text())
    (multiclass / "meta" / "metadata").write_text(json.dumps({**meta, "n_outputs": 6}))
    (w / "junk.npz").write_bytes(b"this is not a zip archive")
    np.savez(w / "other.npz", images=np.zeros((2, 64, 64), np.uint8))
    (w / "split.json").write_text(json.dumps({"val_indices": [0, 1]}))
    return w


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# (id, argv, the argument the one line must name (and any further words it must hold))
CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    # run
    ("run-port-out-of-range", ["run", "--port", "99999"], ("--port", "1..65535")),
    ("run-port-not-a-number", ["run", "--port", "http"], ("--port",)),
    ("run-frames-negative", ["run", "--frames", "-5"], ("--frames", "out of range")),
    ("run-frames-zero", ["run", "--frames", "0"], ("--frames",)),
    ("run-hours-nan", ["run", "--hours", "nan"], ("--hours", "finite")),
    ("run-seed-negative", ["run", "--seed", "-1"], ("--seed",)),
    ("run-time-scale-negative", ["run", "--time-scale", "-1"], ("--time-scale",)),
    ("run-sim-seed-junk", ["run", "--sim-seed", "x"], ("--sim-seed",)),
    ("run-resume-a-file", ["run", "--resume", "file.txt"], ("--resume", "is a file")),
    ("run-resume-empty-dir", ["run", "--resume", "empty"], ("--resume", "no journal")),
    ("run-resume-missing", ["run", "--resume", "typo"], ("--resume", "does not exist")),
    ("run-resume-a-stopped-run", ["run", "--resume", "failed"], ("--resume", "nothing to resume")),
    ("run-resume-empty-journal", ["run", "--resume", "emptyjournal"], ("--resume", "is empty")),
    ("run-resume-with-frames", ["run", "--resume", "run", "--frames", "3"], ("--resume", "--frames")),
    ("run-resume-with-out", ["run", "--resume", "run", "--out", "new"], ("--resume", "--out")),
    ("run-sim-seed-with-host", ["run", "--host", "127.0.0.1", "--sim-seed", "3"], ("--sim-seed", "--host")),
    ("run-host-invalid", ["run", "--host", "lab..pc", "--out", "new"], ("--host", "not a valid host name")),
    ("run-out-a-file", ["run", "--out", "file.txt"], ("--out", "is a file")),
    ("run-out-below-a-file", ["run", "--out", "file.txt/run"], ("--out", "cannot be created")),
    ("run-out-holds-a-run", ["run", "--out", "run"], ("--out", "--resume")),
    ("run-out-not-empty", ["run", "--out", "set"], ("--out", "not empty")),
    ("run-classifier-is-an-agent", ["run", "--set", f"classifier.checkpoint={AGENT}", "--out", "new"],
     ("classifier.checkpoint", "agent checkpoint, not a classifier")),
    ("run-agent-not-a-checkpoint", ["run", "--set", "agent.checkpoint=empty", "--out", "new"],
     ("agent.checkpoint", "not a deepspm checkpoint")),
    ("run-classifier-multiclass", ["run", "--set", "classifier.checkpoint=multiclass", "--out", "new"],
     ("classifier.checkpoint", "6 outputs")),
    ("run-config-missing", ["run", "--config", "lab.toml"], ("lab.toml",)),
    ("run-config-not-toml", ["run", "--config", "notes.toml"], ("notes.toml", "TOML")),
    ("run-set-junk-value", ["run", "--set", "scan.pixels=abc"], ("scan.pixels",)),
    ("run-set-unknown-key", ["run", "--set", "scan.pixls=64"], ("scan.pixls",)),
    # simulate
    ("simulate-port-out-of-range", ["simulate", "--port", "99999"], ("--port", "out of range")),
    ("simulate-port-negative", ["simulate", "--port", "-1"], ("--port",)),
    ("simulate-port-in-use", ["simulate", "--port", "{busy_port}"], ("--port", "already in use")),
    ("simulate-time-scale-negative", ["simulate", "--time-scale", "-2"], ("--time-scale",)),
    ("simulate-seed-junk", ["simulate", "--seed", "one"], ("--seed",)),
    # replay
    ("replay-a-file", ["replay", "file.txt"], ("RUN_DIR", "is a file")),
    ("replay-no-journal", ["replay", "empty"], ("RUN_DIR", "no journal")),
    ("replay-empty-journal", ["replay", "emptyjournal"], ("RUN_DIR", "is empty")),
    ("replay-garbage-journal", ["replay", "garbage"], ("RUN_DIR", "not JSON")),
    ("replay-failed-before-start", ["replay", "failed"], ("RUN_DIR", "failed before it started")),
    ("replay-classifier-is-an-agent", ["replay", "run", "--classifier", AGENT], ("--classifier", "agent checkpoint")),
    ("replay-agent-is-a-classifier", ["replay", "run", "--agent", CLASSIFIER], ("--agent", "classifier checkpoint")),
    ("replay-agent-missing", ["replay", "run", "--agent", "nets/agent"], ("--agent", "does not exist")),
    ("replay-unknown-mode", ["replay", "run", "--mode", "fast"], ("--mode", "invalid choice")),
    # report
    ("report-a-file", ["report", "file.txt", "--out", "report"], ("RUN_DIR",)),
    ("report-no-journal", ["report", "empty", "--out", "report"], ("RUN_DIR",)),
    ("report-out-a-file", ["report", "run", "--out", "file.txt"], ("--out", "is a file")),
    ("report-out-missing", ["report", "run"], ("--out", "required")),
    # status
    ("status-a-file", ["status", "file.txt"], ("RUN_DIR",)),
    ("status-missing", ["status", "typo"], ("RUN_DIR", "does not exist")),
    ("status-interval-zero", ["status", "run", "--follow", "--interval", "0"], ("--interval",)),
    # dataset synth
    ("synth-n-negative", ["dataset", "synth", "--n", "-5", "--out", "ds"], ("--n",)),
    ("synth-n-junk", ["dataset", "synth", "--n", "many", "--out", "ds"], ("--n",)),
    ("synth-out-a-file", ["dataset", "synth", "--n", "4", "--out", "file.txt"], ("--out", "is a file")),
    ("synth-out-not-empty", ["dataset", "synth", "--n", "4", "--out", "set"], ("--out", "not empty")),
    ("synth-good-fraction", ["dataset", "synth", "--n", "4", "--out", "ds", "--good-fraction", "2"],
     ("--good-fraction",)),
    ("synth-seed-negative", ["dataset", "synth", "--n", "4", "--out", "ds", "--seed", "-3"], ("--seed",)),
    ("synth-hsi-out-a-folder", ["dataset", "synth", "--sample", "hsi", "--n", "4", "--out", "empty"],
     ("--out", "is a folder")),
    # dataset gallery
    ("gallery-no-labels", ["dataset", "gallery", "empty", "--out", "g.png"], ("DIR", "labels.csv")),
    ("gallery-missing", ["dataset", "gallery", "typo", "--out", "g.png"], ("DIR", "does not exist")),
    ("gallery-not-png", ["dataset", "gallery", "set", "--out", "g.jpg"], ("--out", ".png")),
    ("gallery-out-no-folder", ["dataset", "gallery", "set", "--out", "plots/g.png"], ("--out", "does not exist")),
    ("gallery-out-a-folder", ["dataset", "gallery", "set", "--out", "empty"], ("--out", "is a folder")),
    ("gallery-per-class-zero", ["dataset", "gallery", "set", "--out", "g.png", "--per-class", "0"], ("--per-class",)),
    ("gallery-real-junk", ["dataset", "gallery", "set", "--out", "g.png", "--real", "junk.npz"], ("--real",)),
    ("dataset-no-action", ["dataset"], ("ACTION", "required")),
    # train classifier
    ("train-data-etc-passwd", ["train", "classifier", "--data", "/etc/passwd", "--out", "ck"], ("--data", "neither")),
    ("train-data-empty-dir", ["train", "classifier", "--data", "empty", "--out", "ck"], ("--data", "good/")),
    ("train-data-junk-npz", ["train", "classifier", "--data", "junk.npz", "--out", "ck"], ("--data", ".npz")),
    ("train-data-other-npz", ["train", "classifier", "--data", "other.npz", "--out", "ck"], ("--data", "lacks")),
    ("train-data-second-bad", ["train", "classifier", "--data", "set", "typo", "--out", "ck"], ("--data", "typo")),
    ("train-out-a-file", ["train", "classifier", "--data", "set", "--out", "file.txt"], ("--out", "is a file")),
    ("train-out-exists", ["train", "classifier", "--data", "set", "--out", CLASSIFIER], ("--out", "--overwrite")),
    ("train-overwrite-not-a-checkpoint", ["train", "classifier", "--data", "set", "--out", "empty", "--overwrite"],
     ("--out", "replaces only a checkpoint")),
    ("train-epochs-zero", ["train", "classifier", "--data", "set", "--out", "ck", "--epochs", "0"], ("--epochs",)),
    ("train-val-fraction-one", ["train", "classifier", "--data", "set", "--out", "ck", "--val-fraction", "1"],
     ("--val-fraction",)),
    ("train-keep-best-without-validation",
     ["train", "classifier", "--data", "set", "--out", "ck", "--keep", "best", "--val-fraction", "0"], ("--keep",)),
    ("train-multiclass-folders", ["train", "classifier", "--data", "set", "--out", "ck", "--multiclass"],
     ("--multiclass", "binary labels only")),
    ("train-preset-unknown", ["train", "classifier", "--data", "set", "--out", "ck", "--preset", "huge"],
     ("--preset",)),
    ("train-good-weight-negative", ["train", "classifier", "--data", "set", "--out", "ck", "--good-weight", "-1"],
     ("--good-weight",)),
    # train agent
    ("train-agent-classifier-is-an-agent", ["train", "agent", "--sim", "--out", "ag", "--classifier", AGENT],
     ("--classifier", "agent checkpoint")),
    ("train-agent-steps-zero", ["train", "agent", "--sim", "--out", "ag", "--steps", "0"], ("--steps",)),
    ("train-agent-out-exists", ["train", "agent", "--sim", "--out", "empty"], ("--out", "exists")),
    ("train-agent-no-sim", ["train", "agent", "--out", "ag"], ("--sim", "required")),
    # evaluate classifier
    ("evaluate-issue-example", ["evaluate", "classifier", "--checkpoint", ".", "--data", "/etc/passwd"],
     ("--checkpoint", "not a deepspm checkpoint")),
    ("evaluate-checkpoint-is-an-agent", ["evaluate", "classifier", "--checkpoint", AGENT, "--data", "set"],
     ("--checkpoint", "agent checkpoint, not a classifier")),
    ("evaluate-checkpoint-a-file", ["evaluate", "classifier", "--checkpoint", "file.txt", "--data", "set"],
     ("--checkpoint", "is a file")),
    ("evaluate-data-empty", ["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", "empty"], ("--data",)),
    ("evaluate-threshold", ["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", "set", "--threshold",
                            "1.5"], ("--threshold",)),
    ("evaluate-json-no-folder", ["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", "set", "--json",
                                 "out/m.json"], ("--json", "does not exist")),
    ("evaluate-json-a-folder", ["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", "set", "--json",
                                "empty"], ("--json", "is a folder")),
    ("evaluate-split-not-json", ["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", "set", "--split",
                                 "file.txt"], ("--split", "not JSON")),
    ("evaluate-split-missing", ["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", "set", "--split",
                                "typo.json"], ("--split", "does not exist")),
    ("evaluate-min-responses", ["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", "set",
                                "--min-responses", "0"], ("--min-responses",)),
    # evaluate agent
    ("evaluate-agent-is-a-classifier", ["evaluate", "agent", "--sim", "--checkpoint", CLASSIFIER],
     ("--checkpoint", "classifier checkpoint, not an agent")),
    ("evaluate-agent-empty-dir", ["evaluate", "agent", "--sim", "--checkpoint", "empty"], ("--checkpoint",)),
    ("evaluate-agent-classifier-is-an-agent", ["evaluate", "agent", "--sim", "--classifier", AGENT],
     ("--classifier",)),
    ("evaluate-agent-episodes-zero", ["evaluate", "agent", "--sim", "--episodes", "0"], ("--episodes",)),
    ("evaluate-agent-json-no-folder", ["evaluate", "agent", "--sim", "--json", "out/r.json"], ("--json",)),
    # export, dataset import
    ("export-a-file", ["export", "file.txt", "--out", "ex"], ("file.txt", "not a run directory")),
    ("export-not-a-run", ["export", "empty", "--out", "ex"], ("empty", "neither a run directory")),
    ("export-format-unknown", ["export", "run", "--out", "ex", "--format", "tiff"], ("--format",)),
    ("export-frame-size-negative", ["export", "set", "--out", "ex", "--frame-size-nm", "-3"], ("--frame-size-nm",)),
    ("import-missing", ["dataset", "import", "typo", "--out", "lab"], ("typo", "no such file")),
    ("import-no-sxm", ["dataset", "import", "empty", "--out", "lab"], ("empty", "no .sxm files")),
    ("import-out-exists", ["dataset", "import", "empty", "--out", "file.txt"], ("file.txt", "exists")),
    # config show, fsm, the command itself
    ("config-set-junk", ["config", "show", "--set", "scan.pixels=abc"], ("scan.pixels",)),
    ("config-set-no-equals", ["config", "show", "--set", "scan.pixels"], ("scan.pixels",)),
    ("config-missing-file", ["config", "show", "--config", "lab.toml"], ("lab.toml",)),
    ("config-out-of-range", ["config", "show", "--set", "instrument.port=0"], ("instrument.port",)),
    ("fsm-unknown-option", ["fsm", "--png"], ("--png",)),
    ("unknown-command", ["frobnicate"], ("frobnicate",)),
]


@pytest.mark.parametrize("argv, names", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(argv, names, workspace, busy_port, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv(validate.LOG_DIR_ENV, str(workspace / "crash-logs"))  # an internal error would show here
    monkeypatch.delenv(validate.TRACEBACK_ENV, raising=False)
    argv = [a.replace("{busy_port}", str(busy_port)) for a in argv]
    before = listing(workspace)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("deepspm"), err
    for word in names:
        assert word in err, err
    assert "Traceback" not in out + err
    assert listing(workspace) == before


def run_deepspm(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "deepspm.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def split_importtime(stderr: str) -> tuple[list[str], set[str]]:
    """(the lines that are not -X importtime's, the names of the modules it imported)."""
    lines, modules = [], set()
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[1].strip())
        else:
            lines.append(line)
    return lines, modules


@pytest.mark.parametrize("argv, names", [
    (["evaluate", "classifier", "--checkpoint", ".", "--data", "/etc/passwd"], ("--checkpoint",)),
    (["simulate", "--port", "99999"], ("--port",)),
    (["evaluate", "agent", "--sim", "--checkpoint", CLASSIFIER], ("--checkpoint",)),
    (["train", "classifier", "--data", "junk.npz", "--out", "ck"], ("--data",)),
    (["replay", "file.txt"], ("RUN_DIR",)),
], ids=["issue-evaluate-classifier", "issue-simulate-port", "evaluate-agent", "train-classifier", "replay-a-file"])
def test_as_a_process_one_line_and_no_jax(argv, names, workspace) -> None:
    """The two examples of issue 19 and a few more, as a user runs them: one line, exit 2, JAX never loaded."""
    before = listing(workspace)
    result = run_deepspm(*argv, cwd=workspace)
    lines, modules = split_importtime(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert all(word in lines[0] for word in names) and "Traceback" not in result.stdout + result.stderr
    assert "jax" not in modules and "orbax.checkpoint" not in modules
    assert listing(workspace) == before


def crash(monkeypatch, exc: BaseException) -> None:
    """Make `deepspm fsm` fail inside the command with `exc`, as a bug would."""
    import deepspm.fsm.diagram

    def broken() -> str:
        raise exc

    monkeypatch.setattr(deepspm.fsm.diagram, "mermaid", broken)


def test_an_internal_error_is_one_line_with_a_crash_log(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(validate.LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.delenv(validate.TRACEBACK_ENV, raising=False)
    crash(monkeypatch, ValueError("the table lost a row\nsecond line"))
    assert main(["fsm"]) == 1
    err = capsys.readouterr().err
    logs = list((tmp_path / "logs").iterdir())
    assert len(logs) == 1 and logs[0].name.startswith("deepspm-crash-")
    assert err == f"deepspm: internal error: ValueError: the table lost a row (details in {logs[0]})\n"
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "command: deepspm fsm" in text


@pytest.mark.parametrize("how", ["-v", "--verbose", "env"])
def test_verbose_prints_the_traceback_too(how: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(validate.LOG_DIR_ENV, str(tmp_path))
    if how == "env":
        monkeypatch.setenv(validate.TRACEBACK_ENV, "1")
        argv = ["fsm"]
    else:
        monkeypatch.delenv(validate.TRACEBACK_ENV, raising=False)
        argv = [how, "fsm"] if how == "-v" else ["fsm", how]  # before or after the command
    crash(monkeypatch, RuntimeError("boom"))
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):" and "RuntimeError: boom" in err
    assert err[-1].startswith("deepspm: internal error: RuntimeError: boom (details in ")


def test_a_crash_of_run_is_logged_in_its_run_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    import deepspm.controller.validate as v

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv(validate.LOG_DIR_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.setattr(v, "check_run_config", lambda cfg, args: (_ for _ in ()).throw(ZeroDivisionError("x")))
    assert main(["run", "--out", str(run_dir), "--quiet"]) == 1
    assert f"(details in {run_dir}{os.sep}deepspm-crash-" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_ctrl_c_outside_a_run_is_one_line(monkeypatch, capsys) -> None:
    crash(monkeypatch, KeyboardInterrupt())
    assert main(["fsm"]) == 130
    assert capsys.readouterr().err == "deepspm: interrupted\n"


def test_a_long_expected_error_is_still_one_line(monkeypatch, capsys) -> None:
    from deepspm.nets.data import DataError

    monkeypatch.delenv(validate.TRACEBACK_ENV, raising=False)
    crash(monkeypatch, DataError("2 file(s) are not square:\n  a.npy: shape (3, 4)\n  b.npy: shape (5,)"))
    assert main(["fsm"]) == 2
    assert capsys.readouterr().err == "deepspm: error: 2 file(s) are not square: (2 more lines with -v)\n"
    assert main(["-v", "fsm"]) == 2
    assert "b.npy: shape (5,)" in capsys.readouterr().err


def test_an_unknown_host_is_refused_before_the_run_directory_is_made(tmp_path: Path, monkeypatch, capsys) -> None:
    """A name lookup that fails (faked: the test machine may have no resolver) is one line naming --host."""
    def no_such_host(host, port, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(validate.socket, "getaddrinfo", no_such_host)
    assert main(["run", "--host", "nanonis-pc.lab", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("deepspm: error: argument --host: cannot resolve the host name 'nanonis-pc.lab' "
                                       "(Name or service not known)\n")
    assert not (tmp_path / "run").exists()


def test_good_input_still_passes_the_checks(tmp_path: Path, workspace: Path) -> None:
    """The same checks accept what they should (so a refusal above is not a check that refuses everything)."""
    parser = __import__("deepspm.cli", fromlist=["build_parser"]).build_parser()
    args = parser.parse_args(["evaluate", "classifier", "--checkpoint", CLASSIFIER, "--data", str(workspace / "set"),
                              "--json", str(tmp_path / "m.json"), "--split", str(workspace / "split.json")])
    validate.check_args(args)
    args = parser.parse_args(["train", "classifier", "--data", str(workspace / "set"), "--out", str(tmp_path / "ck")])
    validate.check_args(args)
    args = parser.parse_args(["run", "--resume", str(workspace / "run")])
    validate.check_args(args)
    args = parser.parse_args(["replay", str(workspace / "run"), "--classifier", CLASSIFIER, "--agent", AGENT])
    args = parser.parse_args(["dataset", "synth", "--n", "4", "--out", str(workspace / "empty")])
    validate.check_args(args)
    args = parser.parse_args(["simulate", "--port", "0"])
    assert args.port == 0
