"""The run engine: executes the plans of `plans.py`, until a terminal state.

It is the only code that awaits the instrument (through the executor) and the only task that fires FSM
triggers. It decides nothing: each step runs the plan of the current state, performing what the plan yields
(commands through the executor, documents into the journal, net and CPU work in worker threads, the FSM
trigger) and sending the results back. Operator requests (stop, pause) are acted on between steps, which are
the run's safe points. An instrument error leaves the state unchanged; on a fatal error the tip is withdrawn
before the error leaves the loop, and the journal's stop record is written from a `finally`.

A full disk (`DiskFull`: a frame, an .sxm file or a journal append could not be written) suspends the run: at the
next safe point (or where the write failed, if the step cannot go on without it) the tip is withdrawn and the loop
returns the status `suspended`, which `--resume` continues once space is back. No FSM trigger fires: the resumed
run carries on in the state it was suspended in (its z check finds the withdrawn tip and recovers the contact).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from deepspm.controller.brain import Brain
from deepspm.controller.commands import Command, Withdraw
from deepspm.controller.config import RunConfig
from deepspm.controller.documents import Classification, Document, Note, OperatorRequestRecord, TransitionRecord
from deepspm.controller.executor import Executor, JournalSink
from deepspm.controller.journal import SCHEMA_VERSION, SUSPENDED, DiskFull
from deepspm.controller.messages import (
    Choose,
    Classify,
    ClassifyLines,
    Compute,
    Experience,
    Fire,
    Learn,
    Plan,
    Scanned,
    UnknownMessage,
)
from deepspm.controller.outputs import SxmOutput
from deepspm.controller.plans import RunCounters, RunFailed, RunState, plan_for
from deepspm.controller.runcontrol import OperatorRequest, RunControl
from deepspm.fsm.machine import RunModel, build_machine
from deepspm.fsm.states import State
from deepspm.io.errors import InstrumentError, Interrupted, SafetyError
from deepspm.io.instrument import Frame, Instrument

log = structlog.get_logger(__name__)

__all__ = ["RunLoop", "RunFailed", "UnknownMessage"]


class RunLoop:
    def __init__(
        self,
        *,
        instrument: Instrument,
        journal: JournalSink,
        brain: Brain,
        config: RunConfig,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] | None = None,
        control: RunControl | None = None,
        progress: Callable[[RunLoop], None] | None = None,
        time_spent_s: float = 0.0,
        outputs: SxmOutput | None = None,
        after_learning: Callable[[], Awaitable[None]] | None = None,
        schema: int | None = None,
    ) -> None:
        """`time_spent_s`: run time of the processes before a resume, which the time budget counts too.
        `outputs`: files for people (.sxm frames), written live only. `after_learning`: called after each
        live learning step (`resume_points.ResumePoints.after_learning`). `schema`: of the journal re-lived
        (replay, resume), whose record order the plans follow; None: the current one."""
        self.config = config
        self.journal = journal
        self.brain = brain
        self.executor = Executor(instrument, journal, sleep)
        self.model = RunModel()
        self.machine = build_machine(self.model, self._on_transition)
        self.plan_state = RunState.new(config, classifier_version=brain.classifier_version,
                                       schema=schema if schema is not None else SCHEMA_VERSION)
        self.control = control or RunControl()
        self._progress = progress
        self._monotonic = monotonic or asyncio.get_running_loop().time
        self._started = self._monotonic() - time_spent_s
        self._consecutive_faults = 0
        self.outputs = outputs
        self._after_learning = after_learning

    @property
    def state(self) -> State:
        return self.model.state

    @property
    def counters(self) -> RunCounters:
        return self.plan_state.counters

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _on_transition(self, trigger: str, source: State, dest: State) -> None:
        self.journal.write(TransitionRecord(trigger, source.value, dest.value))
        structlog.contextvars.bind_contextvars(state=dest.value)

    async def _fire(self, trigger: str) -> None:
        await self.model.fire(trigger)

    # -- the loop -----------------------------------------------------------------------------------------
    async def run(self) -> tuple[str, str]:
        """Run until stopped, done or failed; returns (status, reason) for the journal's stop record."""
        try:
            await self._fire("start")
            while not self.state.terminal:
                self._check_disk()
                stop_reason = await self._safe_point()
                if stop_reason:
                    await self._stop(stop_reason)
                    return ("stopped" if stop_reason.startswith("operator") else "completed", stop_reason)
                await self.step()
            return ("stopped", "terminal state")
        except DiskFull as exc:
            return await self._suspend(exc)
        except asyncio.CancelledError:
            await self._withdraw_safely("cancelled")
            raise
        except Exception as exc:
            log.error("run.fatal", error=f"{type(exc).__name__}: {exc}")
            await self._withdraw_safely(f"{type(exc).__name__}: {exc}")
            if not self.state.terminal:
                await self._fire("fail")
            return ("fault", f"{type(exc).__name__}: {exc}")

    def _journal_requests(self, requests: list[OperatorRequest]) -> None:
        for r in requests:
            self.journal.write(OperatorRequestRecord(r.kind.value, r.source.value, r.detail))

    async def _safe_point(self) -> str | None:
        """Between commands: act on operator requests (pause waits here) and the run's budgets."""
        self._journal_requests(self.control.pending())
        if self.control.paused and not self.control.stop_requested:
            self.journal.write(Note("paused by the operator"))
            self._journal_requests(await self.control.wait_while_paused())
        if self.control.abort_requested:
            return "operator abort"
        if self.control.stop_requested:
            return "operator stop"
        run = self.config.run
        if run.frames is not None and self.counters.frames >= run.frames:
            return f"frame budget of {run.frames} reached"
        # The budget runs on live time only: a replayed past stops where its journal stopped (ReplayControl).
        if run.hours is not None and not self.journal.replaying and self._monotonic() - self._started >= run.hours * 3600:
            return f"time budget of {run.hours} h reached"
        return None

    async def _stop(self, reason: str) -> None:
        if self.config.run.withdraw_on_stop and self.state is not State.idle:
            await self.executor.execute(Withdraw())
        await self._fire("stop")

    def _check_disk(self) -> None:
        """Raise the journal's first full disk, once the run is live (a re-lived past only reads the disk)."""
        if self.journal.replaying:
            return
        live = getattr(self.journal, "live", None)  # the journal of a resumed run, behind its re-lived past
        problem = getattr(self.journal, "disk_problem", None) or getattr(live, "disk_problem", None)
        if problem is not None:
            raise problem

    async def _suspend(self, exc: DiskFull) -> tuple[str, str]:
        """Withdraw the tip and end the process with a status `--resume` accepts. Only the withdraw is journaled
        here (command and reply, or failure): a resume leaves it out of what it re-lives, as a stop's withdraw."""
        log.error("run.suspended", error=str(exc))
        try:
            await asyncio.wait_for(self.executor.execute(Withdraw()), 30.0)
            tip = "tip withdrawn"
        except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - said in the reason, never raised over it
            tip = f"the withdraw failed ({type(e).__name__}: {e})"
        return SUSPENDED, f"{exc}; {tip}"

    async def _withdraw_safely(self, why: str) -> None:
        """Withdraw the tip before a fatal exit; a failure here is journaled, never raised over the cause."""
        try:
            await asyncio.wait_for(self.executor.execute(Withdraw()), 30.0)
        except (Exception, asyncio.CancelledError) as exc:  # the original error matters more than this one
            self.journal.write(Note(f"withdraw after '{why}' failed: {type(exc).__name__}: {exc}"))

    async def step(self) -> None:
        """One state's work. An instrument error leaves the state unchanged, so the next step decides again
        (a new, journaled decision, never a blind re-send); too many in a row end the run."""
        try:
            await self._dispatch()
        except SafetyError:
            raise
        except Interrupted as exc:  # the controller was killed during the command: not the instrument's fault
            self.journal.write(Note(f"resumed after an interruption in {self.state.value}: {exc}"))
            return
        except InstrumentError as exc:
            self._consecutive_faults += 1
            self.journal.write(Note(f"instrument fault in {self.state.value}: {type(exc).__name__}: {exc}",
                                    {"consecutive": self._consecutive_faults}))
            if self._consecutive_faults >= self.config.detection.max_consecutive_faults:
                raise RunFailed(f"{self._consecutive_faults} instrument faults in a row; last: {exc}") from exc
            return
        self._consecutive_faults = 0

    async def _dispatch(self) -> None:
        await self.run_plan(plan_for(self.state, self.plan_state))

    async def run_plan(self, plan: Plan) -> None:
        """Drive one plan to its end: perform each message and send its result back; an error of a message is
        thrown into the plan at its `yield` (the plan may handle it, or it ends the step)."""
        result: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    message = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration:
                    return
                result, error = None, None
                try:
                    result = await self.perform(message)
                except Exception as exc:  # noqa: BLE001 - handed to the plan, which re-raises what it cannot handle
                    error = exc
        finally:
            plan.close()

    async def perform(self, message: Any) -> Any:
        """Carry out one message of a plan."""
        if isinstance(message, Command):
            result = await self.executor.execute(message)
            if isinstance(result, Frame):  # saved by the executor; the plan gets it with its journal reference
                ref, seq = self.executor.last_frame_ref, self.executor.last_reply_seq
                if ref is None or seq is None:
                    raise RuntimeError("a grabbed frame was not saved")
                if self.outputs is not None and not self.journal.replaying:
                    await self.outputs.grabbed(result, ref, seq)
                return Scanned(result, ref)
            return result
        if isinstance(message, Classification) and self.outputs is not None and not self.journal.replaying:
            message = dataclasses.replace(message, sxm=await self.outputs.judged(message))
        if isinstance(message, Document):
            self.journal.write(message)
            if isinstance(message, Classification) and self._progress is not None:
                self._progress(self)
            return None
        if isinstance(message, Fire):
            await self.model.fire(message.trigger, ctx=message.ctx)
            return None
        if isinstance(message, Compute):
            return await asyncio.to_thread(message.fn, *message.args)
        if isinstance(message, Classify):
            return await self.brain.classify(message.image)
        if isinstance(message, ClassifyLines):
            return await self.brain.classify_lines(message.image)
        if isinstance(message, Choose):
            return await self.brain.choose(message.image, message.mask, message.rng)
        if isinstance(message, Experience):
            self.brain.store(message.state, message.action, message.reward, message.next_state, message.terminal,
                             message.next_mask)
            return None
        if isinstance(message, Learn):
            await self.brain.learn()
            if self._after_learning is not None and not self.journal.replaying:
                await self._after_learning()
            return None
        raise UnknownMessage(f"a plan yielded {message!r}, which no engine performs")
