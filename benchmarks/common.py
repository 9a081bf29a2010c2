"""Shared helpers: a table printer, JSON results, a server on its own event-loop thread."""

from __future__ import annotations

import asyncio
import json
import platform
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

RESULTS = Path(__file__).resolve().parents[1] / "bench-results"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": platform.platform(), "python": platform.python_version(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


class LoopThread:
    """An asyncio loop on a daemon thread, so a server can run beside synchronous clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, make: Callable[[], Awaitable[Any]]) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(make(), self.loop)  # type: ignore[arg-type]
        return fut.result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
