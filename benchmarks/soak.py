"""The fault soak (issue 17): a long simulated run under a bad week's faults and repeated kill -9, then checks.

    python -m benchmarks.soak [--frames 10000] [--kills 20] [--fault-scale 1] [--seed 17] [--out DIR]

The controller runs as `deepspm run` in a child process (the embedded simulator at time scale 0, served over
TCP in that process) with three additions made in the child only:
- the fake server's fault plan gets faults at random request numbers, per kind at the rates below (per
  request, times --fault-scale), re-drawn for each process from the seed and the process number; the first coarse
  move of each process gets an error reply (a coarse-motor failure) until one has (a small --piezo-range makes
  approach areas fill up, so the run moves the coarse motor every ~80 frames); the simulator's z jumps (lost
  contact, crashes) come at --z-jump-rate;
- an independent audit (`deepspm.simulator.audit.EnvelopeAudit`, hooked into the fake server) checks every
  received write against the configured `[safety]` limits and the simulated microscope's true state;
  violations are appended to a file at once, counts rewritten after every frame;
- resident memory (VmRSS from /proc/self/status) is sampled every --mem-every frames.
The parent kills the child with SIGKILL at --kills random frame counts (plus a random delay of up to 0.3 s, so
kills land anywhere in a frame) and resumes with `deepspm run --resume` each time, until the run completes.

Then it checks the journal (frames recorded and judged, lost frames, seq gaps or duplicates), replays the whole
journal (`deepspm replay`), and prints and writes (bench-results/soak.json, or --json) the figures. Exit status
1 when a must-be-0 figure is not 0 (lost frames, seq problems, replay not identical, audit violations, a run
that did not complete) or resident memory grew by 10 % or more from frame 1000 to the end; the last line is the
verdict. `--frames 1000 --kills 5` is the CI-sized soak (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, print_table

# Per-request probabilities at --fault-scale 1 ("a bad week in a lab", compressed into the soak's requests).
# NeverReply (a timeout) is injected on a few non-blocking commands only, per call of that command: on a
# blocking one the client's deadline is the nominal scan time plus a margin, in wall seconds.
FAULT_RATES: dict[str, float] = {
    "drop": 1e-4,  # CloseBeforeReply: the link drops, outcome unknown
    "close_after_header": 3e-5,
    "close_mid_body": 3e-5,
    "error_reply": 1e-4,  # status 1 from Nanonis
    "garbage": 3e-5,  # malformed reply bytes
    "wrong_name": 2e-5,
    "bad_body_size": 2e-5,
    "unsolicited": 1e-5,
    "chunked": 1e-3,  # the reply in 5-byte pieces (must be harmless)
    "delay": 1e-3,  # 20 ms late (must be harmless)
}
TIMEOUT_RATE = 1e-4  # per call of each of TIMEOUT_COMMANDS
TIMEOUT_COMMANDS = ("ZCtrl.ZPosGet", "Bias.Set", "Scan.FrameSet", "Scan.FrameDataGrab")
REQUEST_HORIZON = 3_000_000  # request numbers drawn per process (more than any process serves)
MEMORY_GROWTH_LIMIT = 0.10
WARM_FRAMES = 25  # samples of a process's first live frames are left out (a resume re-lives without nets first)

MOTOR_FAULT_FILE = "motor_fault"  # written when the coarse-motor failure has been injected (once per soak)
JAX_CACHE = "jax-cache"  # the children's persistent compilation cache (a restarted process compiles nothing)
VIOLATIONS_FILE = "violations.jsonl"
MEMORY_FILE = "memory.jsonl"
PROGRESS_FILE = "progress"


# -- the child: `deepspm run` with the fault plan, the audit and the memory sampler ---------------------------------


def _fault(kind: str) -> Any:
    from deepspm.simulator import faults as f

    return {
        "drop": f.CloseBeforeReply(), "close_after_header": f.CloseAfterHeader(), "close_mid_body": f.CloseMidBody(6),
        "error_reply": f.ErrorReply("Injected failure (soak)"), "garbage": f.Garbage(b"\x00garbage\xff" * 5),
        "wrong_name": f.WrongName("Bias.Get"), "bad_body_size": f.BadBodySize(-3), "unsolicited": f.Unsolicited(b"\x01\x02"),
        "chunked": f.Chunked(5), "delay": f.Delay(0.02), "timeout": f.NeverReply(),
    }[kind]


def draw_calls(rng: np.random.Generator, rate: float, horizon: int) -> list[int]:
    """Call numbers in 1..horizon, each hit with probability `rate` (independent)."""
    if rate <= 0:
        return []
    n = rng.binomial(horizon, rate)
    return sorted({int(c) for c in rng.integers(1, horizon + 1, size=n)})


def rss_kb() -> int:
    """Resident set size of this process (VmRSS, kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


class _ChildHooks:
    def __init__(self, soak_dir: Path, proc: int, seed: int, fault_scale: float, mem_every: int,
                 t_start: float) -> None:
        self.soak_dir, self.proc, self.seed, self.fault_scale, self.mem_every = soak_dir, proc, seed, fault_scale, mem_every
        self.audit: Any = None
        self.injected: Counter[str] = Counter()
        self.motor_fault: Any = None
        # wall times (time.time()) of this process: started, first frame re-lived or run, first live frame, last frame
        self.times: dict[str, float | None] = {"start": t_start, "first_frame": None, "first_live": None, "last": None}
        self.violations = open(soak_dir / VIOLATIONS_FILE, "a", buffering=1)  # noqa: SIM115 (open for the process)
        self.memory = open(soak_dir / MEMORY_FILE, "a", buffering=1)  # noqa: SIM115
        self.relived = 0  # frames a resumed process re-lives from the journal before it runs live

    def count_relived(self, run_dir: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.relived = (run_dir / "journal.jsonl").read_bytes().count(b'"decision":"classify"')

    def on_simulator(self, sim: Any, limits: Any) -> None:
        from deepspm.simulator.audit import EnvelopeAudit

        rng = np.random.default_rng([self.seed, self.proc])
        for kind, rate in FAULT_RATES.items():
            calls = draw_calls(rng, rate * self.fault_scale, REQUEST_HORIZON)
            if calls:
                sim.server.inject("*", _fault(kind), calls=calls)
        for name in TIMEOUT_COMMANDS:
            calls = draw_calls(rng, TIMEOUT_RATE * self.fault_scale, REQUEST_HORIZON // 10)
            if calls:
                sim.server.inject(name, _fault("timeout"), calls=calls)
        if not (self.soak_dir / MOTOR_FAULT_FILE).exists():
            # a coarse-motor failure: the first coarse move of this process gets an error reply, until one got it
            self.motor_fault = _fault("error_reply")
            sim.server.inject("Motor.StartMove", self.motor_fault, calls=[1])

        def on_violation(v: Any) -> None:
            self.violations.write(json.dumps({"proc": self.proc, "seq": v.seq, "command": v.command,
                                              "problem": v.problem}) + "\n")

        self.audit = EnvelopeAudit(limits, sim.microscope, on_violation)

        def on_request(request: Any) -> None:
            self.audit(request)
            for fault in request.faults:
                if fault is self.motor_fault:
                    self.injected["coarse_motor"] += 1
                    (self.soak_dir / MOTOR_FAULT_FILE).write_text(json.dumps({"proc": self.proc, "seq": request.seq}))
                else:
                    self.injected[_KIND_NAMES[type(fault).__name__]] += 1

        sim.server.on_request = on_request

    def progress(self, loop: Any) -> None:
        frames = loop.counters.frames
        now = time.time()
        self.times["first_frame"] = self.times["first_frame"] or now
        if frames > self.relived:
            self.times["first_live"] = self.times["first_live"] or now
        self.times["last"] = now
        if frames % self.mem_every == 0:
            self.memory.write(json.dumps({"proc": self.proc, "frame": frames, "rss_kb": rss_kb(),
                                          "live": frames - self.relived, "t": now}) + "\n")
        counts = {"proc": self.proc, "frames": frames, "relived": self.relived, "times": self.times,
                  "injected": dict(self.injected),
                  "writes_checked": sum(self.audit.writes.values()) if self.audit else 0,
                  "reads": self.audit.reads if self.audit else 0,
                  "undecodable_writes": self.audit.undecodable_writes if self.audit else 0}
        tmp = self.soak_dir / f".counts-{self.proc}.tmp"
        tmp.write_text(json.dumps(counts))
        os.replace(tmp, self.soak_dir / f"counts-{self.proc}.json")
        if frames > self.relived:  # live frames only: the kills land while the run runs, not while it re-lives
            tmp = self.soak_dir / f".{PROGRESS_FILE}.tmp"
            tmp.write_text(str(frames))
            os.replace(tmp, self.soak_dir / PROGRESS_FILE)


_KIND_NAMES = {"CloseBeforeReply": "drop", "CloseAfterHeader": "close_after_header", "CloseMidBody": "close_mid_body",
               "ErrorReply": "error_reply", "Garbage": "garbage", "WrongName": "wrong_name",
               "BadBodySize": "bad_body_size", "Unsolicited": "unsolicited", "Chunked": "chunked", "Delay": "delay",
               "NeverReply": "timeout"}


def child_main(spec: dict[str, Any], cli_args: list[str]) -> int:
    import jax

    import deepspm.controller.runner as runner
    import deepspm.controller.session as session
    from deepspm import cli

    # A persistent compilation cache shared by the soak's processes: each resume loads the nets' compiled code
    # instead of compiling it again (a lab PC restarting the controller would keep one too).
    jax.config.update("jax_compilation_cache_dir", str(Path(spec["soak_dir"]) / JAX_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    hooks = _ChildHooks(Path(spec["soak_dir"]), spec["proc"], spec["seed"], spec["fault_scale"], spec["mem_every"],
                        spec["t_start"])
    if "--resume" in cli_args:
        hooks.count_relived(Path(cli_args[cli_args.index("--resume") + 1]))

    async def run_session(cfg: Any, run_dir: Path, **kw: Any) -> Any:
        kw["progress"] = hooks.progress
        kw["on_simulator"] = functools.partial(hooks.on_simulator, limits=cfg.safety)
        return await session.run_session(cfg, run_dir, **kw)

    runner.run_session = run_session  # this process only
    return cli.main(["run", "--quiet", *cli_args])


# -- the parent ---------------------------------------------------------------------------------------------------


def _progress(soak_dir: Path) -> int:
    try:
        return int((soak_dir / PROGRESS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return -1


# What a controller process imports before it does anything (~6 s of a process start on an idle core, 15-20 s on a
# loaded one): with --fork the driver imports it once and forks each controller process from itself.
PRELOAD = ("jax", "flax", "optax", "sklearn.linear_model", "deepspm.cli", "deepspm.controller.runner",
           "deepspm.controller.session", "deepspm.controller.replay", "deepspm.controller.replay_run",
           "deepspm.simulator.fake_nanonis", "deepspm.simulator.threaded", "deepspm.simulator.audit")


def preload() -> None:
    """Import what a controller process needs, without starting JAX's backend or any thread (a fork copies only the
    thread that forks, so nothing may be running yet)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("soak: JAX's backend started in the driver; forking it would copy a half of it")


class Forked:
    """A controller process forked from the driver (the subset of `subprocess.Popen` that `drive` uses)."""

    def __init__(self, spec: dict[str, Any], cli_args: list[str], log: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: a new process with the driver's imports, nothing else of it
            code = 70
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                code = child_main(spec, cli_args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported in the log, then the process ends
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _start(soak_dir: Path, proc: int, args: argparse.Namespace, cli_args: list[str], log: Any) -> Any:
    with contextlib.suppress(FileNotFoundError):
        (soak_dir / PROGRESS_FILE).unlink()
    spec = {"soak_dir": str(soak_dir), "proc": proc, "seed": args.seed, "fault_scale": args.fault_scale,
            "mem_every": args.mem_every, "t_start": time.time()}
    if args.fork:
        return Forked(spec, cli_args, log)
    return subprocess.Popen([sys.executable, "-m", "benchmarks.soak", "--child", json.dumps(spec), "--", *cli_args],
                            stdout=log, stderr=log)


def drive(args: argparse.Namespace, run_dir: Path, soak_dir: Path) -> dict[str, Any]:
    """Run, kill and resume until the run ends; returns what the driving saw."""
    rng = np.random.default_rng([args.seed, 999])
    low = min(50, args.frames // 4)
    targets = sorted(int(t) for t in rng.choice(np.arange(low, max(low + args.kills, args.frames - 5)),
                                                size=args.kills, replace=False))
    first = ["--frames", str(args.frames), "--seed", str(args.seed), "--out", str(run_dir),
             "--set", f"simulator.z_jump_rate_per_s={args.z_jump_rate}",
             "--set", f"simulator.piezo_xy_range_m={args.piezo_range}",
             "--set", f"instrument.command_timeout_s={args.command_timeout}"]
    log = open(soak_dir / "child.log", "ab")  # noqa: SIM115
    proc_n = 0
    started = time.monotonic()
    proc = _start(soak_dir, proc_n, args, first, log)
    kills: list[dict[str, Any]] = []
    for target in targets:
        while proc.poll() is None and _progress(soak_dir) < target:
            time.sleep(0.02)
        if proc.poll() is not None:
            break
        time.sleep(float(rng.uniform(0.0, 0.3)))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append({"frame": _progress(soak_dir), "process": proc_n})
        proc_n += 1
        proc = _start(soak_dir, proc_n, args, ["--resume", str(run_dir)], log)
    code = proc.wait()
    # a run that ends early (a fault it could not recover from) is not resumed: that is a finding, not noise
    log.close()
    return {"kills": kills, "processes": proc_n + 1, "last_exit": code, "run_wall_s": time.monotonic() - started}


def _replay(run_dir: Path, soak_dir: Path) -> tuple[bool, str, float]:
    """`deepspm replay RUN_DIR` in this process (what the command delegates to; no interpreter to start)."""
    import asyncio

    from deepspm.controller.replay_run import replay_run

    t0 = time.monotonic()
    try:
        report = asyncio.run(replay_run(run_dir))
        ok, text = report.identical, report.text()
    except Exception as e:  # noqa: BLE001 - a replay that cannot run is a failed check, said in the summary
        ok, text = False, f"replay failed: {type(e).__name__}: {e}"
    (soak_dir / "replay.log").write_text(text)
    return ok, text.splitlines()[0], time.monotonic() - t0


def memory_growth(samples: list[dict[str, Any]], start_frame: int = 1000) -> dict[str, Any]:
    """Growth of resident memory from `start_frame` to the end, over warm samples (taken after a process's
    first WARM_FRAMES live frames): mean of the last fifth of them over the mean of the first fifth."""
    warm = [s for s in samples if s["live"] >= WARM_FRAMES]
    if len(warm) < 4:
        warm = samples
    if not warm:
        return {"samples": 0, "growth": None}
    warm.sort(key=lambda s: s["frame"])
    first = [s for s in warm if s["frame"] >= start_frame] or warm
    n = max(1, len(first) // 5)
    base = float(np.mean([s["rss_kb"] for s in first[:n]]))
    end = float(np.mean([s["rss_kb"] for s in first[-n:]]))
    return {"samples": len(samples), "warm_samples": len(warm), "from_frame": first[0]["frame"],
            "to_frame": first[-1]["frame"], "rss_start_mb": base / 1024, "rss_end_mb": end / 1024,
            "rss_max_mb": max(s["rss_kb"] for s in samples) / 1024, "growth": end / base - 1.0}


def profile(counts: list[dict[str, Any]], replay_s: float) -> dict[str, Any]:
    """Where the soak's wall time went, from the processes' own clocks: start (interpreter, JAX, nets, connect)
    up to the first frame, re-living the journal (resumes), live frames, and the replay at the end."""
    startup = relive_s = live_s = 0.0
    relive_frames = live_frames = 0
    for c in counts:
        t, relived = c.get("times") or {}, c.get("relived", 0)
        if not t.get("first_frame"):
            continue
        startup += t["first_frame"] - t["start"]
        first_live = t.get("first_live") or t["last"]
        relive_s += first_live - t["first_frame"]
        relive_frames += relived
        live_s += t["last"] - first_live
        live_frames += c["frames"] - relived
    return {"processes": len(counts), "startup_s": startup, "startup_s_per_process": startup / max(len(counts), 1),
            "relive_s": relive_s, "relived_frames": relive_frames,
            "relive_frames_per_s": relive_frames / relive_s if relive_s > 0 else None,
            "live_s": live_s, "live_frames": live_frames, "live_frames_per_s": live_frames / live_s if live_s > 0 else None,
            "replay_s": replay_s}


def coarse_motor_outcome(records: list[dict[str, Any]], soak_dir: Path) -> dict[str, Any]:
    """The injected coarse-motor failure: whether it fired, its journal record and what the run made of it (the
    loop's note and the next transitions)."""
    path = soak_dir / MOTOR_FAULT_FILE
    if not path.exists():
        return {"fired": False}
    out: dict[str, Any] = {"fired": True, **json.loads(path.read_text())}
    for i, r in enumerate(records):
        if r["kind"] == "failure" and r.get("op") == "motor_move" and "Injected failure (soak)" in str(r.get("message")):
            out["journal"] = f"seq {r['seq']}: motor_move failed: {r['error']}"
            after = records[i + 1:i + 40]
            notes = [a["message"] for a in after if a["kind"] == "note"][:1]
            out["became"] = notes[0] if notes else None
            out["next_transitions"] = [f"{a['trigger']}: {a['source']} -> {a['dest']}" for a in after
                                       if a["kind"] == "transition"][:3]
            break
    return out


def judged_scans(records: list[dict[str, Any]]) -> set[int]:
    """The scans that classify decisions judged, each named by the seq of the grab_frame reply that brought its
    frame (the newest one before the decision with that frame). Not by the frame's content hash: the fresh
    embedded simulator of a resumed process repeats the random streams of the first one, so a scan at the same
    place, the same number of steps after a resume, can be bit-identical to an earlier one (the 10 000-frame soak
    had 7 such pairs) without being the same scan judged twice."""
    grabbed: dict[str, int] = {}
    judged: set[int] = set()
    for r in records:
        if (ref := grabbed_frame(r)) is not None:
            grabbed[ref] = r["seq"]
        elif r.get("decision") == "classify" and r.get("frame") in grabbed:
            judged.add(grabbed[r["frame"]])
    return judged


def grabbed_frame(record: dict[str, Any]) -> str | None:
    """The frame a grab_frame reply brought (its content hash), or None for any other record."""
    result = record.get("result")
    if record["kind"] == "reply" and record.get("op") == "grab_frame" and isinstance(result, dict):
        return result.get("frame") or None
    return None


def analyse(args: argparse.Namespace, run_dir: Path, soak_dir: Path, driven: dict[str, Any]) -> dict[str, Any]:
    from deepspm.controller.journal import check_journal, read_journal

    records = read_journal(run_dir)
    seq_problems = check_journal(records, require_stop=True)
    stop = records[-1] if records and records[-1]["kind"] == "stop" else {}
    counters = stop.get("counters") or {}
    classified = [r for r in records if r.get("decision") == "classify"]
    judged_frames = judged_scans(records)
    grabbed = {ref for r in records if (ref := grabbed_frame(r)) is not None}
    on_disk = {p.stem for p in (run_dir / "frames").glob("*.npy")}
    triggers = Counter(r["trigger"] for r in records if r["kind"] == "transition")
    failures = Counter(f"{r['op']}: {r['error']}" for r in records if r["kind"] == "failure")
    failures_by_error = Counter(r["error"] for r in records if r["kind"] == "failure")
    violations = [json.loads(line) for line in (soak_dir / VIOLATIONS_FILE).read_text().splitlines() if line.strip()]
    injected: Counter[str] = Counter()
    writes_checked = reads = undecodable = 0
    counts = [json.loads(path.read_text()) for path in soak_dir.glob("counts-*.json")]
    for c in counts:
        injected.update(c["injected"])
        writes_checked += c["writes_checked"]
        reads += c["reads"]
        undecodable += c["undecodable_writes"]
    # the motor-fault file is written the moment the failure fires; a process killed before its next per-frame
    # counts file would otherwise lose the count (the other kinds' counts of such a process are lost the same way)
    if (soak_dir / MOTOR_FAULT_FILE).exists():
        injected["coarse_motor"] = 1
    samples = [json.loads(line) for line in (soak_dir / MEMORY_FILE).read_text().splitlines() if line.strip()]
    replay_ok, replay_line, replay_s = _replay(run_dir, soak_dir) if not args.no_replay else (True, "skipped", 0.0)
    frames = int(counters.get("frames", 0))
    journal_bytes = (run_dir / "journal.jsonl").stat().st_size
    return {
        "frames_target": args.frames, "frames_recorded": frames, "frames_judged": len(classified),
        "lost_frames": args.frames - len(judged_frames),
        "frames_judged_twice": len(classified) - len(judged_frames),
        "frames_missing_on_disk": len(grabbed - on_disk),
        "stop": {"status": stop.get("status"), "reason": stop.get("reason")},
        "journal_problems": seq_problems[:20], "journal_problem_count": len(seq_problems),
        "replay_identical": replay_ok, "replay_verdict": replay_line, "replay_wall_s": replay_s,
        "audit": {"violations": len(violations), "examples": violations[:10], "writes_checked": writes_checked,
                  "reads_seen": reads, "undecodable_writes": undecodable},
        "kills": len(driven["kills"]), "kill_points": driven["kills"], "processes": driven["processes"],
        "resumes": sum(1 for r in records if r["kind"] == "resume"),
        "recoveries": {"contact_lost": triggers.get("contact_lost", 0), "crashed": triggers.get("crashed", 0),
                       "recovered": triggers.get("recovered", 0),
                       "contact_recoveries": counters.get("contact_recoveries"),
                       "crash_recoveries": counters.get("crash_recoveries"), "moves": counters.get("moves"),
                       "fail": triggers.get("fail", 0)},
        "faults_injected": dict(sorted(injected.items())),
        "coarse_motor_failure": coarse_motor_outcome(records, soak_dir),
        "failures_in_journal_by_error": dict(failures_by_error.most_common()),
        "failures_in_journal_by_op": dict(failures.most_common(30)),
        "memory": memory_growth(samples, min(args.memory_from, args.frames // 2)),
        "journal_bytes": journal_bytes, "journal_bytes_per_frame": journal_bytes / max(frames, 1),
        "journal_records": len(records),
        "run_wall_s": driven["run_wall_s"], "last_exit": driven["last_exit"],
        "frames_per_s": frames / max(driven["run_wall_s"], 1e-9),
        "profile": profile(counts, replay_s),
    }


def verdict(r: dict[str, Any]) -> list[str]:
    """The figures that fail the soak (empty = pass)."""
    bad = []
    for key in ("lost_frames", "frames_judged_twice", "frames_missing_on_disk", "journal_problem_count"):
        if r[key] != 0:
            bad.append(f"{key} = {r[key]}")
    if r["audit"]["violations"]:
        bad.append(f"audit violations = {r['audit']['violations']}")
    if not r["replay_identical"]:
        bad.append(f"replay: {r['replay_verdict']}")
    if r["stop"]["status"] != "completed":
        bad.append(f"run ended {r['stop']['status']}: {r['stop']['reason']}")
    growth = r["memory"]["growth"]
    if growth is None or growth >= MEMORY_GROWTH_LIMIT:
        bad.append(f"memory growth {growth}")
    return bad


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=10_000, help="judged frames of the run (default 10000)")
    p.add_argument("--kills", type=int, default=20, help="kill -9 points, each followed by a resume (default 20)")
    p.add_argument("--fault-scale", type=float, default=1.0,
                   help="multiplier of every per-request fault rate (default 1; 0 = no injected faults)")
    p.add_argument("--z-jump-rate", type=float, default=2e-3,
                   help="sudden z jumps per simulated second (some cause lost contact or a crash; default 2e-3, one "
                        "per ~8 simulated minutes; the simulator's own default is 1/7200)")
    p.add_argument("--piezo-range", type=float, default=1e-7,
                   help="lateral range of the simulated scanner, metres (default 1e-7: an approach area holds 81 "
                        "10 nm frames, so the run moves the coarse motor every ~80 frames; an 850 nm scanner holds "
                        "~6500 and a short soak would never move)")
    p.add_argument("--command-timeout", type=float, default=1.0,
                   help="the client's deadline for a non-blocking command, wall seconds (default 1)")
    p.add_argument("--seed", type=int, default=17, help="the run's seed, the fault draws and the kill points (default 17)")
    p.add_argument("--mem-every", type=int, default=50, help="sample resident memory every N frames (default 50)")
    p.add_argument("--memory-from", type=int, default=1000,
                   help="memory growth is measured from this frame to the end (default 1000; at most frames / 2)")
    p.add_argument("--out", type=Path, default=None, help="soak folder (run/ and the soak's files; default a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the summary here (default bench-results/soak.json)")
    p.add_argument("--no-replay", action="store_true", help="skip the replay of the whole journal")
    p.add_argument("--no-fork", dest="fork", action="store_false",
                   help="start each controller process as a new interpreter (python -m ...) instead of forking it "
                        "from the driver, which has imported the controller's modules once (saves ~6-20 s per "
                        "process start; the kills and resumes are the same)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return child_main(json.loads(args.child), rest)
    if args.frames < 10 or args.kills < 0 or args.fault_scale < 0 or args.mem_every < 1:
        print("soak: --frames must be >= 10, --kills >= 0, --fault-scale >= 0, --mem-every >= 1", file=sys.stderr)
        return 2
    if args.kills > args.frames // 2:
        print(f"soak: {args.kills} kills do not fit in {args.frames} frames (at most frames / 2)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        soak_dir = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        soak_dir.mkdir(parents=True, exist_ok=True)
        for name in (VIOLATIONS_FILE, MEMORY_FILE):
            (soak_dir / name).touch()
        run_dir = soak_dir / "run"
        if args.fork:
            preload()
        print(f"soak: {args.frames} frames, {args.kills} kills, fault scale {args.fault_scale}, seed {args.seed}, "
              f"in {soak_dir}", flush=True)
        driven = drive(args, run_dir, soak_dir)
        result = analyse(args, run_dir, soak_dir, driven)
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k not in ("child", "rest")}
    bad = verdict(result)
    result["verdict"] = "PASS" if not bad else "FAIL: " + "; ".join(bad)
    rows = [(k, json.dumps(result[k]) if isinstance(result[k], dict | list) else result[k]) for k in (
        "frames_recorded", "frames_judged", "lost_frames", "frames_judged_twice", "journal_problem_count",
        "replay_identical", "kills", "resumes", "recoveries", "faults_injected", "coarse_motor_failure",
        "failures_in_journal_by_error", "memory", "journal_bytes_per_frame", "run_wall_s", "frames_per_s", "profile")]
    rows.insert(6, ("audit", json.dumps(result["audit"]["violations"]) + f" violations in "
                    f"{result['audit']['writes_checked']} writes checked"))
    print_table("soak", ("figure", "value"), rows)
    path = args.json or RESULTS / "soak.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"soak: summary written to {path}")
    print(f"soak verdict: {result['verdict']}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
