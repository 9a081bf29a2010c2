"""Run control: operator requests from real signals, STOP/PAUSE files and the API, drained at safe points."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deepspm.controller.journal import to_jsonable
from deepspm.controller.runcontrol import OperatorRequest, RequestKind, RequestSource, RunControl

PAUSE, RESUME, STOP, ABORT = RequestKind.PAUSE, RequestKind.RESUME, RequestKind.STOP, RequestKind.ABORT


async def spin_until(predicate: Callable[[], bool], turns: int = 1000) -> None:
    """Let the event loop run (no wall-clock sleep) until `predicate` holds."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def drain_until(control: RunControl, count: int) -> list[OperatorRequest]:
    got: list[OperatorRequest] = []

    def enough() -> bool:
        got.extend(control.pending())
        return len(got) >= count

    await spin_until(enough)
    return got


@pytest.fixture
def handlers_restored() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
            pytest.fail(f"{signal.Signals(sig).name} handler was not restored")


# -- the API and the state flags ---------------------------------------------------------------------------


async def test_requests_are_drained_in_order_and_set_the_flags() -> None:
    control = RunControl()
    assert control.pending() == []
    control.request("pause", detail="lunch")
    control.request(RequestKind.RESUME)
    control.request("stop", "api", "enough")
    got = control.pending()
    assert [(r.kind, r.source, r.detail) for r in got] == [
        (PAUSE, RequestSource.API, "lunch"), (RESUME, RequestSource.API, ""), (STOP, RequestSource.API, "enough")]
    assert not control.paused and control.stop_requested and not control.abort_requested
    assert control.pending() == []
    control.request("abort")
    control.pending()
    assert control.abort_requested and control.stop_requested
    with pytest.raises(ValueError):
        control.request("explode")


async def test_wait_while_paused_returns_on_resume_or_stop() -> None:
    control = RunControl()
    assert await control.wait_while_paused() == []  # not paused: at once

    control.request("pause")
    control.pending()
    waiter = asyncio.create_task(control.wait_while_paused())
    for _ in range(50):
        await asyncio.sleep(0)
    assert not waiter.done()  # still paused
    control.request("pause", detail="again")  # consumed while waiting, still paused
    control.request("resume")
    got = await waiter
    assert [r.kind for r in got] == [PAUSE, RESUME] and not control.paused

    control.request("pause")
    control.pending()
    waiter = asyncio.create_task(control.wait_while_paused())
    await asyncio.sleep(0)
    control.request("stop")
    assert [r.kind for r in await waiter] == [STOP]
    assert control.paused and control.stop_requested  # the loop stops from the paused state


def test_requests_journal_as_plain_values() -> None:
    req = OperatorRequest("stop", "signal", "SIGTERM")
    assert req.kind is STOP and req.source is RequestSource.SIGNAL
    assert to_jsonable(req) == {"kind": "stop", "source": "signal", "detail": "SIGTERM"}


# -- real signals ------------------------------------------------------------------------------------------


async def test_first_sigint_stops_and_a_second_aborts(handlers_restored: None) -> None:
    control = RunControl()
    control.install_signal_handlers(asyncio.get_running_loop())
    try:
        signal.raise_signal(signal.SIGINT)
        (first,) = await drain_until(control, 1)
        assert (first.kind, first.source, first.detail) == (STOP, RequestSource.SIGNAL, "SIGINT")
        assert control.stop_requested and not control.abort_requested
        signal.raise_signal(signal.SIGINT)
        (second,) = await drain_until(control, 1)
        assert second.kind is ABORT and control.abort_requested
    finally:
        control.remove_signal_handlers()


async def test_sigterm_stops_and_sigint_after_it_aborts(handlers_restored: None) -> None:
    control = RunControl()
    control.install_signal_handlers()
    try:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        got = await drain_until(control, 2)
        assert [(r.kind, r.detail) for r in got] == [(STOP, "SIGTERM"), (STOP, "SIGTERM")]
        signal.raise_signal(signal.SIGINT)
        assert [r.kind for r in await drain_until(control, 1)] == [ABORT]
    finally:
        control.remove_signal_handlers()


async def test_fallback_handlers_where_the_loop_has_no_signal_support(
    handlers_restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()

    def unsupported(*args: object) -> None:
        raise NotImplementedError  # as on Windows' proactor loop

    monkeypatch.setattr(loop, "add_signal_handler", unsupported)
    control = RunControl()
    control.install_signal_handlers(loop)
    try:
        assert signal.getsignal(signal.SIGINT) == control._forward_signal
        signal.raise_signal(signal.SIGINT)
        (req,) = await drain_until(control, 1)
        assert (req.kind, req.source) == (STOP, RequestSource.SIGNAL)
    finally:
        control.remove_signal_handlers()


async def test_removing_handlers_restores_the_previous_ones(handlers_restored: None) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        control = RunControl()
        control.install_signal_handlers()
        control.remove_signal_handlers()
        signal.raise_signal(signal.SIGTERM)  # reaches the handler that was there before
        assert seen == [signal.SIGTERM] and control.pending() == []
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the STOP and PAUSE files ------------------------------------------------------------------------------


class ScriptedSleep:
    """An injected sleep: records the poll period and changes the files between polls."""

    def __init__(self, steps: list[Callable[[], object]]) -> None:
        self.steps = steps
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if len(self.calls) <= len(self.steps):
            self.steps[len(self.calls) - 1]()
        await asyncio.sleep(0)


async def test_pause_file_pauses_while_it_exists_and_stop_file_stops(tmp_path: Path) -> None:
    control = RunControl.for_run_dir(tmp_path)
    pause, stop = tmp_path / "PAUSE", tmp_path / "STOP"
    sleep = ScriptedSleep([
        lambda: None,
        pause.touch,
        lambda: None,  # still there: no second pause request
        pause.unlink,
        lambda: stop.write_text("tip change needed\n"),
    ])
    await asyncio.wait_for(control.watch_stop_file(poll_s=2.0, sleep=sleep), timeout=60)  # returns after STOP
    assert sleep.calls == [2.0] * 5
    got = control.pending()
    assert [(r.kind, r.source) for r in got] == [(PAUSE, RequestSource.STOP_FILE), (RESUME, RequestSource.STOP_FILE),
                                                 (STOP, RequestSource.STOP_FILE)]
    assert got[2].detail == f"{stop}: tip change needed"
    assert not stop.exists()  # consumed: a resumed run does not stop again on it
    assert control.stop_requested and not control.paused


async def test_a_given_stop_file_path_and_an_empty_stop_file(tmp_path: Path) -> None:
    stop = tmp_path / "elsewhere" / "please-stop"
    stop.parent.mkdir()
    stop.touch()
    control = RunControl(stop_file=stop)
    sleep = ScriptedSleep([])
    await control.watch_stop_file(poll_s=1.0, sleep=sleep)
    assert sleep.calls == []  # seen on the first poll
    (req,) = control.pending()
    assert req.kind is STOP and req.detail == str(stop)


async def test_no_files_to_watch_returns_at_once() -> None:
    sleep = ScriptedSleep([])
    await RunControl().watch_stop_file(sleep=sleep)
    assert sleep.calls == []


async def test_a_paused_loop_waits_for_the_pause_file_to_go(tmp_path: Path) -> None:
    """The way the run loop uses it: the watcher is a task; the loop drains at safe points."""
    control = RunControl.for_run_dir(tmp_path)
    pause = tmp_path / "PAUSE"
    pause.touch()
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:
        await gate.wait()
        gate.clear()

    watcher = asyncio.create_task(control.watch_stop_file(poll_s=1.0, sleep=sleep))
    await spin_until(lambda: bool(control.pending()) or control.paused)
    assert control.paused
    waiter = asyncio.create_task(control.wait_while_paused())
    gate.set()  # one poll: PAUSE still there
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiter.done()
    pause.unlink()
    gate.set()  # next poll sees it gone
    got = await asyncio.wait_for(waiter, timeout=60)
    assert [r.kind for r in got] == [RESUME] and not control.paused
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
