"""Operator requests (pause, resume, stop, abort) as data, acted on by the run loop at safe points.

Requests arrive from three sources and all go through one asyncio.Queue, so the loop sees them in order
and can journal each one:
- signals: the first SIGINT or SIGTERM requests a stop at the next safe point; a SIGINT after any earlier
  signal requests an abort (stop now, but withdraw the tip first). Handlers run on the event loop (via
  `loop.add_signal_handler`; where that is unavailable, e.g. Windows, a `signal.signal` handler forwards
  with `call_soon_threadsafe`);
- files, polled by `watch_stop_file` (a task the loop owns): a STOP file requests a stop (its text, if
  any, becomes the request's detail) and is removed once seen, so a resumed run does not stop at once on
  a stale file; a PAUSE file pauses the run while it exists (removing it resumes);
- the API: `request(...)`, e.g. from tests or an embedding program.

The loop calls `pending()` at every safe point (a non-blocking drain that also updates `paused`,
`stop_requested` and `abort_requested`), and `await wait_while_paused()` when paused. Nothing here
touches the instrument.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Any

STOP_FILE = "STOP"
PAUSE_FILE = "PAUSE"
_DETAIL_MAX_CHARS = 200


class RequestKind(str, Enum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"  # finish at the next safe point
    ABORT = "abort"  # stop now; the loop withdraws the tip first


class RequestSource(str, Enum):
    SIGNAL = "signal"
    STOP_FILE = "stop_file"  # the STOP or PAUSE file
    API = "api"


@dataclass(frozen=True)
class OperatorRequest:
    kind: RequestKind
    source: RequestSource
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", RequestKind(self.kind))
        object.__setattr__(self, "source", RequestSource(self.source))


class RunControl:
    """The queue of operator requests and the state they imply."""

    def __init__(self, stop_file: Path | None = None, pause_file: Path | None = None) -> None:
        self.stop_file = None if stop_file is None else Path(stop_file)
        self.pause_file = None if pause_file is None else Path(pause_file)
        self._queue: asyncio.Queue[OperatorRequest] = asyncio.Queue()
        self.paused = False
        self.stop_requested = False
        self.abort_requested = False
        self._signals_seen = 0
        self._file_paused = False
        self._installed: dict[int, Any] = {}  # signal -> previous handler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._uses_loop_handlers = False

    @classmethod
    def for_run_dir(cls, run_dir: Path, stop_file: Path | None = None) -> RunControl:
        """STOP and PAUSE files in the run directory (or the given stop file)."""
        run_dir = Path(run_dir)
        return cls(stop_file=stop_file or run_dir / STOP_FILE, pause_file=run_dir / PAUSE_FILE)

    # -- requests -----------------------------------------------------------------------------------------
    def request(self, kind: RequestKind | str, source: RequestSource | str = RequestSource.API, detail: str = "") -> None:
        """Queue a request (from the event loop's thread)."""
        self._queue.put_nowait(OperatorRequest(RequestKind(kind), RequestSource(source), detail))

    def _apply(self, req: OperatorRequest) -> None:
        if req.kind is RequestKind.PAUSE:
            self.paused = True
        elif req.kind is RequestKind.RESUME:
            self.paused = False
        elif req.kind is RequestKind.STOP:
            self.stop_requested = True
        elif req.kind is RequestKind.ABORT:
            self.stop_requested = self.abort_requested = True

    def pending(self) -> list[OperatorRequest]:
        """Every request queued so far, oldest first (non-blocking); updates the state flags."""
        out: list[OperatorRequest] = []
        while True:
            try:
                req = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return out
            self._apply(req)
            out.append(req)

    async def wait_while_paused(self) -> list[OperatorRequest]:
        """While paused (and no stop requested), wait for requests; returns those consumed (journal them).
        Returns at once with [] when not paused."""
        out: list[OperatorRequest] = []
        while self.paused and not self.stop_requested:
            req = await self._queue.get()
            self._apply(req)
            out.append(req)
        return out

    # -- signals ------------------------------------------------------------------------------------------
    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Route SIGINT and SIGTERM to requests until `remove_signal_handlers()`."""
        if self._installed:
            return
        loop = loop or asyncio.get_running_loop()
        self._loop = loop
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._uses_loop_handlers = True
            except (NotImplementedError, RuntimeError):  # no loop signal support here (Windows, a thread)
                signal.signal(sig, self._forward_signal)
                self._uses_loop_handlers = False
            self._installed[sig] = previous

    def remove_signal_handlers(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, previous in self._installed.items():
            if self._uses_loop_handlers and self._loop is not None and not self._loop.is_closed():
                self._loop.remove_signal_handler(sig)
            if previous is not None:  # None: a handler not installed from Python; leave the default
                signal.signal(sig, previous)
        self._installed.clear()

    def _forward_signal(self, signum: int, frame: FrameType | None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self._signals_seen += 1
        if signum == signal.SIGINT and self._signals_seen > 1:
            self.request(RequestKind.ABORT, RequestSource.SIGNAL, f"{name} again: abort")
        else:
            self.request(RequestKind.STOP, RequestSource.SIGNAL, name)

    # -- files --------------------------------------------------------------------------------------------
    async def watch_stop_file(self, poll_s: float = 1.0,
                              sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Poll the STOP and PAUSE files every `poll_s` seconds (of `sleep`); returns after a STOP file
        was seen. The loop owns this task (cancel it when the run ends)."""
        if self.stop_file is None and self.pause_file is None:
            return
        while True:
            if self.poll_files():
                return
            await sleep(poll_s)

    def poll_files(self) -> bool:
        """Check the files once and queue what they ask for; True once a stop was requested by file."""
        if self.pause_file is not None:
            exists = self.pause_file.exists()
            if exists and not self._file_paused:
                self._file_paused = True
                self.request(RequestKind.PAUSE, RequestSource.STOP_FILE, str(self.pause_file))
            elif not exists and self._file_paused:
                self._file_paused = False
                self.request(RequestKind.RESUME, RequestSource.STOP_FILE, str(self.pause_file))
        if self.stop_file is not None and self.stop_file.exists():
            self.request(RequestKind.STOP, RequestSource.STOP_FILE, self._consume_stop_file())
            return True
        return False

    def _consume_stop_file(self) -> str:
        path = self.stop_file
        assert path is not None
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()[:_DETAIL_MAX_CHARS]
        except OSError:
            text = ""
        try:
            path.unlink()
        except OSError:
            pass  # still stop; the file may be on a read-only share
        return f"{path}: {text}" if text else str(path)
