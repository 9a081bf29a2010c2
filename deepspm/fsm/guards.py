"""Pure guard predicates that choose between rows sharing a trigger.

A guard sees only a small frozen `DecisionContext` built by the controller; it never reads the
instrument, the nets or the clock, so a journaled context replays to the same destination.

Counter semantics (the bad-probe counter of the paper's Methods): the controller increments
`bad_probe_count` for each bad-probe image *before* it fires `probe_bad`, and resets it to 0 on
`probe_good`. An episode therefore starts on the 10th consecutive bad image (`count >= threshold`).
This follows the paper; the original code compared with `>` and needed 11 images (reference
section 2 and weakness 1).

The guards of one trigger are complementary (exactly one is true for any context), so the
machine's "first row whose guard passes" rule never depends on row order; a test checks this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

DEFAULT_BAD_PROBE_THRESHOLD = 10


@dataclass(frozen=True)
class DecisionContext:
    """What the guards may know when the controller fires a trigger.

    training: training mode (after a successful episode the probe is re-damaged) vs operation.
    bad_probe_count: consecutive bad-probe images, this one included.
    in_episode: a conditioning episode is running.
    bad_probe_threshold: consecutive bad images that start an episode.
    target: the tip state the run conditions towards ("good" by default; issue 12 part 4). The triggers keep
        their names: `probe_good` means "in the target state", `probe_bad` "not in it".
    """

    training: bool
    bad_probe_count: int
    in_episode: bool
    bad_probe_threshold: int = DEFAULT_BAD_PROBE_THRESHOLD
    target: str = "good"

    def __post_init__(self) -> None:
        if self.bad_probe_count < 0:
            raise ValueError(f"bad_probe_count must be >= 0, got {self.bad_probe_count}")
        if self.bad_probe_threshold < 1:
            raise ValueError(f"bad_probe_threshold must be >= 1, got {self.bad_probe_threshold}")
        if not self.target:
            raise ValueError("target must name a tip state")

    def as_record(self) -> dict[str, bool | int | str]:
        """JSON-serialisable form (for the journal)."""
        return {
            "training": self.training,
            "bad_probe_count": self.bad_probe_count,
            "in_episode": self.in_episode,
            "bad_probe_threshold": self.bad_probe_threshold,
            "target": self.target,
        }


Guard = Callable[[DecisionContext], bool]


def training_mode(ctx: DecisionContext) -> bool:
    """probe_good -> resetting: in training the good probe is damaged again for the next episode."""
    return ctx.training


def operation_mode(ctx: DecisionContext) -> bool:
    """probe_good -> selecting: in operation a good probe just keeps imaging."""
    return not ctx.training


def episode_starts(ctx: DecisionContext) -> bool:
    """probe_bad -> conditioning: the counter has reached the threshold, or an episode is running."""
    return ctx.in_episode or ctx.bad_probe_count >= ctx.bad_probe_threshold


def still_counting(ctx: DecisionContext) -> bool:
    """probe_bad -> selecting: below the threshold and not in an episode; keep imaging and counting."""
    return not episode_starts(ctx)


GUARDS: Mapping[str, Guard] = MappingProxyType(
    {
        "training_mode": training_mode,
        "operation_mode": operation_mode,
        "episode_starts": episode_starts,
        "still_counting": still_counting,
    }
)


def check_guard(name: str, ctx: DecisionContext) -> bool:
    """Evaluate the guard called `name` (KeyError if there is none)."""
    return bool(GUARDS[name](ctx))
