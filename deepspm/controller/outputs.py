"""Files a run writes for people beside its journal: every judged frame (or every frame) as a Nanonis .sxm.

The journal stays the source of truth: a judgement names its file (`sxm` on the classify decision), and an
unjudged frame's file is named by the seq of the reply that brought it. Files are written off the event loop,
atomically, and never while a journal is being re-lived (replay, the fast-forward of a resume). A full disk is a
`DiskFull` naming the file (the run suspends, as for a frame or the journal).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from deepspm.controller.config import RunConfig
from deepspm.controller.documents import Classification
from deepspm.controller.journal import DiskFull, is_disk_full
from deepspm.io.instrument import Frame, line_time_s
from deepspm.io.sxm import FrameRecordInfo, SxmFrameWriter

_KEEP = 16  # grabbed frames remembered until judged (the judgement follows within one step)


class SxmOutput:
    """`[output] sxm`: "judged" (default), "all" or "none"."""

    def __init__(self, run_dir: Path, run_id: str, config: RunConfig, wall: Callable[[], float] = time.time) -> None:
        self.writer = SxmFrameWriter(run_dir, config.output.sxm)
        self.run_id = run_id
        self.wall = wall  # the files' recording time (UTC)
        self.scan = config.scan
        self._grabbed: OrderedDict[str, tuple[Frame, int, float]] = OrderedDict()  # ref -> (frame, reply seq, t_wall)

    def _info(self, frame: Frame, ref: str, seq: int, t_wall: float, judgement: str | None,
              p_good: float | None) -> FrameRecordInfo:
        line_s = line_time_s(self.scan, frame.size_m)
        forward_s = frame.size_m / self.scan.fwd_speed_mps
        return FrameRecordInfo(
            run_id=self.run_id, seq=seq, frame_ref=ref, centre_m=(frame.centre_x_m, frame.centre_y_m),
            size_m=frame.size_m, scan_up=frame.scan_up, recorded_utc=datetime.fromtimestamp(t_wall, tz=UTC),
            bias_v=self.scan.bias_V, setpoint_a=self.scan.setpoint_A, judgement=judgement, p_good=p_good,
            line_time_s=(forward_s, line_s - forward_s),
        )

    async def grabbed(self, frame: Frame, ref: str, seq: int) -> None:
        """A frame arrived: remembered for its judgement; with "all", written now (unjudged)."""
        t_wall = self.wall()
        self._grabbed[ref] = (frame, seq, t_wall)
        while len(self._grabbed) > _KEEP:
            self._grabbed.popitem(last=False)
        if self.writer.mode == "all":
            info = self._info(frame, ref, seq, t_wall, None, None)
            await self._write(frame, info)

    async def judged(self, doc: Classification) -> str | None:
        """A judged frame's file (rewritten with the judgement under "all"); its path relative to the run."""
        if doc.frame not in self._grabbed or not self.writer.wants(True):
            return None
        frame, seq, t_wall = self._grabbed[doc.frame]
        info = self._info(frame, doc.frame, seq, t_wall, "good" if doc.good else "bad", doc.p_good)
        return await self._write(frame, info)

    async def _write(self, frame: Frame, info: FrameRecordInfo) -> str | None:
        try:
            return await asyncio.to_thread(self.writer.write, np.asarray(frame.data_m), info)
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise DiskFull(Path(e.filename) if e.filename else self.writer.run_dir / "sxm", e) from e
