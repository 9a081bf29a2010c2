"""Training and evaluating the conditioning agent in simulation: the run's own plans on the synchronous engine.

There is no conditioning logic here. `SyncEngine` drives the plans of `plans.py` (the ones `deepspm run`
executes over TCP) on an in-process simulated microscope in training mode: regions from the planner with a
creep frame first, RANSAC levelling, the bad-sample rule, the locator's action mask, the classifier's p(good)
through the episode tracker (episodes end at p > 0.9; the reset phase applies random reset actions until
p < 0.1, at most 5; reward -1 per action and +10 on the successful step), an episode cut at its cap moving
to a new approach area. This module only supplies the nets and counts what happened. The simulator's
ground truth is read for reporting only, never for a decision.

Select tip state (issue 12 part 4): `target_state` other than "good" needs a multi-class classifier with that
state among its class names (the shipped `hsi_tipstates`, by default on the H:Si(100) surface, `sample="hsi"`):
then p(target) is the number the episodes follow (an episode ends at p(target) > 0.9, the reset phase damages
the tip until p(target) < 0.1), and the ground truth reported is "the simulated tip is in the target state".
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from deepspm.controller.brain import ActionDecision
from deepspm.controller.compare import bootstrap_ratio
from deepspm.controller.config import RunConfig, load_config
from deepspm.controller.documents import Classification, Document
from deepspm.controller.plans import RunState
from deepspm.controller.sim_engine import SyncEngine
from deepspm.controller.targets import GOOD, TargetPredictor, target_classifier
from deepspm.io.actions import N_ACTIONS
from deepspm.nets.checkpoints import load_net, save_net
from deepspm.nets.dqn import Actor, DQNConfig, Learner, agent_from_classifier, epsilon_at, select_action
from deepspm.nets.ensemble import require_single
from deepspm.nets.inference import Output, Predictor
from deepspm.nets.model import NetDef
from deepspm.simulator.environment import ENV_CONFIG
from deepspm.simulator.inprocess import InProcessInstrument
from deepspm.simulator.microscope import GroundTruth, SimConfig

METRICS_FILE = "metrics.json"
HSI_TIPSTATES = "hsi_tipstates"  # the shipped H:Si(100) tip-state classifier (deepspm/weights/hsi_tipstates)

Choice = Callable[[np.ndarray, np.ndarray, np.random.Generator], ActionDecision]


@dataclass
class SimNets:
    """The nets as the synchronous engine asks for them: the classifier, a choice of action, and (training)
    the learner that stores experiences and runs the updates owed at each `learn`."""

    classifier: Predictor | TargetPredictor
    choice: Choice
    learner: Learner | None = None
    after_learn: Callable[[], None] | None = None

    def classify(self, image: np.ndarray) -> float:
        return float(self.classifier(image)[0])

    def classify_lines(self, image: np.ndarray) -> float:
        raise RuntimeError("training in simulation judges whole frames (classifier.lines_checkpoint = \"none\")")

    def choose(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision:
        return self.choice(image, mask, rng)

    def store(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, terminal: bool,
              next_mask: np.ndarray) -> None:
        if self.learner is not None:
            self.learner.record(state, action, reward, next_state, terminal, next_mask)

    def learn(self) -> None:
        if self.learner is not None:
            self.learner.catch_up()
            if self.after_learn is not None:
                self.after_learn()


@dataclass
class EpisodeRecord:
    """One finished episode: its index, length in conditioning actions, and how it ended
    (`truly_good_at_end`: the simulated tip is in the target state, "good" by default)."""

    index: int
    actions: int
    truncated: bool
    truly_good_at_end: bool


def on_target(truth: GroundTruth, target: str) -> bool:
    """Is the simulated tip in `target` ("good": any good kind or state; else the tip state's name)?"""
    if target == GOOD:
        return bool(truth.is_good)
    return str(getattr(truth.kind, "value", truth.kind)) == target


def env_config(sample: str) -> SimConfig:
    """The simulated microscope for training and evaluation on `sample` ("ag_mgpc" or "hsi")."""
    return ENV_CONFIG if sample == ENV_CONFIG.surface else dataclasses.replace(ENV_CONFIG, surface=sample)


def sim_defaults(target_state: str, classifier: Path | str | None, sample: str | None) -> tuple[Path | str, str]:
    """The classifier and surface `train agent` / `evaluate agent --sim` use unless told: the shipped one-output
    classifier on Ag/MgPc for target "good", the shipped H:Si tip-state classifier on H:Si otherwise."""
    from deepspm.controller.session import checkpoint_path

    good = target_state == GOOD
    if classifier is None:
        classifier = checkpoint_path("shipped", "classifier" if good else HSI_TIPSTATES)
    return classifier, sample or ("ag_mgpc" if good else "hsi")


def sim_config(seed: int, max_episode_actions: int, *, sample: str = "ag_mgpc", target_state: str = GOOD,
               threshold: float = 0.9) -> RunConfig:
    """The run's configuration for training in simulation (training mode; the microscope's piezo range)."""
    return load_config(None, {
        "classifier.threshold": threshold,
        "run.seed": seed, "run.train": True, "classifier.lines_checkpoint": "none",
        "episode.max_episode_actions": max_episode_actions,
        "planner.piezo_range_xy_m": [ENV_CONFIG.piezo_xy_range_m, ENV_CONFIG.piezo_xy_range_m],
        "simulator.sample": sample, "probe.target_state": target_state,
    })


class SimRun:
    """A simulated microscope run by the run's plans on the synchronous engine, with episodes reported."""

    def __init__(self, seed: int, nets: SimNets, *, max_episode_actions: int = 100,
                 on_episode_end: Callable[[EpisodeRecord], None] | None = None, sample: str = "ag_mgpc",
                 target_state: str = GOOD, threshold: float = 0.9) -> None:
        self.config = sim_config(seed, max_episode_actions, sample=sample, target_state=target_state,
                                 threshold=threshold)
        self.target_state = target_state
        self.instrument = InProcessInstrument(seed, env_config(sample), scan=self.config.scan, dip=self.config.dip,
                                              orientation=self.config.orientation)
        self.run_state = RunState.new(self.config, classifier_version="sim")
        self.on_episode_end = on_episode_end
        self.engine = SyncEngine(self.run_state, self.instrument, nets, on_document=self._document)

    def _document(self, doc: Document) -> None:
        if isinstance(doc, Classification) and doc.episode_ended and self.on_episode_end is not None:
            self.on_episode_end(EpisodeRecord(doc.episode, doc.episode_actions, doc.episode_truncated,
                                              on_target(self.instrument.ground_truth(), self.target_state)))

    def run(self, done: Callable[[], bool]) -> None:
        self.engine.run(done)


def _compiled(net: NetDef, variables: Any, kind: Output) -> Predictor:
    predictor = Predictor(net, variables, kind)
    predictor.compile([1])
    return predictor


def judging(classifier_checkpoint: Path | str, target_state: str) -> tuple[Any, Predictor | TargetPredictor, float]:
    """The classifier checkpoint (loaded), its compiled p(target) predictor and the target's threshold (the
    classifier's own for that state, else 0.9); `TargetStateError` naming the allowed states when the classifier
    cannot judge `target_state`."""
    classifier = load_net(classifier_checkpoint, expect_kind="classifier")
    predictor, target = target_classifier(classifier, target_state, 0.9, str(classifier_checkpoint))
    predictor.compile([1])
    return classifier, predictor, target.threshold


def _decision(q_values: Any, mask: np.ndarray, epsilon: float, rng: np.random.Generator, version: str) -> ActionDecision:
    choice = select_action(q_values, mask, epsilon, rng)
    return ActionDecision(choice.action, [float(q) for q in np.ravel(q_values)], epsilon, choice.explored, version)


def _rolling_mean(values: Sequence[int], n: int = 50) -> float | None:
    """Mean of the last `n` values; None (JSON null) before there are any."""
    return float(np.mean(values[-n:])) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# --- training the agent --------------------------------------------------------------------------------------


def train_agent_sim(
    classifier_checkpoint: Path | str, out: Path | str, *, steps: int = 3000, seed: int = 0,
    preset: str | None = None, updates_per_step: float = 1.0, random_steps: int = 500,
    epsilon_decay_steps: int = 500, max_episode_actions: int = 100, checkpoint_every: int = 500,
    overwrite: bool = False, progress: bool = True, init: Path | str | None = None, init_epsilon: float = 0.05,
    target_state: str = GOOD, sample: str = "ag_mgpc",
) -> dict[str, Any]:
    """Train the double-DQN conditioning agent on the simulated microscope; save it to `out` (kind "agent").

    target_state / sample: the tip state episodes aim for (a class of a multi-class classifier, or "good") and
    the simulated surface ("ag_mgpc" or "hsi"); see the module docstring.

    init: an agent checkpoint to continue from (its weights; the replay memory and optimiser start afresh, with
    no random phase and exploration `init_epsilon`); None trains a new agent.

    steps: conditioning actions (= stored experiences, each stored with its 4 flips) to train for.
    preset: None initialises the agent from the classifier (trunk, hidden layers and BN copied, fresh
    12-way head); a preset name starts that preset from scratch instead.
    The DQN schedule: `random_steps` actions at epsilon 1 with no learning, then epsilon 1 -> 0.05 over
    `epsilon_decay_steps`, and `updates_per_step` gradient updates per action (batch 64, Adam 5e-4,
    gamma 0.95, target copy every 100 updates). Episodes follow the paper's training mode (see the module
    docstring); an episode is cut after `max_episode_actions`. The checkpoint is rewritten every
    `checkpoint_every` actions and at the end, with `out/metrics.json` (episode lengths, learning curve).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    options = {
        "classifier_checkpoint": str(classifier_checkpoint), "steps": steps, "seed": seed, "preset": preset,
        "updates_per_step": updates_per_step, "random_steps": random_steps,
        "epsilon_decay_steps": epsilon_decay_steps, "max_episode_actions": max_episode_actions,
        "init": None if init is None else str(init), "target_state": target_state, "sample": sample,
    }
    classifier, judge, threshold = judging(classifier_checkpoint, target_state)
    options["threshold"] = threshold
    root = jax.random.key(seed)
    if init is not None:
        if preset is not None:
            raise ValueError("init continues an agent of its own preset; do not name a preset as well")
        start_from = load_net(init, expect_kind="agent")
        net, variables = start_from.net, start_from.variables
        config = DQNConfig(random_steps=0, epsilon_start=init_epsilon, epsilon_end=init_epsilon,
                           updates_per_step=updates_per_step)
    else:
        if preset is None:
            trunk = require_single(classifier.net, f"a new agent from the classifier {classifier_checkpoint}")
            net, variables = agent_from_classifier(trunk, classifier.variables, N_ACTIONS, jax.random.fold_in(root, 1))
        else:
            net = NetDef.of(preset, N_ACTIONS)
            variables = net.init(jax.random.fold_in(root, 1))
        config = DQNConfig(random_steps=random_steps, epsilon_decay_steps=epsilon_decay_steps,
                           updates_per_step=updates_per_step)
    learner = Learner(net, variables, config, seed=seed)
    actor = Actor(learner)
    episodes: list[EpisodeRecord] = []
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training agent (sim)", unit="action", disable=not progress)

    def choose(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision:
        d = actor.act(image, mask, epsilon_at(learner.env_steps, config), rng)
        return ActionDecision(d.action, [float(q) for q in d.q_values], d.epsilon, d.explored, f"sim+{d.net_version}")

    def save(final: bool) -> None:
        lengths = [e.actions for e in episodes if e.actions > 0]
        summary = {
            "kind": "agent", "options": options, "env_steps": learner.env_steps, "updates": learner.updates,
            "episodes": len(lengths), "zero_step_episodes": sum(e.actions == 0 for e in episodes),
            "truncated_episodes": sum(e.truncated for e in episodes),
            "mean_actions_last_100": _rolling_mean(lengths, 100), "frames": sim.run_state.counters.scanned_frames,
            "bad_sample_frames": sim.run_state.counters.bad_samples,
            "train_seconds": round(time.perf_counter() - start, 1), "final": final,
        }
        save_net(out, net, learner.snapshot().variables, kind="agent", overwrite=True, metadata=summary)
        _write_json(out / METRICS_FILE, {**summary, "curve": curve, "episode_lengths": lengths})

    def after_learn() -> None:
        if learner.last_metrics:
            losses.append(learner.last_metrics["loss"])
        lengths = [e.actions for e in episodes if e.actions > 0]
        bar.update(1)
        bar.set_postfix(episodes=len(lengths), actions_per_ep=_fmt(_rolling_mean(lengths)),
                        eps=f"{epsilon_at(learner.env_steps, config):.2f}",
                        loss=f"{losses[-1]:.3f}" if losses else "-")
        if learner.env_steps % 100 == 0:
            curve.append({"env_steps": learner.env_steps, "updates": learner.updates, "episodes": len(lengths),
                          "mean_actions_last_50": _rolling_mean(lengths), "epsilon": epsilon_at(learner.env_steps, config),
                          "mean_loss_last_100": float(np.mean(losses[-100:])) if losses else None})
        if checkpoint_every and learner.env_steps % checkpoint_every == 0 and learner.env_steps < steps:
            save(final=False)

    nets = SimNets(judge, choose, learner, after_learn)
    sim = SimRun(seed, nets, max_episode_actions=max_episode_actions, on_episode_end=episodes.append, sample=sample,
                 target_state=target_state, threshold=threshold)
    sim.run(done=lambda: learner.env_steps >= steps)
    bar.close()
    save(final=True)
    summary = json.loads((out / METRICS_FILE).read_text())
    summary.pop("episode_lengths")
    print(f"agent trained for {learner.env_steps} actions ({learner.updates} updates, {summary['episodes']} "
          f"episodes) in {summary['train_seconds']:.0f} s; mean actions per episode over the last 100 episodes: "
          f"{_fmt(summary['mean_actions_last_100'])}; saved {out}")
    return summary


# --- evaluating the agent ------------------------------------------------------------------------------------


def _fraction(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def _length_stats(records: Sequence[EpisodeRecord], cap: int) -> dict[str, Any]:
    lengths = np.array([r.actions for r in records], dtype=float)
    return {
        "episodes": int(lengths.size),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "std": float(lengths.std(ddof=1)) if lengths.size > 1 else 0.0,
        "p25": float(np.percentile(lengths, 25)),
        "p75": float(np.percentile(lengths, 75)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
        "truncated": int(sum(r.truncated for r in records)),
        "truly_good_at_end": _fraction([r.truly_good_at_end for r in records if not r.truncated]),
        "histogram": {str(k): int((lengths == k).sum()) for k in range(1, cap + 1) if (lengths == k).any()},
        "lengths": [int(x) for x in lengths],
    }


def format_agent_table(result: dict[str, Any]) -> str:
    """The agent-versus-random table printed by `evaluate_agent_sim`."""
    head = f"{'policy':<8} {'episodes':>8} {'mean':>6} {'median':>6} {'p75':>5} {'p90':>5} {'max':>4} {'cut':>4} {'good@end':>8}"
    lines = [head]
    for name in ("agent", "random"):
        s = result[name]
        good = "-" if s["truly_good_at_end"] is None else f"{s['truly_good_at_end']:.2f}"
        lines.append(f"{name:<8} {s['episodes']:>8} {s['mean']:>6.2f} {s['median']:>6.1f} {s['p75']:>5.1f} "
                     f"{s['p90']:>5.1f} {s['max']:>4} {s['truncated']:>4} {good:>8}")
    low, high = result["ratio_ci95"]
    lines.append(f"actions per episode, agent / random: mean {result['ratio_mean']:.3f} (95 % CI {low:.3f}-{high:.3f}), "
                 f"median {result['ratio_median']:.3f}")
    return "\n".join(lines)


def evaluate_agent_sim(
    agent_checkpoint: Path | str, classifier_checkpoint: Path | str, *, episodes: int = 200, seed: int = 0,
    epsilon: float = 0.05, max_episode_actions: int = 100, out_json: Path | str | None = None,
    progress: bool = True, target_state: str = GOOD, sample: str = "ag_mgpc",
) -> dict[str, Any]:
    """The agent against uniform random choice among the allowed actions, interleaved episode by episode on
    one simulated microscope (both see the same drift of probe and sample), both judged by the classifier.

    Each policy gets `episodes` episodes with at least one action; an episode whose reset phase leaves the
    probe good (p > 0.9 after 5 reset actions) ends with zero actions and is not counted for either. The
    agent acts epsilon-greedily (`epsilon`, default the paper's 0.05) and does not learn during the
    evaluation (the shipped weights are what is measured). Episodes are cut at `max_episode_actions` (counted
    with that length). Prints a table; returns per-policy mean, median, percentiles, histogram and lengths,
    the ratio of means (with a bootstrap 95 % interval) and of medians, and the fraction of episode ends where
    the simulator's ground truth agrees the probe is good.
    """
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    agent = load_net(agent_checkpoint, expect_kind="agent")
    _, judge, threshold = judging(classifier_checkpoint, target_state)
    q_net = _compiled(agent.net, agent.variables, "values")
    agent_rng, random_rng = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])
    results: dict[str, list[EpisodeRecord]] = {"agent": [], "random": []}
    turn = ["agent"]  # whose episode the next one is; flips after each counted episode
    bar = tqdm(total=2 * episodes, desc="agent vs random (sim)", unit="episode", disable=not progress)

    def choose(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> ActionDecision:
        if turn[0] == "agent":
            return _decision(q_net(image)[0], mask, epsilon, agent_rng, "agent")
        return _decision(np.zeros(N_ACTIONS), mask, 1.0, random_rng, "random")

    def on_episode_end(record: EpisodeRecord) -> None:
        if record.actions == 0:
            return
        results[turn[0]].append(record)
        turn[0] = "random" if turn[0] == "agent" else "agent"
        bar.update(1)
        bar.set_postfix({name: _fmt(_rolling_mean([r.actions for r in rs], 10**9)) for name, rs in results.items()})

    start = time.perf_counter()
    nets = SimNets(judge, choose)
    sim = SimRun(seed, nets, max_episode_actions=max_episode_actions, on_episode_end=on_episode_end, sample=sample,
                 target_state=target_state, threshold=threshold)
    sim.run(done=lambda: len(results["random"]) >= episodes)
    bar.close()
    stats = {name: _length_stats(records, max_episode_actions) for name, records in results.items()}
    a = np.array(stats["agent"]["lengths"], float)
    r = np.array(stats["random"]["lengths"], float)
    counters = sim.run_state.counters
    result = {
        "kind": "agent_evaluation", "agent_checkpoint": str(agent_checkpoint),
        "classifier_checkpoint": str(classifier_checkpoint),
        "options": {"episodes": episodes, "seed": seed, "epsilon": epsilon, "max_episode_actions": max_episode_actions,
                    "target_state": target_state, "sample": sample, "threshold": threshold},
        **stats,
        "ratio_mean": float(a.mean() / r.mean()),
        "ratio_ci95": list(bootstrap_ratio(a, r, seed)),
        "ratio_median": float(np.median(a) / np.median(r)),
        "zero_step_episodes": sim.run_state.tracker.episode_index - 2 * episodes,
        "frames": counters.scanned_frames, "bad_sample_frames": counters.bad_samples,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(format_agent_table(result))
    if out_json is not None:
        _write_json(Path(out_json), result)
    return result
