"""Requests per second over loopback: our async client versus the vendor's `nanonis-spm` (sync).

Both talk to the same FakeNanonisServer, which runs on its own event-loop thread; each client runs the
same number of sequential requests (one in flight, as both clients work). Goal: ours >= 1.0x on every row.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time

import numpy as np

from benchmarks.common import print_table, write_json
from deepspm.io.client import FrameData, NanonisClient
from deepspm.io.connection import NanonisConnection
from deepspm.io.safety import SafetyEnvelope
from deepspm.simulator.server import FakeNanonisServer
from deepspm.simulator.threaded import LoopThread

CASES = [("Bias.Get", None, 2000), ("Scan.FrameDataGrab 64x64", 64, 1000), ("Scan.FrameDataGrab 512x512", 512, 40)]


def make_server(frames: dict[int, np.ndarray]) -> tuple[FakeNanonisServer, dict]:
    state = {"size": 64}
    return FakeNanonisServer(
        record=False,
        handlers={
            "Bias.Get": lambda a: {"bias_V": 0.25},
            "Scan.FrameDataGrab": lambda a: {"channel_name": "Z (m)", "data": frames[state["size"]], "scan_up": 1},
            "Scan.BufferSet": lambda a: state.update(size=a["pixels"]),
        },
    ), state


def vendor_rate(port: int, case: str, size: int | None, n: int, state: dict) -> float:
    import nanonis_spm

    sock = socket.create_connection(("127.0.0.1", port))
    try:
        nanonis = nanonis_spm.Nanonis(sock)
        with contextlib.redirect_stdout(io.StringIO()):
            call = (lambda: nanonis.Bias_Get()) if size is None else (lambda: nanonis.Scan_FrameDataGrab(30, 1))
            call()  # warm up
            start = time.perf_counter()
            for _ in range(n):
                reply = call()
            elapsed = time.perf_counter() - start
        if size is not None:
            assert reply[2][4].shape == (size, size)
    finally:
        sock.close()
    return n / elapsed


async def ours_rate(port: int, size: int | None, n: int) -> float:
    client = NanonisClient(NanonisConnection("127.0.0.1", port), SafetyEnvelope())
    async with client:
        call = client.bias_get if size is None else (lambda: client.scan_frame_data_grab(30))
        await call()
        start = time.perf_counter()
        for _ in range(n):
            reply = await call()
        elapsed = time.perf_counter() - start
    if size is not None:
        assert isinstance(reply, FrameData) and reply.data.shape == (size, size)
    return n / elapsed


def main() -> None:
    rng = np.random.default_rng(0)
    frames = {s: rng.normal(0, 1e-10, (s, s)).astype(np.float32) for s in (64, 512)}
    server, state = make_server(frames)
    thread = LoopThread()
    port = thread.call(server.start)
    rows, results = [], []
    try:
        for case, size, n in CASES:
            state["size"] = size or 64
            vendor = vendor_rate(port, case, size, n, state)
            ours = asyncio.run(ours_rate(port, size, n))
            rows.append((case, n, ours, vendor, ours / vendor))
            results.append({"case": case, "requests": n, "ours_per_s": ours, "vendor_per_s": vendor, "ratio": ours / vendor})
    finally:
        thread.call(server.close)
        thread.stop()
    print_table("Nanonis loopback requests/s: ours (asyncio) vs nanonis-spm 1.0.9 (sync); goal ratio >= 1.0",
                ("command", "n", "ours/s", "nanonis-spm/s", "ratio"), rows)
    print("wrote", write_json("nanonis", {"rows": results}))


if __name__ == "__main__":
    main()
