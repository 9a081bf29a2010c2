"""`deepspm status RUN_DIR [--follow]`: what a run is doing now, read only from its journal.

For a person SSHed into the instrument PC: no connection to the running process is needed (or possible),
the journal is the interface. The run may be writing the file while we read it, so a last line without
its newline is simply not read yet (it is re-read at the next poll), and a file that got shorter (a resume
cut off a torn line, or a new run in the same place) is read again from the start.

`JournalFollower` reads incrementally: it remembers the byte offset after the last complete line, so each
poll of a multi-day journal reads only what was appended since, and folds each record into the journal's
one typed fold (`runfold.RunFold`, the report's too), without history: O(1) memory however long the run.
A line that is not a sound record (not JSON, or a JournalError from the fold) is counted and the first
problem shown, not fatal: the view of a run must survive anything in its journal.

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
from pathlib import Path
from typing import TextIO

from deepspm.controller.journal import JOURNAL_FILE, JournalError
from deepspm.controller.runfold import RunFold

CLEAR_SCREEN = "\x1b[H\x1b[2J"
STALE_AFTER_S = 900.0  # a live run with no record for this long is suspicious (approach timeout: 600 s)


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


class JournalFollower:
    """Reads a (possibly growing) journal incrementally into a `RunFold` (no history)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / JOURNAL_FILE
        self.status = RunFold(run_id=Path(run_dir).name)
        self.offset = 0  # bytes consumed: the end of the last complete line read
        self.pending_bytes = 0  # an incomplete last line seen at the last poll (being written, or torn)
        self.exists = False
        self.bad_lines = 0  # complete lines that were not JSON objects or not sound records (should never happen)
        self.first_problem = ""

    def _reset(self) -> None:
        self.status = RunFold(run_id=self.path.parent.name)
        self.offset = self.bad_lines = 0
        self.first_problem = ""

    def poll(self) -> RunFold:
        """Read what was appended since the last poll; returns the updated status."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                if size < self.offset:  # truncated or replaced: start over
                    self._reset()
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except FileNotFoundError:
            self.exists = False
            return self.status
        self.exists = True
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise JournalError("a line that is not a JSON object")
                self.status.add(record)
            except (json.JSONDecodeError, UnicodeDecodeError, JournalError) as e:
                self.bad_lines += 1
                self.first_problem = self.first_problem or (str(e) if isinstance(e, JournalError) else "not JSON")
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
    phase = f"STOPPED: {s.stop.status}" if s.stop is not None else "RUNNING"
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
    target = s.target_state
    on_target = "good probe" if target == "good" else f"probe {target}"
    if target != "good":
        lines.append(_row("target", f"tip state {target} (p({target}) > {s.threshold:g} ends an episode)"))
    lines.append(_row("frames", f"{s.frames_recorded} recorded, {s.frames_classified} classified, "
                                f"{s.good_frames} {on_target} ({good}), {s.bad_samples} bad sample"))
    if s.last_frame is not None:
        f = s.last_frame
        p = f" p({target}) {f.p_good:.3f}" if f.p_good is not None else ""
        when = f", {format_duration(now - f.t_wall)} ago" if not s.stopped else ""
        verdict = f.verdict
        if target != "good" and verdict in ("good probe", "bad probe"):
            verdict = f"probe {target}" if verdict == "good probe" else f"probe not {target}"
        lines.append(_row("last frame", f"#{f.number}{p} -> {verdict}{when}"))
    probe = f"bad-probe counter {s.bad_probe_count}/{s.bad_probe_threshold}"
    if s.in_episode and s.episode is not None:
        probe += f"; episode {s.episode.index} under way, actions so far: {s.episode_actions}"
    lines.append(_row("probe", probe))
    rec = s.recoveries
    lines.append(_row("counters", f"episodes {s.episodes_started}, actions {s.actions}"
                      + (f" (+{s.reset_actions} reset)" if s.reset_actions else "")
                      + f", moves {s.moves}, recoveries {rec['contact'] + rec['crash']} "
                      f"(contact {rec['contact']}, crash {rec['crash']}), failures {s.failures}"
                      + (f", resumes {s.resumes}" if s.resumes else "")))
    for label, item in (("last note", s.last_note), ("last failure", s.last_failure), ("operator", s.last_operator)):
        if item is not None:
            lines.append(_row(label, f"{item[1]} ({format_wall(item[0])})"))
    if s.stop is not None:
        lines.append(_row("stopped", f"{s.stop.status}: {s.stop.reason}"))
    if follower.pending_bytes:
        lines.append(f"(an incomplete last line of {follower.pending_bytes} bytes is not read yet: being written, "
                     "or torn by a kill)")
    if follower.bad_lines:
        lines.append(_row("warning", f"{follower.bad_lines} journal lines are not sound records (the first: "
                                     f"{follower.first_problem})"))
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
) -> RunFold:
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
