"""Hostile input (issue 17): Hypothesis feeds random and mutated bytes to the codec's incremental decoder, random
TOML to the config loader, truncated and corrupted journals to the journal reader and the typed records, and
random and mutated requests to the fake server. Each either succeeds or raises only its typed errors, never
hangs, and the server stays up. Bounded: every test sets max_examples and a deadline; run pytest with
--hypothesis-show-statistics to see how many examples each ran."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deepspm.controller.config import KEYS, ConfigError, load_config
from deepspm.controller.documents import entry_from_record, record_kind
from deepspm.controller.journal import JOURNAL_FILE, JournalError, scan_journal
from deepspm.io import codec, commands
from deepspm.io.commands import TABLE, Release
from deepspm.io.errors import ProtocolError
from deepspm.simulator.server import FakeNanonisServer
from tests import test_documents  # a module, not its tests' names: pytest would collect those twice

RELEASE = Release.R14718
SPECS = sorted((s for s in TABLE.values() if RELEASE in s.layouts), key=lambda s: s.name)
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


# -- the codec: framing and reply bodies -------------------------------------------------------------------------


def valid_reply(spec: commands.CommandSpec, status: int) -> bytes:
    body = spec.encode_reply(None, RELEASE, status=1, message="Injected") if status else spec.encode_reply(
        {f.name: f.type.zero() for f in spec.layout(RELEASE).reply}, RELEASE)
    return codec.encode_reply(spec.name, body)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with a few random edits: flipped bytes, cuts, insertions, a header field overwritten."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "size"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at: at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "size" and len(data) >= codec.HEADER_SIZE:
            data[32:36] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


@st.composite
def reply_streams(draw: st.DrawFn) -> tuple[commands.CommandSpec, bytes]:
    spec = draw(st.sampled_from(SPECS))
    base = b"".join(valid_reply(spec, draw(st.integers(0, 1))) for _ in range(draw(st.integers(1, 3))))
    stream = draw(st.one_of(st.binary(max_size=300), mutated(base), st.just(base)))
    return spec, stream


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@FUZZ
@given(reply_streams(), st.lists(st.integers(0, 2000), max_size=8))
def test_the_reply_decoder_frames_any_stream_or_raises_protocol_error(case: tuple[Any, bytes], cuts: list[int]) -> None:
    """Any bytes, in any chunking: complete messages (the same whatever the chunking), or a ProtocolError; the
    body of a framed reply decodes to values or raises ProtocolError. Nothing else, and it always returns."""
    spec, stream = case

    def frame(chunks: list[bytes]) -> tuple[list[codec.Message], bool]:
        decoder, out = codec.MessageDecoder("reply"), []
        try:
            for chunk in chunks:
                out += decoder.feed(chunk)
        except ProtocolError:
            return out, False
        return out, True

    whole, ok_whole = frame([stream])
    pieces, ok_pieces = frame(split(stream, cuts))
    assert ok_whole == ok_pieces
    # the same messages whatever the chunking; after a framing error, messages completed in the same feed call
    # are dropped with it (the stream is desynchronised and the connection closed), so fewer may come out
    assert whole == pieces if ok_whole else whole == pieces[: len(whole)]
    for message in whole:
        try:
            reply = spec.decode_reply(message.body, RELEASE)
        except ProtocolError:
            continue
        assert reply.status in (0, 1) and set(reply.values) == {f.name for f in spec.layout(RELEASE).reply}


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_the_request_decoder_takes_random_bytes(stream: bytes, cuts: list[int]) -> None:
    decoder, framed = codec.MessageDecoder("request"), []
    with contextlib.suppress(ProtocolError):
        for chunk in split(stream, cuts):
            framed += decoder.feed(chunk)
    assert sum(codec.HEADER_SIZE + len(m.body) for m in framed) <= len(stream)


# -- the config loader -------------------------------------------------------------------------------------------

SECTIONS = sorted(KEYS)
toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=12), st.just(""),
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    lines = []
    for section in draw(st.lists(st.one_of(st.sampled_from(SECTIONS), st.text("abcxyz_", min_size=1, max_size=6)),
                                 max_size=4, unique=True)):
        lines.append(f"[{section}]")
        known = sorted(KEYS.get(section, {}))
        names = st.one_of(st.sampled_from(known), st.text("abz_", min_size=1, max_size=5)) if known else st.text(
            "abz_", min_size=1, max_size=5)
        for name in draw(st.lists(names, max_size=5, unique=True)):
            lines.append(f"{name} = {toml_value(draw(toml_values))}")
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):  # a torn or edited file
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=8)) + text[at + draw(st.integers(0, 8)):]
    return text


@FUZZ
@given(toml_documents())
def test_the_config_loader_takes_random_toml(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "lab.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message.strip() or "not valid TOML" in message, message  # one line, naming the problem
        assert str(path) in message


# -- the journal reader ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journal_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real journal of every document kind (the writer of tests/test_documents.py)."""
    run_dir = tmp_path_factory.mktemp("journal")
    test_documents.test_every_document_is_written_and_read_back_as_itself(run_dir)
    return (run_dir / JOURNAL_FILE).read_bytes()


def read_back(tmp: Path, data: bytes) -> Any:
    run_dir = tmp / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / JOURNAL_FILE).write_bytes(data)
    return scan_journal(run_dir)


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_torn_tail_is_recovered(journal_bytes: bytes, tmp_path: Path, data: st.DataObject) -> None:
    """A journal cut anywhere (kill -9 mid-write) reads as its complete lines plus the torn tail."""
    at = data.draw(st.integers(0, len(journal_bytes)))
    contents = read_back(tmp_path, journal_bytes[:at])
    complete = journal_bytes[:at].rfind(b"\n") + 1
    assert contents.valid_bytes == complete and contents.torn_tail == journal_bytes[complete:at]
    assert contents.records == [json.loads(line) for line in journal_bytes[:complete].splitlines()]
    for record in contents.records:
        entry_from_record(record)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_corrupted_journal_is_a_journal_error_naming_the_line(journal_bytes: bytes, tmp_path: Path,
                                                               data: st.DataObject) -> None:
    corrupted = data.draw(mutated(journal_bytes))
    try:
        contents = read_back(tmp_path, corrupted)
    except JournalError as e:
        assert "line " in str(e) and "\n" not in str(e)
        return
    for record in contents.records:
        try:
            entry_from_record(record)
        except JournalError as e:
            assert "\n" not in str(e)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)


@FUZZ
@given(st.data())
def test_a_record_with_random_fields_is_an_entry_or_a_journal_error(data: st.DataObject) -> None:
    doc = data.draw(st.sampled_from(test_documents.DOCUMENTS))
    record = {"seq": 3, "t_mono": 1.0, "t_wall": 2.0, "kind": record_kind(doc), **doc.to_record()}
    for key in data.draw(st.lists(st.sampled_from(sorted(record)), max_size=3, unique=True)):
        if data.draw(st.booleans()):
            del record[key]
        else:
            record[key] = data.draw(json_values)
    try:
        entry_from_record(record)
    except JournalError as e:
        assert "\n" not in str(e)


# -- the fake server's request parser ----------------------------------------------------------------------------


@st.composite
def request_streams(draw: st.DrawFn) -> bytes:
    spec = draw(st.sampled_from(SPECS))
    layout = spec.layout(RELEASE).args
    body = codec.encode_values(layout, [f.type.zero() for f in layout], spec.name)
    base = codec.encode_request(spec.name, body)
    return draw(st.one_of(st.binary(max_size=200), mutated(base)))


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(request_streams())
def test_the_fake_server_survives_any_request_bytes(stream: bytes) -> None:
    """Whatever arrives, the server answers or closes that connection; it keeps serving new connections,
    and no handler or server error is logged (unknown commands and bad arguments get status-1 replies)."""

    async def go() -> None:
        async with FakeNanonisServer(handlers={"Bias.Get": lambda a: {"bias_V": 0.5}}, record=True) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(stream)
            await writer.drain()
            writer.write_eof()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 5.0)  # the server answers what it framed, then closes
            writer.close()
            # a fresh connection still works
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(codec.encode_request("Bias.Get", b""))
            decoder = codec.MessageDecoder("reply")
            replies: list[codec.Message] = []
            while not replies:
                replies = decoder.feed(await asyncio.wait_for(reader.read(4096), 5.0))
            writer.close()
            assert commands.lookup("Bias.Get").decode_reply(replies[0].body, RELEASE).values["bias_V"] == 0.5
            assert not [e for e in server.events if e.kind in ("handler_error", "server_error")], server.events

    assume(stream)
    asyncio.run(go())
