"""`ReplayInstrument`: answers every instrument operation from a journal, in order, and notices divergence.

Each journaled command has a reply or a failure (timeouts, lost connections, error replies alike). The
replayed controller must ask for the same operation with the same arguments at the same point; the first
request that differs raises `Divergence` naming the journal's sequence number, what was recorded and what
came, because from there on the journal cannot answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from deepspm.controller.commands import COMMANDS
from deepspm.controller.executor import result_from_record
from deepspm.io import errors as io_errors
from deepspm.io import instrument as io_instrument
from deepspm.io.instrument import Frame, PiezoRange, ZState


class Divergence(Exception):
    def __init__(self, seq: int | None, expected: Any, got: Any) -> None:
        super().__init__(f"diverged at seq {seq}: journal has {expected!r}, controller asked for {got!r}")
        self.seq = seq
        self.expected = expected
        self.got = got


_ERROR_TYPES: dict[str, type[Exception]] = {
    name: obj
    for module in (io_errors, io_instrument)
    for name, obj in vars(module).items()
    if isinstance(obj, type) and issubclass(obj, Exception)
}


def rebuild_error(name: str, message: str) -> Exception:
    """An exception of the recorded type carrying the recorded message (constructor arguments are not kept)."""
    cls = _ERROR_TYPES.get(name, io_errors.InstrumentError)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


@dataclass(frozen=True)
class RecordedCall:
    seq: int
    op: str
    args: dict[str, Any]
    outcome: dict[str, Any] | None  # the reply or failure record; None if the run ended mid-command


def recorded_calls(records: list[dict[str, Any]]) -> list[RecordedCall]:
    """The journal's instrument calls in order (settle and stall never reach the instrument)."""
    outcomes = {r["of"]: r for r in records if r.get("kind") in ("reply", "failure")}
    calls = []
    for r in records:
        if r.get("kind") == "command" and COMMANDS[r["op"]].touches_instrument:
            args = {k: v for k, v in r.items() if k not in ("seq", "kind", "op", "t_mono", "t_wall")}
            calls.append(RecordedCall(r["seq"], r["op"], args, outcomes.get(r["seq"])))
    return calls


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-18)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class CallCursor:
    """Walks the recorded calls; `take(op, args)` checks and returns the recorded outcome."""

    def __init__(self, calls: list[RecordedCall]) -> None:
        self._calls = calls
        self.position = 0

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self._calls)

    def take(self, op: str, args: dict[str, Any]) -> RecordedCall:
        if self.exhausted:
            raise Divergence(None, "end of journal", {"op": op, **args})
        call = self._calls[self.position]
        # the record also holds journal-only fields (a scan's purpose, an action's index): compare what was passed
        if call.op != op or not set(args) <= set(call.args) or not all(_same(call.args[k], args[k]) for k in args):
            raise Divergence(call.seq, {"op": call.op, **call.args}, {"op": op, **args})
        self.position += 1
        return call


class ReplayInstrument:
    """The `Instrument` protocol answered from a journal's recorded calls."""

    def __init__(self, calls: list[RecordedCall], load_frame: Callable[[str], np.ndarray]) -> None:
        self.cursor = CallCursor(calls)
        self._load_frame = load_frame

    def _answer(self, op: str, args: dict[str, Any]) -> Any:
        call = self.cursor.take(op, args)
        if call.outcome is None:
            raise Divergence(call.seq, "a recorded outcome", "the journal ends inside this command")
        if call.outcome["kind"] == "failure":
            raise rebuild_error(call.outcome["error"], call.outcome["message"])
        return result_from_record(call.outcome["result"], self._load_frame)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def piezo_range(self) -> PiezoRange:
        return self._answer("piezo_range", {})

    async def z_state(self) -> ZState:
        return self._answer("z_state", {})

    async def approach(self) -> ZState:
        return self._answer("approach", {})

    async def withdraw(self) -> None:
        return self._answer("withdraw", {})

    async def set_z_extension(self) -> ZState:
        return self._answer("set_z_extension", {})

    async def retract_after_crash(self) -> ZState:
        return self._answer("retract_after_crash", {})

    async def scan(self, centre_x_m: float, centre_y_m: float, size_m: float) -> Frame:
        return self._answer("scan", {"centre_x_m": centre_x_m, "centre_y_m": centre_y_m, "size_m": size_m})

    async def pulse(self, x_m: float, y_m: float, bias_V: float, width_s: float) -> None:
        return self._answer("pulse", {"x_m": x_m, "y_m": y_m, "bias_V": bias_V, "width_s": width_s})

    async def dip(self, x_m: float, y_m: float, depth_m: float, bias_V: float, duration_s: float) -> None:
        return self._answer("dip", {"x_m": x_m, "y_m": y_m, "depth_m": depth_m, "bias_V": bias_V, "duration_s": duration_s})

    async def move_area(self, direction: int) -> None:
        return self._answer("move_area", {"direction": direction})
