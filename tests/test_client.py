"""Our connection and typed client, through real sockets on 127.0.0.1 against the scriptable server."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from deepspm.io import codec
from deepspm.io.client import NanonisClient, TipShaperProps
from deepspm.io.commands import TABLE, Release, lookup
from deepspm.io.connection import Backoff, NanonisConnection
from deepspm.io.errors import CommandTimeout, ConnectionLost, NanonisError, ProtocolError
from deepspm.io.safety import SafetyEnvelope
from deepspm.simulator.faults import (
    Chunked,
    CloseBeforeReply,
    CloseMidBody,
    ErrorReply,
    Garbage,
    NeverReply,
    Unsolicited,
    WrongName,
)
from deepspm.simulator.server import FakeNanonisServer

pytestmark = pytest.mark.timeout(30)

FRAME = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) * 1e-12


def handlers() -> dict:
    return {
        "Bias.Get": lambda a: {"bias_V": -1.0},
        "Bias.Set": lambda a: None,
        "Bias.Pulse": lambda a: None,
        "TipShaper.PropsSet": lambda a: None,
        "ZCtrl.ZPosGet": lambda a: {"z_m": 12e-9},
        "Piezo.RangeGet": lambda a: {"x_m": 850e-9, "y_m": 850e-9, "z_m": 1e-6},
        "Scan.FrameDataGrab": lambda a: {"channel_name": "Z (m)", "data": FRAME, "scan_up": 1},
        "Signals.NamesGet": lambda a: {"names": ["Current (A)", "Bias (V)", "Z (m)"]},
    }


def new_client(port: int, **kw) -> NanonisClient:
    conn = NanonisConnection("127.0.0.1", port, backoff=Backoff(attempts=2, initial_s=0.0))
    return NanonisClient(conn, SafetyEnvelope(kw.pop("limits", None), piezo_range_m=(850e-9, 850e-9, 1e-6)), **kw)


async def test_typed_calls_return_si_values() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        assert client.release is Release.R14718
        assert client.version is not None and client.version.rt_release == 14718
        assert await client.bias_get() == -1.0
        assert await client.z_pos_get() == pytest.approx(12e-9)
        frame = await client.scan_frame_data_grab(30)
        np.testing.assert_array_equal(frame.data, FRAME)
        assert frame.scan_up and frame.channel_name == "Z (m)"
        assert await client.signal_names() == ["Current (A)", "Bias (V)", "Z (m)"]
        assert server.requests[-1].args == {}


@pytest.mark.parametrize(
    "release,version,expected",
    [
        (Release.R14718, None, Release.R14718),
        (Release.R14718, ("Nanonis SPM Control Software", "Generic 5", 13000, 13742), Release.R13742),
        (Release.R10862, None, Release.R10862),
    ],
)
async def test_version_detection_selects_layouts(release, version, expected) -> None:
    async with (
        FakeNanonisServer(release=release, version=version, handlers=handlers()) as server,
        new_client(server.port) as client,
    ):
        assert client.release is expected
        assert await client.bias_get() == -1.0


async def test_version_get_without_reply_falls_back_to_oldest_layouts_on_a_new_connection() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server:
        server.inject("Util.VersionGet", NeverReply())
        client = new_client(server.port, version_timeout_s=0.2)
        async with client:
            assert client.release is Release.R10862
            assert client.connection.connects == 2
            assert await client.bias_get() == -1.0


# -- faults: a typed error, then a usable client -------------------------------------------------------------


async def test_error_status_raises_nanonis_error_and_connection_stays() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        server.inject("Bias.Get", ErrorReply("Bias module busy"))
        with pytest.raises(NanonisError, match="Bias module busy") as info:
            await client.bias_get()
        assert info.value.code == 1 and info.value.command == "Bias.Get"
        assert await client.bias_get() == -1.0
        assert client.connection.connects == 1


@pytest.mark.parametrize(
    "fault,error",
    [
        (Garbage(b"\xde\xad" * 30), ProtocolError),
        (WrongName("Bias.Set"), ProtocolError),
        (Unsolicited(b"\x00" * 12), ProtocolError),
        (CloseMidBody(6), ConnectionLost),
        (CloseBeforeReply(), ConnectionLost),
    ],
    ids=["garbage", "wrong-name", "unsolicited", "mid-body", "before-reply"],
)
async def test_broken_replies_raise_typed_errors_and_client_recovers(fault, error) -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        server.inject("Bias.Pulse", fault)
        with pytest.raises(error):
            await client.bias_pulse(0.1, 3.0)
        assert not client.connection.connected  # closed on interruption
        assert await client.z_pos_get() == pytest.approx(12e-9)  # new connection, in step
        assert client.connection.connects == 2
        assert server.call_count("Bias.Pulse") == 1  # never re-sent


async def test_timeout_closes_socket_and_is_typed() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port, default_timeout_s=0.2) as client:
        server.inject("Bias.Set", NeverReply())
        with pytest.raises(CommandTimeout, match="outcome unknown"):
            await client.bias_set(-1.0)
        assert server.call_count("Bias.Set") == 1
        assert await client.bias_get() == -1.0


async def test_cancellation_mid_request_closes_and_client_stays_usable() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        server.inject("Bias.Get", NeverReply())
        task = asyncio.create_task(client.bias_get())
        await server.wait_for_requests(server.request_count + 1, timeout=5)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client.connection.connected
        assert await client.bias_get() == -1.0


async def test_chunked_replies_are_reassembled() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        server.inject("Scan.FrameDataGrab", Chunked(7))
        frame = await client.scan_frame_data_grab(30)
        np.testing.assert_array_equal(frame.data, FRAME)


async def test_reads_are_retried_once_after_reconnect_but_writes_never() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        server.inject("Bias.Get", CloseBeforeReply())
        assert await client.bias_get() == -1.0
        assert server.call_count("Bias.Get") == 2
        server.inject("Bias.Set", CloseBeforeReply())
        with pytest.raises(ConnectionLost):
            await client.bias_set(-0.5)
        assert server.call_count("Bias.Set") == 1


async def test_connect_failure_is_typed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = new_client(port)
    with pytest.raises(ConnectionLost, match="cannot connect"):
        await client.connect()


async def test_one_request_in_flight_when_shared_between_tasks() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server, new_client(server.port) as client:
        results = await asyncio.gather(*(client.bias_get() for _ in range(20)), client.z_pos_get())
        assert results[:20] == [-1.0] * 20 and results[20] == pytest.approx(12e-9)


# -- our bytes equal the vendor client's bytes ---------------------------------------------------------------


def sample_value(label: str, name: str):
    return {
        "i32": 3, "u16": 1, "u32": 1, "f32": 1.5, "f64": 2.5e-9, "str": "deepspm",
        "i32[]": [0, 30], "f32[]": [1.0, 2.0], "f64[]": [1.0], "strarr": [], "f32[][]": np.zeros((1, 1)),
        "str[][]": [["a"]],
    }[label]


VENDOR_COMMANDS = sorted(
    s.name for s in TABLE.values() if Release.R14718 in s.layouts and s.name not in ("Scan.WaitEndOfLine", "Util.SessionPathSet")
)


def vendor_requests(port: int, calls: list[tuple[str, list]]) -> None:
    import contextlib
    import io

    import nanonis_spm

    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    try:
        nanonis = nanonis_spm.Nanonis(sock)
        for name, args in calls:
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    getattr(nanonis, name.replace(".", "_"))(*[list(a) if isinstance(a, list) else a for a in args])
                except Exception:
                    pass  # only the request bytes matter here; some vendor wrappers fail to parse replies
    finally:
        sock.close()


async def test_request_bytes_equal_the_vendor_clients_for_every_shared_command() -> None:
    calls = []
    for name in VENDOR_COMMANDS:
        layout = lookup(name).layout(Release.R14718).args
        calls.append((name, [sample_value(f.type.label, f.name) for f in layout]))
    async with FakeNanonisServer(unknown_reply=True) as server:
        await asyncio.to_thread(vendor_requests, server.port, calls)
        await server.wait_for_requests(len(calls), timeout=10)
        vendor = {r.name: r.raw for r in server.requests}
    assert len(vendor) == len(calls)
    mismatched = []
    for name, args in calls:
        ours = codec.encode_request(name, lookup(name).encode_args(args, Release.R14718))
        if ours != vendor[name]:
            mismatched.append(f"{name}: ours {ours.hex()} vendor {vendor[name].hex()}")
    assert not mismatched, "\n".join(mismatched)


async def test_client_sends_exactly_the_codec_bytes() -> None:
    async with FakeNanonisServer(handlers=handlers()) as server:
        async with new_client(server.port) as client:
            await client.bias_pulse(0.1, 3.0)
            await client.tip_shaper_props_set(TipShaperProps(0.05, 1, 0.02, -1e-9, 0.2, -1.0, 0.05, 1e-9, 0.2, 0.5, 1))
        raw = {r.name: r.raw for r in server.requests}
    assert raw["Bias.Pulse"] == codec.encode_request("Bias.Pulse", bytes.fromhex("00000001 3dcccccd 40400000 0001 0002"))
    assert raw["TipShaper.PropsSet"][32:36] == (44).to_bytes(4, "big")
