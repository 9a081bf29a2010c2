"""A scriptable loopback Nanonis TCP server for tests and for the simulator (reference nanonis-tcp.md 5.4, 6.2).

It speaks the real wire protocol through the same codec and command table as our client
(`deepspm.io.codec`, `deepspm.io.commands`), so a byte-level mistake on either side shows up in tests.
Tests (or the physics simulator) set one handler per command; fault injection (`deepspm.simulator.faults`)
makes it misbehave on purpose, per command and per call.

    async with FakeNanonisServer(handlers={"Bias.Get": lambda args: {"bias_V": 0.25}}) as server:
        port = server.port        # ephemeral, 127.0.0.1 only
        server.inject("Bias.Get", CloseMidBody(2), calls=[3])
        ...
        await server.wait_for_requests(3, timeout=2.0)
        assert server.requests[0].args == {}

Handlers receive the decoded arguments as a dict keyed by the table's field names and return the reply
values the same way (or None for commands without return values). They may be plain functions or coroutine
functions; a coroutine handler blocks only its own connection. Raise `CommandFailed("...")` for a status-1
reply; any other exception becomes a status-1 reply carrying its text (and is logged) - never silence.

Behaviour (reference 5.4): each connection serves its requests strictly in order, one at a time; names are
matched case-insensitively and echoed exactly as received; every reply is written header + body in one
write; a response flag of 0 gets no reply at all; a malformed header closes that connection; unknown
commands (or commands the configured release lacks) get status 1 with a description, or no reply when
`unknown_reply=False`. If the peer disconnects, requests already received still run (as on a real
instrument); their replies are dropped. `close()` cancels everything, pending or not.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import itertools
import socket
import struct
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from deepspm.io import codec, commands
from deepspm.io.commands import CommandSpec, Release
from deepspm.io.errors import ProtocolError, UnsupportedCommand
from deepspm.simulator.faults import (
    ANY_COMMAND,
    BadBodySize,
    Chunked,
    CloseAfterHeader,
    CloseBeforeReply,
    CloseMidBody,
    Delay,
    ErrorReply,
    Fault,
    FaultPlan,
    Garbage,
    NeverReply,
    Unsolicited,
    WrongName,
)

log = structlog.get_logger(__name__)

Handler = Callable[[dict[str, Any]], "Awaitable[Mapping[str, Any] | None] | Mapping[str, Any] | None"]

DEFAULT_PRODUCT = "Nanonis SPM Control Software"
DEFAULT_VERSION_NAME = "Generic 5"
_READ_SIZE = 65536


class CommandFailed(Exception):
    """Raised by a handler: the reply carries status 1 and this description (sent as given).

    Real clients expect a non-empty ASCII description longer than 4 characters (reference 5.4 rule 3).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class LoggedRequest:
    """One request as it arrived. `args` is None when the command is unknown or its body did not decode;
    `error` then says why. `call` is the command's call number (1-based, all connections, any case)."""

    conn: int
    seq: int  # 1-based position among all requests received by the server
    name: str  # as sent, not case-folded
    raw: bytes  # header + body exactly as received
    want_reply: bool
    call: int
    args: dict[str, Any] | None
    error: str | None
    faults: tuple[Fault, ...]


@dataclass(frozen=True)
class LoggedReply:
    """What was written for one request: `raw` the bytes after faults (empty when a fault closed the
    connection first), `writes` the size of each completed write call, `closed` whether a fault closed the
    connection after it. Requests with response flag 0 get no entry unless a fault closed the link."""

    conn: int
    seq: int  # the request's seq
    request_name: str
    status: int
    message: str
    raw: bytes
    writes: tuple[int, ...]
    faults: tuple[Fault, ...]
    closed: bool


@dataclass(frozen=True)
class ServerEvent:
    """Connection-level happenings: "connected", "refused", "closed", "protocol_error", "handler_error",
    "server_error" (a bug in this module)."""

    conn: int
    kind: str
    detail: str = ""


@dataclass
class _Pending:
    request: LoggedRequest
    spec: CommandSpec | None
    unsupported: str | None  # why the command cannot be answered (unknown / missing in this release)


@dataclass
class _Connection:
    id: int
    port: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: codec.MessageDecoder = field(default_factory=lambda: codec.MessageDecoder("request"))
    queue: asyncio.Queue[_Pending | None] = field(default_factory=asyncio.Queue)
    peer_gone: asyncio.Event = field(default_factory=asyncio.Event)
    received: bytearray = field(default_factory=bytearray)
    consumed: int = 0  # bytes of `received` already framed into requests


def _check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the fake Nanonis server binds loopback addresses only, not {host!r}")


def _ascii_text(text: str) -> str:
    """Descriptions we compose ourselves: ASCII only (nanonis-spm decodes them as strict UTF-8)."""
    return text.encode("ascii", "replace").decode("ascii")


def _wire_text(text: str) -> str:
    """Descriptions given by tests: sent as given, one byte per character ("?" where that is impossible)."""
    return text.encode("latin-1", "replace").decode("latin-1")


class FakeNanonisServer:
    """A Nanonis TCP server on 127.0.0.1 with per-command handlers and fault injection.

    `release` selects the layouts (and which commands exist); `version` is what the default
    `Util.VersionGet` handler answers (product, version name, host release, RT-engine release; by default
    both releases equal `release`). `handlers` are added to the defaults. At most `max_connections`
    connections are served at once (and one per port with `one_connection_per_port`); more are reset at
    once, as are all new ones while `refuse_connections` is True. `record=False` keeps no request/reply
    log or received bytes (for benchmarks and long simulator runs); counters and waits still work.
    """

    def __init__(
        self,
        *,
        release: Release = Release.R14718,
        host: str = "127.0.0.1",
        handlers: Mapping[str, Handler] | None = None,
        max_connections: int = 4,
        one_connection_per_port: bool = False,
        unknown_reply: bool = True,
        version: tuple[str, str, int, int] | None = None,
        record: bool = True,
    ) -> None:
        _check_loopback(host)
        self.release = release
        self.host = host
        self.max_connections = max_connections
        self.one_connection_per_port = one_connection_per_port
        self.unknown_reply = unknown_reply
        self.version = version or (DEFAULT_PRODUCT, DEFAULT_VERSION_NAME, int(release), int(release))
        self.record = record
        self.refuse_connections = False
        # called with every framed request as it arrives (before its faults act or its handler runs), even
        # with record=False: for audits that watch a long run without keeping its log
        self.on_request: Callable[[LoggedRequest], None] | None = None

        self.requests: list[LoggedRequest] = []
        self.replies: list[LoggedReply] = []
        self.events: list[ServerEvent] = []

        self._handlers: dict[str, Handler] = {"util.versionget": self._version_handler}
        self.set_handlers(handlers or {})
        self._faults = FaultPlan()
        self._calls: dict[str, int] = {}
        self._request_count = 0
        self._reply_count = 0
        self._conn_ids = itertools.count(1)
        self._connections: dict[int, _Connection] = {}
        self._received: dict[int, bytearray] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: dict[int, asyncio.Server] = {}
        self._changed = asyncio.Event()  # set and replaced on every request, reply and connection event
        self._closing = False

    # -- configuration ------------------------------------------------------------------------------------

    def set_handler(self, name: str, handler: Handler) -> None:
        """Answer `name` (any case; must be in the command table) with `handler`."""
        spec = commands.lookup(name)  # raises UnsupportedCommand on a typo
        self._handlers[spec.name.lower()] = handler

    def set_handlers(self, handlers: Mapping[str, Handler]) -> None:
        """Set many handlers at once (e.g. the physics simulator's handler table)."""
        for name, handler in handlers.items():
            self.set_handler(name, handler)

    def remove_handler(self, name: str) -> None:
        """Forget the handler: the command then gets a status-1 "not supported" reply."""
        self._handlers.pop(name.lower(), None)

    def inject(self, name: str, fault: Fault, *, calls: Iterable[int] | None = None, times: int | None = 1) -> None:
        """Make calls of `name` (any case, or "*" for every command) misbehave with `fault`.

        With `calls`, exactly those call numbers are hit (1-based, counted since the server was created,
        see `call_count`); otherwise the next `times` calls are (None = every call from now on).
        """
        key = name if name == ANY_COMMAND else commands.lookup(name).name.lower()
        self._faults.add(key, fault, calls, times)

    def clear_faults(self) -> None:
        self._faults.clear()

    def call_count(self, name: str) -> int:
        """How many requests of this command (any case) have arrived so far."""
        return self._calls.get(name.lower(), 0)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, port: int = 0) -> int:
        """Listen on `port` of the loopback host (0 = an ephemeral port); returns the port."""
        if self._listeners:
            raise RuntimeError("server already started; use listen() to add a port")
        return await self.listen(port)

    async def listen(self, port: int = 0) -> int:
        """Listen on one more port (like the real server's four ports 6501-6504); returns it."""
        if self._closing:
            raise RuntimeError("server is closed")
        listener = await asyncio.start_server(self._on_connect, self.host, port)
        actual = listener.sockets[0].getsockname()[1]
        self._listeners[actual] = listener
        log.info("fake_nanonis.listening", host=self.host, port=actual, release=self.release.name)
        return actual

    async def stop_listening(self, port: int | None = None) -> None:
        """Stop accepting on `port` (default: all), keeping the port reserved for `resume_listening`.

        New connections then fail with "connection refused"; open connections are not touched.
        """
        for p in [port] if port is not None else list(self._listeners):
            listener = self._listeners[p]
            listener.close()

    async def resume_listening(self, port: int | None = None) -> None:
        """Listen again on ports closed by `stop_listening`."""
        for p in [port] if port is not None else list(self._listeners):
            if not self._listeners[p].is_serving():
                self._listeners[p] = await asyncio.start_server(self._on_connect, self.host, p)

    @property
    def port(self) -> int:
        if not self._listeners:
            raise RuntimeError("server not started")
        return next(iter(self._listeners))

    @property
    def ports(self) -> list[int]:
        return list(self._listeners)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        """Stop listening, cancel every connection (pending requests included) and wait for them to end."""
        self._closing = True
        for listener in self._listeners.values():
            listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners.values():
            await listener.wait_closed()

    async def __aenter__(self) -> FakeNanonisServer:
        if not self._listeners:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- observation ------------------------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        return self._request_count

    @property
    def reply_count(self) -> int:
        return self._reply_count

    def received_bytes(self, conn: int | None = None) -> bytes:
        """Every byte received on connection `conn` (default: all connections, in connection order)."""
        if conn is not None:
            return bytes(self._received.get(conn, b""))
        return b"".join(bytes(self._received[c]) for c in sorted(self._received))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds; it is rechecked whenever bytes arrive and on every reply and event.

        Raises TimeoutError after `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least `n` requests have arrived (in all, since creation)."""
        await self.wait_until(lambda: self._request_count >= n, timeout)

    async def wait_for_replies(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least `n` replies have been written (or cut short by a fault)."""
        await self.wait_until(lambda: self._reply_count >= n, timeout)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _event(self, conn: int, kind: str, detail: str = "") -> None:
        self.events.append(ServerEvent(conn, kind, detail))
        self._notify()

    # -- connections ----------------------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn_id = next(self._conn_ids)
        port = writer.get_extra_info("sockname")[1]
        try:
            reason = self._refusal(port)
            if reason:
                self._event(conn_id, "refused", reason)
                log.info("fake_nanonis.refused", conn=conn_id, reason=reason)
                _reset(writer)
                return
            conn = _Connection(conn_id, port, reader, writer)
            if self.record:
                self._received[conn_id] = conn.received
            self._connections[conn_id] = conn
            self._event(conn_id, "connected", f"port {port}")
            try:
                await self._serve(conn)
            finally:
                del self._connections[conn_id]
                writer.close()
                self._event(conn_id, "closed")
        except asyncio.CancelledError:
            # close() cancelled us; end quietly (asyncio's stream callback would report a cancelled task).
            if not self._closing:
                raise
        finally:
            self._tasks.discard(task)

    def _refusal(self, port: int) -> str:
        if self._closing:
            return "server closing"
        if self.refuse_connections:
            return "refuse_connections is set"
        if len(self._connections) >= self.max_connections:
            return f"already {len(self._connections)} connections (max {self.max_connections})"
        if self.one_connection_per_port and any(c.port == port for c in self._connections.values()):
            return f"port {port} is busy"
        return ""

    async def _serve(self, conn: _Connection) -> None:
        reading = asyncio.create_task(self._read_loop(conn))
        processing = asyncio.create_task(self._process_loop(conn))
        try:
            await asyncio.wait({reading, processing}, return_when=asyncio.FIRST_COMPLETED)
            if reading.done() and reading.result() == "eof":
                await processing  # requests already received still run; replies go nowhere
            elif processing.done():
                processing.result()  # surface a server bug instead of swallowing it
        except Exception as exc:
            self._event(conn.id, "server_error", repr(exc))
            log.error("fake_nanonis.server_error", conn=conn.id, exc_info=exc)  # logged; the link just closes
        finally:
            for task in (reading, processing):
                task.cancel()
            await asyncio.gather(reading, processing, return_exceptions=True)

    async def _read_loop(self, conn: _Connection) -> str:
        """Frame incoming bytes into requests and queue them; returns "eof" or "protocol_error"."""
        try:
            while True:
                try:
                    data = await conn.reader.read(_READ_SIZE)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    return "eof"
                if self.record:
                    conn.received += data
                try:
                    messages = conn.decoder.feed(data)
                except ProtocolError as exc:
                    self._event(conn.id, "protocol_error", str(exc))
                    log.warning("fake_nanonis.protocol_error", conn=conn.id, error=str(exc), raw=exc.raw.hex())
                    return "protocol_error"
                for message in messages:
                    conn.queue.put_nowait(self._accept(conn, message))
                self._notify()
        finally:
            conn.peer_gone.set()
            conn.queue.put_nowait(None)

    def _accept(self, conn: _Connection, message: codec.Message) -> _Pending:
        """Log a framed request, number it, pick its faults and decode its arguments."""
        self._request_count += 1
        key = message.name.lower()
        call = self._calls[key] = self._calls.get(key, 0) + 1
        size = codec.HEADER_SIZE + len(message.body)
        raw = bytes(conn.received[conn.consumed : conn.consumed + size]) if self.record else b""
        conn.consumed += size

        spec: CommandSpec | None = None
        args: dict[str, Any] | None = None
        error = unsupported = None
        try:
            spec = commands.lookup(message.name)
            spec.layout(self.release)
            args = spec.decode_args(message.body, self.release)
        except UnsupportedCommand as exc:
            unsupported = error = _ascii_text(str(exc))
            if spec is None:
                unsupported = error = _ascii_text(f"unknown command {message.name!r}: not supported by this server")
        except ProtocolError as exc:
            error = _ascii_text(f"bad arguments: {exc}")

        request = LoggedRequest(conn.id, self._request_count, message.name, raw, message.want_reply, call, args,
                                error, self._faults.take(key, call, self._request_count))
        if self.record:
            self.requests.append(request)
        if self.on_request is not None:
            self.on_request(request)
        return _Pending(request, spec, unsupported)

    async def _process_loop(self, conn: _Connection) -> str:
        """Serve queued requests one at a time; returns when the queue ends or a fault closed the link."""
        while True:
            pending = await conn.queue.get()
            if pending is None:
                return "eof"
            if not await self._respond(conn, pending):
                return "closed by fault"

    # -- one request ------------------------------------------------------------------------------------------

    async def _respond(self, conn: _Connection, pending: _Pending) -> bool:
        """Answer one request, applying its faults. Returns False when the connection must end."""
        request = pending.request
        faults = request.faults
        delay = sum(f.seconds for f in faults if isinstance(f, Delay))
        if delay:
            await asyncio.sleep(delay)
        if _first(faults, NeverReply):
            await conn.peer_gone.wait()
            return False

        injected = _first(faults, ErrorReply)
        if pending.unsupported is not None:
            if not self.unknown_reply:
                return True
            status, message = 1, _wire_text(injected.message) if injected else pending.unsupported
            body = codec.encode_error_section(status, message)
        else:
            assert pending.spec is not None
            status, message, body = await self._run(pending.spec, request, injected)

        frame, close = _shape(request, body) if request.want_reply else (b"", _closes(faults))
        writes = await self._write(conn, frame, _first(faults, Chunked))
        extra = _first(faults, Unsolicited)
        if extra and request.want_reply and not close:
            writes += await self._write(conn, extra.raw, None)
            frame += extra.raw
        if close:
            conn.writer.close()
        if request.want_reply or close:
            self._log_reply(conn, request, status, message, frame, writes, closed=close)
        return not close

    async def _run(
        self, spec: CommandSpec, request: LoggedRequest, injected: ErrorReply | None
    ) -> tuple[int, str, bytes]:
        """Run the handler (unless an ErrorReply fault pre-empts it); returns status, message, reply body."""
        if request.args is None:
            message = request.error or "bad arguments"
        elif injected is not None:
            message = _wire_text(injected.message)
        elif (handler := self._handlers.get(spec.name.lower())) is None:
            message = f"{spec.name} is not supported by this test server (no handler set)"
        else:
            try:
                result = handler(dict(request.args))
                if inspect.isawaitable(result):
                    result = await result
                return 0, "", spec.encode_reply(result, self.release)
            except CommandFailed as exc:
                message = _wire_text(exc.message)
            except Exception as exc:  # a handler bug is a status-1 reply, never silence or a dead server
                message = _ascii_text(f"{spec.name} handler failed: {type(exc).__name__}: {exc}")
                self._event(request.conn, "handler_error", message)
                where = traceback.extract_tb(exc.__traceback__)[-1]
                log.error("fake_nanonis.handler_error", conn=request.conn, error=message,
                          at=f"{where.filename}:{where.lineno} in {where.name}")
        return 1, message, spec.encode_reply(None, self.release, 1, message)

    async def _write(self, conn: _Connection, data: bytes, chunked: Chunked | None) -> tuple[int, ...]:
        """Write `data` in one write (or in pieces for Chunked); returns the sizes written."""
        if not data or conn.writer.is_closing():
            return ()
        pieces = [data] if chunked is None else [data[i : i + chunked.size] for i in range(0, len(data), chunked.size)]
        sizes = []
        try:
            for k, piece in enumerate(pieces):
                if k and chunked is not None and chunked.pause_s:
                    await asyncio.sleep(chunked.pause_s)
                conn.writer.write(piece)
                await conn.writer.drain()
                sizes.append(len(piece))
        except (ConnectionError, OSError) as exc:
            log.info("fake_nanonis.write_failed", conn=conn.id, error=str(exc))
        return tuple(sizes)

    def _log_reply(self, conn: _Connection, request: LoggedRequest, status: int, message: str, raw: bytes,
                   writes: tuple[int, ...], *, closed: bool) -> None:
        self._reply_count += 1
        if self.record:
            self.replies.append(LoggedReply(conn.id, request.seq, request.name, status, message, raw, writes,
                                            request.faults, closed))
        self._notify()

    # -- default handlers -------------------------------------------------------------------------------------

    def _version_handler(self, args: dict[str, Any]) -> dict[str, Any]:
        product, version, host_release, rt_release = self.version
        return {"product": product, "version": version, "host_release": host_release, "rt_release": rt_release}


def _first(faults: tuple[Fault, ...], kind: type) -> Any:
    return next((f for f in faults if isinstance(f, kind)), None)


def _closes(faults: tuple[Fault, ...]) -> bool:
    return any(isinstance(f, (CloseBeforeReply, CloseAfterHeader, CloseMidBody)) for f in faults)


def _shape(request: LoggedRequest, body: bytes) -> tuple[bytes, bool]:
    """The reply frame after the request's faults, and whether the connection closes after it."""
    faults = request.faults
    wrong = _first(faults, WrongName)
    frame = codec.encode_reply(wrong.name if wrong else request.name, body)
    if bad_size := _first(faults, BadBodySize):
        frame = frame[:32] + struct.pack(">i", len(body) + bad_size.delta) + frame[36:]
    if garbage := _first(faults, Garbage):
        frame = garbage.raw
    if _first(faults, CloseBeforeReply):
        return b"", True
    if _first(faults, CloseAfterHeader):
        return frame[: codec.HEADER_SIZE], True
    if cut := _first(faults, CloseMidBody):
        return frame[: codec.HEADER_SIZE + cut.after_bytes], True
    return frame, False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection with a TCP reset (SO_LINGER 0), as a busy or absent server would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
