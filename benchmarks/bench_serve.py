"""What the live page (`deepspm serve`) costs a run: frames per second and the event loop's longest step, with
and without the page open (issue 15).

The same simulated session (`run_session`, the embedded simulator at time scale 0 over TCP, the shipped nets,
loaded and compiled before the clock starts) runs N frames twice with the same seeds: once alone, once with
`deepspm serve RUN_DIR` running as its own process (at nice 10, as it sets itself) and a headless Chromium
(Debian's, driven by Playwright, at nice 10) showing the run page for the whole run (server-sent events, frame
images, the report's plots redrawn as the run grows). The longest step is measured by a probe task on the run's
event loop that asks to wake every 5 ms and records the largest overshoot: the longest stretch during which the
loop ran something else without yielding. Without a chromium the "with page" row is the server alone (said in
the row). Time scale 0 is the worst case: the run is CPU-bound, at several frames a second, not one per 12 s.

    python -m benchmarks.bench_serve [--frames N] [--time-scales S ...]   (default 1000 frames at time scale 0;
                                                                           --quick: 60)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import print_table, write_json
from deepspm.controller.config import load_config
from deepspm.controller.session import SimulatorOptions, load_brain, run_session

PROBE_S = 0.005
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@dataclass
class ServeRow:
    page: str  # "none", "browser" or "server only"
    time_scale: float  # the simulator's: 0 as fast as possible (CPU-bound)
    frames: int
    run_s: float
    frames_per_s: float
    longest_step_ms: float
    p99_step_ms: float
    page_updates: int  # frames the page showed (distinct newest frames seen by the browser)
    status: str


async def probe(stop: asyncio.Event, lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(PROBE_S)
        lags.append(loop.time() - t - PROBE_S)


class Viewer(threading.Thread):
    """`deepspm serve RUN_DIR` and, if there is a chromium, a headless page on it, until `done` is set."""

    def __init__(self, run_dir: Path, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.done = run_dir, done
        self.ready = threading.Event()  # the page is open (or the server runs, without a chromium)
        self.updates = 0
        self.error = ""

    def run(self) -> None:
        server = subprocess.Popen([sys.executable, "-m", "deepspm.cli", "serve", str(self.run_dir), "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert server.stdout is not None
            match = re.search(r"(http://\S+\?token=[A-Za-z0-9_-]+)", server.stdout.readline())
            if match is None or CHROMIUM is None:
                self.error = "no URL" if match is None else ""
                self.ready.set()
                self.done.wait()
                return
            from playwright.sync_api import sync_playwright

            # the browser runs at nice 10 too: a viewer's browser is on their own machine, not the instrument PC
            wrapper = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "chromium"
            wrapper.write_text(f'#!/bin/sh\nexec nice -n 10 {CHROMIUM} "$@"\n')
            wrapper.chmod(0o755)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(wrapper), headless=True, args=FLAGS)
                page = browser.new_page(viewport={"width": 1300, "height": 1000})
                page.goto(match.group(1))
                page.wait_for_selector("#overview tr")
                self.ready.set()
                seen: set[str] = set()
                while not self.done.is_set():
                    ref = page.evaluate("document.querySelector('#frames .frame')?.dataset.ref")
                    if ref:
                        seen.add(ref)
                    time.sleep(0.25)
                self.updates = len(seen)
                browser.close()
        except Exception as e:  # a benchmark row says what went wrong instead of hiding it
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ready.set()
            server.terminate()
            server.wait(10)


async def timed_run(frames: int, run_dir: Path, page: bool, time_scale: float, seed: int = 0) -> ServeRow:
    cfg = load_config(None, {"run.frames": frames, "run.seed": seed})
    brain = await asyncio.to_thread(load_brain, cfg)
    done = threading.Event()
    viewer = Viewer(run_dir, done) if page else None
    if viewer is not None:  # the page is open (showing "no journal yet") before the run starts
        run_dir.mkdir(parents=True)
        viewer.start()
        await asyncio.to_thread(viewer.ready.wait, 60)
    stop, lags = asyncio.Event(), list[float]()
    probe_task = asyncio.create_task(probe(stop, lags))
    start = time.perf_counter()
    result = await run_session(cfg, run_dir, simulator=SimulatorOptions(seed=seed, time_scale=time_scale),
                               brain=brain)
    run_s = time.perf_counter() - start
    stop.set()
    await probe_task
    done.set()
    if viewer is not None:
        viewer.join(30)
    lags.sort()
    n = result.loop.counters.frames if result.loop is not None else 0
    kind = "none" if viewer is None else ("browser" if CHROMIUM else "server only")
    status = f"{result.status}" + (f"; viewer: {viewer.error}" if viewer is not None and viewer.error else "")
    return ServeRow(kind, time_scale, n, run_s, n / run_s, lags[-1] * 1e3 if lags else 0.0,
                    lags[int(0.99 * (len(lags) - 1))] * 1e3 if lags else 0.0, viewer.updates if viewer else 0, status)


def main(argv: list[str] | None = None) -> list[ServeRow]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks serve")
    parser.add_argument("--frames", type=int, default=1000, help="frames per run (default 1000)")
    parser.add_argument("--time-scales", type=float, nargs="+", default=[0.0],
                        help="simulator time scales to run at (default 0 = full speed, the CPU-bound worst case)")
    parser.add_argument("--quick", action="store_true", help="60 frames at full speed (a smoke test)")
    args = parser.parse_args(argv if argv is not None else [])
    frames = 60 if args.quick else args.frames
    scales = [0.0] if args.quick else args.time_scales
    rows: list[ServeRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for scale in scales:
            for page in (False, True):
                run_dir = Path(tmp) / f"run{len(rows)}"
                rows.append(asyncio.run(timed_run(frames, run_dir, page, scale)))
    print_table(f"deepspm serve: the run with and without the live page ({frames} frames per run, "
                f"{os.cpu_count()} cores)",
                ["page", "time scale", "frames", "run s", "frames/s", "longest loop step ms", "p99 step ms", "frames shown",
                 "status"],
                [[r.page, r.time_scale, r.frames, r.run_s, r.frames_per_s, r.longest_step_ms, r.p99_step_ms, r.page_updates,
                  r.status] for r in rows])
    path = write_json("serve", {"frames": frames, "rows": [asdict(r) for r in rows]})
    print(f"written {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
