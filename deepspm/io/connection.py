"""One TCP connection to a Nanonis server: one request in flight, a deadline per command.

Any interruption (timeout, cancellation, protocol error, EOF) closes the socket before the error
surfaces, because a late reply would otherwise be read as the answer to the next request. The outcome of
the interrupted command is unknown; this layer never re-sends anything. Reconnecting (with backoff) is
for the connection itself only: `connect()` may be called again after a failure.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from deepspm.io.codec import Message, MessageDecoder, encode_request
from deepspm.io.errors import CommandTimeout, ConnectionLost, ProtocolError

log = structlog.get_logger(__name__)

_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Backoff:
    """Reconnect policy for the connection itself: `attempts` tries, delays growing by `factor`."""

    attempts: int = 5
    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 10.0

    def delays(self) -> list[float]:
        out, d = [], self.initial_s
        for _ in range(max(self.attempts - 1, 0)):
            out.append(min(d, self.max_s))
            d *= self.factor
        return out


class NanonisConnection:
    """An asyncio stream to one Nanonis port. Safe to share between tasks: requests are serialised."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout_s: float = 5.0,
        backoff: Backoff = Backoff(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.host = host
        self.port = port
        self._connect_timeout_s = connect_timeout_s
        self._backoff = backoff
        self._sleep = sleep
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.connects = 0  # how many times a socket was opened (for logs and tests)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Open the socket, retrying with backoff; raises ConnectionLost when every attempt failed."""
        if self.connected:
            return
        delays = self._backoff.delays()
        for attempt in range(len(delays) + 1):
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=_READ_CHUNK)
                sock = self._writer.get_extra_info("socket")
                if sock is not None:  # small requests go out at once, not after Nagle's delay
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connects += 1
                log.debug("nanonis.connected", host=self.host, port=self.port, attempt=attempt)
                return
            except (OSError, TimeoutError) as exc:
                log.warning("nanonis.connect_failed", host=self.host, port=self.port, attempt=attempt, error=str(exc))
                if attempt == len(delays):
                    raise ConnectionLost(None, f"cannot connect to {self.host}:{self.port}: {exc}") from exc
                await self._sleep(delays[attempt])

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is None:
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass

    def _abort(self) -> None:
        """Drop the socket at once (synchronous: usable while being cancelled)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.transport.abort()

    async def request(self, name: str, body: bytes, timeout_s: float) -> Message:
        """Send one request and return its reply message (name checked, framing checked)."""
        async with self._lock:
            if not self.connected:
                raise ConnectionLost(name, "not connected")
            try:
                async with asyncio.timeout(timeout_s):
                    return await self._exchange(name, body)
            except TimeoutError:
                self._abort()
                raise CommandTimeout(name, timeout_s) from None
            except (ProtocolError, ConnectionLost):
                self._abort()
                raise
            except asyncio.CancelledError:
                self._abort()
                raise
            except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                self._abort()
                raise ConnectionLost(name, f"{type(exc).__name__}: {exc}") from exc

    async def _exchange(self, name: str, body: bytes) -> Message:
        assert self._reader is not None and self._writer is not None
        self._writer.write(encode_request(name, body))
        await self._writer.drain()
        decoder = MessageDecoder("reply")
        while True:
            chunk = await self._reader.read(_READ_CHUNK)
            if not chunk:
                where = "mid-reply" if decoder.mid_message else "before the reply"
                raise ConnectionLost(name, f"server closed the connection {where}")
            messages = decoder.feed(chunk)
            if not messages:
                continue
            reply = messages[0]
            if len(messages) > 1 or decoder.pending:
                raise ProtocolError(f"{name}: unsolicited bytes after the reply", chunk[-64:])
            if reply.name != name:
                raise ProtocolError(f"{name}: reply echoes {reply.name!r} (stream out of step)")
            return reply
