"""`deepspm serve` in a real browser (headless Chromium, Debian's package, driven by Playwright; no browser is
downloaded) on a live simulated run: new frames show within 2 s of their journal record, Stop stops the run at a
safe point (journaled as an operator request), a wrong token is refused, and labelling by keyboard writes the CSV.

Skipped, with the reason, when no Chromium is installed (`.ci/run` installs Debian's `chromium`). Set
DEEPSPM_SCREENSHOTS=DIR to also save the two pages' screenshots there (docs/serve_run.png, docs/serve_label.png
were made so)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepspm.controller.labdata import read_labels

CHROMIUM = next((p for p in (os.environ.get("DEEPSPM_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).is_file()), None)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[test])")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="browser tests skipped: no chromium found (apt-get install chromium, "
                                                "or set DEEPSPM_CHROMIUM=/path/to/chromium)"),
    pytest.mark.timeout(120),
]
DEEPSPM = [sys.executable, "-m", "deepspm.cli"]
SCREENSHOTS = os.environ.get("DEEPSPM_SCREENSHOTS")


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`deepspm serve ARGS --port 0`; returns the process and the URL it printed (with the token)."""
    proc = subprocess.Popen([*DEEPSPM, "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+\?token=[A-Za-z0-9_-]+)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"deepspm serve printed no URL: {line!r} {proc.stdout.read()}")
    return proc, match.group(1)


def journal(run_dir: Path) -> list[dict]:
    text = (run_dir / "journal.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as p:
        # Playwright gives every launch a fresh temporary profile (its --user-data-dir)
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> Iterator[Path]:
    """A simulated run at full speed, long enough to be stopped from the page."""
    run_dir = tmp_path_factory.mktemp("live") / "run"
    proc = subprocess.Popen([*DEEPSPM, "run", "--frames", "2000", "--seed", "5", "--out", str(run_dir), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "journal.jsonl").is_file() or proc.poll() is not None, 60, "the run to start")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield run_dir
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


def test_the_run_page_shows_new_frames_within_2_s_and_stop_stops_the_run(browser, live_run: Path) -> None:
    server, url = start_server(str(live_run))
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(url)
        first_frame = "document.querySelector('#frames .frame')?.dataset.ref"
        lags = []
        seen = set()
        wait_for(lambda: page.evaluate(first_frame), 60, "the first classified frame on the page")
        for _ in range(3):  # three new frames, each timed from its journal record to the page
            ref = wait_for(lambda: (r := page.evaluate(first_frame)) not in seen and r, 20, "a new frame", 0.02)
            t_seen = time.time()
            seen.add(ref)
            record = wait_for(lambda ref=ref: next((r for r in journal(live_run) if r.get("decision") == "classify"
                                                    and r.get("frame") == ref), None), 5, "its journal record")
            lags.append(t_seen - record["t_wall"])
        assert max(lags) < 2.0, f"frames shown {lags} s after their journal records"
        assert page.evaluate("document.querySelector('#frames img').naturalWidth") > 0  # the image itself loaded
        if SCREENSHOTS:
            page.wait_for_function("document.getElementById('plot-p_good').naturalWidth > 0", timeout=20000)
            page.screenshot(path=str(Path(SCREENSHOTS) / "serve_run.png"), full_page=True)
        page.click("#stop")
        wait_for(lambda: any(r["kind"] == "stop" for r in journal(live_run)), 30, "the run to stop")
        page.wait_for_function("document.getElementById('control-state').textContent.includes('not running')",
                               timeout=10000)
    finally:
        server.terminate()
        server.wait(10)
    records = journal(live_run)
    operator = [r for r in records if r["kind"] == "operator"]
    assert operator and operator[-1]["request"] == "stop" and "web page" in operator[-1]["detail"]
    assert records[-1]["kind"] == "stop" and records[-1]["status"] == "stopped"
    stop_at = next(i for i, r in enumerate(records) if r["kind"] == "transition" and r["trigger"] == "stop")
    withdraw = [r for r in records[:stop_at] if r["kind"] == "command" and r["op"] == "withdraw"]
    assert withdraw and withdraw[-1]["seq"] > operator[-1]["seq"]  # stopped at a safe point: tip withdrawn first


def test_a_wrong_token_is_refused_and_labelling_by_keyboard_writes_the_csv(browser, live_run: Path) -> None:
    wait_for(lambda: any(r["kind"] == "stop" for r in journal(live_run)), 60, "the live run to have stopped")
    server, url = start_server("--label", str(live_run))
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        wrong = page.goto(re.sub(r"token=[^&]+", "token=wrong", url))
        assert wrong is not None and wrong.status == 403 and "refused" in page.content()
        refused = page.evaluate("fetch('/label/set', {method: 'POST', body: '{\"id\": 0, \"class\": \"good\"}'})"
                                ".then(r => r.status)")
        assert refused == 403
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        files = page.evaluate("fetch('/label/items' + location.search).then(r => r.json())"
                              ".then(d => d.items.map(i => i.file))")
        assert "labelled 0 of" in page.inner_text("#progress")

        def press(key: str) -> None:
            page.keyboard.press(key)
            page.wait_for_function("document.body.dataset.pending === '0'")

        for key in ("g", "b", "s", "g", "u", "b"):  # good, bad, skip, good, undo (that good), bad
            press(key)
        labels = read_labels(live_run / "labels.csv")
        assert labels == {files[0]: "good", files[1]: "bad", files[3]: "bad"}
        assert "labelled 3 of" in page.inner_text("#progress")
        if SCREENSHOTS:
            press("ArrowLeft")
            press("ArrowLeft")
            page.screenshot(path=str(Path(SCREENSHOTS) / "serve_label.png"), full_page=True)
    finally:
        server.terminate()
        server.wait(10)
