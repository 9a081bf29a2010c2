"""`deepspm report RUN_DIR --out DIR`: what a run did, as pictures and one table, read from its journal.

Writes into `out_dir`:
    approach_areas.png     one panel per approach area (a new one after each "moved" transition): scanned
                           10 nm regions coloured by verdict, forbidden circles (bad sample, actions), action
                           sites by kind, the piezo range (like Fig. 4 of Krull et al. 2020)
    p_good.png             p(good) of every classified frame, the threshold, conditioning episodes shaded
    actions_per_episode.png  conditioning actions per episode, agent (greedy) vs random (exploration) picks
    frames_montage.png     the last good and the last bad frames with their p(good)
    summary.json           `ReportSummary` (everything in the table) + the plot file names
    index.html             the plots and the table on one page (no external resources)

Everything is counted from the journal's records alone (design.md section 7), never from the loop's
counters in the stop record, so a report of a killed run (no stop record, torn last line) still works.
Plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas: no pyplot, no global state.

The counting rules are the fold's (controller/runfold.py), which `deepspm status` reads through too, so the
two never disagree; the report asks it to keep the full history (regions, frames, actions, episodes).
Journals of schema 1 are reported as well.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from deepspm.controller.compare import bootstrap_ratio
from deepspm.controller.journal import JournalError, TornJournalWarning, load_frame
from deepspm.controller.runfold import (
    BAD,
    BAD_SAMPLE,
    CONTACT_LOST,
    CRASHED,
    DEFAULT_FRAME_SIZE_M,
    GOOD,
    OPEN,
    SUCCEEDED,
    TRUNCATED,
    UNJUDGED,
    ClassifiedFrame,
    Episode,
    History,
    LineCurve,
    RunFold,
    ScannedRegion,
    TakenAction,
    read_fold,
)
from deepspm.controller.status import format_duration
from deepspm.io.actions import ACTIONS, ActionKind
from deepspm.io.atomic import write_atomic

__all__ = ["BAD", "BAD_SAMPLE", "CONTACT_LOST", "CRASHED", "GOOD", "PLOT_FILES", "UNJUDGED", "ReportSummary",
           "read_history", "summarise", "summary_rows", "write_report"]
MONTAGE_FRAMES = 6  # per row: the last good and the last bad frames
MAX_AREA_PANELS = 12  # the latest approach areas; older ones are left out (and said so)
DPI = 110

PLOT_FILES = ("approach_areas.png", "p_good.png", "actions_per_episode.png", "frames_montage.png")
INTERLEAVED_PLOT = "agent_vs_random.png"  # only for an interleaved evaluation
LINES_PLOT = "line_by_line.png"  # only when frames were stopped early or changed judgement mid-scan

VERDICT_COLOURS = {
    GOOD: "#2ca02c",
    BAD: "#d62728",
    BAD_SAMPLE: "#8c564b",
    CONTACT_LOST: "#ff7f0e",
    CRASHED: "#111111",
    UNJUDGED: "#ffffff",
}
DISCARDED = (CONTACT_LOST, CRASHED)
HATCHES = {CONTACT_LOST: "////", CRASHED: "xxxx"}
KIND_COLOURS = {ActionKind.STALL: "#7f7f7f", ActionKind.PULSE: "#1f77b4", ActionKind.DIP: "#9467bd"}


# -- the run, as read from the journal --------------------------------------------------------------------


@dataclass(frozen=True)
class RunHistory:
    """The fold of a run's journal (`run`) and the history it kept for the plots; a torn last line is left
    out and its length kept."""

    run: RunFold
    regions: list[ScannedRegion]
    frames: list[ClassifiedFrame]
    actions: list[TakenAction]
    episodes: dict[int, Episode]
    move_after_frame: list[int]
    torn_tail_bytes: int = 0
    line_curves: list[LineCurve] = dataclasses.field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def threshold(self) -> float:
        return self.run.threshold

    @property
    def piezo_range_xy_m(self) -> tuple[float, float]:
        return self.run.piezo_range_xy_m

    @property
    def envelope_fraction(self) -> float:
        return self.run.envelope_fraction


def read_history(run_dir: Path) -> RunHistory:
    """Fold a run directory's journal, keeping its history (a torn last line is left out and counted)."""
    read = read_fold(Path(run_dir), history=True)
    h = read.fold.history or History()  # kept: asked for above
    return RunHistory(read.fold, h.regions, h.frames, h.actions, h.episodes, h.move_after_frame, read.torn_tail_bytes,
                      h.line_curves)


# -- the summary ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSummary:
    """The report's table. Fractions and means are None when there is nothing to divide by."""

    run_id: str
    status: str  # the stop record's status, or "running / killed" without one
    reason: str
    frames_recorded: int  # "frame_recorded" transitions
    frames_classified: int  # "classify" decisions
    good_frames: int
    good_fraction: float | None  # good / classified
    bad_samples: int  # "sample" decisions (discarded frames)
    discarded_contact_lost: int  # "z_check" decisions
    discarded_crashed: int
    episodes_started: int
    episodes_ended: int
    episodes_succeeded: int
    episodes_truncated: int
    actions: int  # conditioning actions in episodes
    agent_actions: int
    random_actions: int
    reset_actions: int
    mean_actions_per_episode: float | None  # over ended episodes
    mean_actions_per_successful_episode: float | None
    moves: int
    approach_areas: int
    contact_recoveries: int
    crash_recoveries: int
    failures: int  # "failure" records: command timeouts, disconnects, error replies
    resumes: int
    frames_aborted: int  # recorded frames stopped early by a confident bad line-window judgement
    good_images: int  # "good image" labels decided by the episode logic
    not_good_images: int
    interleaved: dict[str, Any] | None  # agent versus random episodes (run --evaluate-interleaved), else None
    uptime_s: float  # wall time from the first to the last record
    started_wall: float | None
    ended_wall: float | None
    records: int
    torn_tail_bytes: int
    target_state: str = "good"  # the tip state the run conditioned towards ([probe] target_state)

    @property
    def recoveries(self) -> int:
        return self.contact_recoveries + self.crash_recoveries


def summarise(history: RunHistory) -> ReportSummary:
    h = history.run
    classified = h.frames_classified
    stop = h.stop
    return ReportSummary(
        run_id=h.run_id,
        status=stop.status if stop else "running / killed",
        reason=stop.reason if stop else "no stop record (still running, or killed)",
        frames_recorded=h.frames_recorded,
        frames_classified=classified,
        good_frames=h.good_frames,
        target_state=h.target_state,
        good_fraction=h.good_frames / classified if classified else None,
        bad_samples=h.bad_samples,
        discarded_contact_lost=h.discarded_contact_lost,
        discarded_crashed=h.discarded_crashed,
        episodes_started=h.episodes_started,
        episodes_ended=h.episodes_ended,
        episodes_succeeded=h.episodes_succeeded,
        episodes_truncated=h.episodes_truncated,
        actions=h.actions,
        agent_actions=h.agent_actions,
        random_actions=h.random_actions,
        reset_actions=h.reset_actions,
        mean_actions_per_episode=h.mean_actions_per_episode(),
        mean_actions_per_successful_episode=h.mean_actions_per_successful_episode(),
        frames_aborted=h.frames_aborted,
        good_images=h.good_images,
        not_good_images=h.not_good_images,
        interleaved=interleaved_comparison(history),
        moves=h.moves,
        approach_areas=h.area if h.records else 0,
        contact_recoveries=h.recoveries["contact"],
        crash_recoveries=h.recoveries["crash"],
        failures=h.failures,
        resumes=h.resumes,
        uptime_s=(h.last_wall - h.first_wall) if h.first_wall is not None and h.last_wall is not None else 0.0,
        started_wall=h.first_wall,
        ended_wall=h.last_wall,
        records=h.records,
        torn_tail_bytes=history.torn_tail_bytes,
    )


def interleaved_comparison(history: RunHistory) -> dict[str, Any] | None:
    """Actions per ended episode of the agent and of uniform random choice (an interleaved evaluation), their means
    and the ratio of means with a 95 % bootstrap interval; None when the run had no random episode."""
    lengths: dict[str, list[int]] = {"agent": [], "random": []}
    for e in history.episodes.values():
        if e.outcome != OPEN and e.actions > 0:
            lengths[e.policy].append(e.actions)
    if not lengths["random"]:
        return None
    out: dict[str, Any] = {name: {"episodes": len(v), "mean": float(np.mean(v)) if v else None, "lengths": v}
                           for name, v in lengths.items()}
    if lengths["agent"]:
        a, r = np.array(lengths["agent"], float), np.array(lengths["random"], float)
        out["ratio_mean"] = float(a.mean() / r.mean())
        out["ratio_ci95"] = list(bootstrap_ratio(a, r, seed=0))
    return out


def _interleaved_rows(c: dict[str, Any] | None) -> list[tuple[str, str]]:
    if c is None:
        return []
    def mean(name: str) -> str:
        return "–" if c[name]["mean"] is None else f"{c[name]['mean']:.2f}"
    rows = [("interleaved: actions per episode, agent / random",
             f"{mean('agent')} ({c['agent']['episodes']} episodes) / {mean('random')} ({c['random']['episodes']})")]
    if "ratio_mean" in c:
        low, high = c["ratio_ci95"]
        rows.append(("interleaved: agent / random, mean (95 % CI)", f"{c['ratio_mean']:.2f} ({low:.2f}-{high:.2f})"))
    return rows


def plot_agent_vs_random(comparison: dict[str, Any], run_id: str, path: Path) -> Path:
    """The two distributions of actions per episode side by side (interleaved evaluation)."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    data = [comparison[name]["lengths"] or [np.nan] for name in ("agent", "random")]
    ax.boxplot(data, tick_labels=[f"agent ({comparison['agent']['episodes']})",
                                  f"random ({comparison['random']['episodes']})"], showmeans=True)
    for i, values in enumerate(data, start=1):
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(len(values))
        ax.scatter(i + jitter, values, s=12, alpha=0.6, color="#1f77b4" if i == 1 else "#aec7e8", zorder=3)
    title = f"Actions per episode, agent versus random, run {run_id}"
    if "ratio_mean" in comparison:
        low, high = comparison["ratio_ci95"]
        title += f"\nratio of means {comparison['ratio_mean']:.2f} (95 % CI {low:.2f}-{high:.2f})"
    ax.set_title(title, fontsize=11)
    ax.set_ylabel("conditioning actions per ended episode")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    return _save(fig, path)


def summary_rows(s: ReportSummary) -> list[tuple[str, str]]:
    """The table as (label, value) text, in reading order."""

    def frac(x: float | None) -> str:
        return "–" if x is None else f"{x:.1%}"

    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    return [
        ("run", s.run_id),
        ("stop", f"{s.status}: {s.reason}" if s.reason else s.status),
        ("uptime (first to last record)", format_duration(s.uptime_s)),
        ("frames recorded", str(s.frames_recorded)),
        ("frames classified", str(s.frames_classified)),
        ("target tip state", s.target_state if s.target_state != "good" else "good (p(good))"),
        ("good probe frames" if s.target_state == "good" else f"frames with the probe {s.target_state}",
         f"{s.good_frames} ({frac(s.good_fraction)} of classified)"),
        ("bad sample frames (discarded)", str(s.bad_samples)),
        ("scans discarded: contact lost / crashed", f"{s.discarded_contact_lost} / {s.discarded_crashed}"),
        ("episodes started / ended", f"{s.episodes_started} / {s.episodes_ended}"),
        ("episodes succeeded / truncated at the cap", f"{s.episodes_succeeded} / {s.episodes_truncated}"),
        ("conditioning actions (agent / random)", f"{s.actions} ({s.agent_actions} / {s.random_actions})"),
        ("mean actions per ended episode", num(s.mean_actions_per_episode)),
        ("mean actions per successful episode", num(s.mean_actions_per_successful_episode)),
        ("reset actions (training)", str(s.reset_actions)),
        ("good images (labels decided)", f"{s.good_images} of {s.good_images + s.not_good_images}"),
        ("frames stopped early (line by line)", str(s.frames_aborted)),
        *_interleaved_rows(s.interleaved),
        ("approach-area moves", f"{s.moves} ({s.approach_areas} areas)"),
        ("recoveries: contact lost / crash", f"{s.recoveries} ({s.contact_recoveries} / {s.crash_recoveries})"),
        ("command failures (timeouts, disconnects, errors)", str(s.failures)),
        ("resumes", str(s.resumes)),
        ("journal records", str(s.records) + (f" (+ torn last line, {s.torn_tail_bytes} bytes)" if s.torn_tail_bytes else "")),
    ]


# -- plots ------------------------------------------------------------------------------------------------


def _nm(x_m: float) -> float:
    return x_m * 1e9


def _site_nm(a: TakenAction) -> tuple[float, float]:
    """An action's site in nm (the maps draw only actions whose site the journal names)."""
    if a.x_m is None or a.y_m is None:
        raise ValueError(f"the action at seq {a.seq} has no known site")
    return _nm(a.x_m), _nm(a.y_m)


def _save(fig: Figure, path: Path) -> Path:
    return write_atomic(path, lambda f: fig.savefig(f, dpi=DPI, format="png"))


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _action_marker(index: int) -> tuple[str, str]:
    """(marker, colour) of an action site: stall x, positive pulse ^, negative pulse v, dip D."""
    action = ACTIONS[index]
    if action.kind is ActionKind.PULSE:
        return ("^" if action.bias_V > 0 else "v"), KIND_COLOURS[ActionKind.PULSE]
    if action.kind is ActionKind.DIP:
        return "D", KIND_COLOURS[ActionKind.DIP]
    return "X", KIND_COLOURS[ActionKind.STALL]


def plot_approach_areas(history: RunHistory, path: Path) -> Path:
    """One map per approach area (the latest MAX_AREA_PANELS), in nanometres around the approach point."""
    areas = sorted({r.area for r in history.regions} | {a.area for a in history.actions})
    shown = areas[-MAX_AREA_PANELS:]
    columns = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    fig = Figure(figsize=(5.2 * columns + 2.6, 5.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    if not shown:
        _empty(axes[0], "no scans recorded")
    for ax, area in zip(axes, shown):
        _draw_area(ax, history, area)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    left_out = len(areas) - len(shown)
    title = f"Approach areas of run {history.run_id}"
    if left_out:
        title += f" (the latest {len(shown)}; {left_out} earlier areas left out)"
    fig.suptitle(title, fontsize=13)
    fig.legend(handles=_map_legend(), loc="outside right upper", fontsize=9, title="legend", title_fontsize=9)
    return _save(fig, path)


def _draw_area(ax: Axes, history: RunHistory, area: int) -> None:
    regions = [r for r in history.regions if r.area == area]
    actions = [a for a in history.actions if a.area == area and a.x_m is not None]
    rx, ry = (_nm(r) / 2 for r in history.piezo_range_xy_m)
    ax.add_patch(Rectangle((-rx, -ry), 2 * rx, 2 * ry, fill=False, ec="black", lw=1.2))
    ex, ey = rx * history.envelope_fraction, ry * history.envelope_fraction
    ax.add_patch(Rectangle((-ex, -ey), 2 * ex, 2 * ey, fill=False, ec="black", lw=0.8, ls=":"))
    # collections, not one artist per patch: a multi-day run has thousands
    sample_circles = [Circle((_nm(r.x_m), _nm(r.y_m)), _nm(r.radius_m)) for r in regions
                      if r.verdict == BAD_SAMPLE and r.radius_m > 0]
    ax.add_collection(PatchCollection(sample_circles, fc=VERDICT_COLOURS[BAD_SAMPLE], alpha=0.12,
                                      ec=VERDICT_COLOURS[BAD_SAMPLE], lw=0.8, ls="--"))
    action_circles = [Circle(_site_nm(a), _nm(ACTIONS[a.action].forbidden_radius_m)) for a in actions]
    ax.add_collection(PatchCollection(action_circles, fc="none", lw=0.7, alpha=0.6,
                                      ec=[KIND_COLOURS[ACTIONS[a.action].kind] for a in actions]))
    # scans in journal order, so a later verdict on the same region is drawn on top; a discarded scan
    # (contact lost, crash) is usually scanned again after the recovery, so it is drawn as a hatched outline
    # over everything else
    kept = [r for r in regions if r.verdict not in DISCARDED]
    ax.add_collection(PatchCollection([_scan_patch(r) for r in kept], match_original=True))
    for r in regions:
        if r.verdict in DISCARDED:
            ax.add_patch(_scan_patch(r))
    for index in sorted({a.action for a in actions}):
        marker, colour = _action_marker(index)
        xs = [_site_nm(a)[0] for a in actions if a.action == index]
        ys = [_site_nm(a)[1] for a in actions if a.action == index]
        ax.scatter(xs, ys, marker=marker, s=30, c=colour, edgecolors="white", linewidths=0.5, zorder=7)
    counts = {v: sum(r.verdict == v for r in regions) for v in (GOOD, BAD, BAD_SAMPLE)}
    ax.set_title(f"area {area}: {len(regions)} scans ({counts[GOOD]} good, {counts[BAD]} bad probe, "
                 f"{counts[BAD_SAMPLE]} bad sample), {len(actions)} actions", fontsize=10)
    zoomed = _frame_view(ax, regions, actions, (rx, ry))
    ax.set_aspect("equal")
    if zoomed:
        _overview_inset(ax, history, regions, (rx, ry))
    ax.set_xlabel("x (nm, from the approach point)")
    ax.set_ylabel("y (nm)")
    ax.grid(True, lw=0.3, alpha=0.5)


def _scan_patch(r: ScannedRegion, label: str | None = None) -> Rectangle:
    half = _nm(r.size_m) / 2
    corner = (_nm(r.x_m) - half, _nm(r.y_m) - half)
    if r.verdict in DISCARDED:
        return Rectangle(corner, 2 * half, 2 * half, fc="none", ec=VERDICT_COLOURS[r.verdict], lw=1.4,
                         hatch=HATCHES[r.verdict], zorder=6, label=label)
    return Rectangle(corner, 2 * half, 2 * half, fc=VERDICT_COLOURS[r.verdict], lw=0.6,
                     ec="black" if r.verdict == UNJUDGED else "none", alpha=0.9, label=label)


def _frame_view(ax: Axes, regions: list[ScannedRegion], actions: list[TakenAction],
                half_range_nm: tuple[float, float]) -> bool:
    """Zoom onto what happened (a short run fills a small part of an 850 nm range), never beyond the piezo
    range; the square view keeps circles round. Returns whether the view shows less than the whole range."""
    xs = [_nm(r.x_m) for r in regions] + [_site_nm(a)[0] for a in actions]
    ys = [_nm(r.y_m) for r in regions] + [_site_nm(a)[1] for a in actions]
    rx, ry = half_range_nm
    whole = max(rx, ry) * 1.05
    half = whole
    cx = cy = 0.0
    if xs:
        pad = 60.0  # nm: room for the widest forbidden circles (50 nm stall, growing bad-sample circles)
        half = min(max(max(xs) - min(xs), max(ys) - min(ys)) / 2 + pad, whole)
        cx = float(np.clip((min(xs) + max(xs)) / 2, -whole + half, whole - half))
        cy = float(np.clip((min(ys) + max(ys)) / 2, -whole + half, whole - half))
    ax.set_xlim(cx - half, cx + half)
    ax.set_ylim(cy - half, cy + half)
    return half < 0.6 * whole


def _overview_inset(ax: Axes, history: RunHistory, regions: list[ScannedRegion], half_range_nm: tuple[float, float]) -> None:
    """A small map of the whole piezo range with the zoomed view outlined, in the emptiest corner."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    u = np.array([(_nm(r.x_m) - x0) / (x1 - x0) for r in regions])
    v = np.array([(_nm(r.y_m) - y0) / (y1 - y0) for r in regions])
    size = 0.3
    corners = [(1 - size - 0.01, 1 - size - 0.01), (0.01, 1 - size - 0.01), (1 - size - 0.01, 0.01), (0.01, 0.01)]
    crowding = [int(np.sum((u > cu - 0.05) & (u < cu + size + 0.05) & (v > cv - 0.05) & (v < cv + size + 0.05)))
                for cu, cv in corners]
    cu, cv = corners[int(np.argmin(crowding))]
    inset = ax.inset_axes((cu, cv, size, size))
    rx, ry = half_range_nm
    inset.add_patch(Rectangle((-rx, -ry), 2 * rx, 2 * ry, fc="white", ec="black", lw=1.0))
    inset.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fc="#1f77b4", alpha=0.12, ec="#1f77b4", lw=0.8))
    inset.scatter([_nm(r.x_m) for r in regions], [_nm(r.y_m) for r in regions], s=1.5,
                  c=[VERDICT_COLOURS[r.verdict] if r.verdict != UNJUDGED else "black" for r in regions], lw=0)
    inset.set_xlim(-rx * 1.05, rx * 1.05)
    inset.set_ylim(-ry * 1.05, ry * 1.05)
    inset.set_aspect("equal")
    inset.axis("off")
    inset.text(0.5, 0.92, f"piezo range {2 * rx:.0f} nm", transform=inset.transAxes, ha="center",
               va="top", fontsize=6.5, color="#333333")


def _map_legend() -> list[Any]:
    handles: list[Any] = [_scan_patch(ScannedRegion(0, 0, 0.0, 0.0, 0.0, v), label=f"scan: {v}")
                          for v in (GOOD, BAD, BAD_SAMPLE, CONTACT_LOST, CRASHED, UNJUDGED)]
    handles.append(Patch(fc=VERDICT_COLOURS[BAD_SAMPLE], alpha=0.25, ec=VERDICT_COLOURS[BAD_SAMPLE], ls="--",
                         label="bad-sample forbidden circle"))
    handles.append(Patch(fc="none", ec=KIND_COLOURS[ActionKind.PULSE], label="action forbidden circle"))
    for label, index in (("stall (50 nm)", 0), ("pulse > 0 V", 1), ("pulse < 0 V", 3), ("dip", 6)):
        marker, colour = _action_marker(index)
        handles.append(Line2D([], [], ls="none", marker=marker, color=colour, markeredgecolor="white", markersize=7,
                              label=label))
    handles.append(Line2D([], [], color="black", lw=1.2, label="piezo range"))
    handles.append(Line2D([], [], color="black", lw=0.8, ls=":", label="safety envelope"))
    return handles


def _time_unit(span_s: float) -> tuple[str, float]:
    if span_s >= 2 * 86400:
        return "d", 86400.0
    if span_s >= 2 * 3600:
        return "h", 3600.0
    if span_s >= 120:
        return "min", 60.0
    return "s", 1.0


def plot_p_good(history: RunHistory, path: Path) -> Path:
    """p(good) per classified frame, the threshold, episodes shaded, approach-area moves marked; the top
    axis gives the wall time since the first frame."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax = fig.subplots()
    frames = history.frames
    if not frames:
        _empty(ax, "no classified frames")
        fig.suptitle(f"p({history.run.target_state}) of run {history.run_id}")
        return _save(fig, path)
    index = np.array([f.index for f in frames], dtype=float)
    p = np.array([f.p_good for f in frames], dtype=float)
    good = np.array([f.good for f in frames], dtype=bool)
    last = len(frames)
    episodes = sorted(history.episodes.values(), key=lambda e: e.start_frame)
    for k, e in enumerate(episodes):  # alternating shades, so back-to-back episodes stay apart
        end = e.end_frame if e.end_frame is not None else last
        ax.axvspan(e.start_frame - 0.5, end + 0.5, color="#ff7f0e", alpha=0.13 if k % 2 == 0 else 0.26, lw=0,
                   hatch="//" if e.outcome == OPEN else None, label="conditioning episode" if k == 0 else None)
        if len(episodes) <= 25:
            ax.text((e.start_frame + end) / 2, 0.015, f"ep. {e.index}", ha="center", va="bottom", fontsize=7,
                    color="#a0522d", transform=ax.get_xaxis_transform())
    for k, after in enumerate(history.move_after_frame):
        ax.axvline(after + 0.5, color="#555555", lw=0.8, ls="-.", label="approach-area move" if k == 0 else None)
    ax.axhline(history.threshold, color="black", lw=1.0, ls="--", label=f"threshold {history.threshold:g}")
    size = 14 if len(frames) < 2000 else 4
    target = history.run.target_state
    on, off = ("good probe", "bad probe") if target == "good" else (f"probe {target}", f"probe not {target}")
    ax.scatter(index[good], p[good], s=size, c=VERDICT_COLOURS[GOOD], label=on, zorder=3, rasterized=True)
    ax.scatter(index[~good], p[~good], s=size, c=VERDICT_COLOURS[BAD], label=off, zorder=3, rasterized=True)
    ax.set_xlim(0.5, last + 0.5)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("classified frame")
    ax.set_ylabel("p(good probe)" if target == "good" else f"p({target})")
    ax.grid(True, lw=0.3, alpha=0.5)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    _elapsed_axis(ax, index, np.array([f.t_wall for f in frames], dtype=float))
    fig.suptitle(f"p({target}) of run {history.run_id}: {int(good.sum())} of {last} frames "
                 f"{'good' if target == 'good' else target}", fontsize=12)
    return _save(fig, path)


def _elapsed_axis(ax: Axes, index: np.ndarray, t_wall: np.ndarray) -> None:
    """A secondary x axis: wall time since the first classified frame (interpolated between frames)."""
    elapsed = t_wall - t_wall[0]
    if len(index) < 2 or not np.all(np.diff(elapsed) >= 0) or elapsed[-1] <= 0:
        return
    unit, scale = _time_unit(float(elapsed[-1]))
    # strictly increasing copies, so both directions interpolate
    t = elapsed / scale + np.arange(len(elapsed)) * 1e-12
    top = ax.secondary_xaxis("top", functions=(lambda x: np.interp(np.asarray(x, float), index, t),
                                               lambda v: np.interp(np.asarray(v, float), t, index)))
    top.set_xlabel(f"wall time since the first frame ({unit})")


def plot_actions_per_episode(history: RunHistory, path: Path) -> Path:
    """Bars per episode (agent picks + random picks, stacked), outcome marked; and the length histogram."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    bars, hist = fig.subplots(1, 2, width_ratios=[2.2, 1])
    episodes = sorted(history.episodes.values(), key=lambda e: e.index)
    if not episodes:
        _empty(bars, "no conditioning episodes")
        _empty(hist, "")
        fig.suptitle(f"Conditioning actions per episode, run {history.run_id}")
        return _save(fig, path)
    x = np.arange(1, len(episodes) + 1)
    agent = np.array([e.agent_actions for e in episodes])
    random = np.array([e.random_actions for e in episodes])
    bars.bar(x, agent, color="#1f77b4", label="agent (greedy)")
    if random.any():
        bars.bar(x, random, bottom=agent, color="#aec7e8", label="random (exploration)")
    top = agent + random
    for outcome, marker, colour in ((SUCCEEDED, "*", VERDICT_COLOURS[GOOD]), (TRUNCATED, "x", VERDICT_COLOURS[BAD]),
                                    (OPEN, "o", "#7f7f7f")):
        chosen = np.array([e.outcome == outcome for e in episodes])
        if chosen.any():
            label = {SUCCEEDED: "ended: good probe", TRUNCATED: "ended: action cap reached", OPEN: "still open"}[outcome]
            bars.scatter(x[chosen], top[chosen] + max(top.max(), 1) * 0.03, marker=marker, c=colour, s=40,
                         label=label, zorder=4)
    bars.set_xlabel("episode")
    bars.set_ylabel("conditioning actions")
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_ylim(0, max(top.max(), 1) * 1.15)
    bars.set_xlim(0.4, max(len(episodes), 6) + 0.6)
    if len(episodes) <= 30:
        bars.set_xticks(x, [str(e.index) for e in episodes])
    bars.grid(True, axis="y", lw=0.3, alpha=0.5)
    bars.legend(fontsize=9, loc="best")
    ended = [e.actions for e in episodes if e.outcome == SUCCEEDED]
    truncated = [e.actions for e in episodes if e.outcome == TRUNCATED]
    width = max(1, math.ceil((top.max() - top.min() + 1) / 20))  # whole actions per bin
    edges = np.arange(top.min(), top.max() + width + 1, width) - 0.5
    if ended:
        hist.hist(ended, bins=edges, color=VERDICT_COLOURS[GOOD], alpha=0.8, label="succeeded")
    if truncated:
        hist.hist(truncated, bins=edges, color=VERDICT_COLOURS[BAD], alpha=0.6, label="truncated")
    if ended:
        hist.axvline(float(np.mean(ended)), color="black", ls="--", lw=1, label=f"mean (succeeded) {np.mean(ended):.1f}")
    hist.set_xlabel("actions per episode")
    hist.set_ylabel("episodes")
    middle, span = (edges[0] + edges[-1]) / 2, max(edges[-1] - edges[0] + 2 * width, 8)
    hist.set_xlim(max(-0.5, middle - span / 2), middle + span / 2)
    hist.xaxis.set_major_locator(MaxNLocator(integer=True))
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.grid(True, axis="y", lw=0.3, alpha=0.5)
    if ended or truncated:
        hist.legend(fontsize=9, loc="best")
    else:
        _empty(hist, "no episode has ended")
    fig.suptitle(f"Conditioning actions per episode, run {history.run_id}", fontsize=12)
    return _save(fig, path)


def _display_image(data_m: np.ndarray) -> np.ndarray:
    """Height minus its least-squares plane, in picometres (NaN lines of an incomplete scan kept as NaN)."""
    z = np.asarray(data_m, dtype=float)
    grid = np.indices(z.shape)
    rows, cols = grid[0], grid[1]
    ok = np.isfinite(z)
    if ok.sum() < 3:
        return np.full(z.shape, np.nan)
    design = np.column_stack([rows[ok], cols[ok], np.ones(ok.sum())])
    coef = np.linalg.lstsq(design, z[ok], rcond=None)[0]
    return (z - (coef[0] * rows + coef[1] * cols + coef[2])) * 1e12


def plot_frames_montage(history: RunHistory, run_dir: Path, path: Path, per_row: int = MONTAGE_FRAMES) -> Path:
    """The last `per_row` good and bad frames (plane removed, heights in pm), newest on the right."""
    good = [f for f in history.frames if f.good][-per_row:]
    bad = [f for f in history.frames if not f.good][-per_row:]
    fig = Figure(figsize=(2.0 * per_row + 0.8, 4.9), layout="constrained")
    axes = fig.subplots(2, per_row, squeeze=False)
    size_nm = _nm(history.regions[0].size_m) if history.regions else _nm(DEFAULT_FRAME_SIZE_M)
    for row, (label, chosen) in enumerate((("good probe", good), ("bad probe", bad))):
        for col in range(per_row):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"last {label}", fontsize=10)
            if col >= len(chosen):
                ax.set_frame_on(False)
                if col == 0:
                    ax.text(0.5, 0.5, f"no {label} frame", ha="center", va="center", transform=ax.transAxes,
                            color="#555555")
                continue
            f = chosen[col]
            try:
                image = _display_image(load_frame(run_dir, f.ref, verify=False))
            except JournalError:
                ax.text(0.5, 0.5, "frame file\nmissing", ha="center", va="center", transform=ax.transAxes)
                continue
            lo, hi = (np.nanpercentile(image, (1, 99)) if np.isfinite(image).any() else (0.0, 1.0))
            ax.imshow(image, cmap="afmhot", vmin=lo, vmax=max(hi, lo + 1e-3), origin="upper",
                      extent=(0, size_nm, 0, size_nm), interpolation="nearest")
            colour = VERDICT_COLOURS[GOOD] if f.good else VERDICT_COLOURS[BAD]
            ax.set_title(f"#{f.index}  p = {f.p_good:.2f}", fontsize=9, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
    fig.suptitle(f"Last frames of run {history.run_id}, p = p(good probe) ({size_nm:g} nm x {size_nm:g} nm, "
                 f"plane removed, colour range 1-99 % of each frame)", fontsize=11)
    return _save(fig, path)


def plot_line_by_line(history: RunHistory, run_dir: Path, path: Path, per_row: int = MONTAGE_FRAMES) -> Path:
    """Frames judged line by line: the latest early-aborted frames (the partial image when the scan was stopped)
    and frames whose judgement changed mid-scan, each above its p(good) against the number of lines scanned."""
    curves: list[LineCurve] = history.line_curves[-per_row:]
    fig = Figure(figsize=(2.2 * per_row + 0.8, 5.2), layout="constrained")
    axes = fig.subplots(2, per_row, squeeze=False, height_ratios=[1.2, 1])
    size_nm = _nm(history.regions[0].size_m) if history.regions else _nm(DEFAULT_FRAME_SIZE_M)
    for col in range(per_row):
        top, bottom = axes[0, col], axes[1, col]
        top.set_xticks([])
        top.set_yticks([])
        if col >= len(curves):
            top.set_frame_on(False)
            bottom.set_frame_on(False)
            bottom.set_xticks([])
            bottom.set_yticks([])
            continue
        c = curves[col]
        try:
            image = _display_image(load_frame(run_dir, c.frame, verify=False))
            lo, hi = (np.nanpercentile(image, (1, 99)) if np.isfinite(image).any() else (0.0, 1.0))
            top.imshow(image, cmap="afmhot", vmin=lo, vmax=max(hi, lo + 1e-3), origin="upper",
                       extent=(0, size_nm, 0, size_nm), interpolation="nearest")
        except JournalError:
            top.text(0.5, 0.5, "frame file\nmissing", ha="center", va="center", transform=top.transAxes)
        last = c.judgements[-1][0] if c.judgements else 0
        what = f"stopped at line {last}" if c.aborted else f"changed after line {c.changed_at_line}"
        top.set_title(f"seq {c.seq}: {what}", fontsize=9, color=VERDICT_COLOURS[BAD] if c.aborted else "#333333")
        lines = [n for n, _ in c.judgements]
        bottom.plot(lines, [p for _, p in c.judgements], "o-", color="#1f77b4", ms=4)
        bottom.axhline(history.threshold, color=VERDICT_COLOURS[GOOD], ls="--", lw=0.8)
        bottom.set_ylim(-0.03, 1.03)
        bottom.set_xlim(0, max(64, last))
        bottom.set_xlabel("lines scanned", fontsize=9)
        if col == 0:
            bottom.set_ylabel("p(good), line-window net", fontsize=9)
        bottom.grid(True, lw=0.3, alpha=0.5)
    if not curves:
        _empty(axes[0, 0], "no frame was stopped early\nor changed mid-scan")
    fig.suptitle(f"Line by line, run {history.run_id}: frames stopped early by a confident bad judgement, and tip "
                 f"changes during a scan (dashed: the good threshold)", fontsize=11)
    return _save(fig, path)


# -- the page ---------------------------------------------------------------------------------------------


PLOT_CAPTIONS = {
    LINES_PLOT: "Line by line: frames stopped early, and tip changes during a scan, with p(good) against lines scanned",
    INTERLEAVED_PLOT: "Interleaved evaluation: actions per ended episode of the agent and of uniform random choice",
    "approach_areas.png": "Approach areas: scanned regions by verdict, forbidden circles and action sites.",
    "p_good.png": "p(good) of every classified frame; conditioning episodes shaded.",
    "actions_per_episode.png": "Conditioning actions per episode (agent vs random picks) and their distribution.",
    "frames_montage.png": "The last good and bad frames with their p(good).",
}


def render_html(summary: ReportSummary, plots: list[str]) -> str:
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(summary))
    figures = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(PLOT_CAPTIONS.get(name, name))}">'
        f"<figcaption>{html.escape(PLOT_CAPTIONS.get(name, name))}</figcaption></figure>" for name in plots)
    title = f"deepspm run {html.escape(summary.run_id)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ text-align: left; padding: 0.25em 1em; border-bottom: 1px solid #ddd; }}
th {{ font-weight: normal; color: #555; }}
figure {{ margin: 0 0 2.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; }}
</style></head>
<body>
<h1>{title}</h1>
<table>
{rows}
</table>
{figures}
<p><small>summary.json holds these numbers; written by <code>deepspm report</code> from journal.jsonl.</small></p>
</body></html>
"""


def write_report(run_dir: Path, out_dir: Path) -> ReportSummary:
    """Read `run_dir`'s journal, write the plots, summary.json and index.html into `out_dir`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    history = read_history(run_dir)
    if history.torn_tail_bytes:
        warnings.warn(f"{run_dir}: incomplete last journal line ({history.torn_tail_bytes} bytes) left out",
                      TornJournalWarning, stacklevel=2)
    summary = summarise(history)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_approach_areas(history, out_dir / "approach_areas.png")
    plot_p_good(history, out_dir / "p_good.png")
    plot_actions_per_episode(history, out_dir / "actions_per_episode.png")
    plot_frames_montage(history, run_dir, out_dir / "frames_montage.png")
    plots = list(PLOT_FILES)
    if summary.interleaved is not None:
        plot_agent_vs_random(summary.interleaved, summary.run_id, out_dir / INTERLEAVED_PLOT)
        plots.append(INTERLEAVED_PLOT)
    if history.line_curves:
        plot_line_by_line(history, run_dir, out_dir / LINES_PLOT)
        plots.append(LINES_PLOT)
    data = {**dataclasses.asdict(summary), "recoveries": summary.recoveries, "plots": plots}
    (out_dir / "summary.json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "index.html").write_text(render_html(summary, plots), encoding="utf-8")
    return summary
