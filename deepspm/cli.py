"""The `deepspm` command: parses arguments and delegates; no logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deepspm.controller import validate as check
from deepspm.nets.presets import PRESETS


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from deepspm.controller.config import parse_override

    out = dict(parse_override(s) for s in getattr(args, "set", None) or [])
    for option, key in (("frames", "run.frames"), ("hours", "run.hours"), ("seed", "run.seed"),
                        ("time_scale", "run.time_scale"), ("host", "instrument.host"), ("port", "instrument.port")):
        value = getattr(args, option, None)
        if value is not None:
            out[key] = value
    if getattr(args, "train", False):
        out["run.train"] = True
    if getattr(args, "evaluate_interleaved", False):
        out["run.evaluate_interleaved"] = True
    if getattr(args, "target_state", None) is not None:
        out["probe.target_state"] = args.target_state
    return out


def _load(args: argparse.Namespace):
    from deepspm.controller.config import load_config

    return load_config(args.config, _overrides(args))


def _fsm(args: argparse.Namespace) -> int:
    from deepspm.fsm.diagram import mermaid

    print(mermaid(), end="")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from deepspm.controller.config import config_to_toml

    print(config_to_toml(_load(args)), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    check.check_run_config(cfg, args)  # before anything is created
    from deepspm.controller.runner import run_from_cli

    return run_from_cli(cfg, args)


def _simulate(args: argparse.Namespace) -> int:
    from deepspm.controller.diagnostics import configure_logging
    from deepspm.simulator.fake_nanonis import serve_forever
    from deepspm.simulator.microscope import SimConfig

    configure_logging("info")
    try:
        asyncio.run(serve_forever(port=args.port, seed=args.seed, time_scale=args.time_scale,
                                  config=SimConfig(surface=args.sample)))
    except KeyboardInterrupt:
        pass
    return 0


def _replay(args: argparse.Namespace) -> int:
    from deepspm.controller.diagnostics import configure_logging
    from deepspm.controller.replay_run import replay_run

    configure_logging("warning")
    report = asyncio.run(replay_run(args.run_dir, mode=args.mode, classifier=args.classifier, agent=args.agent))
    print(report.text())
    what_if = args.classifier is not None or args.agent is not None
    return 0 if report.identical or what_if else 1


def _report(args: argparse.Namespace) -> int:
    from deepspm.controller.report import summary_rows, write_report

    summary = write_report(args.run_dir, args.out)
    for label, value in summary_rows(summary):
        print(f"{label:>28}  {value}")
    print(f"report written to {args.out / 'index.html'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from deepspm.controller.webapp import serve_command

    return serve_command(args.run_dirs, label=args.label, host=args.host, port=args.port, order=args.order,
                         classifier=args.classifier)


def _status(args: argparse.Namespace) -> int:
    from deepspm.controller.status import follow, status_text

    if not (args.run_dir / "journal.jsonl").exists():
        raise FileNotFoundError(f"no journal in {args.run_dir}")
    if args.follow:
        try:
            asyncio.run(follow(args.run_dir, args.interval))
        except KeyboardInterrupt:
            pass
    else:
        print(status_text(args.run_dir))
    return 0


def _dataset_synth(args: argparse.Namespace) -> int:
    if args.sample == "hsi":
        from deepspm.simulator.hsi_dataset import synth_hsi_command

        return synth_hsi_command(args.out, n=args.n, seed=args.seed, good_fraction=args.good_fraction)
    from deepspm.controller.training import synth_dataset_command

    good_fraction = 0.25 if args.good_fraction is None else args.good_fraction
    synth_dataset_command(args.out, n=args.n, seed=args.seed, good_fraction=good_fraction)
    return 0


def _dataset_gallery(args: argparse.Namespace) -> int:
    if args.dataset.suffix == ".npz":  # an H:Si(100) set (synthetic, from dataset synth --sample hsi)
        from deepspm.simulator.hsi_dataset import gallery

        gallery(args.dataset, args.out, real_npz=args.real, per_class=min(args.per_class, 8), seed=args.seed)
        return 0
    from deepspm.controller.labdata import MANIFEST, manifest_gallery
    from deepspm.controller.training import gallery_command

    if (args.dataset / MANIFEST).is_file():  # an imported lab set (dataset import)
        manifest_gallery(args.dataset, args.out)
        return 0
    gallery_command(args.dataset, args.out, n_per_class=args.per_class, seed=args.seed)
    return 0


def _dataset_import(args: argparse.Namespace) -> int:
    from deepspm.controller.labdata import import_sxm_command

    import_sxm_command(args.inputs, args.out, labels=args.labels, channel=args.channel, direction=args.direction,
                       skip_bad=args.skip_bad, overwrite=args.overwrite)
    return 0


def _export(args: argparse.Namespace) -> int:
    from deepspm.controller.export import export_command

    export_command(args.source, args.out, fmt=args.format, frames=args.frames, frame_size_m=args.frame_size_nm * 1e-9,
                   overwrite=args.overwrite)
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from deepspm.controller.recipes import OPTION_NAMES, train_with_recipe

    train_with_recipe(args.data, args.out, recipe=args.recipe, given={k: getattr(args, k) for k in OPTION_NAMES},
                      seed=args.seed, val_fraction=args.val_fraction, multiclass=args.multiclass,
                      overwrite=args.overwrite, holdout_fraction=args.holdout_fraction, init=args.init,
                      freeze_epochs=args.freeze_epochs, patience=args.patience,
                      finetune_learning_rate=args.finetune_lr, max_train=args.max_train, lines=args.lines,
                      min_lines=args.min_lines)
    return 0


def _evaluate_classifier(args: argparse.Namespace) -> int:
    from deepspm.controller.training import evaluate_classifier_command

    evaluate_classifier_command(args.checkpoint, args.data, out_json=args.json, threshold=args.threshold,
                                seed=args.seed, split=args.split, min_responses=args.min_responses, lines=args.lines,
                                plots=args.plots)
    return 0


def _devices(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        return _positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {text!r}") from None


DEVICES_HELP = ("data-parallel training: N local devices (GPUs; CPU devices with XLA_FLAGS=--xla_force_host_platform_"
                "device_count=N) per process, or all (default: every one, or the most that split the batch evenly); each "
                "batch is split over them, the parameters are "
                "replicated, the result equals one device's to float rounding; 1 trains on one device as before. "
                "Several processes or hosts: the same command in each, with JAX_COORDINATOR_ADDRESS=host:port (process "
                "0's), DEEPSPM_NUM_PROCESSES and DEEPSPM_PROCESS_ID set, or started by srun/mpirun; process 0 writes --out")


def _on_devices(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`handler` under --devices, in the multi-process job the environment describes (deepspm.nets.parallel)."""
    def run(args: argparse.Namespace) -> int:
        from deepspm.nets import parallel  # loads JAX: only the training commands pay for it

        with parallel.training_command(args.devices, args.out) as (scope, out):
            status = handler(argparse.Namespace(**{**vars(args), "out": out}))
        if scope.taken == 0 and parallel.mesh_for(args.devices) is not None:
            print(f"deepspm: note: --devices {args.devices}: this training loop runs on one device (it does not take "
                  "--devices yet)", file=sys.stderr)
        return status
    return run


def _train_agent(args: argparse.Namespace) -> int:
    from deepspm.controller.agent_sim import sim_defaults, train_agent_sim
    from deepspm.controller.session import checkpoint_path

    if args.vectorised or args.envs is not None:
        from deepspm.controller.train_vectorised import vectorised_command

        if args.target_state != "good" or args.sample is not None:
            raise check.ArgumentProblem("--target-state", "the vectorised loop trains for good on Ag/MgPc only; "
                                                          "drop --vectorised/--envs to train for a tip state")
        return vectorised_command(args)
    classifier, sample = sim_defaults(args.target_state, args.classifier, args.sample)
    init = None if args.init is None else checkpoint_path(args.init, "agent") if args.init == "shipped" else args.init
    train_agent_sim(classifier, args.out, steps=args.steps, seed=args.seed, overwrite=args.overwrite, init=init,
                    target_state=args.target_state, sample=sample)
    return 0


def _evaluate_agent(args: argparse.Namespace) -> int:
    from deepspm.controller.agent_sim import evaluate_agent_sim, sim_defaults
    from deepspm.controller.session import checkpoint_path

    agent = args.checkpoint or checkpoint_path("shipped", "agent")
    classifier, sample = sim_defaults(args.target_state, args.classifier, args.sample)
    evaluate_agent_sim(agent, classifier, episodes=args.episodes, seed=args.seed, out_json=args.json,
                       target_state=args.target_state, sample=sample)
    return 0


def _add_target_options(p: argparse.ArgumentParser) -> None:
    """--target-state and --sample for train/evaluate agent --sim (issue 12 part 4)."""
    p.add_argument("--target-state", dest="target_state", default="good", metavar="NAME",
                   help="tip state the episodes aim for: good (default, the one-output classifier) or a state of a "
                        "multi-class classifier (the shipped H:Si one: atoms, dimers, asymmetric, rows, double, "
                        "multiple, blurry); other than good, the defaults become the shipped hsi_tipstates classifier "
                        "and the H:Si surface")
    p.add_argument("--sample", choices=("ag_mgpc", "hsi"), default=None,
                   help="simulated surface (default: ag_mgpc for --target-state good, hsi otherwise)")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="TOML", help="run configuration file (see docs/config.example.toml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config key, e.g. --set scan.pixels=128 (repeatable)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = check.OneLineParser(
        prog="deepspm",
        description="Autonomous STM controller (DeepSPM re-implemented) speaking the Nanonis TCP protocol.",
        epilog=check.EXIT_CODES,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the autonomous controller",
        description="Run the autonomous controller. Without --host it starts the simulated microscope on a "
                    "loopback port in this process and drives it through TCP with the shipped nets.",
    )
    _add_config_options(run)
    run.add_argument("--host", help="Nanonis host (IP or name); omit to run against the embedded simulator")
    run.add_argument("--port", type=check.config_value("instrument.port", int),
                     help="Nanonis TCP programming-interface port (default 6501)")
    run.add_argument("--frames", type=check.config_value("run.frames", int),
                     help="stop after this many recorded frames (default: 300 in simulation)")
    run.add_argument("--hours", type=check.config_value("run.hours", float), help="stop after this many hours of run time")
    run.add_argument("--train", action="store_true",
                     help="training mode: re-damage the probe after every success; without an agent checkpoint "
                          "(agent.checkpoint) a new agent is built from the classifier and trained as in the paper")
    run.add_argument("--evaluate-interleaved", dest="evaluate_interleaved", action="store_true",
                     help="alternate agent and uniformly random conditioning episodes (the agent keeps learning); "
                          "`deepspm report` compares their actions per episode")
    run.add_argument("--seed", type=check.config_value("run.seed", int), help="root seed of every random stream (default 0)")
    run.add_argument("--time-scale", dest="time_scale", type=check.config_value("run.time_scale", float),
                     help="simulator only: wall seconds per simulated second (0 = as fast as possible, 1 = real time)")
    run.add_argument("--sim-seed", dest="sim_seed", type=check.seed, default=None,
                     help="simulator only: seed of the simulated sample and probe (default: the run's seed)")
    run.add_argument("--out", type=check.output_dir, metavar="RUN_DIR",
                     help="run directory, new or empty (default: runs/<UTC time>)")
    run.add_argument("--resume", type=check.resumable_run, metavar="RUN_DIR",
                     help="continue a killed run in RUN_DIR (its settings come from its journal: no other run option)")
    run.add_argument("--target-state", dest="target_state", metavar="NAME",
                     help="condition the probe until the classifier says NAME (p(NAME) > classifier.threshold) instead "
                          "of good; NAME must be a class of the loaded multi-class classifier (sets "
                          "probe.target_state; default good)")
    run.add_argument("--quiet", action="store_true", help="no live progress line")
    run.set_defaults(func=_run)

    sim = sub.add_parser("simulate", help="serve the simulated microscope over the Nanonis protocol",
                         description="Serve the simulated STM on 127.0.0.1 for any Nanonis client until Ctrl-C.")
    sim.add_argument("--port", type=check.free_local_port, default=6501,
                     help="TCP port on 127.0.0.1: 1-65535 and free, or 0 for any free port (default 6501)")
    sim.add_argument("--seed", type=check.seed, default=0, help="seed of the simulated sample and probe (default 0)")
    sim.add_argument("--time-scale", dest="time_scale", type=check.float_range(0, 100), default=1.0,
                     help="wall seconds per simulated second: 1 = real time (default), 0 = as fast as possible")
    sim.add_argument("--sample", choices=("ag_mgpc", "hsi"), default="ag_mgpc",
                     help="the simulated surface: MgPc on Ag(100) (default) or H:Si(100)-(2x1) with its tip states")
    sim.set_defaults(func=_simulate)

    replay = sub.add_parser(
        "replay", help="re-run a recorded run against its journal and check it does the same",
        description="Run the unchanged controller against a run's journal (every reply, timeout and error as "
                    "recorded) and check that it emits the same commands and transitions; prints 'identical' or "
                    "the first diverging sequence number. With --classifier/--agent: what would other nets have done?",
    )
    replay.add_argument("run_dir", type=check.replayable_run, metavar="RUN_DIR", help="a run directory (holds journal.jsonl)")
    replay.add_argument("--mode", choices=("recorded", "recompute"), default="recorded",
                        help="recorded: inject the journal's net outputs (checks the controller logic); recompute: "
                             "run the journal's checkpoints and require the same decisions (checks the nets too)")
    replay.add_argument("--classifier", type=check.checkpoint_of_kind("classifier"), metavar="CKPT",
                        help="what-if: replay with this classifier")
    replay.add_argument("--agent", type=check.checkpoint_of_kind("agent"), metavar="CKPT", help="what-if: replay with this agent")
    replay.set_defaults(func=_replay)

    report = sub.add_parser("report", help="plots and a summary of a run (PNG + HTML)",
                            description="Write plots (approach-area maps, p(good) over time, actions per episode, "
                                        "frame montages) and an HTML page with the run's summary.")
    report.add_argument("run_dir", type=check.journaled_run, metavar="RUN_DIR", help="a run directory (holds journal.jsonl)")
    report.add_argument("--out", type=check.output_dir, required=True, metavar="DIR",
                        help="where to write the PNGs and index.html")
    report.set_defaults(func=_report)

    serve = sub.add_parser(
        "serve", help="a live web page of runs (frames, plots, pause/stop), or a labelling page",
        description="A local web app that only reads the run directories: the run's state, newest frames, the "
                    "report's plots, updated live, and Pause/Resume/Stop buttons (through RUN_DIR/PAUSE and STOP, "
                    "journaled as operator requests). --label serves a page to label frames by keyboard. A random "
                    "token is printed in the URL; writes need it, and every page does off loopback.")
    serve.add_argument("run_dirs", type=Path, nargs="*", metavar="RUN_DIR",
                       help="run directories to show (default: every run under ./runs)")
    serve.add_argument("--label", type=Path, metavar="DATASET_OR_RUN_DIR",
                       help="serve the labelling page for a run directory or an imported .sxm set instead; labels "
                            "go to its labels.csv (file,class) and labelled/good|bad/")
    serve.add_argument("--order", choices=("uncertainty", "time"), default="uncertainty",
                       help="labelling order: p(good) nearest the classifier's threshold first (default; a run's "
                            "p(good) from its journal, an imported set's from --classifier), or recording time")
    serve.add_argument("--classifier", default="shipped", metavar="CKPT",
                       help="labelling an imported set in uncertainty order: the classifier that scores its frames "
                            "(default: the shipped one; 'none' for recording order)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1, this machine only; another address makes every "
                            "page need the token)")
    serve.add_argument("--port", type=check.int_range(0, 65535), default=8765,
                       help="TCP port (default 8765; 0 picks a free one)")
    serve.set_defaults(func=_serve)

    status = sub.add_parser("status", help="the state of a (running) run, read from its journal",
                            description="Show a run's state, counters and last frame from its journal; usable over SSH.")
    status.add_argument("run_dir", type=check.run_directory, metavar="RUN_DIR", help="a run directory (holds journal.jsonl)")
    status.add_argument("--follow", action="store_true", help="refresh until the run stops (Ctrl-C to leave)")
    status.add_argument("--interval", type=check.float_range(0, 3600, lo_open=True, unit="s"), default=2.0,
                        help="seconds between refreshes with --follow (default 2)")
    status.set_defaults(func=_status)

    dataset = sub.add_parser("dataset", help="training data: synthetic, imported from .sxm, galleries",
                             description="Synthetic labelled frames from the simulator, and galleries to judge them.")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    synth = dataset_sub.add_parser("synth", help="write labelled 64x64 frames in the original DeepSPM layout",
                                   description="Write N labelled 64x64 raw frames (heights in metres, .npy) as "
                                               "OUT/good/*.npy and OUT/bad/*.npy, plus labels.csv with the probe kind.")
    synth.add_argument("--n", type=_positive_int, required=True, help="number of frames")
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    synth.add_argument("--seed", type=check.seed, default=0, help="simulator seed (default 0)")
    synth.add_argument("--good-fraction", dest="good_fraction", type=_fraction, default=None,
                       help="fraction of frames taken with a good probe, 0-1 (default 0.25 as the paper's data; "
                            "hsi: 0.46, about the real set's share)")
    synth.add_argument("--sample", choices=("ag_mgpc", "hsi"), default="ag_mgpc",
                       help="ag_mgpc (default): 10 nm frames of MgPc/Ag(100) as raw .npy in good/ and bad/; hsi: "
                            "H:Si(100) frames of 3-25 nm in the real tip-state set's representation, written as one "
                            ".npz in its layout (OUT is the .npz file; --good-fraction then means the good tip states)")
    synth.set_defaults(func=_dataset_synth)
    gal = dataset_sub.add_parser("gallery", help="a labelled montage PNG of a data set",
                                 description="Draw a labelled montage of good and bad frames of a data set.")
    gal.add_argument("dataset", type=Path, metavar="DIR", help="a folder with good/ and bad/ sub-folders")
    gal.add_argument("--out", type=check.output_file(".png"), required=True, metavar="PNG", help="the PNG to write")
    gal.add_argument("--per-class", dest="per_class", type=check.int_range(1, 1000), default=12,
                     help="frames per class (default 12)")
    gal.add_argument("--seed", type=check.seed, default=0, help="which frames are picked (default 0)")
    gal.add_argument("--real", type=check.labelled_data, metavar="NPZ",
                     help="H:Si sets (.npz): real frames of the matching classes to show beside the simulated ones")
    gal.set_defaults(func=_dataset_gallery)
    imp = dataset_sub.add_parser(
        "import", help="a lab's Nanonis .sxm scans as a data set for train classifier",
        description="Import .sxm files and folders as OUT/good, OUT/bad, OUT/unlabelled (one channel, raw values "
                    "in the file's unit, the central square resampled to 64x64 px) with OUT/manifest.csv (source, "
                    "physical size, bias, setpoint, time). Labels: --labels CSV, else good/ or bad/ folder names, else "
                    "unlabelled. Nothing is written unless every input can be read.")
    imp.add_argument("inputs", type=Path, nargs="+", metavar="SXM_FILE_OR_DIR",
                     help=".sxm files or folders (searched recursively)")
    imp.add_argument("--out", type=Path, required=True, metavar="DIR", help="the data set folder to create")
    imp.add_argument("--labels", type=Path, metavar="CSV", help="columns file,class: .sxm name (or path relative to "
                     "its folder argument) and good, bad or unlabelled")
    imp.add_argument("--channel", default="Z", help="channel name as in the file's DATA_INFO (default Z, heights in m)")
    imp.add_argument("--direction", choices=("forward", "backward"), default="forward", help="scan direction (default forward)")
    imp.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                     help="skip unreadable .sxm files inside folders (with the reason) instead of stopping")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    imp.set_defaults(func=_dataset_import)

    train = sub.add_parser("train", help="train the probe classifier or the conditioning agent",
                           description="Train the probe classifier on labelled images, or the agent in simulation.")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="NET")
    tc = train_sub.add_parser(
        "classifier", help="train a probe classifier",
        description="Train a probe classifier. DATA: folders in the original DeepSPM layout (good/*.npy, bad/*.npy, "
                    "raw heights in metres; *Ransac.npy already levelled), our synthetic sets, or the H:Si(100) .npz.")
    tc.add_argument("--data", type=check.labelled_data, nargs="+", required=True, metavar="PATH", help="labelled data set(s)")
    tc.add_argument("--out", type=check.output_dir, required=True, metavar="CKPT", help="checkpoint directory to write")
    tc.add_argument("--recipe", choices=("auto", "standard", "hsi100"), default="auto",
                    help="the defaults of the options below: auto (default) = hsi100 for the H:Si(100) .npz alone "
                         "(an ensemble of 5 wide nets, 20 epochs, good weight 8 with its prior correction: the "
                         "output bias moved by -log 8 after training, flips, cosine learning rate, the set's fixed "
                         "20 %% hold-out), else standard "
                         "(one compact net, 20 epochs, good weight 8, flips, constant learning rate: the paper's); "
                         "any option given overrides the recipe; the checkpoint's metadata records it")
    tc.add_argument("--preset", choices=tuple(PRESETS),
                    help="network size (recipe default: wide for the H:Si(100) set, else compact; tiny is for tests; "
                         "original and paper need a GPU workstation)")
    tc.add_argument("--epochs", type=check.int_range(1, 100_000), help="passes over the training split (recipe default)")
    tc.add_argument("--seed", type=check.seed, default=0, help="seed of the split, init, batches and flips (default 0)")
    tc.add_argument("--val-fraction", dest="val_fraction", type=check.float_range(0, 1, hi_open=True), default=0.24,
                    help="fraction kept for validation, stratified by label (default 0.24, as the paper)")
    tc.add_argument("--good-weight", dest="good_weight", type=check.float_range(0, 1e6, lo_open=True),
                    help="loss weight of good-probe images (recipe default: 8, the paper; hsi100 then moves the output "
                         "bias by -log of it, so its probabilities are the data's)")
    tc.add_argument("--augment", choices=("flips", "dihedral"),
                    help="training augmentation: flips (random left-right and up-down) or dihedral (also the "
                         "transpose: all 8 symmetries of the square); recipe default")
    tc.add_argument("--crop-min-scale", dest="crop_min_scale", type=check.float_range(0, 1, lo_open=True),
                    metavar="F", help="random square crops of side F..1 x 64 px, resized back to 64 px, per training "
                                      "image (1 = none; recipe default); validation sees whole images")
    tc.add_argument("--lr-schedule", dest="lr_schedule", choices=("constant", "cosine"),
                    help="learning rate 1e-3 constant, or cosine-decayed to 0 over all steps (recipe default)")
    tc.add_argument("--keep", choices=("last", "best"),
                    help="weights to save: the last epoch's (recipe default), or the epoch with the best validation ROC AUC "
                         "(macro over classes with --multiclass); metrics.json names the kept epoch")
    tc.add_argument("--init", metavar="CKPT",
                    help="fine-tune from a classifier checkpoint directory, or 'shipped' (the package's); its preset "
                         "is used, with the small-data recipe: --freeze-epochs 3, --patience 5, --keep best")
    tc.add_argument("--freeze-epochs", dest="freeze_epochs", type=int,
                    help="epochs with the conv features frozen (only dense layers and head learn); default 3 with "
                         "--init, else 0")
    tc.add_argument("--patience", type=int,
                    help="stop after this many epochs without a better validation ROC AUC (default 5 with --init, "
                         "else 0 = never)")
    tc.add_argument("--finetune-lr", dest="finetune_lr", type=float,
                    help="learning rate after the frozen epochs (default: the learning rate, 1e-3)")
    tc.add_argument("--max-train", dest="max_train", type=int, metavar="N",
                    help="train on at most N images (a stratified subset of the training split; validation unchanged)")
    tc.add_argument("--multiclass", action="store_true", help="H:Si set: one output per crowd-voted class")
    tc.add_argument("--lines", action="store_true",
                    help="train a line-window net that judges a frame from its first n scan lines (random truncation "
                         "of every training image to n lines, n uniform in --min-lines..64; metadata lines=true)")
    tc.add_argument("--min-lines", dest="min_lines", type=check.int_range(1, 64), default=4, metavar="N",
                    help="with --lines: the fewest visible scan lines (rows) a training image keeps (default 4)")
    tc.add_argument("--ensemble", type=check.int_range(1, 64), metavar="K",
                    help="train K members (seeds SEED..SEED+K-1, each with its own split of the rows outside a "
                         "hold-out) into ONE checkpoint, run as one batched call; metrics on the hold-out "
                         "(recipe default: none for standard, 5 for hsi100)")
    tc.add_argument("--combine", choices=("mean", "vote", "dihedral-mean", "dihedral-vote"),
                    help="with --ensemble: mean of the members' probabilities, or vote: the fraction of members "
                         "with probability > 0.5; dihedral-: each member also judges the 90-degree rotations and "
                         "mirrorings of every image (8 views, one call) and the rule runs over all of them "
                         "(stored in the checkpoint; recipe default: mean for standard, see the recipe line)")
    tc.add_argument("--holdout-fraction", dest="holdout_fraction", type=check.float_range(0, 1, hi_open=True),
                    help="with --ensemble: fraction of the rows no member sees, stratified by label and seeded by "
                         "--seed (default 0.2; the hsi100 recipe holds out the set's fixed 20 %% instead, the same "
                         "images for every seed and for --multiclass); written as split.json")
    tc.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    tc.add_argument("--devices", type=_devices, default="all", metavar="N|all", help=DEVICES_HELP)
    tc.set_defaults(func=_on_devices(_train_classifier))
    ta = train_sub.add_parser("agent", help="train the double-DQN agent in simulation",
                              description="Train the conditioning agent on the simulated microscope (in-process).")
    ta.add_argument("--sim", action="store_true", required=True, help="train in simulation (the only option)")
    ta.add_argument("--out", type=check.output_dir, required=True, metavar="CKPT", help="checkpoint directory to write")
    ta.add_argument("--classifier", type=check.checkpoint_of_kind("classifier"), metavar="CKPT",
                    help="classifier that judges the episodes and initialises the agent (default: the shipped one)")
    ta.add_argument("--steps", type=check.int_range(1, 10**8), default=3000,
                    help="conditioning actions to train for (default 3000)")
    ta.add_argument("--seed", type=check.seed, default=0, help="seed of the simulator and the agent (default 0)")
    ta.add_argument("--init", type=check.shipped_or(check.checkpoint_of_kind("agent")), metavar="CKPT|shipped",
                    help="continue an agent (its weights; a fresh replay memory, no random phase, epsilon 0.05) "
                         "instead of a new one from the classifier")
    ta.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    ta.add_argument("--vectorised", action="store_true",
                    help="train in the vectorised JAX environment, the whole loop jitted (simulator/jaxenv.py; the "
                         "classifier's conv trunk frozen, see docs/training.md) instead of the run's plans")
    ta.add_argument("--envs", type=check.int_range(1, 65536), default=None, metavar="N",
                    help="with --vectorised: simulated microscopes stepped together (default 64)")
    _add_target_options(ta)
    ta.add_argument("--devices", type=_devices, default="all", metavar="N|all",
                    help=DEVICES_HELP + " (here: the learner's gradient updates)")
    ta.set_defaults(func=_on_devices(_train_agent))

    evaluate = sub.add_parser("evaluate", help="evaluate a classifier on data, or the agent against random",
                              description="Evaluate a classifier on a labelled set, or the agent against random.")
    eval_sub = evaluate.add_subparsers(dest="evaluate_command", required=True, metavar="NET")
    ec = eval_sub.add_parser("classifier", help="metrics of a classifier checkpoint on a labelled set",
                             description="Accuracy, precision, recall, ROC AUC and confusion matrix of a checkpoint.")
    ec.add_argument("--checkpoint", type=check.checkpoint_of_kind("classifier"), required=True, metavar="CKPT",
                    help="classifier checkpoint directory")
    ec.add_argument("--data", type=check.labelled_data, nargs="+", required=True, metavar="PATH", help="labelled data set(s)")
    ec.add_argument("--threshold", type=check.float_range(0, 1, lo_open=True, hi_open=True), default=0.9,
                    help="p(good) above this is good (default 0.9)")
    ec.add_argument("--json", type=check.output_file(), metavar="FILE", help="also write the metrics as JSON")
    ec.add_argument("--split", type=check.split_file, metavar="SPLIT_JSON",
                    help="evaluate only the validation rows of a training run (its split.json)")
    ec.add_argument("--seed", type=check.seed, default=0, help="RANSAC seed for levelling raw frames (default 0)")
    ec.add_argument("--min-responses", dest="min_responses", type=check.int_range(1, 1000), default=1,
                    help="H:Si set: keep images with at least this many crowd votes (default 1)")
    ec.add_argument("--lines", type=check.int_range(1, 64), nargs="+", metavar="N",
                    help="evaluate with only the first N scan lines (rows 0..N-1, 64 = full frame) of each image "
                         "visible, the rest NaN as a partial frame grab, levelled from those rows; one metrics row "
                         "per N (e.g. --lines 8 16 32 64)")
    ec.add_argument("--plots", type=check.output_dir, metavar="DIR",
                    help="write the reliability diagram (reliability.png: observed frequency against predicted "
                         "probability in 10 equal-width bins, per output) into DIR")
    ec.set_defaults(func=_evaluate_classifier)
    ea = eval_sub.add_parser("agent", help="the agent versus random actions in simulation, interleaved",
                             description="Episodes alternate between the agent and uniform random actions on one "
                                         "simulated microscope; prints actions per episode for each and the ratio.")
    ea.add_argument("--sim", action="store_true", required=True, help="evaluate in simulation (the only option)")
    ea.add_argument("--checkpoint", type=check.checkpoint_of_kind("agent"), metavar="CKPT",
                    help="agent checkpoint (default: the shipped one)")
    ea.add_argument("--classifier", type=check.checkpoint_of_kind("classifier"), metavar="CKPT",
                    help="classifier judging the frames (default: shipped)")
    ea.add_argument("--episodes", type=check.int_range(1, 10**6), default=200, help="episodes per policy (default 200)")
    ea.add_argument("--seed", type=check.seed, default=0, help="simulator seed (default 0)")
    ea.add_argument("--json", type=check.output_file(), metavar="FILE", help="also write the results as JSON")
    _add_target_options(ea)
    ea.set_defaults(func=_evaluate_agent)

    export = sub.add_parser(
        "export", help="a run's (or a data set's) frames as .sxm, .gwy or .png",
        description="Write every recorded frame of a run directory (from its journal), or every frame of a data "
                    "set folder, as Nanonis .sxm, Gwyddion .gwy or a levelled PNG, one file per frame.")
    export.add_argument("source", type=Path, metavar="RUN_DIR", help="a run directory (journal.jsonl) or a data set folder")
    export.add_argument("--format", choices=("sxm", "gwy", "png"), default="sxm", help="file format (default sxm)")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the files")
    export.add_argument("--frames", choices=("all", "judged"), default="all",
                        help="run frames: all recorded (default) or only those the classifier judged")
    export.add_argument("--frame-size-nm", dest="frame_size_nm", type=check.float_range(0, 1e5, lo_open=True, unit="nm"),
                        default=10.0,
                        help="data sets without a manifest: frame width in nm (default 10, the simulator's)")
    export.add_argument("--overwrite", action="store_true", help="replace existing files in DIR")
    export.set_defaults(func=_export)

    config = sub.add_parser("config", help="inspect the run configuration", description="Inspect the run configuration.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved configuration as TOML (defaults filled in)")
    _add_config_options(show)
    show.set_defaults(func=_config_show)

    fsm = sub.add_parser("fsm", help="print the run's state machine", description="Print the run's state machine.")
    fsm.add_argument("--mermaid", action="store_true", default=True, help="as a Mermaid stateDiagram-v2 (the default)")
    fsm.set_defaults(func=_fsm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input is one line and exit 2; an internal error one line, exit 1 and a crash log (controller.validate)."""
    return check.run_cli(build_parser, argv)

if __name__ == "__main__":
    sys.exit(main())
