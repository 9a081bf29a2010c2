"""Resume points of online learning: the learner's state saved during a run (design §7, `checkpoints/`: "the
planner/episode state needed to resume").

A run that learns online makes one gradient update per conditioning action, and its weights are a function of
the journal (`brain.py`). A resume rebuilds them by re-living the journal, which used to mean redoing every
update: 0.3 s each on two CPU cores, so the resumes of a long run spent most of their time re-learning (the
10 000-frame soak of issue 17). Now, every `RESUME_POINT_EVERY` updates, the learner's state (both nets, Adam
state, counters and the memory's sampling RNG; not the memory's rows, which the re-live rebuilds) is written to
`checkpoints/resume/learner`, after the journal records behind it are on disk. A resume adopts it before the
re-live and redoes only the updates made after it: the same weights, update for update (tests/test_resume.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from deepspm.controller.journal import CHECKPOINTS_DIR, Journal
from deepspm.nets.checkpoint_info import CheckpointError
from deepspm.nets.checkpoints import load_learner, write_learner_state
from deepspm.nets.dqn import Learner

log = structlog.get_logger(__name__)

RESUME_POINT_EVERY = 25  # updates between saves: ~8 s of learning on 2 cores against ~0.1 s per save
RESUME_LEARNER = Path(CHECKPOINTS_DIR) / "resume" / "learner"


class ResumePoints:
    """Saves the learner's resume point once `every` updates have been made since the last one."""

    def __init__(self, run_dir: Path, journal: Journal, learner: Learner, every: int | None = None) -> None:
        self.path = run_dir / RESUME_LEARNER
        self.journal = journal
        self.learner = learner
        self.every = every if every is not None else RESUME_POINT_EVERY
        self.saved_updates: int | None = None  # None: not yet looked (a resumed learner starts past 0)

    async def after_learning(self) -> None:
        """Called after the loop's learning step (live only): save a point if one is due."""
        learner = self.learner
        if self.saved_updates is None:
            self.saved_updates = learner.updates
        if learner.updates - self.saved_updates < self.every:
            return
        state, memory = learner.resume_point()
        # The experience behind `state` must be in the journal before a resume can use the point: a point ahead
        # of the journal would hold updates from experience the re-live never records.
        await self.journal.flush()
        meta = {"env_steps": int(state.env_steps), "updates": int(state.updates)}
        try:
            await asyncio.to_thread(write_learner_state, self.path, learner, state, memory, metadata=meta,
                                    overwrite=True)
        except OSError as exc:  # the run goes on; a resume starts from the previous point (or re-learns)
            log.warning("resume_point.not_saved", error=f"{type(exc).__name__}: {exc}", path=str(self.path))
            return
        self.saved_updates = int(state.updates)


def adopt_resume_point(run_dir: Path, learner: Learner, actions_in_journal: int) -> int | None:
    """Before a resume's re-live: give `learner` (fresh, built from the run's nets and config) the run's last
    resume point. Returns its update count, or None when there is none to use (the re-live then redoes every
    update): missing, unreadable, of another learner, or ahead of the journal (more experience than the
    `actions_in_journal` it re-lives; cannot happen when the journal is flushed first, checked all the same)."""
    path = run_dir / RESUME_LEARNER
    if not path.exists():
        return None
    try:
        saved, _ = load_learner(path)
    except (CheckpointError, OSError, ValueError, KeyError) as exc:
        log.warning("resume_point.unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}",
                    detail="the re-live redoes every update")
        return None
    why_not = None
    if saved.net.spec != learner.net.spec or saved.config != learner.config or saved.seed != learner.seed:
        why_not = "it belongs to another learner (net, DQN settings or seed differ)"
    elif saved.env_steps > actions_in_journal:
        why_not = f"it is ahead of the journal ({saved.env_steps} experiences, {actions_in_journal} actions journaled)"
    if why_not is not None:
        log.warning("resume_point.not_used", path=str(path), reason=why_not, detail="the re-live redoes every update")
        return None
    learner.adopt_resume_point(saved.state, saved.buffer.sampling_state())
    log.info("resume_point.adopted", updates=saved.updates, env_steps=saved.env_steps)
    return saved.updates
