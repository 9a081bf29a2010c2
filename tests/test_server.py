"""The fake Nanonis server, through real sockets on 127.0.0.1: wire bytes, dispatch, faults, vendor client.

Raw clients here write request bytes by hand (or with the codec) and read replies with readexactly, so
every assertion is about bytes on the wire. Each wait is bounded; the only sleeps are tiny injected Delays.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from deepspm.io import codec, commands
from deepspm.io.commands import Release
from deepspm.io.errors import UnsupportedCommand
from deepspm.simulator.faults import (
    BadBodySize,
    Chunked,
    CloseAfterHeader,
    CloseBeforeReply,
    CloseMidBody,
    Delay,
    ErrorReply,
    Garbage,
    NeverReply,
    Unsolicited,
    WrongName,
)
from deepspm.simulator.server import CommandFailed, FakeNanonisServer

pytestmark = pytest.mark.timeout(20)

STEP_S = 2.0  # bound on any single network step in these tests


def name32(name: str) -> str:
    """The hex of a command name padded to 32 bytes (the reference's `name…`)."""
    return name.encode().ljust(32, b"\0").hex()


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


class RawClient:
    """A hand-driven client: writes given bytes, reads exact byte counts, never interprets more than asked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        async with asyncio.timeout(STEP_S):
            return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def request(self, name: str, body: bytes = b"", want_reply: bool = True) -> None:
        await self.send(codec.encode_request(name, body, want_reply))

    async def read(self, n: int) -> bytes:
        async with asyncio.timeout(STEP_S):
            return await self.reader.readexactly(n)

    async def reply(self) -> bytes:
        """One whole reply (header + body) as raw bytes."""
        header = await self.read(codec.HEADER_SIZE)
        (size,) = struct.unpack(">i", header[32:36])
        return header + await self.read(size)

    async def rest_until_eof(self) -> bytes:
        """Everything until the server closes the connection."""
        async with asyncio.timeout(STEP_S):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


def decode(name: str, raw_reply: bytes, release: Release = Release.R14718) -> codec.DecodedReply:
    (message,) = codec.MessageDecoder("reply").feed(raw_reply)
    return commands.lookup(name).decode_reply(message.body, release)


@pytest.fixture
async def server():
    srv = FakeNanonisServer()
    await srv.start()
    try:
        yield srv
    finally:
        async with asyncio.timeout(STEP_S):
            await srv.close()


@pytest.fixture
async def client(server):
    c = await RawClient.open(server.port)
    try:
        yield c
    finally:
        c.close()


def recorder(reply: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], Callable[[dict[str, Any]], Any]]:
    """A handler that records its arguments and answers `reply`."""
    seen: list[dict[str, Any]] = []

    def handler(args: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(args)
        return reply

    return seen, handler


# -- the worked hex examples of the reference (section 2), byte for byte ---------------------------------------


async def test_bias_get_and_set_match_the_worked_examples(server, client):
    server.set_handler("Bias.Get", lambda args: {"bias_V": 0.25})
    seen, handler = recorder()
    server.set_handler("Bias.Set", handler)

    request = unhex(name32("Bias.Get") + "00000000 0001 0000")
    assert request == unhex("42696173 2e476574" + "00" * 24 + "00000000 0001 0000")
    await client.send(request)
    assert await client.reply() == unhex(name32("Bias.Get") + "0000000c 00000000  3e800000  00000000 00000000")

    await client.send(unhex(name32("Bias.Set") + "00000004 0001 0000  bfc00000"))
    assert await client.reply() == unhex(name32("Bias.Set") + "00000008 00000000  00000000 00000000")
    assert seen == [{"bias_V": -1.5}]


async def test_error_reply_matches_the_worked_example(server, client):
    def refuse(args: dict[str, Any]) -> None:
        raise CommandFailed("Bad")

    server.set_handler("ZCtrl.ZPosSet", refuse)
    await client.request("ZCtrl.ZPosSet", struct.pack(">f", 1e-9))
    raw = await client.reply()
    assert raw == unhex(name32("ZCtrl.ZPosSet") + "0000000b 00000000   00000001 00000003 426164")
    assert len(raw) == 51


async def test_signals_names_get_matches_the_worked_example(server, client):
    server.set_handler("Signals.NamesGet", lambda args: {"names": ["Current (A)", "Z (m)"]})
    await client.request("Signals.NamesGet")
    raw = await client.reply()
    assert raw == unhex(
        name32("Signals.NamesGet") + "00000028 00000000  00000018 00000002"
        "0000000b 43757272656e74202841 29   00000005 5a20286d29   00000000 00000000"
    )
    assert len(raw) == 80


async def test_frame_data_grab_matches_the_worked_example(server, client):
    seen, handler = recorder(
        {"channel_name": "Z (m)", "data": np.array([[1e-9, 2e-9, 3e-9], [np.nan] * 3]), "scan_up": 1}
    )
    server.set_handler("Scan.FrameDataGrab", handler)
    request = unhex(
        "5363616e 2e467261 6d654461 74614772 61620000 00000000 00000000 00000000"
        "00000008 0001 0000   0000000e 00000001"
    )
    assert len(request) == 48
    await client.send(request)
    raw = await client.reply()
    assert raw == unhex(
        name32("Scan.FrameDataGrab") + "00000035 00000000  00000005 5a20286d29  00000002 00000003"
        "3089705f 3109705f 314e288f  7fc00000 7fc00000 7fc00000  00000001  00000000 00000000"
    )
    assert len(raw) == 93
    assert seen == [{"channel": 14, "forward": 1}]


async def test_folme_xy_pos_get_matches_the_document_example(server, client):
    seen, handler = recorder({"x_m": 5e-9, "y_m": -5e-9})
    server.set_handler("FolMe.XYPosGet", handler)
    request = unhex(name32("FolMe.XYPosGet") + "00000004 0001 0000   00000001")
    await client.send(request)
    assert await client.reply() == unhex(
        name32("FolMe.XYPosGet") + "00000018 00000000  3e35798e e2308c3a be35798e e2308c3a  00000000 00000000"
    )
    assert seen == [{"wait_newest": 1}]
    assert server.requests[0].raw == request
    assert server.received_bytes() == request


# -- dispatch, logging and protocol rules -------------------------------------------------------------------


async def test_names_match_case_insensitively_and_are_echoed_as_sent(server, client):
    server.set_handler("BIAS.GET", lambda args: {"bias_V": 1.0})
    await client.request("bias.get")
    raw = await client.reply()
    assert raw[:32] == b"bias.get".ljust(32, b"\0")
    assert decode("Bias.Get", raw).values == {"bias_V": 1.0}
    assert server.call_count("Bias.Get") == 1
    assert server.requests[0].name == "bias.get"


async def test_requests_and_replies_are_logged_with_exact_bytes(server):
    server.set_handler("Bias.Get", lambda args: {"bias_V": 0.5})
    a, b = await RawClient.open(server.port), await RawClient.open(server.port)
    try:
        await a.request("Bias.Get")
        raw_a = await a.reply()
        await b.request("Bias.Set", struct.pack(">f", 2.0))
        raw_b = await b.reply()
    finally:
        a.close()
        b.close()
    assert server.received_bytes(1) == codec.encode_request("Bias.Get", b"")
    assert server.received_bytes(2) == codec.encode_request("Bias.Set", struct.pack(">f", 2.0))
    assert server.received_bytes() == server.received_bytes(1) + server.received_bytes(2)
    first, second = server.requests
    assert (first.conn, first.seq, first.call, first.args, first.error) == (1, 1, 1, {}, None)
    assert (second.conn, second.args, second.want_reply) == (2, {"bias_V": 2.0}, True)
    assert [r.raw for r in server.replies] == [raw_a, raw_b]
    assert [r.writes for r in server.replies] == [(len(raw_a),), (len(raw_b),)]  # header + body in one write
    assert server.replies[1].status == 1  # no Bias.Set handler: "not supported"


async def test_pipelined_requests_are_answered_in_order(server, client):
    server.set_handler("Bias.Get", lambda args: {"bias_V": 0.1})
    server.set_handler("ZCtrl.ZPosGet", lambda args: {"z_m": 2e-9})
    await client.send(codec.encode_request("ZCtrl.ZPosGet", b"") + codec.encode_request("Bias.Get", b""))
    assert decode("ZCtrl.ZPosGet", await client.reply()).values == {"z_m": pytest.approx(2e-9)}
    assert decode("Bias.Get", await client.reply()).values == {"bias_V": pytest.approx(0.1)}


async def test_requests_split_at_every_boundary_are_framed(server, client):
    seen, handler = recorder()
    server.set_handler("Scan.Action", handler)
    raw = codec.encode_request("Scan.Action", struct.pack(">HI", 0, 1)) * 2
    rng = np.random.default_rng(7)
    cuts = sorted(set(rng.integers(1, len(raw), size=12).tolist()) | {1, 39, 40, 41})
    sent = 0
    for end in [*cuts, len(raw)]:
        await client.send(raw[sent:end])
        sent = end
        await server.wait_until(lambda n=sent: len(server.received_bytes(1)) >= n, timeout=STEP_S)
    for _ in range(2):
        assert decode("Scan.Action", await client.reply()).status == 0
    assert seen == [{"action": 0, "direction_up": 1}] * 2


async def test_async_handlers_are_awaited(server, client):
    async def slow_current(args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"current_A": 1e-10}

    server.set_handler("Current.Get", slow_current)
    await client.request("Current.Get")
    assert decode("Current.Get", await client.reply()).values == {"current_A": pytest.approx(1e-10)}


async def test_response_flag_zero_runs_the_command_and_sends_nothing(server, client):
    seen, handler = recorder()
    server.set_handler("Bias.Set", handler)
    server.set_handler("Bias.Get", lambda args: {"bias_V": -1.5})
    await client.request("Bias.Set", struct.pack(">f", -1.5), want_reply=False)
    await client.request("Bias.Get")
    raw = await client.reply()  # the first bytes back belong to Bias.Get
    assert raw[:8] == b"Bias.Get"
    assert seen == [{"bias_V": -1.5}]
    assert [r.request_name for r in server.replies] == ["Bias.Get"]


async def test_unknown_command_gets_an_error_and_the_connection_keeps_serving(server, client):
    server.set_handler("Bias.Get", lambda args: {"bias_V": 0.3})
    await client.request("Foo.Bar", b"\x00\x01")
    raw = await client.reply()
    assert raw[:32] == b"Foo.Bar".ljust(32, b"\0")
    status, size = struct.unpack(">Ii", raw[40:48])
    description = raw[48:].decode("ascii")
    assert status == 1 and size == len(description) > 4
    assert "unknown command" in description and "Foo.Bar" in description
    await client.request("Bias.Get")
    assert decode("Bias.Get", await client.reply()).status == 0


async def test_unknown_command_without_reply_when_configured():
    async with FakeNanonisServer(unknown_reply=False, handlers={"Bias.Get": lambda a: {"bias_V": 0.3}}) as srv:
        c = await RawClient.open(srv.port)
        try:
            await c.request("Foo.Bar")
            await c.request("Bias.Get")
            assert (await c.reply())[:8] == b"Bias.Get"
            assert srv.requests[0].error is not None and len(srv.replies) == 1
        finally:
            c.close()


async def test_commands_missing_in_the_release_are_unsupported():
    async with FakeNanonisServer(release=Release.R10862) as srv:
        c = await RawClient.open(srv.port)
        try:
            await c.request("Util.VersionGet")
            reply = decode("Util.VersionGet", await c.reply())
            assert reply.status == 1 and "R10862" in reply.message
            srv.set_handler("Motor.PosGet", lambda args: {"x_m": 1.0, "y_m": 2.0, "z_m": 3.0})
            await c.request("Motor.PosGet")  # R10862 layout: no arguments
            assert decode("Motor.PosGet", await c.reply(), Release.R10862).values == {"x_m": 1, "y_m": 2, "z_m": 3}
        finally:
            c.close()


async def test_default_handlers_answer_version_and_refuse_the_rest(server, client):
    await client.request("Util.VersionGet")
    reply = decode("Util.VersionGet", await client.reply())
    assert (reply.status, reply.values) == (0, {
        "product": "Nanonis SPM Control Software", "version": "Generic 5", "host_release": 14718, "rt_release": 14718,
    })
    await client.request("Bias.Get")
    reply = decode("Bias.Get", await client.reply())
    assert reply.status == 1 and "not supported" in reply.message and reply.values == {"bias_V": 0.0}


async def test_bad_arguments_get_status_one_with_the_full_zero_layout(server, client):
    seen, handler = recorder({"value": 1.0})
    server.set_handler("Signals.ValGet", handler)
    await client.request("Signals.ValGet", b"\x00\x00\x00\x05")  # 4 bytes short
    raw = await client.reply()
    reply = decode("Signals.ValGet", raw)
    assert reply.status == 1 and reply.message.startswith("bad arguments: ")
    assert raw[40:44] == b"\x00\x00\x00\x00"  # the f32 value, zero, precedes the error section
    assert seen == [] and server.requests[0].args is None


async def test_handler_errors_become_status_one_and_the_server_survives(server, client):
    def broken(args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    server.set_handler("ZCtrl.ZPosGet", broken)
    server.set_handler("Current.Get", lambda args: {"wrong_field": 1.0})
    server.set_handler("Bias.Get", lambda args: {"bias_V": 0.2})
    await client.request("ZCtrl.ZPosGet")
    reply = decode("ZCtrl.ZPosGet", await client.reply())
    assert reply.status == 1 and "RuntimeError: boom" in reply.message
    await client.request("Current.Get")
    reply = decode("Current.Get", await client.reply())
    assert reply.status == 1 and "current_A" in reply.message
    await client.request("Bias.Get")
    assert decode("Bias.Get", await client.reply()).status == 0
    assert [e.kind for e in server.events if e.kind == "handler_error"] == ["handler_error"] * 2


async def test_garbage_header_closes_only_that_connection(server, client):
    server.set_handler("Bias.Get", lambda args: {"bias_V": 0.2})
    await client.send(b"\xff" * 40)
    assert await client.rest_until_eof() == b""
    assert [e.kind for e in server.events].count("protocol_error") == 1
    other = await RawClient.open(server.port)
    try:
        await other.request("Bias.Get")
        assert decode("Bias.Get", await other.reply()).status == 0
    finally:
        other.close()


async def test_impossible_request_body_size_closes_the_connection(server, client):
    await client.send(b"Bias.Get".ljust(32, b"\0") + struct.pack(">iHH", -5, 1, 0))
    assert await client.rest_until_eof() == b""
    assert "impossible body size" in next(e.detail for e in server.events if e.kind == "protocol_error")


# -- faults, each observed from a raw client ---------------------------------------------------------------


@pytest.fixture
def bias_server(server):
    """The server answering Bias.Get with 0.25 V; the recorded calls show whether the handler ran."""
    seen, handler = recorder({"bias_V": 0.25})
    server.set_handler("Bias.Get", handler)
    server.bias_calls = seen
    return server


GOOD_BIAS_REPLY = codec.encode_reply("Bias.Get", unhex("3e800000 00000000 00000000"))


async def test_delay_holds_the_reply(bias_server, client):
    bias_server.inject("Bias.Get", Delay(0.05))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await client.request("Bias.Get")
    assert await client.reply() == GOOD_BIAS_REPLY
    assert loop.time() - start >= 0.049


async def test_never_reply_stalls_only_its_connection(bias_server, client):
    bias_server.inject("Bias.Get", NeverReply())
    await client.request("Bias.Get")
    await client.request("Bias.Get")  # queued behind the pending one: one request at a time
    other = await RawClient.open(bias_server.port)
    try:
        await other.request("Bias.Get")
        assert await other.reply() == GOOD_BIAS_REPLY
    finally:
        other.close()
    await bias_server.wait_for_requests(3, timeout=STEP_S)
    assert [r.conn for r in bias_server.replies] == [2]
    assert len(bias_server.bias_calls) == 1  # the pending request never ran its handler
    client.close()  # the pending request ends with its connection
    await bias_server.wait_until(lambda: ("closed" in [e.kind for e in bias_server.events if e.conn == 1]), STEP_S)
    assert len(bias_server.bias_calls) == 1


async def test_close_before_reply_runs_the_command_and_sends_nothing(bias_server, client):
    bias_server.inject("Bias.Get", CloseBeforeReply())
    await client.request("Bias.Get")
    assert await client.rest_until_eof() == b""
    assert len(bias_server.bias_calls) == 1
    assert bias_server.replies[0].closed and bias_server.replies[0].raw == b""


async def test_close_after_header(bias_server, client):
    bias_server.inject("Bias.Get", CloseAfterHeader())
    await client.request("Bias.Get")
    assert await client.rest_until_eof() == GOOD_BIAS_REPLY[:40]


async def test_close_mid_body(bias_server, client):
    bias_server.inject("Bias.Get", CloseMidBody(3))
    await client.request("Bias.Get")
    assert await client.rest_until_eof() == GOOD_BIAS_REPLY[:43]


async def test_chunked_reply_arrives_whole_in_small_writes(bias_server, client):
    bias_server.inject("Bias.Get", Chunked(7, pause_s=0.001))
    await client.request("Bias.Get")
    assert await client.reply() == GOOD_BIAS_REPLY
    assert bias_server.replies[0].writes == (7,) * 7 + (3,)


async def test_wrong_name(bias_server, client):
    bias_server.inject("Bias.Get", WrongName("Bias.Set"))
    await client.request("Bias.Get")
    raw = await client.reply()
    assert raw[:32] == b"Bias.Set".ljust(32, b"\0") and raw[32:] == GOOD_BIAS_REPLY[32:]


async def test_bad_body_size_too_large(bias_server, client):
    bias_server.inject("Bias.Get", BadBodySize(+4))
    await client.request("Bias.Get")
    header = await client.read(40)
    assert struct.unpack(">i", header[32:36]) == (16,)
    assert await client.read(12) == GOOD_BIAS_REPLY[40:]
    await bias_server.close()  # the 4 announced bytes never come
    assert await client.rest_until_eof() == b""


async def test_bad_body_size_too_small(bias_server, client):
    bias_server.inject("Bias.Get", BadBodySize(-4))
    await client.request("Bias.Get")
    header = await client.read(40)
    assert struct.unpack(">i", header[32:36]) == (8,)
    assert await client.read(12) == GOOD_BIAS_REPLY[40:]  # 4 bytes beyond the announced size


@pytest.mark.parametrize("message", ["Injected failure", "", "caf\xe9 not UTF-8"])
async def test_error_reply_pre_empts_the_handler(bias_server, client, message):
    bias_server.inject("Bias.Get", ErrorReply(message))
    await client.request("Bias.Get")
    raw = await client.reply()
    assert raw[40:] == b"\0" * 4 + struct.pack(">Ii", 1, len(message)) + message.encode("latin-1")
    assert bias_server.bias_calls == []


async def test_garbage_replaces_the_reply_and_the_link_stays_open(bias_server, client):
    bias_server.inject("Bias.Get", Garbage(b"\xde\xad\xbe\xef" * 10))
    await client.request("Bias.Get")
    assert await client.read(40) == b"\xde\xad\xbe\xef" * 10
    await client.request("Bias.Get")
    assert await client.reply() == GOOD_BIAS_REPLY


async def test_unsolicited_bytes_follow_a_good_reply(bias_server, client):
    bias_server.inject("Bias.Get", Unsolicited(b"hello"))
    await client.request("Bias.Get")
    assert await client.reply() == GOOD_BIAS_REPLY
    assert await client.read(5) == b"hello"
    assert bias_server.replies[0].writes == (52, 5)


async def test_faults_hit_chosen_calls_counts_and_any_command(bias_server, client):
    async def statuses(n: int) -> list[int]:
        out = []
        for _ in range(n):
            await client.request("Bias.Get")
            out.append(decode("Bias.Get", await client.reply()).status)
        return out

    bias_server.inject("bias.get", ErrorReply(), calls=[2, 4])
    assert await statuses(4) == [0, 1, 0, 1]
    bias_server.inject("Bias.Get", ErrorReply(), times=2)
    assert await statuses(3) == [1, 1, 0]
    bias_server.inject("*", ErrorReply(), times=None)
    assert await statuses(2) == [1, 1]
    bias_server.clear_faults()
    assert await statuses(1) == [0]
    assert bias_server.call_count("BIAS.GET") == 10


async def test_fault_injection_rejects_unknown_names_and_bad_counts(server):
    with pytest.raises(UnsupportedCommand):
        server.inject("Bias.Gett", Delay(0.1))
    with pytest.raises(UnsupportedCommand):
        server.set_handler("Bias.Gett", lambda args: None)
    with pytest.raises(ValueError):
        server.inject("Bias.Get", Delay(0.1), times=0)
    with pytest.raises(ValueError):
        WrongName("x" * 33)
    with pytest.raises(TypeError):
        server.inject("Bias.Get", "close")  # type: ignore[arg-type]


# -- connections --------------------------------------------------------------------------------------------


async def refused(port: int) -> bool:
    """True if a new connection is dropped at once (reset or EOF) instead of being served."""
    c = await RawClient.open(port)
    try:
        await c.request("Util.VersionGet")
        await c.reply()
        return False
    except (ConnectionError, asyncio.IncompleteReadError):
        return True
    finally:
        c.close()


async def test_refuse_connections_and_connection_limits():
    async with FakeNanonisServer(max_connections=1) as srv:
        first = await RawClient.open(srv.port)
        try:
            await first.request("Util.VersionGet")
            await first.reply()
            assert await refused(srv.port)  # over max_connections
            await first.request("Util.VersionGet")
            assert decode("Util.VersionGet", await first.reply()).status == 0  # the first is unaffected
        finally:
            first.close()
        await srv.wait_until(lambda: srv.open_connections == 0, STEP_S)
        srv.refuse_connections = True
        assert await refused(srv.port)
        srv.refuse_connections = False
        assert not await refused(srv.port)
        assert [e.kind for e in srv.events].count("refused") == 2


async def test_one_connection_per_port_and_stop_listening():
    async with FakeNanonisServer(one_connection_per_port=True) as srv:
        second_port = await srv.listen(0)
        a = await RawClient.open(srv.port)
        try:
            await a.request("Util.VersionGet")
            await a.reply()
            assert await refused(srv.port)
            assert not await refused(second_port)
        finally:
            a.close()
        await srv.stop_listening()
        with pytest.raises(ConnectionRefusedError):
            await RawClient.open(second_port)
        await srv.resume_listening()
        assert not await refused(second_port)


async def test_close_ends_pending_requests_promptly():
    never = asyncio.Event()

    async def blocks_forever(args: dict[str, Any]) -> None:
        await never.wait()

    srv = FakeNanonisServer(handlers={"Scan.WaitEndOfScan": blocks_forever})
    srv.inject("Bias.Get", NeverReply())
    port = await srv.start()
    a, b = await RawClient.open(port), await RawClient.open(port)
    try:
        await a.request("Scan.WaitEndOfScan", struct.pack(">i", -1))
        await b.request("Bias.Get")
        await srv.wait_for_requests(2, timeout=STEP_S)
        async with asyncio.timeout(1.0):
            await srv.close()
        assert await a.rest_until_eof() == b"" and await b.rest_until_eof() == b""
        assert srv.open_connections == 0 and srv.replies == []
    finally:
        a.close()
        b.close()


async def test_wait_for_requests_is_bounded(server):
    with pytest.raises(TimeoutError):
        await server.wait_for_requests(1, timeout=0.01)


async def test_record_false_keeps_counts_only():
    async with FakeNanonisServer(record=False) as srv:
        c = await RawClient.open(srv.port)
        try:
            await c.request("Util.VersionGet")
            await c.reply()
        finally:
            c.close()
        assert (srv.request_count, srv.reply_count) == (1, 1)
        assert srv.requests == [] and srv.replies == [] and srv.received_bytes() == b""


def test_binds_loopback_only():
    with pytest.raises(ValueError):
        FakeNanonisServer(host="0.0.0.0")
    FakeNanonisServer(host="::1")


# -- the vendor's own client (nanonis-spm) against this server ----------------------------------------------

nanonis_spm = pytest.importorskip("nanonis_spm")


async def vendor_session(port: int, script: Callable[[Callable[..., Any]], Any]) -> Any:
    """Run `script(call)` in a worker thread, where `call("Bias_Get")` calls nanonis-spm on a fresh socket.

    nanonis-spm blocks and sets a 1000 s socket timeout after every call; `call` resets it to a short
    bound first, and the socket is shut down in `finally` so the thread always ends.
    """

    def run() -> Any:
        sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_S)
        try:
            vendor = nanonis_spm.Nanonis(sock)

            def call(method: str, *args: Any) -> Any:
                sock.settimeout(STEP_S)
                return getattr(vendor, method)(*args)

            return script(call)
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    return await asyncio.wait_for(asyncio.to_thread(run), timeout=4 * STEP_S)


async def test_vendor_client_reads_bias_z_and_a_frame(server):
    rng = np.random.default_rng(1)
    frame = rng.normal(0.0, 1e-10, size=(96, 128)).astype(np.float32)
    frame[60:] = np.nan  # lines not yet scanned
    grabs, grab = recorder({"channel_name": "Z (m)", "data": frame, "scan_up": 1})
    server.set_handler("Bias.Get", lambda args: {"bias_V": 0.25})
    server.set_handler("ZCtrl.ZPosGet", lambda args: {"z_m": -3.5e-9})
    server.set_handler("Scan.FrameDataGrab", grab)

    def script(call: Callable[..., Any]) -> tuple[Any, Any, Any]:
        return call("Bias_Get"), call("ZCtrl_ZPosGet"), call("Scan_FrameDataGrab", 14, 1)

    bias, z, grabbed = await vendor_session(server.port, script)
    assert bias[0] == "" and bias[2] == [0.25]
    assert z[0] == "" and z[2] == [pytest.approx(np.float32(-3.5e-9))]
    error, _, (name_size, name, rows, cols, data, scan_up) = grabbed
    assert (error, name_size, name, rows, cols, scan_up) == ("", 5, "Z (m)", 96, 128, 1)
    np.testing.assert_array_equal(data, frame.astype(np.float64))  # NaN rows included
    assert grabs == [{"channel": 14, "forward": 1}]


async def test_vendor_client_sees_errors_and_string_arrays(server):
    def refuse(args: dict[str, Any]) -> None:
        raise CommandFailed("Z-controller is on")

    server.set_handler("ZCtrl.ZPosSet", refuse)
    server.set_handler("Signals.NamesGet", lambda args: {"names": ["Current (A)", "Z (m)", "Bias (V)"]})

    def script(call: Callable[..., Any]) -> tuple[Any, Any]:
        return call("ZCtrl_ZPosSet", 1e-9), call("Signals_NamesGet")

    failed, names = await vendor_session(server.port, script)
    assert failed[0] == "Z-controller is on"
    assert names[0] == "" and names[2][1:] == [3, ["Current (A)", "Z (m)", "Bias (V)"]]
    assert server.requests[0].args == {"z_m": pytest.approx(1e-9)}


# -- combinations and edge rules ----------------------------------------------------------------------------


async def test_faults_combine(bias_server, client):
    bias_server.inject("Bias.Get", Delay(0.01))
    bias_server.inject("Bias.Get", WrongName("Bias.Got"))
    bias_server.inject("Bias.Get", Chunked(20))
    await client.request("Bias.Get")
    raw = await client.reply()
    assert raw == b"Bias.Got" + GOOD_BIAS_REPLY[8:]
    assert bias_server.replies[0].writes == (20, 20, 12)


async def test_fault_closes_even_without_response_flag(bias_server, client):
    seen, handler = recorder()
    bias_server.set_handler("Bias.Set", handler)
    bias_server.inject("Bias.Set", CloseBeforeReply())
    await client.request("Bias.Set", struct.pack(">f", 1.0), want_reply=False)
    assert await client.rest_until_eof() == b""
    assert seen == [{"bias_V": 1.0}] and bias_server.replies[0].closed


async def test_unencodable_failure_text_is_replaced_not_fatal(server, client):
    def refuse(args: dict[str, Any]) -> None:
        raise CommandFailed("limit \u2192 exceeded")

    server.set_handler("ZCtrl.Home", refuse)
    await client.request("ZCtrl.Home")
    assert decode("ZCtrl.Home", await client.reply()).message == "limit ? exceeded"


async def test_requests_received_before_a_disconnect_still_run(server):
    ran = asyncio.Event()
    server.set_handler("Motor.StopMove", lambda args: ran.set())
    c = await RawClient.open(server.port)
    await c.request("Motor.StopMove")
    c.close()
    async with asyncio.timeout(STEP_S):
        await ran.wait()
