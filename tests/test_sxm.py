"""The .sxm reader and writer: round trips, orientation, the real files, bad input, and nanonispy2 as a referee."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from deepspm.io.sxm import (
    ScanImage,
    ScanParameters,
    SxmError,
    decode_sxm,
    encode_sxm,
    read_sxm,
    write_sxm,
)

SXM_DIR = Path(__file__).parents[1] / ".." / "shared" / "data" / "sxm"
REAL = sorted(SXM_DIR.glob("*.sxm")) if SXM_DIR.is_dir() else []
needs_real = pytest.mark.skipif(not REAL, reason="../shared/data/sxm is absent")


def _frame(seed: int, shape=(32, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 1e-10).astype(np.float32)


def _params(**kw) -> ScanParameters:
    base = dict(range_m=(10e-9, 7.5e-9), offset_m=(1.25e-7, -3e-8), angle_deg=12.5, scan_up=True, bias_v=-1.5,
                setpoint_a=2e-10, recorded_utc=datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC),
                comment="run r1 seq 42 judged good p(good)=0.97", extra={"DeepSPM>Run ID": "r1"})
    base.update(kw)
    return ScanParameters(**base)


@pytest.mark.parametrize("scan_up", [True, False])
def test_round_trip_is_bit_exact_with_every_field(tmp_path: Path, scan_up: bool) -> None:
    z_f, z_b, cur = _frame(1), _frame(2), _frame(3)
    z_f[0, :5] = np.nan  # unscanned pixels survive as NaN
    channels = [ScanImage("Z", "m", forward=z_f, backward=z_b), ScanImage("Current", "A", forward=cur, index=0)]
    path = write_sxm(tmp_path / "a.sxm", channels, _params(scan_up=scan_up))
    scan = read_sxm(path)
    for (name, direction), want in [(("Z", "forward"), z_f), (("Z", "backward"), z_b), (("Current", "forward"), cur)]:
        got = scan.image(name, direction)
        assert got.dtype == np.float32 and got.shape == (32, 48)
        assert got.tobytes() == want.tobytes()  # bit-exact, NaN included
    assert scan.pixels == (48, 32) and scan.size_px == (32, 48)
    assert scan.range_m == (10e-9, 7.5e-9) and scan.offset_m == (1.25e-7, -3e-8) and scan.angle_deg == 12.5
    assert scan.scan_up is scan_up and scan.bias_v == -1.5 and scan.setpoint == (2e-10, "A")
    assert scan.recorded == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert scan.comment == "run r1 seq 42 judged good p(good)=0.97"
    assert scan.header["DeepSPM>Run ID"] == "r1"
    assert [(c.name, c.direction) for c in scan.channels] == [("Z", "both"), ("Current", "forward")]
    with pytest.raises(SxmError, match="no channel 'Current' recorded backward"):
        scan.image("Current", "backward")
    # re-encoding what was read gives the same bytes
    assert encode_sxm(scan.header, scan.images) == path.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


def test_storage_order_is_acquisition_order(tmp_path: Path) -> None:
    """Up-scans store the bottom line first; backward lines are stored right to left (as Gwyddion reads them)."""
    image = np.zeros((4, 4), np.float32)
    image[0, 0] = 1.0  # top-left corner of the frame
    raw = (tmp_path / "o.sxm")
    write_sxm(raw, [ScanImage("Z", "m", forward=image, backward=image)], _params(range_m=(1e-9, 1e-9)))
    data = raw.read_bytes()
    planes = np.frombuffer(data[data.index(b"\x1a\x04") + 2:], ">f4").reshape(2, 4, 4)
    assert planes[0][3, 0] == 1.0  # forward: last stored line (top), first column
    assert planes[1][3, 3] == 1.0  # backward: last stored line, last stored pixel


def test_nanonispy2_reads_our_files_and_agrees(tmp_path: Path) -> None:
    nanonispy2 = pytest.importorskip("nanonispy2.read")
    z_f, z_b = _frame(5, (16, 16)), _frame(6, (16, 16))
    path = write_sxm(tmp_path / "x.sxm", [ScanImage("Z", "m", forward=z_f, backward=z_b)], _params(range_m=(5e-9, 5e-9)))
    theirs = nanonispy2.Scan(str(path))
    assert theirs.header["scan_pixels"].tolist() == [16, 16]
    assert theirs.header["bias"] == -1.5
    # nanonispy2 hands out the planes as stored: flip them into the frame convention to compare
    assert np.array_equal(theirs.signals["Z"]["forward"][::-1], z_f)
    assert np.array_equal(theirs.signals["Z"]["backward"][::-1, ::-1], z_b)


@needs_real
@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_files_read_and_reencode_to_the_same_bytes(path: Path) -> None:
    scan = read_sxm(path)
    assert scan.pixels == (256, 256) and scan.channel("Z").unit == "m"
    assert scan.bias_v is not None and scan.setpoint is not None and scan.recorded is not None
    assert scan.comment is not None and scan.range_m[0] > 0
    for image in scan.images.values():
        assert image.shape == (256, 256) and np.isfinite(image).all()
    assert encode_sxm(scan.header, scan.images) == path.read_bytes()


@needs_real
@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_files_agree_with_nanonispy2(path: Path) -> None:
    nanonispy2 = pytest.importorskip("nanonispy2.read")
    scan = read_sxm(path)
    theirs = nanonispy2.Scan(str(path))
    for ch in scan.channels:
        fwd = theirs.signals[ch.name]["forward"]
        bwd = theirs.signals[ch.name]["backward"]
        flip = (lambda a: a[::-1]) if scan.scan_up else (lambda a: a)
        assert np.array_equal(scan.image(ch.name, "forward"), flip(fwd))
        assert np.array_equal(scan.image(ch.name, "backward"), flip(bwd)[:, ::-1])
    assert theirs.header["bias"] == scan.bias_v


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture
def good_bytes(tmp_path: Path) -> bytes:
    path = write_sxm(tmp_path / "g.sxm", [ScanImage("Z", "m", forward=_frame(9, (8, 8)))], _params())
    return path.read_bytes()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[: len(b) - 10], "truncated data: 246 of 256 bytes"),
        (lambda b: b[: b.index(b":SCANIT_END:") - 20], "truncated header: no ':SCANIT_END:'"),
        (lambda b: b + b"\0\0\0\0", "4 bytes after the 1 data planes"),
        (lambda b: b.replace(b":SCAN_PIXELS:", b":SCAN_PIXELZ:"), "header has no ':SCAN_PIXELS:' key"),
        (lambda b: b.replace(b":DATA_INFO:", b":DATA_INFX:"), "header has no ':DATA_INFO:' key"),
        (lambda b: b.replace(b"\nup\n", b"\nsideways\n"), "SCAN_DIR is 'sideways'"),
        (lambda b: b.replace(b"FLOAT", b"HALF "), "unsupported SCANIT_TYPE"),
        (lambda b: b"\x89PNG\r\n\x1a\n" + b[:100], "not a Nanonis .sxm file"),
        (lambda b: b"", "not a Nanonis .sxm file"),
        (lambda b: b.replace(b"\x1a\x04", b"\x00\x00"), "no data marker"),
        (lambda b: b.replace(b"\tboth\t", b"\tsome\t").replace(b"\tforward\t", b"\tsome\t"), "unknown direction 'some'"),
    ],
)
def test_bad_files_raise_sxm_error_naming_file_and_problem(tmp_path: Path, good_bytes: bytes, mutate, message) -> None:
    bad = tmp_path / "bad.sxm"
    bad.write_bytes(mutate(good_bytes))
    with pytest.raises(SxmError, match=message) as info:
        read_sxm(bad)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    assert info.value.path == bad


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SxmError, match="no such file"):
        read_sxm(tmp_path / "nope.sxm")
    with pytest.raises(SxmError, match="is a directory"):
        read_sxm(tmp_path)


def test_writer_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SxmError, match="one shape"):
        write_sxm(tmp_path / "a.sxm", [ScanImage("Z", "m", forward=_frame(1), backward=_frame(1, (8, 8)))], _params())
    with pytest.raises(SxmError, match="timezone-aware"):
        write_sxm(tmp_path / "a.sxm", [ScanImage("Z", "m", forward=_frame(1))],
                  _params(recorded_utc=datetime(2026, 1, 1)))
    with pytest.raises(SxmError, match="positive lengths"):
        write_sxm(tmp_path / "a.sxm", [ScanImage("Z", "m", forward=_frame(1))], _params(range_m=(0.0, 1e-9)))
    with pytest.raises(SxmError, match="reserved"):
        write_sxm(tmp_path / "a.sxm", [ScanImage("Z", "m", forward=_frame(1))], _params(extra={"BIAS": "1"}))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_decode_without_a_path_still_says_what_is_wrong() -> None:
    with pytest.raises(SxmError, match="^not a Nanonis .sxm file"):
        decode_sxm(b"hello")


GWY_THUMB = shutil.which("gwyddion-thumbnailer")


@pytest.mark.skipif(GWY_THUMB is None, reason="Gwyddion is not installed (apt-get install gwyddion)")
@pytest.mark.parametrize("scan_up", [True, False])
def test_gwyddion_opens_our_files_the_right_way_up(tmp_path: Path, scan_up: bool) -> None:
    """Gwyddion's own thumbnailer renders the forward Z: a bright top band and left band must show there."""
    from PIL import Image

    image = np.zeros((64, 64), np.float32)
    image[:8] = 1e-9  # top edge bright
    image[:, :8] += 5e-10  # left edge half bright
    path = write_sxm(tmp_path / "t.sxm", [ScanImage("Z", "m", forward=image, backward=image)],
                     _params(range_m=(5e-9, 5e-9), scan_up=scan_up))
    png = tmp_path / "t.png"
    subprocess.run([str(GWY_THUMB), "gnome2", "64", str(path), str(png)], check=True, timeout=60, capture_output=True)
    grey = np.asarray(Image.open(png).convert("L"), float)
    assert grey[:4].mean() > grey[-4:].mean() + 50  # the top band is at the top
    assert grey[:, :4].mean() > grey[:, -4:].mean() + 20  # the left band is on the left


GWYDDION = shutil.which("gwyddion")


def _gwyddion_reads(path: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """Gwyddion's own .sxm import (--convert-to-gwy), read back with gwyfile: {title: data field}."""
    import gwyfile

    out = tmp_path / f"{path.stem}.gwy"
    subprocess.run([str(GWYDDION), f"--convert-to-gwy={out}", str(path)], check=True, timeout=120, capture_output=True)
    container = gwyfile.load(str(out))
    return {str(container[f"/{i}/data/title"]): container[f"/{i}/data"].data
            for i in range(64) if f"/{i}/data" in container}


@pytest.mark.skipif(GWYDDION is None, reason="Gwyddion is not installed (apt-get install gwyddion)")
@pytest.mark.parametrize("scan_up", [True, False])
def test_gwyddion_imports_our_files_identically(tmp_path: Path, scan_up: bool) -> None:
    z_f, z_b = _frame(11, (16, 24)), _frame(12, (16, 24))
    path = write_sxm(tmp_path / "g.sxm", [ScanImage("Z", "m", forward=z_f, backward=z_b)],
                     _params(range_m=(6e-9, 4e-9), scan_up=scan_up))
    fields = _gwyddion_reads(path, tmp_path)
    assert np.array_equal(fields["Z (Forward)"], z_f.astype(np.float64))
    assert np.array_equal(fields["Z (Backward)"], z_b.astype(np.float64))


@needs_real
@pytest.mark.skipif(GWYDDION is None, reason="Gwyddion is not installed (apt-get install gwyddion)")
def test_gwyddion_agrees_on_a_real_up_and_down_file(tmp_path: Path) -> None:
    for name in ("g80sxm_example_TOPO.sxm", "nanoscopy_STM_Au-111_Flat.sxm"):  # an up scan and a down scan
        scan = read_sxm(SXM_DIR / name)
        fields = _gwyddion_reads(SXM_DIR / name, tmp_path)
        for direction in ("forward", "backward"):
            ours = scan.image("Z", direction).astype(np.float64)
            assert np.array_equal(fields[f"Z ({direction.capitalize()})"], ours), (name, direction)
