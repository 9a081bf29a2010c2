"""Sans-I/O codec for the Nanonis V5 TCP protocol (reference: nanonis-tcp.md sections 1-2).

Everything is big-endian with no padding. A message is a 40-byte header (32-byte command name, i32 body
size, then the response flag for requests or 4 reserved bytes for replies) and a body. Reply bodies end
with the error section (u32 status, i32 description size, description). No I/O happens here: the
connection and the fake server feed bytes in and take bytes out, so the same code serves both sides.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepspm.io.errors import ArgumentError, ProtocolError

HEADER_SIZE = 40
NAME_SIZE = 32
MAX_BODY_SIZE = 64 * 1024 * 1024  # a 4096x4096 float32 frame is 64 MiB; anything larger is a desync
ERROR_SECTION_MIN = 8

_REQUEST_HEADER = struct.Struct(">32siHH")
_REPLY_HEADER = struct.Struct(">32siI")
_ERROR_HEAD = struct.Struct(">Ii")


def _text(raw: bytes | memoryview) -> str:
    # The server is a Windows LabVIEW program: one byte per character, never fail on decode.
    return bytes(raw).decode("latin-1")


def _ascii(value: str, what: str) -> bytes:
    try:
        return value.encode("latin-1")
    except (UnicodeEncodeError, AttributeError) as exc:
        raise ArgumentError(f"{what}: cannot send {value!r} as one byte per character") from exc


class WireType:
    """One type of the protocol: how a Python value becomes bytes and back."""

    label: str = "?"

    def encode(self, value: Any, out: bytearray, what: str) -> None:
        raise NotImplementedError

    def decode(self, buf: memoryview, pos: int, what: str) -> tuple[Any, int]:
        raise NotImplementedError

    def zero(self) -> Any:
        """The value a server sends in a failed reply (the full layout with zero/empty values)."""
        raise NotImplementedError


def _need(buf: memoryview, pos: int, n: int, what: str) -> None:
    if n < 0 or pos + n > len(buf):
        raise ProtocolError(f"{what}: needs {n} bytes at offset {pos}, body has {len(buf)}", bytes(buf[:256]))


class Scalar(WireType):
    def __init__(self, label: str, fmt: str, kind: type) -> None:
        self.label = label
        self._struct = struct.Struct(">" + fmt)
        self._kind = kind

    def encode(self, value: Any, out: bytearray, what: str) -> None:
        if isinstance(value, (str, bytes)) or (self._kind is int and isinstance(value, float) and not value.is_integer()):
            raise ArgumentError(f"{what}: {value!r} is not a valid {self.label}")
        try:
            v = self._kind(value)
            out += self._struct.pack(v)
        except (struct.error, TypeError, ValueError, OverflowError) as exc:
            raise ArgumentError(f"{what}: {value!r} is not a valid {self.label}") from exc

    def decode(self, buf: memoryview, pos: int, what: str) -> tuple[Any, int]:
        _need(buf, pos, self._struct.size, what)
        return self._struct.unpack_from(buf, pos)[0], pos + self._struct.size

    def zero(self) -> Any:
        return self._kind(0)


I32 = Scalar("i32", "i", int)
U16 = Scalar("u16", "H", int)
U32 = Scalar("u32", "I", int)
F32 = Scalar("f32", "f", float)
F64 = Scalar("f64", "d", float)
_COUNT = struct.Struct(">i")


def _read_count(buf: memoryview, pos: int, what: str, elem_size: int) -> tuple[int, int]:
    _need(buf, pos, 4, what)
    n = _COUNT.unpack_from(buf, pos)[0]
    if n < 0 or n * max(elem_size, 1) > len(buf) - pos - 4:
        raise ProtocolError(f"{what}: impossible size {n} at offset {pos} (body {len(buf)} bytes)", bytes(buf[:256]))
    return n, pos + 4


class String(WireType):
    """A string preceded by its i32 byte count (the document's separate length argument)."""

    label = "str"

    def encode(self, value: Any, out: bytearray, what: str) -> None:
        if not isinstance(value, str):
            raise ArgumentError(f"{what}: expected a string, got {type(value).__name__}")
        raw = _ascii(value, what)
        out += _COUNT.pack(len(raw)) + raw

    def decode(self, buf: memoryview, pos: int, what: str) -> tuple[Any, int]:
        n, pos = _read_count(buf, pos, what, 1)
        return _text(buf[pos : pos + n]), pos + n

    def zero(self) -> Any:
        return ""


class NumericArray(WireType):
    """A 1D numeric array preceded by its i32 element count."""

    def __init__(self, label: str, dtype: str) -> None:
        self.label = label
        self._wire = np.dtype(dtype)
        self._native = self._wire.newbyteorder("=")

    def encode(self, value: Any, out: bytearray, what: str) -> None:
        arr = np.asarray(value)
        if arr.ndim != 1:
            raise ArgumentError(f"{what}: expected a 1D sequence, got shape {arr.shape}")
        if self._wire.kind == "i" and arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ArgumentError(f"{what}: expected integers, got {arr.dtype}")
        out += _COUNT.pack(arr.size) + arr.astype(self._wire, copy=False).tobytes()

    def decode(self, buf: memoryview, pos: int, what: str) -> tuple[Any, int]:
        n, pos = _read_count(buf, pos, what, self._wire.itemsize)
        end = pos + n * self._wire.itemsize
        arr = np.frombuffer(buf, dtype=self._wire, count=n, offset=pos).astype(self._native)
        if self._wire.kind == "i":
            return [int(v) for v in arr], end
        return arr, end

    def zero(self) -> Any:
        return [] if self._wire.kind == "i" else np.zeros(0, self._native)


class StringArray(WireType):
    """i32 byte size (sum of 4 + len), i32 count, then each element as i32 length + bytes.

    On receipt the byte size is ignored (clients disagree about it, reference 1.6); parsing follows the count.
    """

    label = "strarr"

    def encode(self, value: Any, out: bytearray, what: str) -> None:
        if isinstance(value, str):
            raise ArgumentError(f"{what}: expected a sequence of strings, got one string")
        encoded = [_ascii(v, what) if isinstance(v, str) else None for v in value]
        items = [i for i in encoded if i is not None]
        if len(items) != len(encoded):
            raise ArgumentError(f"{what}: every element must be a string")
        size = sum(4 + len(i) for i in items)
        out += _COUNT.pack(size) + _COUNT.pack(len(items))
        for i in items:
            out += _COUNT.pack(len(i)) + i

    def decode(self, buf: memoryview, pos: int, what: str) -> tuple[Any, int]:
        _need(buf, pos, 4, what)
        pos += 4  # byte size: informational only
        n, pos = _read_count(buf, pos, what, 4)
        items = []
        for k in range(n):
            m, pos = _read_count(buf, pos, f"{what}[{k}]", 1)
            items.append(_text(buf[pos : pos + m]))
            pos += m
        return items, pos

    def zero(self) -> Any:
        return []


class Float2D(WireType):
    """i32 rows, i32 cols, then rows*cols big-endian float32, row-major (rows = scan lines)."""

    label = "f32[][]"
    _wire = np.dtype(">f4")

    def encode(self, value: Any, out: bytearray, what: str) -> None:
        arr = np.asarray(value)
        if arr.ndim != 2:
            raise ArgumentError(f"{what}: expected a 2D array, got shape {arr.shape}")
        out += struct.pack(">ii", *arr.shape) + arr.astype(self._wire, copy=False).tobytes()

    def decode(self, buf: memoryview, pos: int, what: str) -> tuple[Any, int]:
        _need(buf, pos, 8, what)
        rows, cols = struct.unpack_from(">ii", buf, pos)
        pos += 8
        if rows < 0 or cols < 0 or rows * cols * 4 > len(buf) - pos:
            raise ProtocolError(f"{what}: impossible frame {rows}x{cols} for a {len(buf)}-byte body", bytes(buf[:256]))
        data = np.frombuffer(buf, dtype=self._wire, count=rows * cols, offset=pos)
        return data.astype(np.float32).reshape(rows, cols), pos + rows * cols * 4

    def zero(self) -> Any:
        return np.zeros((0, 0), np.float32)


class String2D(WireType):
    """i32 rows, i32 cols, then rows*cols length-prefixed strings (no byte-size field)."""

    label = "str[][]"

    def encode(self, value: Any, out: bytearray, what: str) -> None:
        rows = [list(r) for r in value]
        cols = len(rows[0]) if rows else 0
        if any(len(r) != cols for r in rows):
            raise ArgumentError(f"{what}: rows of unequal length")
        out += struct.pack(">ii", len(rows), cols)
        for r in rows:
            for v in r:
                raw = _ascii(v, what)
                out += _COUNT.pack(len(raw)) + raw

    def decode(self, buf: memoryview, pos: int, what: str) -> tuple[Any, int]:
        _need(buf, pos, 8, what)
        rows, cols = struct.unpack_from(">ii", buf, pos)
        pos += 8
        if rows < 0 or cols < 0 or rows * cols * 4 > len(buf) - pos:
            raise ProtocolError(f"{what}: impossible table {rows}x{cols}", bytes(buf[:256]))
        table = []
        for _ in range(rows):
            row = []
            for _ in range(cols):
                m, pos = _read_count(buf, pos, what, 1)
                row.append(_text(buf[pos : pos + m]))
                pos += m
            table.append(row)
        return table, pos

    def zero(self) -> Any:
        return []


TYPES: dict[str, WireType] = {
    "i32": I32,
    "u16": U16,
    "u32": U32,
    "f32": F32,
    "f64": F64,
    "str": String(),
    "i32[]": NumericArray("i32[]", ">i4"),
    "f32[]": NumericArray("f32[]", ">f4"),
    "f64[]": NumericArray("f64[]", ">f8"),
    "strarr": StringArray(),
    "f32[][]": Float2D(),
    "str[][]": String2D(),
}


@dataclass(frozen=True)
class Field:
    name: str
    type: WireType


def fields(spec: str) -> tuple[Field, ...]:
    """Parse a compact layout such as ``"x_m:f32 y_m:f32 wait:u32"``."""
    out = []
    for token in spec.split():
        name, _, label = token.partition(":")
        if label not in TYPES:
            raise KeyError(f"unknown wire type {label!r} in layout {spec!r}")
        out.append(Field(name, TYPES[label]))
    return tuple(out)


def encode_values(layout: Sequence[Field], values: Sequence[Any], command: str) -> bytes:
    if len(values) != len(layout):
        names = ", ".join(f.name for f in layout)
        raise ArgumentError(f"{command}: expected {len(layout)} values ({names}), got {len(values)}")
    out = bytearray()
    for f, v in zip(layout, values):
        f.type.encode(v, out, f"{command}.{f.name}")
    return bytes(out)


def decode_values(layout: Sequence[Field], buf: memoryview, pos: int, command: str) -> tuple[dict[str, Any], int]:
    values = {}
    for f in layout:
        values[f.name], pos = f.type.decode(buf, pos, f"{command}.{f.name}")
    return values, pos


# -- the error section ------------------------------------------------------------------------------------


def encode_error_section(status: int = 0, message: str = "") -> bytes:
    raw = _ascii(message, "error description")
    return _ERROR_HEAD.pack(status, len(raw)) + raw


def _error_at(buf: memoryview, pos: int) -> tuple[int, str] | None:
    """The error section starting at `pos` if it ends exactly at the body's end, else None."""
    if len(buf) - pos < ERROR_SECTION_MIN:
        return None
    status, n = _ERROR_HEAD.unpack_from(buf, pos)
    if status not in (0, 1) or n < 0 or pos + 8 + n != len(buf):
        return None
    return status, _text(buf[pos + 8 :])


@dataclass(frozen=True)
class DecodedReply:
    values: dict[str, Any]
    status: int
    message: str


def decode_reply_body(layout: Sequence[Field], body: bytes | memoryview, command: str) -> DecodedReply:
    """Decode return values and the closing error section; parsing must end exactly at the body's end.

    A failed reply normally carries the full layout with zero values (what our fake server sends); if the
    values cannot be parsed but the whole body is a failed error section, that is accepted too (the real
    server's layout on failure is undocumented).
    """
    buf = memoryview(body)
    try:
        values, pos = decode_values(layout, buf, 0, command)
        section = _error_at(buf, pos)
    except ProtocolError:
        section, values = None, {}
    if section is None:
        bare = _error_at(buf, 0)
        if bare is not None and bare[0] == 1:
            return DecodedReply({f.name: f.type.zero() for f in layout}, *bare)
        raise ProtocolError(f"{command}: reply body of {len(buf)} bytes does not match its layout", bytes(buf[:256]))
    return DecodedReply(values, *section)


# -- headers and framing ----------------------------------------------------------------------------------


def _pack_name(name: str) -> bytes:
    raw = _ascii(name, "command name")
    if not raw or len(raw) > NAME_SIZE:
        raise ArgumentError(f"command name {name!r} must be 1..32 characters")
    return raw


def encode_request(name: str, body: bytes, want_reply: bool = True) -> bytes:
    return _REQUEST_HEADER.pack(_pack_name(name), len(body), 1 if want_reply else 0, 0) + body


def encode_reply(name: str, body: bytes) -> bytes:
    return _REPLY_HEADER.pack(_pack_name(name), len(body), 0) + body


@dataclass(frozen=True)
class Message:
    """One framed message: `name` as sent (not case-folded), `body`, and for requests the response flag."""

    name: str
    body: bytes
    want_reply: bool = True


def _parse_name(raw: bytes) -> str:
    name, _, pad = raw.partition(b"\0")
    if not name or pad.strip(b"\0") or any(c < 0x21 or c > 0x7E for c in name):
        raise ProtocolError(f"garbage header: name field {raw!r} is not an ASCII command name", raw)
    return name.decode("ascii")


class MessageDecoder:
    """Incremental framing: feed bytes in any chunking, take complete messages out.

    `kind` is "request" (server side) or "reply" (client side). Sizes outside [min, MAX_BODY_SIZE] raise
    ProtocolError at once: they mean a desynchronised stream or an endianness slip.
    """

    def __init__(self, kind: str, max_body: int = MAX_BODY_SIZE) -> None:
        if kind not in ("request", "reply"):
            raise ValueError(kind)
        self._kind = kind
        self._min_body = ERROR_SECTION_MIN if kind == "reply" else 0
        self._max_body = max_body
        self._buf = bytearray()
        self._head: tuple[str, int, bool] | None = None

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    @property
    def mid_message(self) -> bool:
        return self._head is not None or bool(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            if self._head is None:
                if len(self._buf) < HEADER_SIZE:
                    return out
                self._head = self._parse_header(bytes(self._buf[:HEADER_SIZE]))
                del self._buf[:HEADER_SIZE]
            name, size, want = self._head
            if len(self._buf) < size:
                return out
            out.append(Message(name, bytes(self._buf[:size]), want))
            del self._buf[:size]
            self._head = None

    def _parse_header(self, raw: bytes) -> tuple[str, int, bool]:
        if self._kind == "request":
            name_raw, size, flag, _ = _REQUEST_HEADER.unpack(raw)
            want = flag != 0
        else:
            name_raw, size, _ = _REPLY_HEADER.unpack(raw)
            want = True
        name = _parse_name(name_raw)
        if not self._min_body <= size <= self._max_body:
            raise ProtocolError(f"{name}: impossible body size {size} in header", raw)
        return name, size, want

