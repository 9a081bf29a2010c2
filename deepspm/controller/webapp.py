"""`deepspm serve`: a live web page for runs, and a labelling page, on aiohttp.

    deepspm serve [RUN_DIR ...] [--port P] [--host H]     the run page(s)
    deepspm serve --label DATASET_OR_RUN_DIR [--order uncertainty|time]   the labelling page

A separate process that only reads the run directory (the journal, incrementally, through the journal's one
typed fold, as `deepspm status` does; frames from RUN_DIR/frames), so it can never slow or block the run. Its
only writes to a run directory are the operator's files: Pause creates RUN_DIR/PAUSE, Resume removes it, Stop
creates RUN_DIR/STOP (controller/runcontrol.py); the run journals each as an operator request (source
"stop_file") at its next safe point, exactly as when a person creates the files.

Updates are pushed as server-sent events: one poller task per run reads what the journal gained every
POLL_S seconds and wakes the open pages. The plots are the report's (controller/report.py), drawn in a worker
thread only when a page asks for one and only when what they show has changed.

Security: binds 127.0.0.1 unless --host says otherwise. A random token is printed at start in the URL; every
write (pause, resume, stop, a label) needs it, and so does every request when bound to a non-loopback
address; a request carrying a wrong token is refused (403). Nothing outside the served directories can be
read: frames are addressed by their content hash (hex, checked) or by an index into the list made at start,
and a resolved path (symlinks followed) must stay inside its folder. Bad requests get a 4xx with a one-line
text, never a traceback.

Labelling: one frame at a time, large, with its neighbours; keys g (good), b (bad), s or Space (skip), u or
Backspace (undo), arrows to move. Labels go to DIR/labels.csv (`file,class`, written atomically: temp file and
rename), the format `deepspm dataset import --labels` reads (for a run, `file` is the judged frame's .sxm in
RUN_DIR/sxm), and each labelled frame is also kept as DIR/labelled/{good,bad}/NAME.npy, the folder layout
`deepspm train classifier --data DIR/labelled` reads directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hmac
import html
import io
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from deepspm.controller import report
from deepspm.controller.commands import StartScan
from deepspm.controller.documents import Classification, LineJudgement
from deepspm.controller.journal import FRAMES_DIR, JOURNAL_FILE, JournalError, scan_journal
from deepspm.controller.runcontrol import PAUSE_FILE, STOP_FILE
from deepspm.controller.runfold import BAD, DEFAULT_THRESHOLD, GOOD, History, RunFold, fold_records
from deepspm.controller.status import JournalFollower, format_duration, format_wall
from deepspm.controller.validate import ArgumentProblem
from deepspm.io.atomic import write_atomic

log = logging.getLogger("deepspm.serve")

POLL_S = 0.5  # journal poll period of the live page (the page shows a new frame within this plus a render)
KEEPALIVE_S = 15.0
SERVER_NICE = 10  # serve lowers its own priority by this: on a shared instrument PC the run has the CPU first
SHUTDOWN_S = 1.0  # open event streams are cut this long after a stop was asked
NEWEST_FRAMES = 8
PLOT_NAMES = {"approach_areas": report.plot_approach_areas, "p_good": report.plot_p_good,
              "actions_per_episode": report.plot_actions_per_episode}
FRAME_PNG_CACHE = 256
TOKEN_PARAM = "token"
TOKEN_HEADER = "X-Deepspm-Token"
LABELS_CSV = "labels.csv"
LABELLED_DIR = "labelled"
CLASSES = ("good", "bad")
_HEX = re.compile(r"^[0-9a-f]{8,128}$")


class ServeError(ArgumentProblem):
    """`deepspm serve` cannot start as asked (one line, exit 2)."""


class RequestProblem(Exception):
    """A bad request: answered with `status` and the message, never a traceback."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- security -----------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def inside(folder: Path, path: Path) -> Path:
    """`path` resolved (symlinks followed); RequestProblem 404 unless it is a file inside `folder`."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RequestProblem(404, "no such file") from None
    if not resolved.is_relative_to(folder.resolve()) or not resolved.is_file():
        raise RequestProblem(404, "no such file")
    return resolved


def _token_given(request: web.Request) -> str | None:
    return request.query.get(TOKEN_PARAM) or request.headers.get(TOKEN_HEADER)


@web.middleware
async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    """The token rules, and every error as a short 4xx/5xx text (no traceback reaches a client)."""
    token: str = request.app[TOKEN_KEY]
    given = _token_given(request)
    needed = request.method not in ("GET", "HEAD") or not request.app[LOOPBACK_KEY]
    if (given is not None or needed) and not (given is not None and hmac.compare_digest(given, token)):
        what = "a wrong token" if given is not None else "no token"
        return web.Response(status=403, text=f"refused: {what} (use the URL that deepspm serve printed)\n")
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400:
            return web.Response(status=e.status, text=f"{e.reason}\n")
        raise
    except RequestProblem as e:
        return web.Response(status=e.status, text=f"{e}\n")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("internal error answering %s %s", request.method, request.path)
        return web.Response(status=500, text="internal error (details in the server's log)\n")


# -- images ----------------------------------------------------------------------------------------------------


def frame_png(array: np.ndarray) -> bytes:
    """A frame as a PNG: plane removed, colour range 1-99 % (the report's display), afmhot, row 0 at the
    bottom as the report draws it."""
    from matplotlib import colormaps
    from PIL import Image

    image = report._display_image(np.asarray(array, dtype=float))
    finite = np.isfinite(image)
    lo, hi = np.nanpercentile(image, (1, 99)) if finite.any() else (0.0, 1.0)
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / max(hi - lo, 1e-3), 0, 1)
    rgba = (colormaps["afmhot"](scaled[::-1]) * 255).astype(np.uint8)
    rgba[..., :3][~finite[::-1]] = (40, 40, 60)
    out = io.BytesIO()
    Image.fromarray(rgba[..., :3], "RGB").save(out, format="PNG")
    return out.getvalue()


class PngCache:
    """A small LRU of rendered frames (by content hash: a frame never changes)."""

    def __init__(self, size: int = FRAME_PNG_CACHE) -> None:
        self.size = size
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = make()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return data


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        raise RequestProblem(404, "not a readable frame") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise RequestProblem(404, "not a 2-D frame")
    return array


# -- the live run ------------------------------------------------------------------------------------------------


@dataclass
class LiveFold(RunFold):
    """The fold with history (the plots), the wall time of the last transition (time in the state), and the
    line-window judgements of the newest frames (p(good) after each checked line count while it was scanned)."""

    state_since: float | None = None
    lines_of: OrderedDict[str, list[tuple[int, float]]] = field(default_factory=OrderedDict)  # by frame ref
    _scan_lines: list[tuple[int, float]] = field(default_factory=list)  # of the scan under way

    def add_entry(self, e: Any) -> None:
        super().add_entry(e)
        doc = e.doc
        if isinstance(doc, LineJudgement):
            self._scan_lines.append((doc.lines, doc.p_good))
        elif isinstance(doc, StartScan) and doc.purpose == "frame":  # a new frame: its own judgements follow
            self._scan_lines = []
        elif isinstance(doc, Classification):
            self.lines_of[doc.frame] = self._scan_lines
            self._scan_lines = []
            while len(self.lines_of) > 4 * NEWEST_FRAMES:
                self.lines_of.popitem(last=False)

    def _transition(self, e: Any, t: Any) -> None:
        super()._transition(e, t)
        self.state_since = e.t_wall


class LiveFollower(JournalFollower):
    """`status`'s incremental reader, folding with history for the page's plots and frames."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self.status = LiveFold.new(self.path.parent.name, history=True)


@dataclass
class LiveRun:
    """One served run directory: its follower, the snapshot pages get, and the plot cache."""

    index: int
    run_dir: Path
    follower: LiveFollower
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0
    snapshot: dict[str, Any] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    plot_cache: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    closing: bool = False  # the server is stopping: event streams end

    def poll(self, now: float) -> bool:
        """Read what the journal gained; True when the page's view changed (runs in a worker thread)."""
        with self.lock:
            before = (self.follower.status.records, self.follower.exists, self.controls())
            self.follower.poll()
            after = (self.follower.status.records, self.follower.exists, self.controls())
            if after == before and self.snapshot:
                return False
            self.snapshot = self._snapshot(now)
            return True

    def controls(self) -> dict[str, bool]:
        return {"paused": (self.run_dir / PAUSE_FILE).exists(), "stop_pending": (self.run_dir / STOP_FILE).exists()}

    def plot_version(self) -> int:
        s = self.follower.status
        return hash((s.frames_classified, s.frames_recorded, s.bad_samples, s.actions, s.reset_actions, s.moves,
                     s.episodes_started, s.episodes_ended, s.discarded_contact_lost, s.discarded_crashed))

    def _snapshot(self, now: float) -> dict[str, Any]:
        s = self.follower.status
        assert isinstance(s, LiveFold)
        h = s.history or History()
        lines_of = s.lines_of
        frames = [{"index": f.index, "ref": f.ref, "p_good": f.p_good if math.isfinite(f.p_good) else None,
                   "verdict": GOOD if f.good else BAD, "seq": f.seq, "t_wall": f.t_wall,
                   "lines": [[n, p if math.isfinite(p) else None] for n, p in lines_of.get(f.ref, [])]}
                  for f in h.frames[-NEWEST_FRAMES:]][::-1]
        overview: list[tuple[str, str]] = []
        if not self.follower.exists:
            overview.append(("journal", "not written yet"))
        else:
            since = f" for {format_duration(now - s.state_since)}" if s.state_since and not s.stopped else ""
            overview.append(("state", f"{s.state}{since}"))
            if s.first_wall is not None:
                overview.append(("started", format_wall(s.first_wall)))
            budget = f" of {s.budget_hours:g} h" if s.budget_hours else ""
            overview.append(("run time", f"{format_duration(s.time_spent_s)}{budget}"
                             + (" (simulated clock)" if s.simulated else "")))
            good = f" ({s.good_frames / s.frames_classified:.1%} good)" if s.frames_classified else ""
            overview.append(("frames", f"{s.frames_recorded} recorded, {s.frames_classified} classified{good}, "
                                       f"{s.bad_samples} bad sample"))
            overview.append(("probe", f"bad-probe counter {s.bad_probe_count}/{s.bad_probe_threshold}"
                             + (f", episode {s.episode.index}: {s.episode_actions} actions"
                                if s.in_episode and s.episode is not None else "")))
            rec = s.recoveries
            overview.append(("counters", f"episodes {s.episodes_started}, actions {s.actions}, moves {s.moves}, "
                                         f"recoveries {rec['contact'] + rec['crash']}, failures {s.failures}, "
                                         f"resumes {s.resumes}"))
            for label, item in (("last error", s.last_failure), ("operator", s.last_operator),
                                ("last note", s.last_note)):
                if item is not None:
                    overview.append((label, f"{item[1]} ({format_wall(item[0])})"))
            if s.stop is not None:
                overview.append(("stopped", f"{s.stop.status}: {s.stop.reason}"))
        if self.follower.bad_lines:
            overview.append(("warning", f"{self.follower.bad_lines} unsound journal lines "
                                        f"(first: {self.follower.first_problem})"))
        episodes = [{"index": e.index, "actions": e.actions, "outcome": e.outcome}
                    for e in sorted(h.episodes.values(), key=lambda e: e.index)][-20:]
        return {"run": s.run_id, "index": self.index, "records": s.records, "last_seq": s.last_seq,
                "running": self.follower.exists and not s.stopped, "state": s.state, "overview": overview,
                "frames": frames, "episodes": episodes, "plots": self.plot_version(), **self.controls()}

    def plot(self, name: str) -> bytes:
        """A report plot of the run as it is now (worker thread; cached until what it shows changes)."""
        with self.lock:
            version = self.plot_version()
            cached = self.plot_cache.get(name)
            if cached is not None and cached[0] == version:
                return cached[1]
            fold = self.follower.status
            h = fold.history or History()
            history = report.RunHistory(fold, h.regions, h.frames, h.actions, h.episodes, h.move_after_frame)
            with tempfile.TemporaryDirectory(prefix="deepspm-serve-") as tmp:
                path = Path(tmp) / f"{name}.png"
                PLOT_NAMES[name](history, path)
                data = path.read_bytes()
            self.plot_cache[name] = (version, data)
            return data


async def _poller(app: web.Application, run: LiveRun) -> None:
    while True:
        try:
            if await asyncio.to_thread(run.poll, time.time()):
                run.version += 1
                run.changed.set()
                run.changed = asyncio.Event()
        except Exception:  # the view of a run must survive anything; say so in the log
            log.exception("polling %s", run.run_dir)
        await asyncio.sleep(app[POLL_KEY])


def _run_of(request: web.Request) -> LiveRun:
    runs: list[LiveRun] = request.app[RUNS_KEY]
    try:
        index = int(request.match_info["run"])
        return runs[index]
    except (ValueError, IndexError):
        raise RequestProblem(404, "no such run") from None


async def runs_index(request: web.Request) -> web.StreamResponse:
    runs: list[LiveRun] = request.app[RUNS_KEY]
    if len(runs) == 1:
        raise web.HTTPFound(_with_token(request, "/run/0"))
    items = "\n".join(f'<li><a href="{html.escape(_with_token(request, f"/run/{r.index}"))}">'
                      f"{html.escape(r.run_dir.name)}</a> ({html.escape(str(r.run_dir))})</li>" for r in runs)
    return web.Response(text=f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>deepspm runs</title></head>"
                             f"<body><h1>deepspm runs</h1><ul>{items}</ul></body></html>", content_type="text/html")


def _with_token(request: web.Request, path: str) -> str:
    given = _token_given(request)
    return f"{path}?{TOKEN_PARAM}={given}" if given else path


async def run_page(request: web.Request) -> web.StreamResponse:
    run = _run_of(request)
    page = RUN_PAGE.replace("__TITLE__", html.escape(f"deepspm run {run.run_dir.name}")).replace(
        "__RUN__", str(run.index))
    return web.Response(text=page, content_type="text/html")


async def run_state(request: web.Request) -> web.StreamResponse:
    run = _run_of(request)
    return web.json_response(run.snapshot)


async def run_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the run's snapshot now and after every change."""
    run = _run_of(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sent = -1
    try:
        while not run.closing:
            if run.version != sent and run.snapshot:
                sent = run.version
                await response.write(f"data: {json.dumps(run.snapshot, allow_nan=False)}\n\n".encode())
            waiter = run.changed
            try:
                await asyncio.wait_for(waiter.wait(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
    except (ConnectionResetError, ConnectionError):
        pass
    return response


async def run_frame(request: web.Request) -> web.StreamResponse:
    run = _run_of(request)
    ref = request.match_info["ref"]
    if not _HEX.match(ref):
        raise RequestProblem(404, "not a frame reference")
    path = inside(run.run_dir / FRAMES_DIR, run.run_dir / FRAMES_DIR / f"{ref}.npy")
    cache: PngCache = request.app[PNG_KEY]
    data = await asyncio.to_thread(cache.get, f"{run.index}/{ref}", lambda: frame_png(_load_npy(path)))
    return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "max-age=86400"})


async def run_plot(request: web.Request) -> web.StreamResponse:
    run = _run_of(request)
    name = request.match_info["name"]
    if name not in PLOT_NAMES:
        raise RequestProblem(404, f"no plot {name!r} (plots: {', '.join(PLOT_NAMES)})")
    data = await asyncio.to_thread(run.plot, name)
    return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "no-store"})


async def run_control(request: web.Request) -> web.StreamResponse:
    """Pause, resume or stop through the run's PAUSE and STOP files (the run journals each request)."""
    run = _run_of(request)
    action = request.match_info["action"]
    if not run.snapshot.get("running"):
        raise RequestProblem(409, "the run is not running")
    who = request.remote or "?"
    if action == "pause":
        write_atomic(run.run_dir / PAUSE_FILE, f"paused from the web page ({who})\n".encode())
    elif action == "resume":
        with contextlib.suppress(FileNotFoundError):
            (run.run_dir / PAUSE_FILE).unlink()
    elif action == "stop":
        write_atomic(run.run_dir / STOP_FILE, f"stop from the web page ({who})\n".encode())
    else:
        raise RequestProblem(404, f"no action {action!r} (pause, resume, stop)")
    return web.json_response({"ok": True, "action": action, **run.controls()})


# -- labelling ---------------------------------------------------------------------------------------------------


@dataclass
class LabelItem:
    """A frame to label: `file` is its name in labels.csv, `stem` its name under labelled/."""

    path: Path  # the .npy
    file: str
    stem: str
    p_good: float | None
    t_wall: float | None
    hint: str = ""  # what the source says (a run's verdict, an imported set's folder)


class LabelSet:
    """The frames of a run or an imported set, the labels so far, and their atomic writes."""

    def __init__(self, root: Path, items: list[LabelItem], threshold: float, order: str) -> None:
        self.root = root
        self.threshold = threshold
        self.order_used = order
        if order == "uncertainty" and any(i.p_good is None for i in items):
            self.order_used = "time"  # no p(good) for every frame: say so on the page
        if self.order_used == "uncertainty":
            items = sorted(items, key=lambda i: (abs((i.p_good or 0.0) - threshold), i.t_wall or 0.0))
        else:
            items = sorted(items, key=lambda i: (i.t_wall is None, i.t_wall or 0.0, i.file))
        self.items = items
        self.labels: dict[str, str] = {}
        self.lock = threading.Lock()
        csv_path = root / LABELS_CSV
        if csv_path.exists():
            from deepspm.controller.labdata import read_labels

            known = {i.file for i in items}
            self.labels = {k: v for k, v in read_labels(csv_path).items() if v in CLASSES and k in known}

    @property
    def csv_path(self) -> Path:
        return self.root / LABELS_CSV

    def describe(self) -> dict[str, Any]:
        return {"root": self.root.name, "order": self.order_used, "threshold": self.threshold,
                "classes": list(CLASSES), "labelled": len(self.labels),
                "items": [{"id": n, "file": i.file, "p_good": i.p_good, "hint": i.hint,
                           "label": self.labels.get(i.file)} for n, i in enumerate(self.items)]}

    def set_label(self, index: int, cls: str | None) -> dict[str, Any]:
        if not 0 <= index < len(self.items):
            raise RequestProblem(404, "no such frame")
        if cls is not None and cls not in CLASSES:
            raise RequestProblem(400, f"class must be one of {', '.join(CLASSES)} or null")
        item = self.items[index]
        with self.lock:
            if cls is None:
                self.labels.pop(item.file, None)
            else:
                self.labels[item.file] = cls
            self._write_csv()
            self._write_folders(item, cls)
            return {"id": index, "label": cls, "labelled": len(self.labels), "total": len(self.items)}

    def _write_csv(self) -> None:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["file", "class"])
        for item in self.items:
            if item.file in self.labels:
                writer.writerow([item.file, self.labels[item.file]])
        write_atomic(self.csv_path, out.getvalue().encode())

    def _write_folders(self, item: LabelItem, cls: str | None) -> None:
        for name in CLASSES:
            target = self.root / LABELLED_DIR / name / f"{item.stem}.npy"
            if name == cls:
                target.parent.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                np.save(buffer, _load_npy(item.path), allow_pickle=False)
                write_atomic(target, buffer.getvalue())
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()


def run_label_items(run_dir: Path) -> tuple[list[LabelItem], float]:
    """Every classified frame of a run, with its p(good) and .sxm file (labels.csv names the .sxm)."""
    contents = scan_journal(run_dir)
    fold: RunFold = fold_records(contents.records, run_dir.name, replay=True)
    items: list[LabelItem] = []
    seen: set[str] = set()
    assert fold.relived is not None
    for entry in fold.relived.decisions:
        doc = entry.doc
        if not isinstance(doc, Classification) or doc.frame in seen:
            continue
        seen.add(doc.frame)
        path = run_dir / FRAMES_DIR / f"{doc.frame}.npy"
        if not path.is_file():
            continue
        sxm = Path(doc.sxm).name if doc.sxm else None
        file = sxm if sxm else f"{FRAMES_DIR}/{doc.frame}.npy"
        stem = Path(sxm).stem if sxm else doc.frame
        p = doc.p_good if math.isfinite(doc.p_good) else None
        items.append(LabelItem(path, file, stem, p, entry.t_wall, "classifier: " + ("good" if doc.good else "bad")))
    return items, fold.threshold


def dataset_label_items(root: Path) -> list[LabelItem]:
    """The frames of an imported set (manifest.csv: good/, bad/, unlabelled/ .npy and their .sxm sources)."""
    from deepspm.controller.labdata import MANIFEST

    items: list[LabelItem] = []
    manifest = root / MANIFEST
    if manifest.is_file():
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f):
                relative = row.get("file") or ""
                path = root / relative
                if not relative or not path.is_file() or not path.resolve().is_relative_to(root.resolve()):
                    continue
                source = row.get("source") or ""
                t = _iso_time(row.get("recorded") or "")
                items.append(LabelItem(path, Path(source).name if source else relative, path.stem, None, t,
                                       f"imported as: {row.get('label') or '?'}"))
        return items
    for folder in ("good", "bad", "unlabelled"):
        for path in sorted((root / folder).glob("*.npy")):
            items.append(LabelItem(path, f"{folder}/{path.name}", path.stem, None, None, f"folder: {folder}"))
    return items


def _iso_time(text: str) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def score_items(items: list[LabelItem], classifier: str) -> None:
    """p(good) of every frame without one, by `classifier` ("shipped" or a checkpoint directory), preprocessed as
    `train classifier` reads a folder set (the run loop's RANSAC plane, seeded by the file's name). Loads JAX."""
    from deepspm.controller.seeds import derived_seed
    from deepspm.controller.session import checkpoint_path
    from deepspm.controller.training import normalise_frames
    from deepspm.nets.checkpoints import load_net
    from deepspm.nets.data import LEVELLED_SUFFIX, halve_to
    from deepspm.nets.inference import Predictor

    todo = [i for i in items if i.p_good is None]
    if not todo:
        return
    try:
        ckpt = load_net(checkpoint_path(classifier, "classifier"), expect_kind="classifier")
    except FileNotFoundError as e:
        raise ServeError("--classifier", str(e)) from None
    side = ckpt.net.spec.image_side_px
    frames, keep = [], []
    for item in todo:
        array = np.load(item.path, allow_pickle=False)
        if array.ndim == 2 and array.shape[0] == array.shape[1] and array.shape[0] % side == 0:
            frames.append(halve_to(array.astype(np.float64), side).astype(np.float32))
            keep.append(item)
    if not frames:
        return
    levelled = np.array([i.path.name.endswith(LEVELLED_SUFFIX) for i in keep])
    seeds = [derived_seed(0, f"{i.path.parent.name}/{i.path.name}") for i in keep]
    images = normalise_frames(np.stack(frames), levelled, seeds, workers=1, progress=False)
    scores = Predictor(ckpt.net, ckpt.variables, "probability").predict_batched(images)
    for item, p in zip(keep, np.asarray(scores, dtype=float).reshape(len(keep), -1)[:, 0]):
        item.p_good = float(p)


def open_label_set(source: Path, order: str, classifier: str = "shipped") -> LabelSet:
    if not source.is_dir():
        raise ServeError("--label", f"{source} is not a folder (a run directory or an imported data set)")
    if (source / JOURNAL_FILE).is_file():
        try:
            items, threshold = run_label_items(source)
        except JournalError as e:
            raise ServeError("--label", f"{source}: {e}") from None
    else:
        items, threshold = dataset_label_items(source), DEFAULT_THRESHOLD
        if order == "uncertainty" and classifier != "none" and items:
            score_items(items, classifier)
    if not items:
        raise ServeError("--label", f"{source}: no frames to label (a run directory with classified frames, or a "
                                    "data set from 'deepspm dataset import')")
    return LabelSet(source, items, threshold, order)


async def label_page(request: web.Request) -> web.StreamResponse:
    labels: LabelSet = request.app[LABELS_KEY]
    page = LABEL_PAGE.replace("__TITLE__", html.escape(f"deepspm labelling: {labels.root.name}"))
    return web.Response(text=page, content_type="text/html")


async def label_items(request: web.Request) -> web.StreamResponse:
    labels: LabelSet = request.app[LABELS_KEY]
    return web.json_response(labels.describe())


async def label_image(request: web.Request) -> web.StreamResponse:
    labels: LabelSet = request.app[LABELS_KEY]
    try:
        index = int(request.match_info["item"])
        item = labels.items[index]
    except (ValueError, IndexError):
        raise RequestProblem(404, "no such frame") from None
    path = inside(labels.root, item.path)
    cache: PngCache = request.app[PNG_KEY]
    data = await asyncio.to_thread(cache.get, f"label/{index}", lambda: frame_png(_load_npy(path)))
    return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "max-age=86400"})


async def label_set(request: web.Request) -> web.StreamResponse:
    labels: LabelSet = request.app[LABELS_KEY]
    try:
        body = await request.json()
        index, cls = body["id"], body.get("class")
        if not isinstance(index, int) or isinstance(index, bool) or not (cls is None or isinstance(cls, str)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RequestProblem(400, 'the body must be JSON {"id": N, "class": "good"|"bad"|null}') from None
    return web.json_response(await asyncio.to_thread(labels.set_label, index, cls))


# -- the app -----------------------------------------------------------------------------------------------------

TOKEN_KEY = web.AppKey("token", str)
LOOPBACK_KEY = web.AppKey("loopback", bool)
RUNS_KEY = web.AppKey("runs", list)
LABELS_KEY = web.AppKey("labels", LabelSet)
PNG_KEY = web.AppKey("png", PngCache)
POLL_KEY = web.AppKey("poll", float)
TASKS_KEY = web.AppKey("tasks", list)


def build_app(run_dirs: Sequence[Path] = (), *, label: Path | None = None, token: str | None = None,
              loopback: bool = True, order: str = "uncertainty", classifier: str = "shipped",
              poll_s: float = POLL_S) -> web.Application:
    """The web app: the run pages of `run_dirs`, or the labelling page of `label`."""
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[TOKEN_KEY] = token or secrets.token_urlsafe(18)
    app[LOOPBACK_KEY] = loopback
    app[PNG_KEY] = PngCache()
    app[POLL_KEY] = poll_s
    if label is not None:
        app[LABELS_KEY] = open_label_set(Path(label), order, classifier)
        app.router.add_get("/", label_page)
        app.router.add_get("/label/items", label_items)
        app.router.add_get(r"/label/image/{item:\d+}.png", label_image)
        app.router.add_post("/label/set", label_set)
        return app
    runs = [LiveRun(n, Path(d), LiveFollower(Path(d))) for n, d in enumerate(run_dirs)]
    for run in runs:  # the first view at once, so a page never starts empty
        run.poll(time.time())
    app[RUNS_KEY] = runs
    app.router.add_get("/", runs_index)
    app.router.add_get(r"/run/{run:\d+}", run_page)
    app.router.add_get(r"/run/{run:\d+}/state", run_state)
    app.router.add_get(r"/run/{run:\d+}/events", run_events)
    app.router.add_get(r"/run/{run:\d+}/frame/{ref}.png", run_frame)
    app.router.add_get(r"/run/{run:\d+}/plot/{name}.png", run_plot)
    app.router.add_post(r"/run/{run:\d+}/{action}", run_control)

    async def start_pollers(app: web.Application) -> None:
        app[TASKS_KEY] = [asyncio.create_task(_poller(app, run)) for run in runs]

    async def stop_pollers(app: web.Application) -> None:
        for task in app[TASKS_KEY]:
            task.cancel()
        await asyncio.gather(*app[TASKS_KEY], return_exceptions=True)

    async def end_streams(app: web.Application) -> None:
        for run in runs:
            run.closing = True
            run.changed.set()

    app.on_startup.append(start_pollers)
    app.on_shutdown.append(end_streams)
    app.on_cleanup.append(stop_pollers)
    return app


def check_run_dirs(run_dirs: Sequence[Path]) -> list[Path]:
    if not run_dirs:
        base = Path("runs")
        run_dirs = sorted(p for p in base.iterdir() if (p / JOURNAL_FILE).is_file()) if base.is_dir() else []
        if not run_dirs:
            raise ServeError("RUN_DIR", "no run directories given, and none with a journal under ./runs")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise ServeError("RUN_DIR", f"{d} is not a folder")
    return [Path(d) for d in run_dirs]


def url_of(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?{TOKEN_PARAM}={token}"


async def serve(app: web.Application, host: str, port: int, *, ready: Callable[[str], None] | None = None,
                until: asyncio.Event | None = None) -> None:
    """Serve until cancelled, `until` is set, or SIGINT/SIGTERM; `ready(url)` once listening (the URL holds the
    token). Open event streams are closed within SHUTDOWN_S."""
    loop = asyncio.get_running_loop()
    if until is None:
        until = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # no loop signal handlers here
                loop.add_signal_handler(sig, until.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise ServeError("--port", f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        bound = int(runner.addresses[0][1]) if runner.addresses else port  # --port 0: the one picked
        url = url_of(host, bound, app[TOKEN_KEY])
        (ready or print)(url)
        await until.wait()
    finally:
        await runner.cleanup()


def serve_command(run_dirs: Sequence[Path], *, label: Path | None, host: str, port: int, order: str,
                  classifier: str = "shipped") -> int:
    """`deepspm serve`: prints the URL (with the token) and serves until Ctrl-C."""
    loopback = is_loopback(host)
    with contextlib.suppress(OSError, AttributeError):  # POSIX: the run comes first for the CPU
        os.nice(SERVER_NICE)
    if label is not None and run_dirs:
        raise ServeError("--label", "serves one labelling page; give no RUN_DIR with it")
    app = build_app(check_run_dirs(run_dirs) if label is None else (), label=label, loopback=loopback, order=order,
                    classifier=classifier)

    def ready(url: str) -> None:
        what = f"labelling {label}" if label is not None else f"{len(app[RUNS_KEY])} run(s)"
        note = "" if loopback else " (not loopback: every page needs the token)"
        print(f"deepspm serve: {what}{note}, Ctrl-C to stop: {url}", flush=True)

    try:
        asyncio.run(serve(app, host, port, ready=ready))
    except KeyboardInterrupt:
        pass
    return 0


# -- the pages (no external resources) -----------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0.2em 0 0.6em; }
table { border-collapse: collapse; } th, td { text-align: left; padding: 0.15em 0.8em; border-bottom: 1px solid #ddd; }
th { font-weight: normal; color: #555; }
button { font-size: 1em; padding: 0.35em 1.1em; margin-right: 0.5em; border-radius: 4px; border: 1px solid #888; }
.frame { display: inline-block; margin: 0 0.6em 0.6em 0; text-align: center; font-size: 0.85em; vertical-align: top;
  max-width: 150px; } .lines { color: #666; font-size: 0.85em; }
.frame img { width: 128px; height: 128px; image-rendering: pixelated; border: 3px solid #ccc; display: block; }
.good img { border-color: #2ca02c; } .bad img { border-color: #d62728; }
.plots img { max-width: 100%; display: block; margin-bottom: 1em; }
#error { color: #b00; }
"""

RUN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title><style>""" + _STYLE + """</style></head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="controls"><button id="pause">Pause</button><button id="resume">Resume</button>
<button id="stop">Stop</button> <span id="control-state"></span> <span id="error"></span></div>
<h2>Run</h2><table id="overview"></table>
<h2>Newest frames</h2><div id="frames"></div>
<h2>Episodes</h2><div id="episodes"></div>
<div class="plots"><h2>p(good) over time</h2><img id="plot-p_good" alt="p(good) over time">
<h2>Actions per episode</h2><img id="plot-actions_per_episode" alt="actions per episode">
<h2>Approach areas</h2><img id="plot-approach_areas" alt="approach-area map"></div>
<script>
"use strict";
const RUN = __RUN__;
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
const base = "/run/" + RUN;
let lastPlots = null, lastPlotTime = 0, pendingPlots = null;
function esc(s) { const d = document.createElement("div"); d.textContent = String(s); return d.innerHTML; }
function refreshPlots(version) {
  lastPlots = version; lastPlotTime = Date.now();
  for (const name of ["p_good", "actions_per_episode", "approach_areas"]) {
    document.getElementById("plot-" + name).src = base + "/plot/" + name + ".png" + (q ? q + "&" : "?") + "v=" + version;
  }
}
function show(s) {
  document.getElementById("overview").innerHTML = s.overview.map(
    ([k, v]) => "<tr><th>" + esc(k) + "</th><td>" + esc(v) + "</td></tr>").join("");
  document.getElementById("frames").innerHTML = s.frames.map(f =>
    '<div class="frame ' + (f.verdict === "good probe" ? "good" : "bad") + '" data-ref="' + esc(f.ref) +
    '" data-seq="' + f.seq + '"><img src="' + base + "/frame/" + esc(f.ref) + ".png" + q + '" alt="frame ' + f.index +
    '"><span>#' + f.index + " " + esc(f.verdict) + (f.p_good === null ? "" : " p=" + f.p_good.toFixed(3)) +
    "</span>" + (f.lines.length ? '<br><span class="lines" title="line-window p(good) while scanned">lines ' +
    f.lines.map(([n, p]) => n + ": " + (p === null ? "?" : p.toFixed(2))).join(", ") + "</span>" : "") +
    "</div>").join("") || "no classified frame yet";
  document.getElementById("episodes").textContent = s.episodes.length ? s.episodes.map(
    e => "#" + e.index + ": " + e.actions + " actions (" + e.outcome + ")").join(", ") : "none yet";
  document.getElementById("control-state").textContent = !s.running ? "the run is not running" :
    s.stop_pending ? "stop requested: the run stops at its next safe point" : s.paused ? "paused" : "running";
  for (const id of ["pause", "resume", "stop"]) document.getElementById(id).disabled = !s.running;
  document.getElementById("pause").style.display = s.paused ? "none" : "";
  document.getElementById("resume").style.display = s.paused ? "" : "none";
  document.body.dataset.records = s.records;
  document.body.dataset.state = s.state;
  if (s.plots !== lastPlots) {  // redraw at most every 10 s (plots are drawn by the server)
    const wait = 10000 - (Date.now() - lastPlotTime);
    if (wait <= 0) refreshPlots(s.plots);
    else { clearTimeout(pendingPlots); pendingPlots = setTimeout(() => refreshPlots(s.plots), wait); }
  }
}
async function control(action) {
  const r = await fetch(base + "/" + action + q, {method: "POST"});
  document.getElementById("error").textContent = r.ok ? "" : await r.text();
}
for (const a of ["pause", "resume", "stop"]) document.getElementById(a).onclick = () => control(a);
const events = new EventSource(base + "/events" + q);
events.onmessage = m => show(JSON.parse(m.data));
</script></body></html>
"""

LABEL_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title><style>""" + _STYLE + """
#current img { width: 448px; height: 448px; image-rendering: pixelated; border: 4px solid #ccc; }
#current.good img { border-color: #2ca02c; } #current.bad img { border-color: #d62728; }
.neighbour img { width: 112px; height: 112px; opacity: 0.8; }
.keys span { display: inline-block; border: 1px solid #888; border-radius: 4px; padding: 0.1em 0.5em; margin: 0 0.2em;
  background: #fff; font-family: monospace; }
#strip { display: flex; align-items: center; gap: 1em; } #before, #after { display: flex; gap: 0.5em; }
</style></head>
<body>
<h1>__TITLE__</h1>
<p class="keys"><span>g</span> good probe &nbsp; <span>b</span> bad probe &nbsp; <span>s</span>/<span>Space</span> skip
&nbsp; <span>u</span>/<span>Backspace</span> undo &nbsp; <span>&larr;</span><span>&rarr;</span> move</p>
<p id="progress"></p>
<div id="strip"><div id="before"></div><div id="current" class="frame"><img alt="frame"><div id="caption"></div></div>
<div id="after"></div></div>
<p id="order"></p><p id="error"></p>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
let items = [], pos = 0, undo = [], total = 0, labelled = 0;
function esc(s) { const d = document.createElement("div"); d.textContent = String(s); return d.innerHTML; }
function img(i) { return "/label/image/" + items[i].id + ".png" + q; }
function neighbour(i) {
  return '<div class="frame neighbour ' + (items[i].label || "") + '"><img src="' + img(i) + '" alt="neighbour"><br>' +
    (items[i].label || "&nbsp;") + "</div>";
}
function render() {
  const it = items[pos];
  document.getElementById("progress").textContent = "labelled " + labelled + " of " + total +
    (it ? "; frame " + (pos + 1) + " of " + total : "; all frames seen");
  const cur = document.getElementById("current");
  if (!it) { cur.style.display = "none"; return; }
  cur.style.display = ""; cur.className = "frame " + (it.label || ""); cur.dataset.id = it.id;
  cur.querySelector("img").src = img(pos);
  document.getElementById("caption").textContent = it.file + (it.p_good === null ? "" : "  p(good) = " +
    it.p_good.toFixed(3)) + (it.hint ? "  (" + it.hint + ")" : "") + "  label: " + (it.label || "none");
  let before = "", after = "";
  for (let i = Math.max(0, pos - 2); i < pos; i++) before += neighbour(i);
  for (let i = pos + 1; i < Math.min(items.length, pos + 3); i++) after += neighbour(i);
  document.getElementById("before").innerHTML = before;
  document.getElementById("after").innerHTML = after;
}
async function setLabel(i, cls) {
  const r = await fetch("/label/set" + q, {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({id: items[i].id, class: cls})});
  if (!r.ok) { document.getElementById("error").textContent = await r.text(); return false; }
  const out = await r.json();
  items[i].label = out.label; labelled = out.labelled;
  document.getElementById("error").textContent = "";
  return true;
}
let chain = Promise.resolve(), pending = 0;  // keys are handled in order, none dropped while a label is saved
async function handle(k) {
  if ((k === "g" || k === "b") && pos < items.length) {
    const prev = items[pos].label || null;
    if (await setLabel(pos, k === "g" ? "good" : "bad")) { undo.push([pos, prev]); pos++; }
  } else if ((k === "s" || k === " ") && pos < items.length) { undo.push([pos, undefined]); pos++; }
  else if (k === "u" || k === "Backspace") {
    const last = undo.pop();
    if (last) { if (last[1] !== undefined) await setLabel(last[0], last[1]); pos = last[0]; }
  } else if (k === "ArrowRight") pos = Math.min(items.length, pos + 1);
  else if (k === "ArrowLeft") pos = Math.max(0, pos - 1);
  render();
}
document.addEventListener("keydown", ev => {
  const k = ev.key;
  if (!items.length || !["g", "b", "s", " ", "u", "Backspace", "ArrowLeft", "ArrowRight"].includes(k)) return;
  ev.preventDefault();
  pending++; document.body.dataset.pending = pending;
  chain = chain.then(() => handle(k)).catch(e => { document.getElementById("error").textContent = String(e); })
    .finally(() => { pending--; document.body.dataset.pending = pending; });
});
fetch("/label/items" + q).then(r => r.json()).then(d => {
  items = d.items; total = items.length; labelled = d.labelled;
  document.getElementById("order").textContent = "order: " + (d.order === "uncertainty" ?
    "most uncertain first (p(good) nearest the threshold " + d.threshold + ")" : "time (recording order)") +
    "; labels are written to " + d.root + "/labels.csv and " + d.root + "/labelled/";
  document.body.dataset.ready = "1";
  render();
});
</script></body></html>
"""
