"""Nanonis `.sxm` scan files: a strict reader and an atomic writer (numpy only).

Format (as Nanonis writes it, and as Gwyddion's `nanonis` module reads it): an ASCII header of `:KEY:` lines,
each followed by its value lines, up to `:SCANIT_END:`; then `\\n\\n\\n`, the bytes `0x1A 0x04`, and the data:
one plane per channel and direction (`:DATA_INFO:` lists the channels; a channel recorded in `both`
directions has its forward plane then its backward plane), each `SCAN_PIXELS` = (pixels per line, lines),
in `SCANIT_TYPE` (normally big-endian float32). Planes are stored in acquisition order: the first stored
line is the first line scanned (the bottom line of an `up` scan), and backward lines are stored as scanned
(right to left). Both conventions were checked against Gwyddion 2.62 (its thumbnailer rendering a file
written with a marked first line and first column).

Arrays handed out and taken in here are in the project's frame convention (`deepspm.io.instrument.Frame`):
row 0 at the top (+y) edge, column 0 at the left (-x) edge, for both scan directions and both scan
directions of travel. Unscanned pixels are NaN, as Nanonis writes them.

Why our own reader (docs/decisions.md, "Nanonis .sxm"): the PyPI readers either fail on a channel recorded
in one direction only and on truncated files with a bare numpy error (nanonispy, nanonispy2), or pull in a
large stack for one file format (pySPM); none writes `.sxm`. The tests compare this reader's planes with
nanonispy2's on the real files and on files this writer makes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from deepspm.io.atomic import write_atomic
from deepspm.io.errors import InstrumentError

END_KEY = "SCANIT_END"
_END_MARK = b":SCANIT_END:"
_DATA_MARK = b"\x1a\x04"
_HEADER_TAIL = b":SCANIT_END:\n\n\n\x1a\x04"
_KEY_LINE = re.compile(r"^:(.+):$")
_MAX_HEADER_BYTES = 1 << 20  # a real header is ~5-20 kB; anything past 1 MiB without SCANIT_END is not one

REQUIRED_KEYS = ("SCANIT_TYPE", "SCAN_PIXELS", "SCAN_RANGE", "SCAN_DIR", "DATA_INFO")
"""Keys without which the data cannot be laid out. Every other key is optional (None when absent)."""

_TYPES = {"FLOAT": "f4", "DOUBLE": "f8", "INT": "i4", "UINT": "u4"}
_ORDERS = {"MSBFIRST": ">", "LSBFIRST": "<"}
DIRECTIONS = ("forward", "backward")


class SxmError(InstrumentError, ValueError):
    """An `.sxm` file that cannot be read or written as asked; the message names the file and the problem."""

    def __init__(self, path: Path | str | None, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path is not None else problem)
        self.path = None if path is None else Path(path)
        self.problem = problem


@dataclass(frozen=True)
class SxmChannel:
    """One row of `:DATA_INFO:`: a recorded signal."""

    name: str
    unit: str
    direction: str  # "both", "forward" or "backward"
    index: int = 0  # the Nanonis signal index
    calibration: float = 1.0
    offset: float = 0.0

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.direction == "both" else (self.direction,)


@dataclass(frozen=True)
class SxmScan:
    """A parsed `.sxm` file: the whole header (every key, in file order, values as text with their lines
    joined by newlines) and typed views of the keys the controller uses.

    `images[(name, direction)]` is a (lines, pixels) array in the frame convention (row 0 top, column 0
    left), in the file's data type (float32 for FLOAT files).
    """

    header: dict[str, str]
    channels: tuple[SxmChannel, ...]
    images: dict[tuple[str, str], np.ndarray]
    pixels: tuple[int, int]  # (pixels per line, lines)
    range_m: tuple[float, float]  # (width, height)
    scan_up: bool
    dtype: np.dtype
    offset_m: tuple[float, float] | None = None  # centre of the frame (x, y)
    angle_deg: float | None = None
    bias_v: float | None = None
    setpoint: tuple[float, str] | None = None  # (value, unit) of the Z controller
    recorded: datetime | None = None  # REC_DATE + REC_TIME, naive unless the writer marked it UTC
    comment: str | None = None
    path: Path | None = None

    def image(self, channel: str = "Z", direction: str = "forward") -> np.ndarray:
        """One channel's image; `channel` is the `:DATA_INFO:` name (e.g. `Z`, `Current`)."""
        try:
            return self.images[(channel, direction)]
        except KeyError:
            have = ", ".join(f"{n} ({d})" for n, d in self.images)
            raise SxmError(self.path, f"no channel {channel!r} recorded {direction}; the file has {have}") from None

    def channel(self, name: str) -> SxmChannel:
        for ch in self.channels:
            if ch.name == name:
                return ch
        raise SxmError(self.path, f"no channel {name!r}; the file has {', '.join(c.name for c in self.channels)}")

    @property
    def size_px(self) -> tuple[int, int]:
        """(lines, pixels): the shape of every image."""
        return self.pixels[1], self.pixels[0]


# --- reading ------------------------------------------------------------------------------------------------


def split_header(raw: bytes, path: Path | str | None = None) -> tuple[dict[str, str], int]:
    """The header's keys and values, and the offset of the first data byte. Raises `SxmError`."""
    if not raw.startswith(b":"):
        raise SxmError(path, "not a Nanonis .sxm file (it does not start with a ':KEY:' header line)")
    end = raw.find(_END_MARK, 0, _MAX_HEADER_BYTES)
    if end < 0:
        if len(raw) < _MAX_HEADER_BYTES:
            raise SxmError(path, "truncated header: no ':SCANIT_END:' line (the file ends inside the header)")
        raise SxmError(path, "not a Nanonis .sxm file (no ':SCANIT_END:' line in its first MiB)")
    after = end + len(_END_MARK)
    mark = raw.find(_DATA_MARK, after, after + 64)
    if mark < 0 or raw[after:mark].strip(b"\r\n ") != b"":
        if len(raw) - after < 64 and mark < 0:
            raise SxmError(path, "truncated: the file ends before the data marker 0x1A 0x04")
        raise SxmError(path, "no data marker 0x1A 0x04 after ':SCANIT_END:'")
    text = raw[:end].decode("latin-1")
    if not text.endswith("\n"):
        raise SxmError(path, "':SCANIT_END:' is not on a line of its own")
    header: dict[str, str] = {}
    key: str | None = None
    lines: list[str] = []
    for line in text[:-1].split("\n"):
        line = line.rstrip("\r")
        match = _KEY_LINE.match(line)
        if match:
            if key is not None:
                header[key] = "\n".join(lines)
            key, lines = match.group(1), []
            if key in header:
                raise SxmError(path, f"header key ':{key}:' appears twice")
        elif key is None:
            raise SxmError(path, "not a Nanonis .sxm file (text before the first ':KEY:' line)")
        else:
            lines.append(line)
    if key is not None:
        header[key] = "\n".join(lines)
    return header, mark + len(_DATA_MARK)


def _floats(path: Path | str | None, header: Mapping[str, str], key: str, n: int) -> tuple[float, ...] | None:
    if key not in header:
        return None
    parts = header[key].split()
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise SxmError(path, f"header key ':{key}:' is not {n} number(s): {header[key].strip()!r}") from None
    if len(values) != n:
        raise SxmError(path, f"header key ':{key}:' has {len(values)} value(s), expected {n}: {header[key].strip()!r}")
    return values


def _table(text: str) -> list[list[str]]:
    rows = [line.strip("\t ").split("\t") for line in text.split("\n") if line.strip()]
    return [[cell.strip() for cell in row] for row in rows]


def parse_channels(text: str, path: Path | str | None = None) -> tuple[SxmChannel, ...]:
    """`:DATA_INFO:` -> channels. Raises `SxmError` when a row does not fit the column names."""
    rows = _table(text)
    if not rows:
        raise SxmError(path, "':DATA_INFO:' lists no channels")
    columns = rows[0]
    for needed in ("Name", "Unit", "Direction"):
        if needed not in columns:
            raise SxmError(path, f"':DATA_INFO:' has no {needed!r} column (columns: {', '.join(columns)})")
    channels = []
    for row in rows[1:]:
        if len(row) != len(columns):
            raise SxmError(path, f"':DATA_INFO:' row {row!r} has {len(row)} cells for {len(columns)} columns")
        cell = dict(zip(columns, row))
        direction = cell["Direction"]
        if direction not in ("both", *DIRECTIONS):
            raise SxmError(path, f"channel {cell['Name']!r}: unknown direction {direction!r}")
        try:
            channels.append(SxmChannel(
                name=cell["Name"], unit=cell["Unit"], direction=direction,
                index=int(cell.get("Channel", "0")), calibration=float(cell.get("Calibration", "1")),
                offset=float(cell.get("Offset", "0")),
            ))
        except ValueError:
            raise SxmError(path, f"':DATA_INFO:' row {row!r} has a malformed number") from None
    if not channels:
        raise SxmError(path, "':DATA_INFO:' lists no channels")
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise SxmError(path, f"':DATA_INFO:' names a channel twice: {names}")
    return tuple(channels)


def parse_setpoint(header: Mapping[str, str]) -> tuple[float, str] | None:
    """The Z controller's setpoint (value, unit): from the `:Z-CONTROLLER:` table, else `Z-Controller>Setpoint`."""
    rows = _table(header.get("Z-CONTROLLER", ""))
    if len(rows) >= 2 and "Setpoint" in rows[0] and len(rows[1]) == len(rows[0]):
        parts = rows[1][rows[0].index("Setpoint")].split()
        try:
            return float(parts[0]), (parts[1] if len(parts) > 1 else "")
        except (ValueError, IndexError):
            pass
    value = header.get("Z-Controller>Setpoint")
    if value is not None:
        try:
            return float(value.strip()), header.get("Z-Controller>Setpoint unit", "").strip()
        except ValueError:
            return None
    return None


def parse_recorded(header: Mapping[str, str], path: Path | str | None = None) -> datetime | None:
    """REC_DATE (dd.mm.yyyy) + REC_TIME (hh:mm:ss); UTC-aware when the header says the time is UTC."""
    date, clock = header.get("REC_DATE", "").strip(), header.get("REC_TIME", "").strip()
    if not date:
        return None
    try:
        stamp = datetime.strptime(f"{date} {clock or '00:00:00'}", "%d.%m.%Y %H:%M:%S")
    except ValueError:
        raise SxmError(path, f"REC_DATE/REC_TIME {date!r} {clock!r} are not dd.mm.yyyy hh:mm:ss") from None
    if header.get("DeepSPM>Time zone", "").strip() == "UTC":
        stamp = stamp.replace(tzinfo=UTC)
    return stamp


def decode_sxm(raw: bytes, path: Path | str | None = None) -> SxmScan:
    """Parse the bytes of an `.sxm` file. Every problem raises `SxmError` naming `path`."""
    header, start = split_header(raw, path)
    for key in REQUIRED_KEYS:
        if key not in header:
            raise SxmError(path, f"header has no ':{key}:' key")
    kind = header["SCANIT_TYPE"].split()
    if len(kind) != 2 or kind[0] not in _TYPES or kind[1] not in _ORDERS:
        raise SxmError(path, f"unsupported SCANIT_TYPE {header['SCANIT_TYPE'].strip()!r}")
    dtype = np.dtype(_ORDERS[kind[1]] + _TYPES[kind[0]])
    pixels_f = _floats(path, header, "SCAN_PIXELS", 2)
    assert pixels_f is not None
    if any(p != int(p) or p < 1 for p in pixels_f):
        raise SxmError(path, f"SCAN_PIXELS {header['SCAN_PIXELS'].strip()!r} are not positive integers")
    nx, ny = int(pixels_f[0]), int(pixels_f[1])
    range_m = _floats(path, header, "SCAN_RANGE", 2)
    assert range_m is not None
    if not all(math.isfinite(r) and r > 0 for r in range_m):
        raise SxmError(path, f"SCAN_RANGE {header['SCAN_RANGE'].strip()!r} is not two positive lengths")
    scan_dir = header["SCAN_DIR"].strip()
    if scan_dir not in ("up", "down"):
        raise SxmError(path, f"SCAN_DIR is {scan_dir!r}, expected 'up' or 'down'")
    channels = parse_channels(header["DATA_INFO"], path)
    planes = [(c.name, d) for c in channels for d in c.directions]
    expected = len(planes) * nx * ny * dtype.itemsize
    have = len(raw) - start
    if have < expected:
        raise SxmError(path, f"truncated data: {have} of {expected} bytes ({len(planes)} planes of {nx}x{ny} {kind[0]})")
    if have > expected:
        raise SxmError(path, f"{have - expected} bytes after the {len(planes)} data planes of {nx}x{ny} {kind[0]}")
    data = np.frombuffer(raw, dtype=dtype, count=len(planes) * nx * ny, offset=start).reshape(len(planes), ny, nx)
    images = {}
    for plane, (name, direction) in zip(data, planes):
        images[(name, direction)] = storage_to_image(plane, scan_up=scan_dir == "up", backward=direction == "backward")
    offset = _floats(path, header, "SCAN_OFFSET", 2)
    angle = _floats(path, header, "SCAN_ANGLE", 1)
    bias = _floats(path, header, "BIAS", 1)
    return SxmScan(
        header=header, channels=channels, images=images, pixels=(nx, ny), range_m=(range_m[0], range_m[1]),
        scan_up=scan_dir == "up", dtype=dtype.newbyteorder("="),
        offset_m=None if offset is None else (offset[0], offset[1]),
        angle_deg=None if angle is None else angle[0], bias_v=None if bias is None else bias[0],
        setpoint=parse_setpoint(header), recorded=parse_recorded(header, path),
        comment=header.get("COMMENT"), path=None if path is None else Path(path),
    )


def read_sxm(path: Path | str) -> SxmScan:
    """Read an `.sxm` file (see the module doc). Raises `SxmError` naming the file for anything unreadable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SxmError(path, "no such file") from None
    except IsADirectoryError:
        raise SxmError(path, "is a directory, not an .sxm file") from None
    except OSError as exc:
        raise SxmError(path, f"cannot be read: {exc.strerror or exc}") from None
    return decode_sxm(raw, path)


def storage_to_image(plane: np.ndarray, *, scan_up: bool, backward: bool) -> np.ndarray:
    """A plane as stored (acquisition order) -> the frame convention (row 0 top, column 0 left), native order."""
    image = plane[::-1] if scan_up else plane
    image = image[:, ::-1] if backward else image
    return np.ascontiguousarray(image, dtype=plane.dtype.newbyteorder("="))


def image_to_storage(image: np.ndarray, *, scan_up: bool, backward: bool) -> np.ndarray:
    """The inverse of `storage_to_image` (the same flips: each is its own inverse)."""
    plane = image[::-1] if scan_up else image
    return plane[:, ::-1] if backward else plane


# --- writing ------------------------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """The shortest text that reads back as the same double (`repr`), with Nanonis' capital E."""
    return repr(float(value)).upper().replace("INF", "Inf").replace("NAN", "NaN")


@dataclass(frozen=True)
class ScanImage:
    """One channel to write: its images in the frame convention (float32), forward and/or backward."""

    name: str
    unit: str
    forward: np.ndarray | None = None
    backward: np.ndarray | None = None
    index: int = 14  # Nanonis' signal index of Z
    calibration: float = 1.0
    offset: float = 0.0

    @property
    def direction(self) -> str:
        if self.forward is not None and self.backward is not None:
            return "both"
        return "forward" if self.forward is not None else "backward"


@dataclass(frozen=True)
class ScanParameters:
    """What a written file says about its scan (SI units; times are UTC)."""

    range_m: tuple[float, float]
    offset_m: tuple[float, float] = (0.0, 0.0)  # frame centre (x, y)
    angle_deg: float = 0.0
    scan_up: bool = True
    bias_v: float | None = None
    setpoint_a: float | None = None  # current setpoint of the Z controller
    recorded_utc: datetime | None = None
    comment: str = ""
    line_time_s: tuple[float, float] | None = None  # forward, backward time per line (None: written as 0)
    acquisition_s: float | None = None  # None: lines x (forward + backward line time)
    source_file: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)  # more keys, e.g. {"DeepSPM>Run ID": "..."}


def make_header(images: Sequence[ScanImage], params: ScanParameters) -> dict[str, str]:
    """The header keys of a scan written by deepspm, in the order Nanonis writes them."""
    if not images:
        raise SxmError(None, "a scan needs at least one channel")
    shapes = {img.shape for ch in images for img in (ch.forward, ch.backward) if img is not None}
    if len(shapes) != 1 or any(ch.forward is None and ch.backward is None for ch in images):
        raise SxmError(None, f"every channel needs images of one shape; got {sorted(shapes)}")
    (lines, pixels), = shapes
    if not all(math.isfinite(r) and r > 0 for r in params.range_m):
        raise SxmError(None, f"scan range must be two positive lengths in metres, got {params.range_m}")
    header: dict[str, str] = {"NANONIS_VERSION": "2", "SCANIT_TYPE": "              FLOAT            MSBFIRST"}
    stamp = params.recorded_utc
    if stamp is not None:
        if stamp.tzinfo is None:
            raise SxmError(None, "recorded_utc must be a timezone-aware datetime")
        stamp = stamp.astimezone(UTC)
        header["REC_DATE"] = stamp.strftime(" %d.%m.%Y")
        header["REC_TIME"] = stamp.strftime("%H:%M:%S")
    # SCAN_TIME and ACQ_TIME are always written (readers such as nanonispy require them); 0 = not known
    line_time = params.line_time_s if params.line_time_s is not None else (0.0, 0.0)
    acquisition = params.acquisition_s if params.acquisition_s is not None else lines * sum(line_time)
    header["ACQ_TIME"] = format_number(acquisition)
    header["SCAN_PIXELS"] = f"{pixels:>10d}{lines:>10d}"
    if params.source_file:
        header["SCAN_FILE"] = params.source_file
    header["SCAN_TIME"] = "  ".join(format_number(t) for t in line_time)
    header["SCAN_RANGE"] = "  ".join(format_number(r) for r in params.range_m)
    header["SCAN_OFFSET"] = "  ".join(format_number(o) for o in params.offset_m)
    header["SCAN_ANGLE"] = format_number(params.angle_deg)
    header["SCAN_DIR"] = "up" if params.scan_up else "down"
    if params.bias_v is not None:
        header["BIAS"] = format_number(params.bias_v)
    if params.setpoint_a is not None:
        header["Z-CONTROLLER"] = f"\tName\ton\tSetpoint\n\tlog Current\t1\t{format_number(params.setpoint_a)} A"
    header["COMMENT"] = params.comment.replace("\r", "").replace("\n", " ")  # Nanonis keeps it on one line
    if stamp is not None:
        header["DeepSPM>Time zone"] = "UTC"
    if params.bias_v is not None:
        header["Bias>Bias (V)"] = format_number(params.bias_v)
    if params.setpoint_a is not None:
        header["Z-Controller>Setpoint"] = format_number(params.setpoint_a)
        header["Z-Controller>Setpoint unit"] = "A"
    header["Scan>pixels/line"] = str(pixels)
    header["Scan>lines"] = str(lines)
    header["Scan>channels"] = ";".join(f"{ch.name} ({ch.unit})" for ch in images)
    for key, value in params.extra.items():
        if key in header or key == END_KEY or not key or "\n" in key or ":" in key:
            raise SxmError(None, f"extra header key {key!r} is reserved or malformed")
        header[key] = str(value).replace("\n", " ")
    rows = ["\tChannel\tName\tUnit\tDirection\tCalibration\tOffset"]
    rows += [f"\t{ch.index}\t{ch.name}\t{ch.unit}\t{ch.direction}\t{format_number(ch.calibration)}\t"
             f"{format_number(ch.offset)}" for ch in images]
    header["DATA_INFO"] = "\n".join(rows) + "\n"
    return header


def encode_header(header: Mapping[str, str]) -> bytes:
    """Header keys -> bytes up to and including the data marker (the inverse of `split_header`)."""
    parts = []
    for key, value in header.items():
        if key == END_KEY:
            continue
        parts.append(f":{key}:\n{value}\n")  # Nanonis writes a value line even for an empty value
    try:
        return "".join(parts).encode("latin-1") + _HEADER_TAIL
    except UnicodeEncodeError as exc:
        raise SxmError(None, f"header text is not Latin-1: {exc.object[exc.start:exc.end]!r}") from None


def encode_sxm(header: Mapping[str, str], images: Mapping[tuple[str, str], np.ndarray]) -> bytes:
    """A whole file: `header` (with SCANIT_TYPE, SCAN_PIXELS, SCAN_DIR and DATA_INFO) and one image per
    (channel name, direction) that DATA_INFO lists, in the frame convention. Raises `SxmError`."""
    for key in REQUIRED_KEYS:
        if key not in header:
            raise SxmError(None, f"header has no ':{key}:' key")
    kind = header["SCANIT_TYPE"].split()
    if len(kind) != 2 or kind[0] not in _TYPES or kind[1] not in _ORDERS:
        raise SxmError(None, f"unsupported SCANIT_TYPE {header['SCANIT_TYPE'].strip()!r}")
    dtype = np.dtype(_ORDERS[kind[1]] + _TYPES[kind[0]])
    nx, ny = (int(float(p)) for p in header["SCAN_PIXELS"].split())
    scan_up = header["SCAN_DIR"].strip() == "up"
    body = []
    for ch in parse_channels(header["DATA_INFO"]):
        for direction in ch.directions:
            image = images.get((ch.name, direction))
            if image is None:
                raise SxmError(None, f"no image for channel {ch.name!r} ({direction})")
            image = np.asarray(image)
            if image.shape != (ny, nx):
                raise SxmError(None, f"{ch.name} ({direction}) is {image.shape}, SCAN_PIXELS says {(ny, nx)}")
            if image.dtype.kind != np.dtype(dtype).kind and not (image.dtype.kind == "f" and dtype.kind == "f"):
                raise SxmError(None, f"{ch.name} ({direction}) has dtype {image.dtype}, the file {dtype}")
            plane = image_to_storage(image, scan_up=scan_up, backward=direction == "backward")
            body.append(np.ascontiguousarray(plane, dtype=dtype).tobytes())
    return encode_header(header) + b"".join(body)


def write_sxm(path: Path | str, images: Sequence[ScanImage], params: ScanParameters) -> Path:
    """Write a scan as an ordinary Nanonis `.sxm` (big-endian float32), atomically. Returns the path."""
    header = make_header(images, params)
    planes = {}
    for ch in images:
        for direction, image in (("forward", ch.forward), ("backward", ch.backward)):
            if image is not None:
                planes[(ch.name, direction)] = np.asarray(image, dtype=np.float32)
    return write_atomic(path, encode_sxm(header, planes))


# --- a run's frames as .sxm ---------------------------------------------------------------------------------

SXM_OUTPUT_MODES = ("judged", "all", "none")
"""`[output] sxm`: which recorded frames a run writes as .sxm: those the classifier judged (default), every
recorded frame (creep frames and rescans too), or none."""

SXM_DIR = "sxm"


@dataclass(frozen=True)
class FrameRecordInfo:
    """What the run knows about one recorded frame, for its .sxm file (SI units, UTC)."""

    run_id: str
    seq: int  # the journal sequence number of the scan's reply
    frame_ref: str  # the frame's content hash in RUN_DIR/frames/
    centre_m: tuple[float, float]
    size_m: float
    scan_up: bool
    recorded_utc: datetime
    bias_v: float | None = None
    setpoint_a: float | None = None
    judgement: str | None = None  # e.g. "good", "bad", "bad sample"; None when not judged
    p_good: float | None = None
    line_time_s: tuple[float, float] | None = None
    channel: str = "Z"

    def comment(self) -> str:
        judged = "not judged" if self.judgement is None else f"judged {self.judgement}"
        p = "" if self.p_good is None else f", p(good)={self.p_good:.4f}"
        return f"deepspm run {self.run_id}, journal seq {self.seq}, frame {self.frame_ref[:12]}: {judged}{p}"

    def extra(self) -> dict[str, str]:
        out = {"DeepSPM>Run ID": self.run_id, "DeepSPM>Journal seq": str(self.seq), "DeepSPM>Frame": self.frame_ref,
               "DeepSPM>Judgement": self.judgement or "none"}
        if self.p_good is not None:
            out["DeepSPM>p(good)"] = format_number(self.p_good)
        return out


def frame_file_name(info: FrameRecordInfo) -> str:
    """`<seq, 7 digits>_<first 12 hex of the frame hash>.sxm`: sorts in journal order, names the frame."""
    return f"{info.seq:07d}_{info.frame_ref[:12]}.sxm"


class SxmFrameWriter:
    """Writes a run's recorded frames as `RUN_DIR/sxm/<seq>_<hash>.sxm` (see `SXM_OUTPUT_MODES`).

    The journal stays the source of truth: `write` returns the file's path relative to the run directory
    (for the journal to name), or None when the mode skips the frame. Files are written atomically.
    """

    def __init__(self, run_dir: Path | str, mode: str = "judged") -> None:
        if mode not in SXM_OUTPUT_MODES:
            raise SxmError(None, f"[output] sxm must be one of {', '.join(SXM_OUTPUT_MODES)}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.mode = mode

    def wants(self, judged: bool) -> bool:
        return self.mode == "all" or (self.mode == "judged" and judged)

    def write(self, frame_m: np.ndarray, info: FrameRecordInfo, backward_m: np.ndarray | None = None) -> str | None:
        """Write one frame (lines, pixels) of heights in metres, row 0 at the top, if the mode wants it."""
        if not self.wants(info.judgement is not None):
            return None
        relative = f"{SXM_DIR}/{frame_file_name(info)}"
        write_frame_sxm(self.run_dir / relative, frame_m, info, backward_m)
        return relative


def write_frame_sxm(path: Path | str, frame_m: np.ndarray, info: FrameRecordInfo,
                    backward_m: np.ndarray | None = None) -> Path:
    """One recorded frame (lines, pixels; metres; row 0 at the top) as an .sxm with the run's metadata."""
    frame = np.asarray(frame_m, dtype=np.float32)
    if frame.ndim != 2:
        raise SxmError(path, f"a frame must be 2-D, got shape {frame.shape}")
    lines, pixels = frame.shape
    params = ScanParameters(
        range_m=(info.size_m, info.size_m * lines / pixels), offset_m=info.centre_m, angle_deg=0.0,
        scan_up=info.scan_up, bias_v=info.bias_v, setpoint_a=info.setpoint_a, recorded_utc=info.recorded_utc,
        comment=info.comment(), line_time_s=info.line_time_s, source_file=Path(path).name, extra=info.extra(),
    )
    channel = ScanImage(info.channel, "m", forward=frame,
                        backward=None if backward_m is None else np.asarray(backward_m, np.float32))
    return write_sxm(path, [channel], params)
