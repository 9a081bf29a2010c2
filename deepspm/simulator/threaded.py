"""Host an asyncio server on its own event-loop thread.

The embedded simulator renders frames synchronously inside its request handlers; on its own thread it
never blocks the controller's event loop, just as a real Nanonis runs on another machine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An event loop running on a daemon thread; `call` runs a coroutine there and waits for its result."""

    def __init__(self, name: str = "simulator") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, make: Callable[[], Awaitable[T]]) -> Future[T]:
        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def call(self, make: Callable[[], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Block the calling thread until the coroutine finished on the loop thread."""
        return self.submit(make).result(timeout_s)

    async def call_async(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await, from another event loop, a coroutine run on the loop thread."""
        return await asyncio.wrap_future(self.submit(make))

    def stop(self, timeout_s: float = 5.0) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
