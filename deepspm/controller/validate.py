"""The command line's edge: every argument is checked before a command starts, and every failure is one line.

Three parts, used by `deepspm.cli` (which only parses and delegates):

- argparse `type=` callables (`free_local_port`, `checkpoint_of_kind("agent")`, `labelled_data`,
  `resumable_run`, `output_file(".png")`, `int_range(1, 1000)`, `config_value("run.frames", int)`...): a bad
  value is refused while the arguments are parsed, as
  `deepspm simulate: error: argument --port: port 99999 is out of range: allowed 0..65535`.
  They are cheap: no JAX, no orbax, no images read (checkpoints are recognised by their JSON metadata, data
  sets by their folders or the .npz's table of contents).
- `check_args` (after parsing: combinations that make no sense, outputs that exist) and `check_run_config`
  (after the run's configuration is resolved: its checkpoints, host and run directory). Both raise
  `ArgumentProblem` naming the argument or config key. All of this happens before anything is written, so a
  refused command leaves no file and no directory behind.
- `run_cli`: the top-level handler. Expected errors (bad arguments, configuration, data, checkpoints, journals,
  missing files) print `deepspm: error: <one line>` and exit 2. Anything else is a bug or an unforeseen
  condition: one line `deepspm: internal error: <Type>: <message> (details in <log>)`, exit 1, with the full
  traceback written to a crash log (in the run directory for `deepspm run`, else in $DEEPSPM_LOG_DIR, else
  ~/.cache/deepspm/) and printed on the terminal with `-v`/`--verbose` or DEEPSPM_TRACEBACK=1. Ctrl-C outside
  a run (which handles it itself) exits 130 with one line.

This module imports only the standard library at import time; the checks that need a layer import it lazily.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

TRACEBACK_ENV = "DEEPSPM_TRACEBACK"
LOG_DIR_ENV = "DEEPSPM_LOG_DIR"
SEED_MAX = 2**32 - 1  # JAX PRNG keys and numpy seeds take 32-bit seeds (as run.seed)

VERBOSE_HELP = (f"on an internal error, also print the full traceback here (as {TRACEBACK_ENV}=1 does); it is always "
                f"written to a crash log: in the run directory for 'run', else in ${LOG_DIR_ENV} (default "
                f"~/.cache/deepspm/)")

EXIT_CODES = ("exit codes: 0 done; 1 a run that ended in a fault, a replay that diverged, or an internal error "
              "(one line, details in a crash log); 2 bad input or a refused request (one line naming the argument); "
              "130 interrupted")

# Errors that describe the user's input or environment, not a bug: one line, exit 2. Named, not imported, so
# that recognising one costs no import (some live in modules that load JAX).
EXPECTED_ERRORS = frozenset({
    "deepspm.controller.validate.ArgumentProblem",
    "deepspm.controller.config.ConfigError",
    "deepspm.controller.journal.JournalError",
    "deepspm.controller.session.ResumeError",
    "deepspm.controller.session.CheckpointMismatch",
    "deepspm.controller.runlock.RunDirInUse",
    "deepspm.nets.data.DataError",
    "deepspm.nets.checkpoint_info.CheckpointError",
    "deepspm.nets.parallel.ParallelError",
    "deepspm.io.sxm.SxmError",
    "deepspm.controller.export.ExportError",
    "builtins.FileNotFoundError",
    "builtins.FileExistsError",
    "builtins.NotADirectoryError",
    "builtins.IsADirectoryError",
    "builtins.PermissionError",
})


class ArgumentProblem(ValueError):
    """An argument (or config key) that is refused, alone or in combination with another."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"argument {argument}: {message}")
        self.argument = argument


def _one_line(text: str) -> tuple[str, int]:
    """The first non-empty line of `text`, and how many more lines it had."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()] or [""]
    return lines[0].strip(), len(lines) - 1


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (`deepspm run: error: argument --port: ...`, exit 2) instead of
    the usage block, and `-v/--verbose` on every (sub)command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("conflict_handler", "resolve")  # a command's own -v, if one is ever added, wins
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)

    def error(self, message: str) -> None:  # type: ignore[override]
        line, _ = _one_line(message)
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


# --- argparse types -----------------------------------------------------------------------------------------


def _refuse(message: str) -> NoReturn:
    raise argparse.ArgumentTypeError(message)


def _named(name: str, fn: Callable[[str], Any]) -> Callable[[str], Any]:
    fn.__name__ = name
    return fn


def int_range(lo: int, hi: int, what: str = "") -> Callable[[str], int]:
    """A whole number in lo..hi."""
    label = f"{what} " if what else ""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            _refuse(f"{text!r} is not a whole number")
        if not lo <= value <= hi:
            _refuse(f"{label}{value} is out of range: allowed {lo}..{hi}")
        return value

    return _named(f"int_range({lo}, {hi})", parse)


def float_range(lo: float | None, hi: float | None, *, lo_open: bool = False, hi_open: bool = False,
                unit: str = "") -> Callable[[str], float]:
    """A finite number within the given bounds (open or closed)."""
    lo_sign, hi_sign = "<" if lo_open else "<=", "<" if hi_open else "<="
    allowed = " ".join(part for part in (f"{lo:g} {lo_sign}" if lo is not None else "", "x",
                                         f"{hi_sign} {hi:g}" if hi is not None else "") if part)
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _refuse(f"{text!r} is not a number")
        if not math.isfinite(value):
            _refuse(f"{text!r} is not a finite number")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            _refuse(f"{value:g}{suffix} is out of range: allowed {allowed}{suffix}")
        return value

    return _named("float_range", parse)


seed = int_range(0, SEED_MAX, "seed")
port_number = int_range(1, 65535, "port")


def free_local_port(text: str) -> int:
    """A port number on which this process may listen on 127.0.0.1 now (not in use, not privileged), or 0: any
    free port, chosen by the system."""
    port = int_range(0, 65535, "port")(text)
    if port == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if os.name != "nt":  # as asyncio's servers do, so a port in TIME_WAIT is not refused
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except PermissionError:
            _refuse(f"port {port} is not permitted (ports below 1024 need administrator rights; the Nanonis "
                    f"default is 6501)")
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                _refuse(f"port {port} on 127.0.0.1 is already in use (another simulator or program listens there)")
            _refuse(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}")
    return port


def checkpoint_of_kind(kind: str) -> Callable[[str], Path]:
    """A checkpoint directory holding a `kind` net ("classifier" or "agent"), recognised by its metadata."""

    def parse(text: str) -> Path:
        from deepspm.nets.checkpoint_info import CheckpointError, require_kind

        try:
            require_kind(text, kind)
        except CheckpointError as e:
            _refuse(str(e))
        return Path(text)

    return _named(f"{kind}_checkpoint", parse)


def shipped_or(checkpoint: Callable[[str], Path]) -> Callable[[str], str | Path]:
    """The word "shipped" (the package's weights), or what `checkpoint` accepts."""

    def parse(text: str) -> str | Path:
        return "shipped" if text == "shipped" else checkpoint(text)

    return _named(getattr(checkpoint, "__name__", "checkpoint"), parse)


def labelled_data(text: str) -> Path:
    """A labelled data set in a supported layout: the H:Si(100) .npz, or a folder with good/ and bad/ .npy files."""
    from deepspm.nets.data import DataError, check_labelled_path

    try:
        check_labelled_path(text)
    except DataError as e:
        _refuse(str(e))
    return Path(text)


def run_directory(text: str) -> Path:
    """A run directory: a folder holding journal.jsonl."""
    path = Path(text)
    if not path.exists():
        _refuse(f"no journal in {path}: the folder does not exist")
    if not path.is_dir():
        _refuse(f"{path} is a file, not a run directory")
    if not (path / "journal.jsonl").is_file():
        _refuse(f"no journal in {path} (not a run directory)")
    return path


def journaled_run(text: str) -> Path:
    """A run directory whose journal begins with a complete start record (what replay and report read)."""
    path = run_directory(text)
    journal = path / "journal.jsonl"
    try:
        with open(journal, "rb") as f:
            first = f.readline()
    except OSError as e:
        _refuse(f"cannot read {journal}: {e.strerror or e}")
    if not first.strip():
        _refuse(f"{journal} is empty (the run never started)")
    if not first.endswith(b"\n"):
        _refuse(f"{journal} holds only an incomplete first line (the run was killed while starting)")
    try:
        record = json.loads(first)
    except ValueError:
        _refuse(f"{journal}: the first line is not JSON (not a deepspm journal)")
    if not isinstance(record, dict) or record.get("kind") != "start":
        _refuse(f"{journal} does not begin with a start record (not a deepspm journal)")
    return path


def _start_record(path: Path) -> dict[str, Any]:
    with open(path / "journal.jsonl", "rb") as f:
        return json.loads(f.readline())


def _last_record(path: Path, tail_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """The journal's last complete record (None when the last complete line is not JSON)."""
    with open(path / "journal.jsonl", "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail_bytes))
        lines = f.read().split(b"\n")[:-1]  # what follows the last newline is a torn line, or nothing
    try:
        record = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _schema_for(path: Path, verb: str) -> None:
    """The journal's layout must be this version's to be replayed or resumed (report and status read older ones)."""
    from deepspm.controller.journal import JournalError, check_schema

    try:
        check_schema(_start_record(path), verb)
    except JournalError as e:
        _refuse(f"{path}: {e}")


def replayable_run(text: str) -> Path:
    """A run directory whose run started (a run that failed while connecting has nothing to replay)."""
    path = journaled_run(text)
    if _start_record(path).get("failed_before_start"):
        _refuse(f"{path}: the run failed before it started, so there is nothing to replay (see deepspm status {path})")
    _schema_for(path, "replayed")
    return path


def resumable_run(text: str) -> Path:
    """A run directory whose journal has no stop record (the run was killed or crashed) or ends suspended (a full
    disk stopped it: `journal.SUSPENDED`, named here so that the check imports nothing)."""
    path = journaled_run(text)
    last = _last_record(path)
    if last is not None and last.get("kind") == "stop" and last.get("status") != "suspended":
        _refuse(f"{path}: the run has stopped ({last.get('status')}: {last.get('reason')}); nothing to resume")
    _schema_for(path, "resumed")
    return path


def _first_existing_ancestor(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path(path.absolute().anchor)


def output_dir(text: str) -> Path:
    """A folder to create (or one that exists): not a file, and not below a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        _refuse(f"{path} is a file, not a folder")
    if not path.exists():
        ancestor = _first_existing_ancestor(path)
        if not ancestor.is_dir():
            _refuse(f"{ancestor} is a file, so {path} cannot be created")
    return path


def output_file(suffix: str | None = None) -> Callable[[str], Path]:
    """A file to write (replaced if it exists) in a folder that exists, optionally with a required suffix."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_dir():
            _refuse(f"{path} is a folder; give a file name")
        if suffix is not None and path.suffix.lower() != suffix:
            _refuse(f"{path}: the file name must end in {suffix}")
        parent = path.absolute().parent
        if not parent.is_dir():
            _refuse(f"the folder {path.parent} does not exist" if not parent.exists()
                    else f"{path.parent} is a file, not a folder")
        return path

    return _named(f"output_file({suffix})", parse)


def split_file(text: str) -> Path:
    """A training run's split.json: a JSON object with a list of validation row indices."""
    path = Path(text)
    if not path.is_file():
        _refuse(f"{path} does not exist" if not path.exists() else f"{path} is a folder, not a split.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        _refuse(f"cannot read {path}: {e.strerror or e}")
    except ValueError:
        _refuse(f"{path} is not JSON (expected a training run's split.json)")
    rows = data.get("val_indices") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows):
        _refuse(f"{path} has no list of row numbers 'val_indices' (expected a training run's split.json)")
    return path


def config_value(key: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A run option that sets config `key`: converted, then validated by the configuration's own rules."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            _refuse(f"{text!r} is not a {'whole number' if convert is int else 'number'}")
        from deepspm.controller.config import ConfigError, load_config

        try:
            load_config(None, {key: value})
        except ConfigError as e:
            _refuse(str(e))
        return value

    return _named(key, parse)


# --- checks after parsing ----------------------------------------------------------------------------------


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def _check_new_checkpoint(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise ArgumentProblem("--out", f"{out} exists (pass --overwrite to replace it)")
    from deepspm.nets.checkpoint_info import CheckpointError, read_checkpoint_meta

    try:
        read_checkpoint_meta(out)
    except CheckpointError as e:
        raise ArgumentProblem("--out", f"--overwrite replaces only a checkpoint, and {e}") from None


def _check_new_folder(argument: str, out: Path, what: str) -> None:
    if out.exists() and not _is_empty_dir(out):
        if (out / "journal.jsonl").exists():
            raise ArgumentProblem(argument, f"{out} already holds a run; continue it with 'deepspm run --resume {out}' "
                                            f"or choose another {what}")
        raise ArgumentProblem(argument, f"{out} exists and is not empty; choose a new {what}")


# the run options that a resumed run takes from its journal instead
_RUN_SETTINGS = (("config", "--config"), ("set", "--set"), ("host", "--host"), ("port", "--port"),
                 ("frames", "--frames"), ("hours", "--hours"), ("seed", "--seed"), ("time_scale", "--time-scale"),
                 ("sim_seed", "--sim-seed"), ("out", "--out"))


def _check_run(args: argparse.Namespace) -> None:
    if args.resume is not None:
        given = [flag for dest, flag in _RUN_SETTINGS if getattr(args, dest, None) not in (None, [])]
        if args.train:
            given.append("--train")
        if given:
            raise ArgumentProblem("--resume", f"cannot be combined with {', '.join(given)} (a resumed run keeps the "
                                              f"settings, seed and run directory recorded in its journal)")
        return
    if args.host is not None:
        for dest, flag in (("time_scale", "--time-scale"), ("sim_seed", "--sim-seed")):
            if getattr(args, dest) is not None:
                raise ArgumentProblem(flag, "applies to the embedded simulator only, not to a run against --host")
    if args.out is not None:
        _check_new_folder("--out", args.out, "run directory")


def _check_train_classifier(args: argparse.Namespace) -> None:
    _check_new_checkpoint(args.out, args.overwrite)
    if args.keep == "best" and args.val_fraction == 0:
        raise ArgumentProblem("--keep", "best needs a validation split (--val-fraction above 0)")
    if args.multiclass:
        folders = [str(p) for p in args.data if not (p.is_file() and p.suffix == ".npz")]
        if folders:
            raise ArgumentProblem("--multiclass", f"needs the H:Si(100) .npz; {folders[0]} is a good/bad folder set "
                                                  f"(binary labels only)")


def _check_train_agent(args: argparse.Namespace) -> None:
    _check_new_checkpoint(args.out, args.overwrite)


def _checked(argument: str, parse: Callable[[str], Any], text: str) -> Any:
    """An argparse type applied after parsing (when which one applies depends on another argument)."""
    try:
        return parse(text)
    except argparse.ArgumentTypeError as e:
        raise ArgumentProblem(argument, str(e)) from None


def _check_dataset_synth(args: argparse.Namespace) -> None:
    if getattr(args, "sample", None) == "hsi":  # OUT is the .npz file to write
        if args.out.is_dir():
            raise ArgumentProblem("--out", f"{args.out} is a folder; with --sample hsi OUT is the .npz file to write")
        _checked("--out", output_dir, str(args.out.parent))
        return
    _checked("--out", output_dir, str(args.out))
    _check_new_folder("--out", args.out, "folder")


def _check_dataset_gallery(args: argparse.Namespace) -> None:
    dataset = args.dataset
    if not dataset.exists():
        raise ArgumentProblem("DIR", f"{dataset} does not exist")
    if dataset.suffix == ".npz":
        if not dataset.is_file():
            raise ArgumentProblem("DIR", f"{dataset} is a folder, not an .npz file")
        return
    if getattr(args, "real", None) is not None:
        raise ArgumentProblem("--real", "applies only to an H:Si set (.npz), not to a folder")
    if not dataset.is_dir():
        raise ArgumentProblem("DIR", f"{dataset} is neither a data set folder nor an .npz file")
    if not any((dataset / name).is_file() for name in ("labels.csv", "manifest.csv")):
        raise ArgumentProblem("DIR", f"{dataset} has no labels.csv (a set from 'dataset synth') nor manifest.csv "
                                     f"(a set from 'dataset import')")


_CHECKS: dict[tuple[str, str | None], Callable[[argparse.Namespace], None]] = {
    ("run", None): _check_run,
    ("train", "classifier"): _check_train_classifier,
    ("train", "agent"): _check_train_agent,
    ("dataset", "synth"): _check_dataset_synth,
    ("dataset", "gallery"): _check_dataset_gallery,
}


def check_args(args: argparse.Namespace) -> None:
    """Combinations of arguments that make no sense, and outputs that must not be overwritten."""
    command = getattr(args, "command", None)
    action = getattr(args, f"{command}_command", None)
    check = None if command is None else _CHECKS.get((command, action))
    if check is not None:
        check(args)


def check_run_config(cfg: Any, args: argparse.Namespace) -> None:
    """What a new run needs from its resolved configuration, checked before the run directory is made: the
    checkpoints are of the right kind, the Nanonis host name resolves, the run directory is new or empty."""
    if args.resume is not None:
        return
    from deepspm.controller.config import ConfigError
    from deepspm.nets.checkpoint_info import CheckpointError, require_kind

    # the words a setting may hold instead of a path (session.agent_setting): the shipped weights, and for the
    # agent a new one built from the classifier ("new"), or new when training and the shipped one otherwise
    # ("auto"). Named here rather than imported: session loads JAX, and a refusal should not wait for it.
    words = {"classifier": ("shipped",), "agent": ("shipped", "new", "auto")}
    for kind, setting in (("classifier", cfg.classifier.checkpoint), ("agent", cfg.agent.checkpoint)):
        if setting in words[kind]:
            continue
        try:
            require_kind(setting, kind)
        except CheckpointError as e:
            raise ConfigError(f"{kind}.checkpoint", f"{kind}.checkpoint: {e}") from None
    # probe.target_state must be a state the classifier judges ("good" for a one-output net, else a class name)
    from deepspm.controller.targets import check_target_setting

    setting = cfg.classifier.checkpoint
    check_target_setting(cfg, Path(__file__).resolve().parents[1] / "weights" / "classifier" if setting == "shipped"
                         else setting)
    host = cfg.instrument.host
    if host is not None:
        argument = "--host" if args.host is not None else "instrument.host"
        try:
            socket.getaddrinfo(host, cfg.instrument.port, type=socket.SOCK_STREAM)
        except UnicodeError:  # an empty or over-long label ("lab..pc"), refused before any name lookup
            raise ArgumentProblem(argument, f"{host!r} is not a valid host name") from None
        except socket.gaierror as e:
            raise ArgumentProblem(argument, f"cannot resolve the host name {host!r} ({e.strerror or e})") from None
    if args.out is None and cfg.run.out:
        _check_new_folder("run.out", Path(cfg.run.out), "run directory")


# --- the top-level handler ---------------------------------------------------------------------------------


def is_expected(exc: BaseException) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in EXPECTED_ERRORS for cls in type(exc).__mro__)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def _verbose(args: argparse.Namespace | None, argv: Sequence[str] | None) -> bool:
    if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        return True
    if args is not None:
        return bool(getattr(args, "verbose", False))
    tokens = sys.argv[1:] if argv is None else list(argv)
    return "-v" in tokens or "--verbose" in tokens


def crash_log_dir(args: argparse.Namespace | None) -> Path:
    """Where the details of an internal error go: the run directory of `deepspm run` when it exists, else
    $DEEPSPM_LOG_DIR, else $XDG_CACHE_HOME/deepspm (~/.cache/deepspm)."""
    if args is not None and getattr(args, "command", None) == "run":
        for path in (getattr(args, "resume", None), getattr(args, "out", None)):
            if path is not None and Path(path).is_dir():
                return Path(path)
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "deepspm"


def write_crash_log(exc: BaseException, args: argparse.Namespace | None, argv: Sequence[str] | None) -> Path:
    """The full report of an internal error; the run directory or cache folder, else the system's temp folder."""
    import tempfile

    from deepspm import __version__

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    text = "".join([
        f"deepspm {__version__} internal error at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n",
        f"command: deepspm {' '.join(sys.argv[1:] if argv is None else argv)}\n",
        f"python {platform.python_version()} on {platform.platform()}\n\n",
        *traceback.format_exception(exc),
    ])
    name = f"deepspm-crash-{stamp}-{os.getpid()}.log"
    last_error: OSError | None = None
    for folder in (crash_log_dir(args), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError as e:
            last_error = e
    raise OSError(f"cannot write a crash log: {last_error}")


def report_error(exc: BaseException, args: argparse.Namespace | None, argv: Sequence[str] | None) -> int:
    """One line on stderr for the person; exit 2 for an expected error, 1 (and a crash log) for any other."""
    verbose = _verbose(args, argv)
    if is_expected(exc):
        line, more = _one_line(_message(exc))
        if more and verbose:
            print(f"deepspm: error: {_message(exc)}", file=sys.stderr)
        else:
            extra = f" ({more} more line{'s' if more > 1 else ''} with -v)" if more else ""
            print(f"deepspm: error: {line}{extra}", file=sys.stderr)
        return 2
    try:
        where = f"details in {write_crash_log(exc, args, argv)}"
    except OSError as e:
        where = f"{e}; run with -v to see the details"
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    line, _ = _one_line(_message(exc))
    print(f"deepspm: internal error: {type(exc).__name__}: {line} ({where})", file=sys.stderr)
    return 1


def run_cli(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None = None) -> int:
    """Parse, check and run one command; every failure ends in one line on stderr (see the module docstring)."""
    args: argparse.Namespace | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a usage error, already printed on one line (2)
            return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
        check_args(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("deepspm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report_error(exc, args, argv)
