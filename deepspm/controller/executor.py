"""The one place where commands meet the instrument: perform, and journal command, reply or failure.

Failures are inputs too: a timeout, a lost connection or a refused (safety) request is journaled with its
type and message before it propagates to the loop, which decides what it means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import structlog

from deepspm.controller.commands import Command, Settle, Wait
from deepspm.controller.documents import Failure, Reply, Written
from deepspm.io.instrument import Frame, Instrument, ZState


class JournalSink(Protocol):
    @property
    def replaying(self) -> bool:
        """True while a resume or replay re-lives recorded records (no live time passes)."""
        ...

    def write(self, doc: Written) -> int: ...
    async def flush(self) -> None: ...
    async def save_frame(self, array: np.ndarray) -> str: ...


# Before these the journal is flushed to disk: a resumed run must know they may have happened.
FLUSH_BEFORE = frozenset({"pulse", "dip", "motor_move", "start_approach"})


def zstate_to_record(z: ZState) -> dict[str, Any]:
    return dataclasses.asdict(z)


def result_to_record(result: Any, frame_ref: str | None) -> Any:
    if result is None or isinstance(result, bool):
        return result
    if isinstance(result, ZState):
        return {"type": "ZState", **zstate_to_record(result)}
    if isinstance(result, Frame):
        meta = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in ("data_m", "z_after")}
        return {"type": "Frame", "frame": frame_ref, "z_after": zstate_to_record(result.z_after), **meta}
    raise TypeError(f"cannot journal a result of type {type(result).__name__}")


def error_attributes(exc: BaseException) -> dict[str, Any]:
    """An error's own fields that JSON holds as they are (a command name, a code, a timeout; not raw bytes)."""
    return {k: v for k, v in vars(exc).items()
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}


def digest(outcome: Any) -> str:
    """A short hash of a recorded outcome, so a replay notices a reply that was altered after the run."""
    from deepspm.controller.journal import to_jsonable

    text = json.dumps(to_jsonable(outcome), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def result_from_record(record: Any, load_frame: Callable[[str], np.ndarray]) -> Any:
    """Inverse of `result_to_record` (replay)."""
    if record is None or isinstance(record, bool):
        return record
    data = dict(record)
    kind = data.pop("type")
    if kind == "ZState":
        return ZState(**data)
    if kind == "Frame":
        ref = data.pop("frame")
        z_after = ZState(**data.pop("z_after"))
        return Frame(data_m=load_frame(ref), z_after=z_after, **data)
    raise ValueError(f"unknown result type {kind!r} in journal")


class Executor:
    def __init__(self, instrument: Instrument, journal: JournalSink, sleep: Callable[[float], Awaitable[None]]) -> None:
        self.instrument = instrument
        self.journal = journal
        self.sleep = sleep
        self.last_frame_ref: str | None = None  # the content hash of the last frame saved
        self.last_reply_seq: int | None = None

    async def execute(self, command: Command) -> Any:
        seq = self.journal.write(command)
        structlog.contextvars.bind_contextvars(seq=seq)  # diagnostics join the journal record
        if command.op in FLUSH_BEFORE:
            await self.journal.flush()
        try:
            if isinstance(command, (Settle, Wait)):
                if not self.journal.replaying:  # a re-lived wait was waited out when it was recorded
                    await self.sleep(command.seconds)
                result = None
            elif not command.touches_instrument:
                result = None
            else:
                method = getattr(self.instrument, command.op)
                result = await method(**command.instrument_kwargs())
        except Exception as exc:
            error, message = type(exc).__name__, str(exc)
            self.journal.write(Failure(of=seq, op=command.op, error=error, message=message,
                                       attributes=error_attributes(exc),
                                       digest=digest([error, message])))
            raise
        ref = await self.journal.save_frame(result.data_m) if isinstance(result, Frame) else None
        if ref is not None:
            self.last_frame_ref = ref
        record = result_to_record(result, ref)
        self.last_reply_seq = self.journal.write(Reply(of=seq, op=command.op, result=record, digest=digest(record)))
        return result

