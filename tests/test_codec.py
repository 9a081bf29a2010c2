"""The sans-I/O codec: every type, every command's request and reply, any chunking, typed errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspm.io import codec
from deepspm.io.commands import TABLE, Release, lookup, release_for
from deepspm.io.errors import ArgumentError, ProtocolError, UnsupportedCommand

ascii_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
i32 = st.integers(-(2**31), 2**31 - 1)
f32 = st.floats(width=32, allow_nan=False)


def value_strategy(wire: codec.WireType) -> st.SearchStrategy:
    label = wire.label
    if label == "i32":
        return i32
    if label == "u16":
        return st.integers(0, 2**16 - 1)
    if label == "u32":
        return st.integers(0, 2**32 - 1)
    if label == "f32":
        return f32
    if label == "f64":
        return st.floats(allow_nan=False)
    if label == "str":
        return ascii_text
    if label == "i32[]":
        return st.lists(i32, max_size=8)
    if label in ("f32[]", "f64[]"):
        return st.lists(f32, max_size=8).map(lambda v: np.array(v, np.float64))
    if label == "strarr":
        return st.lists(ascii_text, max_size=5)
    if label == "f32[][]":
        return st.tuples(st.integers(0, 5), st.integers(0, 5)).flatmap(
            lambda rc: st.lists(f32, min_size=rc[0] * rc[1], max_size=rc[0] * rc[1]).map(
                lambda v: np.array(v, np.float32).reshape(rc)
            )
        )
    if label == "str[][]":
        return st.tuples(st.integers(1, 3), st.integers(1, 3)).flatmap(
            lambda rc: st.lists(st.lists(ascii_text, min_size=rc[1], max_size=rc[1]), min_size=rc[0], max_size=rc[0])
        )
    raise AssertionError(label)


@pytest.mark.parametrize("label", sorted(codec.TYPES))
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_every_type_round_trips(label: str, data: st.DataObject) -> None:
    wire = codec.TYPES[label]
    value = data.draw(value_strategy(wire))
    out = bytearray()
    wire.encode(value, out, "v")
    decoded, end = wire.decode(memoryview(bytes(out)), 0, "v")
    assert end == len(out)
    check(decoded, value, label)


@pytest.mark.parametrize("label", sorted(codec.TYPES))
def test_truncated_values_raise_protocol_error(label: str) -> None:
    wire = codec.TYPES[label]
    example = {
        "i32": 1, "u16": 1, "u32": 1, "f32": 1.0, "f64": 1.0, "str": "abc", "i32[]": [1, 2], "f32[]": [1.0],
        "f64[]": [1.0], "strarr": ["ab", "c"], "f32[][]": np.ones((2, 2)), "str[][]": [["a", "b"]],
    }[label]
    out = bytearray()
    wire.encode(example, out, "v")
    with pytest.raises(ProtocolError):
        wire.decode(memoryview(bytes(out[:-1])), 0, "v")


def test_impossible_sizes_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="impossible"):
        codec.TYPES["f32[][]"].decode(memoryview(struct.pack(">ii", 100000, 100000)), 0, "frame")
    with pytest.raises(ProtocolError, match="impossible"):
        codec.TYPES["str"].decode(memoryview(struct.pack(">i", -3)), 0, "s")


def test_bad_arguments_are_typed() -> None:
    with pytest.raises(ArgumentError):
        lookup("Bias.Set").encode_args(["x"], Release.R14718)
    with pytest.raises(ArgumentError):
        lookup("Scan.Action").encode_args([70000, 1], Release.R14718)
    with pytest.raises(ArgumentError):
        lookup("Util.SessionPathSet").encode_args(["\u2603", 0], Release.R14718)
    with pytest.raises(ArgumentError):
        lookup("Bias.Set").encode_args([], Release.R14718)
    with pytest.raises(ArgumentError, match="u32"):
        lookup("Scan.StatusGet").encode_reply({"running": 1.7}, Release.R14718)
    with pytest.raises(ArgumentError):
        lookup("Bias.Set").encode_args(["1.0"], Release.R14718)


def args_for(spec, release):
    return st.tuples(*[value_strategy(f.type) for f in spec.layout(release).args])


def reply_for(spec, release):
    layout = spec.layout(release).reply
    return st.fixed_dictionaries({f.name: value_strategy(f.type) for f in layout})


COMMANDS = [(s, r) for s in TABLE.values() for r in Release if r in s.layouts]


@pytest.mark.parametrize("spec,release", COMMANDS, ids=[f"{s.name}-{r.name}" for s, r in COMMANDS])
@given(data=st.data())
@settings(max_examples=8, deadline=None)
def test_every_command_request_and_reply_round_trip_in_any_chunking(spec, release, data: st.DataObject) -> None:
    args = data.draw(args_for(spec, release))
    request = codec.encode_request(spec.name, spec.encode_args(list(args), release))
    reply_values = data.draw(reply_for(spec, release))
    reply = codec.encode_reply(spec.name, spec.encode_reply(reply_values, release))
    cuts = data.draw(st.lists(st.integers(1, 64), max_size=30))

    server = codec.MessageDecoder("request")
    got = [m for chunk in split(request, cuts) for m in server.feed(chunk)]
    assert len(got) == 1 and got[0].name == spec.name and server.pending == 0
    decoded_args = spec.decode_args(got[0].body, release)
    for f, v in zip(spec.layout(release).args, args):
        check(decoded_args[f.name], v, f.type.label)

    client = codec.MessageDecoder("reply")
    msgs = [m for chunk in split(reply, cuts) for m in client.feed(chunk)]
    assert len(msgs) == 1
    decoded = spec.decode_reply(msgs[0].body, release)
    assert decoded.status == 0 and decoded.message == ""
    for f in spec.layout(release).reply:
        check(decoded.values[f.name], reply_values[f.name], f.type.label)


def split(data: bytes, cuts: list[int]):
    pos = 0
    for n in cuts:
        if pos >= len(data):
            return
        yield data[pos : pos + n]
        pos += n
    if pos < len(data):
        yield data[pos:]


def check(decoded, original, label: str) -> None:
    if label == "f32":
        assert decoded == np.float32(original)
    elif label in ("f32[]", "f32[][]"):
        np.testing.assert_array_equal(decoded, np.asarray(original, np.float32))
    elif label == "f64[]":
        np.testing.assert_array_equal(decoded, original)
    else:
        assert decoded == original


# -- the worked examples of reference section 2 ---------------------------------------------------------------


def test_folme_xyposget_example_bytes() -> None:
    spec = lookup("FolMe.XYPosGet")
    req = codec.encode_request(spec.name, spec.encode_args([1], Release.R14718))
    assert req == b"FolMe.XYPosGet".ljust(32, b"\0") + bytes.fromhex("00000004 0001 0000 00000001")
    rsp = b"FolMe.XYPosGet".ljust(32, b"\0") + bytes.fromhex(
        "00000018 00000000 3e35798ee2308c3a be35798ee2308c3a 00000000 00000000"
    )
    [m] = codec.MessageDecoder("reply").feed(rsp)
    values = spec.decode_reply(m.body, Release.R14718).values
    assert values == {"x_m": pytest.approx(5e-9), "y_m": pytest.approx(-5e-9)}


def test_folme_xyposset_and_bias_examples() -> None:
    spec = lookup("FolMe.XYPosSet")
    body = spec.encode_args([10e-9, 15e-9, 1], Release.R14718)
    assert body == bytes.fromhex("3e45798ee2308c3a 3e501b2b29a4692b 00000001")
    assert lookup("Bias.Set").encode_args([-1.5], Release.R14718) == bytes.fromhex("bfc00000")
    encoded = lookup("Bias.Pulse").encode_args([1, 0.1, 3.0, 1, 2], Release.R14718)
    assert encoded == bytes.fromhex("00000001 3dcccccd 40400000 0001 0002")
    assert lookup("Scan.Action").encode_args([0, 1], Release.R14718) == bytes.fromhex("0000 00000001")
    assert lookup("Scan.BufferSet").encode_args([[0, 14], 256, 256], Release.R14718) == bytes.fromhex(
        "00000002 00000000 0000000e 00000100 00000100"
    )
    get = codec.encode_request("Bias.Get", b"")
    assert get == b"Bias.Get".ljust(32, b"\0") + bytes.fromhex("00000000 0001 0000")
    reply = codec.encode_reply("Bias.Get", lookup("Bias.Get").encode_reply({"bias_V": 0.25}, Release.R14718))
    assert reply[32:] == bytes.fromhex("0000000c 00000000 3e800000 00000000 00000000")


def test_frame_data_grab_example_with_nan_row() -> None:
    spec = lookup("Scan.FrameDataGrab")
    assert spec.encode_args([14, 1], Release.R14718) == bytes.fromhex("0000000e 00000001")
    body = bytes.fromhex(
        "00000005 5a20286d29 00000002 00000003 3089705f 3109705f 314e288f 7fc00000 7fc00000 7fc00000 00000001 00000000 00000000"
    )
    assert len(body) == 0x35
    values = spec.decode_reply(body, Release.R14718).values
    assert values["channel_name"] == "Z (m)" and values["scan_up"] == 1
    assert values["data"].shape == (2, 3) and values["data"].dtype == np.float32
    np.testing.assert_allclose(values["data"][0], [1e-9, 2e-9, 3e-9], rtol=1e-6)
    assert np.isnan(values["data"][1]).all()


def test_error_reply_and_string_array_examples() -> None:
    spec = lookup("ZCtrl.ZPosSet")
    decoded = spec.decode_reply(bytes.fromhex("00000001 00000003 426164"), Release.R14718)
    assert (decoded.status, decoded.message) == (1, "Bad")
    assert spec.encode_reply(None, Release.R14718, 1, "Bad") == bytes.fromhex("00000001 00000003 426164")
    names = lookup("Signals.NamesGet").encode_reply({"names": ["Current (A)", "Z (m)"]}, Release.R14718)
    assert names.hex() == "00000018000000020000000b43757272656e7420284129000000055a20286d290000000000000000"


def test_failed_reply_without_values_is_accepted_and_zero_filled() -> None:
    decoded = lookup("Bias.Get").decode_reply(bytes.fromhex("00000001 00000005 4572726f72"), Release.R14718)
    assert decoded.status == 1 and decoded.message == "Error" and decoded.values == {"bias_V": 0.0}


def test_reply_layout_mismatch_is_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="does not match"):
        lookup("Bias.Get").decode_reply(bytes(13), Release.R14718)
    with pytest.raises(ProtocolError):
        lookup("Bias.Get").decode_reply(bytes.fromhex("3e800000 00000002 00000000"), Release.R14718)  # status 2


def test_garbage_header_and_impossible_size() -> None:
    with pytest.raises(ProtocolError, match="garbage"):
        codec.MessageDecoder("reply").feed(b"\xff" * 40)
    with pytest.raises(ProtocolError, match="impossible body size"):
        codec.MessageDecoder("reply").feed(b"Bias.Get".ljust(32, b"\0") + struct.pack(">iI", 2, 0))
    with pytest.raises(ProtocolError, match="impossible body size"):
        codec.MessageDecoder("reply").feed(b"Bias.Get".ljust(32, b"\0") + struct.pack(">iI", 1 << 30, 0))


def test_request_response_flag_and_lower_case_lookup() -> None:
    [m] = codec.MessageDecoder("request").feed(codec.encode_request("bias.get", b"", want_reply=False))
    assert m.name == "bias.get" and m.want_reply is False
    assert lookup(m.name).name == "Bias.Get"
    with pytest.raises(UnsupportedCommand):
        lookup("Nope.Nothing")


def test_version_dependent_layouts() -> None:
    assert release_for(None) is Release.R10862
    assert release_for(10000) is Release.R10862
    assert release_for(13742) is Release.R13742
    assert release_for(14718) is Release.R14718
    with pytest.raises(UnsupportedCommand):
        lookup("Util.VersionGet").layout(Release.R10862)
    with pytest.raises(UnsupportedCommand):
        lookup("Signals.InSlotsGet").layout(Release.R14718)
    assert len(lookup("Scan.PropsSet").layout(Release.R10862).args) == 5
    assert len(lookup("Scan.PropsSet").layout(Release.R13742).args) == 6
    assert len(lookup("Scan.PropsSet").layout(Release.R14718).args) == 7
    assert lookup("Motor.PosGet").layout(Release.R10862).args == ()
