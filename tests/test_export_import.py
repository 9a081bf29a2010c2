"""`deepspm export` (run and data-set frames as sxm/gwy/png), `deepspm dataset import` (.sxm -> data set), the
run's `SxmFrameWriter`, and the CLI's handling of bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from deepspm.cli import main
from deepspm.controller.export import ExportError, export_command
from deepspm.controller.journal import frame_ref
from deepspm.controller.labdata import LabImportError, import_sxm_command, resample_square
from deepspm.io.sxm import (
    FrameRecordInfo,
    ScanImage,
    ScanParameters,
    SxmError,
    SxmFrameWriter,
    read_sxm,
    write_sxm,
)
from deepspm.nets.data import load_deepspm_folders

SXM_DIR = Path(__file__).parents[1] / ".." / "shared" / "data" / "sxm"
GWY_THUMB = shutil.which("gwyddion-thumbnailer")


def _frame(seed: int, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(side, side)) * 3e-11 + np.linspace(0, 2e-10, side)[None, :]).astype(np.float32)


def _fake_run(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """A journal as the run loop writes it: a creep scan (not judged) and a judged scan."""
    run = tmp_path / "run"
    (run / "frames").mkdir(parents=True)
    frames = [_frame(1), _frame(2)]
    refs = []
    for f in frames:
        ref = frame_ref(f)
        np.save(run / "frames" / f"{ref}.npy", f)
        refs.append(ref)
    scan_cfg = {"pixels": 64, "fwd_speed_mps": 8e-8, "bwd_speed_mps": 1.6e-7, "scan_up": True, "frame_size_m": 1e-8}
    records = [
        {"seq": 0, "t_wall": 1.7e9, "kind": "start", "run_id": "r-test", "config": {"scan": scan_cfg}},
        {"seq": 5, "t_wall": 1.7e9 + 5, "kind": "command", "op": "scan", "purpose": "creep"},
        {"seq": 6, "t_wall": 1.7e9 + 6, "kind": "reply", "of": 5, "op": "scan",
         "result": {"type": "Frame", "frame": refs[0], "centre_x_m": 1e-8, "centre_y_m": -2e-8, "size_m": 1e-8,
                    "scan_up": True, "complete": True}},
        {"seq": 8, "t_wall": 1.7e9 + 8, "kind": "reply", "of": 7, "op": "scan",
         "result": {"type": "Frame", "frame": refs[1], "centre_x_m": 0.0, "centre_y_m": 0.0, "size_m": 1e-8,
                    "scan_up": False, "complete": True, "bias_V": 1.2, "setpoint_A": 5e-11}},
        {"seq": 9, "t_wall": 1.7e9 + 9, "kind": "decision", "decision": "classify", "frame": refs[1],
         "p_good": 0.123, "good": False, "ransac_seed": 7},
    ]
    (run / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run, frames


# --- the run's writer ------------------------------------------------------------------------------------------


def _info(**kw) -> FrameRecordInfo:
    base = dict(run_id="r1", seq=123, frame_ref="ab" * 32, centre_m=(1e-8, 2e-8), size_m=1e-8, scan_up=True,
                recorded_utc=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), bias_v=1.0, setpoint_a=5e-11,
                judgement="good", p_good=0.93, line_time_s=(0.125, 0.0625))
    base.update(kw)
    return FrameRecordInfo(**base)


@pytest.mark.parametrize("mode, judged, written", [("judged", True, True), ("judged", False, False),
                                                   ("all", False, True), ("none", True, False)])
def test_frame_writer_modes(tmp_path: Path, mode: str, judged: bool, written: bool) -> None:
    writer = SxmFrameWriter(tmp_path, mode)
    rel = writer.write(_frame(3), _info(judgement="good" if judged else None))
    assert (rel is not None) is written
    assert len(list((tmp_path / "sxm").glob("*.sxm")) if (tmp_path / "sxm").exists() else []) == int(written)


def test_frame_writer_metadata_and_bit_exact_frame(tmp_path: Path) -> None:
    frame = _frame(4)
    rel = SxmFrameWriter(tmp_path).write(frame, _info())
    assert rel == "sxm/0000123_abababababab.sxm"
    scan = read_sxm(tmp_path / rel)
    assert scan.image("Z").tobytes() == frame.tobytes()
    assert scan.bias_v == 1.0 and scan.setpoint == (5e-11, "A") and scan.offset_m == (1e-8, 2e-8)
    assert scan.recorded == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert scan.comment == "deepspm run r1, journal seq 123, frame abababababab: judged good, p(good)=0.9300"
    assert scan.header["DeepSPM>p(good)"] == "0.93" and scan.header["DeepSPM>Journal seq"] == "123"
    assert scan.header["SCAN_TIME"] == "0.125  0.0625"
    with pytest.raises(SxmError, match="must be one of judged, all, none"):
        SxmFrameWriter(tmp_path, "some")


# --- export ------------------------------------------------------------------------------------------------------


def test_export_run_sxm_reads_back_identical(tmp_path: Path) -> None:
    run, frames = _fake_run(tmp_path)
    result = export_command(run, tmp_path / "out", fmt="sxm")
    assert result["n"] == 2
    scans = [read_sxm(p) for p in sorted((tmp_path / "out").glob("*.sxm"))]
    for scan, frame in zip(scans, frames):
        assert scan.image("Z").tobytes() == frame.tobytes()
    assert "not judged" in (scans[0].comment or "") and scans[0].bias_v is None
    assert "judged bad, p(good)=0.1230" in (scans[1].comment or "") and scans[1].bias_v == 1.2 and not scans[1].scan_up
    assert scans[1].header["SCAN_TIME"] == "0.125  0.0625"  # 10 nm at 80 / 160 nm/s
    judged = export_command(run, tmp_path / "judged", fmt="sxm", frames="judged")
    assert judged["n"] == 1


def test_export_gwy_opens_with_gwyfile(tmp_path: Path) -> None:
    import gwyfile

    run, frames = _fake_run(tmp_path)
    export_command(run, tmp_path / "gwy", fmt="gwy")
    files = sorted((tmp_path / "gwy").glob("*.gwy"))
    assert len(files) == 2
    obj = gwyfile.load(str(files[1]))
    field = obj["/0/data"]
    assert np.array_equal(field.data, frames[1].astype(np.float64))
    assert field.xreal == pytest.approx(1e-8) and field.si_unit_z.unitstr == "m"
    assert obj["/0/meta"]["DeepSPM Judgement"] == "bad" and obj["/0/meta"]["Bias (V)"] == "1.2"
    if GWY_THUMB:  # Gwyddion itself opens it too (Debian's gwyddion package)
        subprocess.run([GWY_THUMB, "gnome2", "64", str(files[1]), str(tmp_path / "t.png")], check=True, timeout=60)
        assert (tmp_path / "t.png").stat().st_size > 100


def test_export_png_and_refusals(tmp_path: Path) -> None:
    run, _ = _fake_run(tmp_path)
    export_command(run, tmp_path / "png", fmt="png")
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 2 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ExportError, match="exists"):
        export_command(run, tmp_path / "png", fmt="png")
    with pytest.raises(ExportError, match="neither a run directory"):
        export_command(tmp_path / "png", tmp_path / "x", fmt="png")
    with pytest.raises(ExportError, match="unknown format"):
        export_command(run, tmp_path / "x", fmt="tiff")


# --- import ------------------------------------------------------------------------------------------------------


def _write_scan(path: Path, side: int = 128, seed: int = 0, scan_up: bool = True, width_m: float = 2e-8,
                nan_rows: int = 0) -> np.ndarray:
    z = _frame(seed, side)
    if nan_rows:
        z[:nan_rows] = np.nan
    cur = np.full_like(z, 1e-10)
    write_sxm(path, [ScanImage("Z", "m", forward=z, backward=z[:, ::-1].copy()), ScanImage("Current", "A", forward=cur, index=0)],
              ScanParameters(range_m=(width_m, width_m), scan_up=scan_up, bias_v=0.5, setpoint_a=1e-10,
                             recorded_utc=datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC)))
    return z


def test_import_labels_from_csv_and_folders_then_loader_reads_it(tmp_path: Path) -> None:
    src = tmp_path / "lab"
    (src / "good").mkdir(parents=True)
    (src / "misc").mkdir()
    z_good = _write_scan(src / "good" / "a.sxm", seed=1)
    _write_scan(src / "misc" / "b.sxm", seed=2, side=64)
    _write_scan(src / "misc" / "c.sxm", seed=3, side=100)  # not 64 x 2^k: linear zoom
    _write_scan(src / "misc" / "d.sxm", seed=4, nan_rows=3)  # incomplete: skipped with a reason
    (src / "misc" / "notes.txt").write_text("hello")  # mixed content: skipped with a reason
    labels = tmp_path / "labels.csv"
    labels.write_text("file,class\nmisc/b.sxm,bad\nc.sxm,\n")
    result = import_sxm_command([src], tmp_path / "set", labels=labels)
    assert result["counts"] == {"good": 1, "bad": 1, "unlabelled": 1}
    assert any("notes.txt: skipped, not an .sxm file" in s for s in result["skipped"])
    assert any("d.sxm: skipped, incomplete scan" in s for s in result["skipped"])
    data = load_deepspm_folders(tmp_path / "set")  # what train classifier reads
    assert sorted(data.labels.tolist()) == [0, 1]
    good = np.load(tmp_path / "set" / "good" / "a.npy")
    assert good.shape == (64, 64) and good.dtype == np.float32
    assert np.allclose(good, z_good.reshape(64, 2, 64, 2).mean(axis=(1, 3)), atol=1e-16)  # raw metres, 2x2 means
    with open(tmp_path / "set" / "manifest.csv", newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    assert rows["good/a.npy"]["width_m"] == "2e-08" and rows["good/a.npy"]["bias_V"] == "0.5"
    assert rows["unlabelled/c.npy"]["source_pixels_x"] == "100" and rows["bad/b.npy"]["channel"] == "Z"
    assert not list(tmp_path.glob(".set.*"))  # the staging folder was renamed


def test_import_channel_direction_and_non_square(tmp_path: Path, capsys) -> None:
    z = _write_scan(tmp_path / "x.sxm", side=64)
    import_sxm_command([tmp_path / "x.sxm"], tmp_path / "set", direction="backward")
    assert np.array_equal(np.load(tmp_path / "set" / "unlabelled" / "x.npy"), z[:, ::-1])
    out, crop = resample_square(np.zeros((128, 256), np.float32))
    assert out.shape == (64, 64) and crop == (0, 64, 128)
    with pytest.raises(LabImportError, match="nothing to import"):
        import_sxm_command([tmp_path / "x.sxm"], tmp_path / "set2", channel="Phase")
    assert "x.sxm: skipped, no channel 'Phase' recorded forward" in capsys.readouterr().out
    assert not (tmp_path / "set2").exists()


@pytest.mark.parametrize("case", ["truncated", "missing_key", "not_sxm", "mixed_dir_with_broken_sxm", "bad_labels"])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, capsys, case: str) -> None:
    good = tmp_path / "in" / "good.sxm"
    good.parent.mkdir()
    _write_scan(good, side=64)
    raw = good.read_bytes()
    bad = tmp_path / "in" / "bad.sxm"
    args = [str(bad)]
    if case == "truncated":
        bad.write_bytes(raw[:-100])
        expect = "truncated data"
    elif case == "missing_key":
        bad.write_bytes(raw.replace(b":SCAN_RANGE:", b":SCAN_RANGX:"))
        expect = "header has no ':SCAN_RANGE:' key"
    elif case == "not_sxm":
        bad = tmp_path / "in" / "photo.sxm"
        bad.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
        args, expect = [str(bad)], "not a Nanonis .sxm file"
    elif case == "mixed_dir_with_broken_sxm":
        bad.write_bytes(raw[: len(raw) // 2])
        (tmp_path / "in" / "readme.md").write_text("x")
        args, expect = [str(tmp_path / "in")], "bad.sxm: truncated data"
    else:
        labels = tmp_path / "labels.csv"
        labels.write_text("file,class\ngood.sxm,excellent\n")
        args, expect = [str(good), "--labels", str(labels)], "class 'excellent' is not good, bad or unlabelled"
    code = main(["dataset", "import", *args, "--out", str(tmp_path / "set")])
    err = capsys.readouterr().err
    assert code == 2
    assert expect in err and err.startswith("deepspm: error: ") and err.count("\n") == 1
    assert not (tmp_path / "set").exists() and not list(tmp_path.glob(".set*"))


def test_cli_mixed_dir_skip_bad_imports_the_rest(tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    _write_scan(tmp_path / "in" / "ok.sxm", side=64)
    (tmp_path / "in" / "broken.sxm").write_bytes(b":NANONIS_VERSION:\n2\n")
    (tmp_path / "in" / "x.dat").write_text("1 2 3")
    assert main(["dataset", "import", str(tmp_path / "in"), "--out", str(tmp_path / "set"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "broken.sxm: skipped, truncated header" in out and "x.dat: skipped, not an .sxm file" in out
    assert (tmp_path / "set" / "unlabelled" / "ok.npy").is_file()
    assert main(["export", str(tmp_path / "set"), "--format", "sxm", "--out", str(tmp_path / "ex")]) == 0
    back = read_sxm(tmp_path / "ex" / "unlabelled_ok.sxm")
    assert np.array_equal(back.image("Z"), np.load(tmp_path / "set" / "unlabelled" / "ok.npy"))
    assert back.range_m[0] == pytest.approx(2e-8)  # from the manifest


@pytest.mark.skipif(not SXM_DIR.is_dir(), reason="../shared/data/sxm is absent")
def test_real_files_import_and_gallery(tmp_path: Path) -> None:
    assert main(["dataset", "import", str(SXM_DIR), "--out", str(tmp_path / "real")]) == 0
    with open(tmp_path / "real" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["label"] for r in rows} == {"unlabelled"}
    for r in rows:
        a = np.load(tmp_path / "real" / r["file"])
        assert a.shape == (64, 64) and np.isfinite(a).all() and 1e-9 < float(r["width_m"]) < 1e-7
    assert main(["dataset", "gallery", str(tmp_path / "real"), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000
