"""`deepspm serve` without a browser: the token rules, no path escapes, 4xx never a traceback, the live view
following a growing journal, the operator's files, and labels written as `dataset import` and `train
classifier` read them. (The browser tests, on a live simulated run, are in test_serve_browser.py.)"""

from __future__ import annotations

import asyncio
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from deepspm.cli import main
from deepspm.controller.commands import StartScan
from deepspm.controller.documents import LineJudgement
from deepspm.controller.labdata import MANIFEST, MANIFEST_COLUMNS, read_labels
from deepspm.controller.runcontrol import PAUSE_FILE, STOP_FILE
from deepspm.controller.validate import ArgumentProblem
from deepspm.controller.webapp import LABELS_KEY, build_app, is_loopback
from deepspm.nets.data import load_deepspm_folders
from tests.test_report import ScriptedRun

TOKEN = "test-token-123"


class LineJudgedRun(ScriptedRun):
    """A scripted run whose next frame scan is judged line by line (`lines`: (line count, p(good)) pairs), the
    judgements journaled after the frame's start_scan, as the scanning plan does."""

    lines: list[tuple[int, float]] = []

    def command(self, command, result=None, ref=None) -> int:
        seq = super().command(command, result, ref)
        if isinstance(command, StartScan) and command.purpose == "frame":
            for lines, p in self.lines:
                self.journal.write(LineJudgement(frame="cd" * 32, lines=lines, p_good=p))
            self.lines = []
        return seq


async def scripted_run(run_dir: Path, frames: int = 3, *, stop: bool = True) -> LineJudgedRun:
    run = LineJudgedRun(run_dir)
    run.open()
    run.approach()
    for k in range(frames):
        await run.frame(k * 12e-9, 0.0, p_good=0.95 if k % 2 == 0 else 0.2)
    await run.journal.flush()
    if stop:
        await run.close()
    return run


async def client_for(app) -> TestClient:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def refs_of(run_dir: Path) -> list[str]:
    return sorted(p.stem for p in (run_dir / "frames").glob("*.npy"))


async def test_the_token_rules_on_loopback_and_off_it(tmp_path: Path) -> None:
    await scripted_run(tmp_path / "run")
    client = await client_for(build_app([tmp_path / "run"], token=TOKEN))
    try:
        assert (await client.get("/run/0")).status == 200  # loopback: reading needs no token
        assert (await client.get("/run/0/state", params={"token": "wrong"})).status == 403  # a wrong one: refused
        for path in ("/run/0/pause", "/run/0/stop", "/run/0/resume"):
            response = await client.post(path)
            assert response.status == 403 and "no token" in await response.text()
            assert (await client.post(path, params={"token": "nope"})).status == 403
        assert not (tmp_path / "run" / STOP_FILE).exists()
    finally:
        await client.close()
    client = await client_for(build_app([tmp_path / "run"], token=TOKEN, loopback=False))
    try:  # bound to another address: every page needs the token
        assert (await client.get("/run/0")).status == 403
        assert (await client.get("/run/0/state")).status == 403
        assert (await client.get("/run/0/state", params={"token": TOKEN})).status == 200
        assert (await client.get("/run/0/state", headers={"X-Deepspm-Token": TOKEN})).status == 200
    finally:
        await client.close()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


async def test_no_path_outside_the_run_can_be_read_and_bad_requests_get_4xx(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    await scripted_run(run_dir)
    secret = tmp_path / "secret.npy"
    np.save(secret, np.ones((16, 16)))
    fake = "ab" * 32
    os.symlink(secret, run_dir / "frames" / f"{fake}.npy")  # a symlink out of the run directory
    client = await client_for(build_app([run_dir], token=TOKEN))
    try:
        good = refs_of(run_dir)[0] if refs_of(run_dir)[0] != fake else refs_of(run_dir)[1]
        response = await client.get(f"/run/0/frame/{good}.png")
        assert response.status == 200 and (await response.read()).startswith(b"\x89PNG")
        for path in (f"/run/0/frame/{fake}.png", "/run/0/frame/..%2F..%2Fsecret.png", "/run/0/frame/%2Fetc%2Fpasswd.png",
                     "/run/0/frame/../../secret.npy", "/run/0/frame/" + "0" * 64 + ".png", "/run/7",
                     "/run/0/plot/..%2Fsecret.png", "/run/0/plot/nothing.png", "/etc/passwd", "/run/0/explode"):
            response = await client.get(path)
            text = await response.text()
            assert 400 <= response.status < 500, (path, response.status)
            assert "Traceback" not in text and "File \"" not in text
        response = await client.post("/run/0/explode", params={"token": TOKEN})
        assert response.status in (404, 409)  # a stopped run: 409 before the action is looked at
    finally:
        await client.close()


async def test_the_live_view_follows_a_growing_journal_and_controls_write_the_operator_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = await scripted_run(run_dir, frames=1, stop=False)
    client = await client_for(build_app([run_dir], token=TOKEN, poll_s=0.01))
    try:
        response = await client.get("/run/0/events")
        assert response.headers["Content-Type"].startswith("text/event-stream")

        async def next_event() -> dict:
            while True:
                line = (await asyncio.wait_for(response.content.readline(), 10)).decode()
                if line.startswith("data: "):
                    return json.loads(line[6:])

        first = await next_event()
        assert first["running"] and len(first["frames"]) == 1 and first["state"] == "selecting"
        run.lines = [(16, 0.8), (32, 0.4)]  # this frame is judged line by line while it is scanned
        ref = await run.frame(12e-9, 0.0, p_good=0.3)
        await run.journal.flush()
        while (event := await next_event())["frames"][0]["ref"] != ref:
            pass
        assert event["frames"][0]["p_good"] == pytest.approx(0.3) and event["frames"][0]["verdict"] == "bad probe"
        assert event["frames"][0]["lines"] == [[16, 0.8], [32, 0.4]] and event["frames"][1]["lines"] == []
        assert any(k == "frames" and "2 classified" in v for k, v in event["overview"])
        for name in ("p_good", "actions_per_episode", "approach_areas"):
            plot = await client.get(f"/run/0/plot/{name}.png")
            assert plot.status == 200 and (await plot.read()).startswith(b"\x89PNG")
        assert (await client.post("/run/0/pause", params={"token": TOKEN})).status == 200
        assert (run_dir / PAUSE_FILE).is_file()
        assert (await client.post("/run/0/resume", params={"token": TOKEN})).status == 200
        assert not (run_dir / PAUSE_FILE).exists()
        assert (await client.post("/run/0/stop", params={"token": TOKEN})).status == 200
        assert "web page" in (run_dir / STOP_FILE).read_text()
        response.close()
        await run.close("stopped", "operator stop")
    finally:
        await client.close()


def write_dataset(root: Path, n: int = 5) -> list[str]:
    """A set as `deepspm dataset import` writes it (unlabelled/*.npy, manifest.csv naming the .sxm sources)."""
    rng = np.random.default_rng(0)
    (root / "unlabelled").mkdir(parents=True)
    rows = []
    for k in range(n):
        np.save(root / "unlabelled" / f"scan{k}.npy", rng.normal(0, 1e-10, (64, 64)))
        rows.append({"file": f"unlabelled/scan{k}.npy", "label": "unlabelled", "source": f"/lab/2025/scan{k}.sxm",
                     "recorded": f"2025-01-0{k + 1}T10:00:00"})
    with open(root / MANIFEST, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return [f"scan{k}.sxm" for k in range(n)]


async def test_labels_are_written_as_dataset_import_and_train_classifier_read_them(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    names = write_dataset(root)
    client = await client_for(build_app(label=root, token=TOKEN, classifier="none"))
    try:
        items = await (await client.get("/label/items")).json()
        assert items["order"] == "time"  # no p(good) for an imported set and no classifier: recording order
        assert [i["file"] for i in items["items"]] == names
        assert (await client.post("/label/set", json={"id": 0, "class": "good"})).status == 403
        for index, cls in ((0, "good"), (1, "bad"), (2, "good"), (2, "bad"), (3, "bad"), (3, None)):
            response = await client.post("/label/set", params={"token": TOKEN}, json={"id": index, "class": cls})
            assert response.status == 200
        assert read_labels(root / "labels.csv") == {"scan0.sxm": "good", "scan1.sxm": "bad", "scan2.sxm": "bad"}
        data = load_deepspm_folders(root / "labelled")
        assert sorted(p.stem for p in data.paths) == ["scan0", "scan1", "scan2"]
        assert dict(zip((p.stem for p in data.paths), data.labels.tolist())) == {"scan0": 1, "scan1": 0, "scan2": 0}
        assert not list(root.glob(".*.tmp")) and not list((root / "labelled").rglob(".*.tmp"))
        for body in ({"id": 99, "class": "good"}, {"id": 0, "class": "maybe"}, {"id": "0"}, [1, 2]):
            response = await client.post("/label/set", params={"token": TOKEN}, json=body)
            assert response.status in (400, 404) and "Traceback" not in await response.text()
        response = await client.post("/label/set", params={"token": TOKEN}, data=b"not json")
        assert response.status == 400
        assert (await client.get("/label/image/99.png")).status == 404
        assert (await client.get("/label/image/0.png")).status == 200
    finally:
        await client.close()
    reopened = build_app(label=root, token=TOKEN, order="time")  # the labels so far are read back at start
    client = await client_for(reopened)
    try:
        items = await (await client.get("/label/items")).json()
        assert items["labelled"] == 3 and items["items"][0]["label"] == "good"
    finally:
        await client.close()


def test_an_imported_set_is_scored_by_the_classifier_for_the_uncertainty_order(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    write_dataset(root, n=6)
    labels = build_app(label=root, token=TOKEN)[LABELS_KEY]  # the shipped classifier
    assert labels.order_used == "uncertainty"
    p = [i.p_good if i.p_good is not None else -1.0 for i in labels.items]
    assert all(0.0 <= x <= 1.0 for x in p)
    distances = [abs(x - 0.9) for x in p]
    assert distances == sorted(distances)
    with pytest.raises(ArgumentProblem, match="--classifier"):
        build_app(label=root, token=TOKEN, classifier=str(tmp_path / "no-such-checkpoint"))


async def test_a_run_is_labelled_most_uncertain_first_by_its_sxm_names(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    await scripted_run(run_dir, frames=4)
    client = await client_for(build_app(label=run_dir, token=TOKEN))
    try:
        items = await (await client.get("/label/items")).json()
        assert items["order"] == "uncertainty"
        distances = [abs(i["p_good"] - 0.9) for i in items["items"]]
        assert distances == sorted(distances) and len(distances) == 4
        await client.post("/label/set", params={"token": TOKEN}, json={"id": 0, "class": "bad"})
        first = items["items"][0]["file"]
        assert read_labels(run_dir / "labels.csv") == {first: "bad"}
    finally:
        await client.close()


def test_cli_refuses_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--label", str(tmp_path)]) == 2  # an empty folder: nothing to label
    (tmp_path / "run").mkdir()
    assert main(["serve", "--label", str(tmp_path / "run"), str(tmp_path / "run")]) == 2
    assert main(["serve", "--port", "70000", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error") == 4
