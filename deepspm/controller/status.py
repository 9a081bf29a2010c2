"""`deepspm status RUN_DIR [--follow]`: what a run is doing now, read only from its journal.

For a person SSHed into the instrument PC: no connection to the running process is needed (or possible),
the journal is the interface. The run may be writing the file while we read it, so a last line without
its newline is simply not read yet (it is re-read at the next poll), and a file that got shorter (a resume
cut off a torn line, or a new run in the same place) is read again from the start.

`JournalFollower` reads incrementally: it remembers the byte offset after the last complete line, so each
poll of a multi-day journal reads only what was appended since. `RunStatus.add` folds one record at a time.

    status_text(run_dir, now=time.time())            -> one rendering, plain text
    await follow(run_dir, interval_s, sleep=..., out=sys.stdout)   refresh until the run stops

On a TTY `follow` clears the screen (ANSI) before each refresh; otherwise (a log file, a pipe) it appends
a block only when something changed, so the output stays readable.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from deepspm.controller.journal import JOURNAL_FILE, RecordTally

CLEAR_SCREEN = "\x1b[H\x1b[2J"
STALE_AFTER_S = 900.0  # a live run with no record for this long is suspicious (approach timeout: 600 s)
MESSAGE_CHARS = 160


def format_duration(seconds: float) -> str:
    """'2 d 03:04:05', '03:04:05' or '12.3 s' (for people)."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f} s"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days} d {clock}" if days else clock


def format_wall(t_wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_wall))


def _short(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


@dataclass
class LastFrame:
    number: int  # classified frames so far (0 for a discarded frame before the first one)
    verdict: str  # good probe / bad probe / bad sample / contact lost / crashed
    p_good: float | None
    t_wall: float


@dataclass
class RunStatus(RecordTally):
    """The run as its journal says, so far. Counts follow the report's rules (controller/report.py)."""

    run_id: str = ""
    state: str = "not started"  # the last transition's destination
    bad_lines: int = 0  # complete lines that were not JSON objects (should never happen)
    frames_recorded: int = 0
    frames_classified: int = 0
    good_frames: int = 0
    bad_samples: int = 0
    last_frame: LastFrame | None = None
    bad_probe_count: int = 0
    bad_probe_threshold: int = 10
    budget_hours: float | None = None  # the run's time budget (run.hours), if any
    simulated: bool = False  # against the embedded simulator: run time is its clock's
    episodes: int = 0
    in_episode: bool = False
    episode_actions: int = 0
    actions: int = 0
    reset_actions: int = 0
    moves: int = 0
    failures: int = 0
    resumes: int = 0
    last_note: tuple[float, str] | None = None
    last_failure: tuple[float, str] | None = None
    last_operator: tuple[float, str] | None = None
    stopped: bool = False
    stop_status: str = ""
    stop_reason: str = ""

    def add(self, r: dict[str, Any]) -> None:
        self.tally(r)
        t_wall = r.get("t_wall")
        t = float(t_wall) if isinstance(t_wall, (int, float)) else 0.0
        kind = r.get("kind")
        if kind == "start":
            self.run_id = str(r.get("run_id", self.run_id))
            episode = (r.get("config") or {}).get("episode") or {}
            self.bad_probe_threshold = int(episode.get("bad_probe_threshold", self.bad_probe_threshold))
            hours = ((r.get("config") or {}).get("run") or {}).get("hours")
            self.budget_hours = float(hours) if isinstance(hours, (int, float)) else None
            self.simulated = bool((r.get("instrument") or {}).get("simulated"))
        elif kind == "transition":
            self._transition(r)
        elif kind == "decision":
            self._decision(r, t)
        elif kind == "failure":
            self.failures += 1
            self.last_failure = (t, f"{r.get('op')} failed: {r.get('error')}: {_short(r.get('message', ''))}")
        elif kind == "note":
            self.last_note = (t, _short(r.get("message", "")))
        elif kind == "operator":
            self.last_operator = (t, f"{r.get('request')} (from {r.get('source')})"
                                     + (f": {_short(r['detail'])}" if r.get("detail") else ""))
        elif kind == "resume":
            self.resumes += 1
            self.stopped = False
        elif kind == "stop":
            self.stopped = True
            self.stop_status = str(r.get("status", ""))
            self.stop_reason = str(r.get("reason", ""))

    def _transition(self, r: dict[str, Any]) -> None:
        self.state = str(r.get("dest", self.state))
        trigger = r.get("trigger")
        if trigger == "frame_recorded":
            self.frames_recorded += 1
        elif trigger == "moved":
            self.moves += 1

    def _decision(self, r: dict[str, Any], t: float) -> None:
        decision = r.get("decision")
        if decision == "classify":
            self.frames_classified += 1
            good = bool(r.get("good"))
            self.good_frames += good
            p = r.get("p_good")
            self.last_frame = LastFrame(self.frames_classified, "good probe" if good else "bad probe",
                                        float(p) if isinstance(p, (int, float)) else None, t)
            self.bad_probe_count = int(r.get("bad_probe_count", self.bad_probe_count))
            if r.get("episode_started"):
                self.episodes += 1
                self.episode_actions = 0
            self.in_episode = bool(r.get("in_episode"))
        elif decision == "sample":
            self.bad_samples += 1
            self.last_frame = LastFrame(self.frames_classified, "bad sample", None, t)
        elif decision == "z_check":
            verdict = "crashed" if r.get("verdict") == "crashed" else "contact lost"
            self.last_frame = LastFrame(self.frames_classified, verdict, None, t)
        elif decision == "action" and r.get("action") is not None:
            self.actions += 1
            self.episode_actions += 1
        elif decision == "reset_action":
            self.reset_actions += 1


class JournalFollower:
    """Reads a (possibly growing) journal incrementally into a `RunStatus`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / JOURNAL_FILE
        self.status = RunStatus(run_id=Path(run_dir).name)
        self.offset = 0  # bytes consumed: the end of the last complete line read
        self.pending_bytes = 0  # an incomplete last line seen at the last poll (being written, or torn)
        self.exists = False

    def poll(self) -> RunStatus:
        """Read what was appended since the last poll; returns the updated status."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                if size < self.offset:  # truncated or replaced: start over
                    self.status = RunStatus(run_id=self.path.parent.name)
                    self.offset = 0
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except FileNotFoundError:
            self.exists = False
            return self.status
        self.exists = True
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if isinstance(record, dict):
                self.status.add(record)
            elif line.strip():
                self.status.bad_lines += 1
        self.offset += end
        self.pending_bytes = len(data) - end
        return self.status


LABEL_WIDTH = 12


def _row(label: str, text: str) -> str:
    return f"{label:<{LABEL_WIDTH}} {text}"


def render(follower: JournalFollower, now: float) -> str:
    """The status as plain text lines (no colours, no cursor tricks: it must survive any terminal)."""
    s = follower.status
    if not follower.exists:
        return f"deepspm run {s.run_id}: no journal yet at {follower.path}"
    phase = f"STOPPED: {s.stop_status}" if s.stopped else "RUNNING"
    lines = [f"deepspm run {s.run_id or '?'}   {phase}   state: {s.state}"]
    if s.first_wall is not None and s.last_wall is not None:
        end = s.last_wall if s.stopped else max(now, s.last_wall)
        line = _row("elapsed", f"{format_duration(end - s.first_wall)} since {format_wall(s.first_wall)}")
        if not s.stopped:
            quiet = now - s.last_wall
            line += f"; last record {format_duration(quiet)} ago"
            if quiet > STALE_AFTER_S:
                line += " (no record for a long time: is the run still alive?)"
        lines.append(line)
        budget = f" of the {s.budget_hours:g} h budget" if s.budget_hours else ""
        clock = ", simulated time" if s.simulated else ""
        lines.append(_row("run time", f"{format_duration(s.time_spent_s)}{budget} (all processes{clock})"))
    good = f"{s.good_frames / s.frames_classified:.1%}" if s.frames_classified else "–"
    lines.append(_row("frames", f"{s.frames_recorded} recorded, {s.frames_classified} classified, "
                                f"{s.good_frames} good probe ({good}), {s.bad_samples} bad sample"))
    if s.last_frame is not None:
        f = s.last_frame
        p = f" p(good) {f.p_good:.3f}" if f.p_good is not None else ""
        when = f", {format_duration(now - f.t_wall)} ago" if not s.stopped else ""
        lines.append(_row("last frame", f"#{f.number}{p} -> {f.verdict}{when}"))
    probe = f"bad-probe counter {s.bad_probe_count}/{s.bad_probe_threshold}"
    if s.in_episode:
        probe += f"; episode {s.episodes} under way, actions so far: {s.episode_actions}"
    lines.append(_row("probe", probe))
    rec = s.recoveries
    lines.append(_row("counters", f"episodes {s.episodes}, actions {s.actions}"
                      + (f" (+{s.reset_actions} reset)" if s.reset_actions else "")
                      + f", moves {s.moves}, recoveries {rec['contact'] + rec['crash']} "
                      f"(contact {rec['contact']}, crash {rec['crash']}), failures {s.failures}"
                      + (f", resumes {s.resumes}" if s.resumes else "")))
    for label, item in (("last note", s.last_note), ("last failure", s.last_failure), ("operator", s.last_operator)):
        if item is not None:
            lines.append(_row(label, f"{item[1]} ({format_wall(item[0])})"))
    if s.stopped:
        lines.append(_row("stopped", f"{s.stop_status}: {s.stop_reason}"))
    if follower.pending_bytes:
        lines.append(f"(an incomplete last line of {follower.pending_bytes} bytes is not read yet: being written, "
                     "or torn by a kill)")
    if s.bad_lines:
        lines.append(_row("warning", f"{s.bad_lines} journal lines are not JSON records"))
    return "\n".join(lines)


def status_text(run_dir: Path, now: float | None = None) -> str:
    """One rendering of the run's status (reads the whole journal once)."""
    follower = JournalFollower(run_dir)
    follower.poll()
    return render(follower, time.time() if now is None else now)


async def follow(
    run_dir: Path,
    interval_s: float = 2.0,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    out: TextIO | None = None,
    clear: bool | None = None,
    now: Callable[[], float] = time.time,
    max_polls: int | None = None,
) -> RunStatus:
    """Show the status every `interval_s` seconds until the run stops (or `max_polls`, or cancellation).

    `clear`: clear the screen before each refresh (default: when `out` is a TTY); otherwise a block is
    appended only when the journal changed. Returns the last status."""
    out = out if out is not None else sys.stdout
    clear = out.isatty() if clear is None else clear
    follower = JournalFollower(run_dir)
    seen: tuple[int, int, bool] | None = None
    polls = 0
    while True:
        status = follower.poll()
        polls += 1
        changed = (follower.status.records, follower.pending_bytes, follower.exists) != seen
        if clear:
            out.write(CLEAR_SCREEN + render(follower, now()) + "\n")
        elif changed:
            out.write(render(follower, now()) + "\n\n")
        out.flush()
        seen = (follower.status.records, follower.pending_bytes, follower.exists)
        if status.stopped or (max_polls is not None and polls >= max_polls):
            return status
        await sleep(interval_s)
