"""Training the conditioning agent in one jitted loop over the vectorised JAX environment (purejaxrl's shape).

`deepspm train agent --sim --vectorised --envs N` lands here. Everything between two progress lines is one
`jax.lax.scan` under `jax.jit`: N simulated microscopes (`simulator.jaxenv`) act (epsilon-greedy over the
allowed actions), scan, have every frame judged by the classifier exactly as the run's episode logic
(`controller.episode`, training mode) uses it, store the transitions in a replay ring of device arrays, and run
the double-DQN updates owed under the update-to-data ratio, with the target net copied every
`target_update_every` updates. `DQNConfig`'s defaults are the paper's hyper-parameters.

Episodes, as `EpisodeTracker` in training mode: the classifier's p(good) > 0.9 ends an episode (reward
-1 + 10 on that step, -1 on every other); then the reset phase applies random reset-flagged actions among the
allowed ones until p(good) < 0.1 or 5 were used (no transitions); the next frame (a scan with no action) starts
the next episode, or ends it with zero actions if the probe is still good; an episode cut at
`max_episode_actions` is stored non-terminal and continues on a new approach area.

Departure from the paper (docs/decisions.md): the agent's convolutional trunk is the classifier's, frozen; the
hidden FC layers and the output layer learn. The trunk then runs once per frame and serves both the
classifier's judgement and the agent's features, and the replay memory holds features instead of images, so an
update costs an MLP pass instead of three CNN passes (no flipped copies: they would need three more trunk
passes per frame). The saved agent is a whole net of the classifier's preset (trunk included), which the run
loads like any other agent checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepspm.controller.validate import ArgumentProblem
from deepspm.io.actions import N_ACTIONS
from deepspm.nets.checkpoints import load_net, save_net
from deepspm.nets.dqn import (
    DQNConfig,
    LearnerState,
    agent_from_classifier,
    make_learn_step,
    make_optimizer,
    masked_argmax,
)
from deepspm.nets.model import NetDef, NetVars
from deepspm.simulator import jaxenv

METRICS_FILE = "metrics.json"
EPISODE, RESET, ARMED = 0, 1, 2  # what each environment does next: the agent acts, a reset action, a scan only
_RECENT = 100  # episode lengths kept for the progress line


class VectorisedTrainingError(ArgumentProblem):
    """Bad options for the vectorised training (one line naming the option and the problem; CLI exit 2)."""


@dataclass(frozen=True)
class VectorisedOptions:
    envs: int = 64
    steps: int = 3000  # agent actions (stored transitions) to train for, as the old loop's --steps
    seed: int = 0
    chunk: int = 8  # loop iterations per jitted call (one progress line each)
    max_episode_actions: int = 100
    good_threshold: float = 0.9
    reset_stop_below: float = 0.1
    reset_max_actions: int = 5
    step_reward: float = -1.0
    success_reward: float = 10.0

    def check(self) -> None:
        if self.envs < 1:
            raise VectorisedTrainingError("--envs", f"must be >= 1, got {self.envs}")
        if self.steps < 1:
            raise VectorisedTrainingError("--steps", f"must be >= 1, got {self.steps}")
        if self.chunk < 1:
            raise VectorisedTrainingError("chunk", f"must be >= 1, got {self.chunk}")


# --- the net split at the flatten: trunk (frozen, the classifier's) and head (FC layers + output) --------------


def trunk_features(net: NetDef, variables: NetVars, images: jax.Array) -> jax.Array:
    """(B, 64, 64) normalised frames -> (B, F) flattened conv features (inference mode), as `ProbeNet`."""
    model: Any = nnx.merge(net.graphdef, variables.params, variables.batch_stats, copy=True)
    return model.features(images[..., None], train=False)


def head_apply(net: NetDef, variables: NetVars, features: jax.Array, key: jax.Array | None = None
               ) -> tuple[jax.Array, Any]:
    """The FC layers and the output layer on trunk features. With a key: a training pass (batch statistics,
    running statistics updated, dropout), returning the new BN statistics; without: inference."""
    model: Any = nnx.merge(net.graphdef, variables.params, variables.batch_stats, copy=True)
    train = key is not None
    out = model.head_on(features, train=train, dropout_key=key)
    return out, (nnx.state(model, nnx.BatchStat) if train else None)


def _is_trunk(path: tuple[Any, ...]) -> bool:
    return getattr(path[0], "key", None) == "convs"


def make_head_learn_step(net: NetDef, optimizer: optax.GradientTransformation, config: DQNConfig):
    """`(LearnerState, features, actions, rewards, next features, dones, next masks, key) -> (state, metrics)`:
    `dqn.make_learn_step` on trunk features (the trunk's gradients are zero, so Adam leaves it as it is).
    Pure and unjitted, so the data-parallel wrapper can shard it."""
    return make_learn_step(net, optimizer, config,
                           q_eval=lambda variables, x: head_apply(net, variables, x)[0],
                           q_train=lambda variables, x, key: head_apply(net, variables, x, key),
                           frozen=_is_trunk)


def epsilon_jnp(step: jax.Array, config: DQNConfig) -> jax.Array:
    """`dqn.epsilon_at` for a traced step count."""
    frac = jnp.clip((step - config.random_steps) / max(config.epsilon_decay_steps, 1), 0.0, 1.0)
    decayed = config.epsilon_start + frac * (config.epsilon_end - config.epsilon_start)
    return jnp.where(step < config.random_steps, config.epsilon_start, decayed)


# --- the carried state ---------------------------------------------------------------------------------------


class Replay(NamedTuple):
    """A ring of transitions in device arrays (features, not images)."""

    states: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_states: jax.Array
    dones: jax.Array
    next_masks: jax.Array
    ptr: jax.Array
    size: jax.Array


class Envs(NamedTuple):
    probes: jaxenv.ProbeBatch
    features: jax.Array  # (N, F) of the last frame
    masks: jax.Array  # (N, N_ACTIONS) allowed on the last frame
    mode: jax.Array  # EPISODE / RESET / ARMED
    episode_actions: jax.Array
    reset_actions: jax.Array


class Tally(NamedTuple):
    episodes: jax.Array  # with at least one action
    zero_step: jax.Array
    truncated: jax.Array
    recent: jax.Array  # (_RECENT,) lengths of the latest episodes (ring)
    loss: jax.Array  # last update's loss
    frames: jax.Array


class Carry(NamedTuple):
    learner: LearnerState
    replay: Replay
    envs: Envs
    tally: Tally
    key: jax.Array


def _insert(r: Replay, valid: jax.Array, s: jax.Array, a: jax.Array, rew: jax.Array, s2: jax.Array, d: jax.Array,
            m2: jax.Array) -> Replay:
    capacity = r.actions.shape[0]
    slot = jnp.cumsum(valid) - 1
    idx = jnp.where(valid, (r.ptr + slot) % capacity, capacity)  # out of range: dropped
    n = jnp.sum(valid)

    def put(buf: jax.Array, x: jax.Array) -> jax.Array:
        return buf.at[idx].set(x.astype(buf.dtype), mode="drop")

    return Replay(put(r.states, s), put(r.actions, a), put(r.rewards, rew), put(r.next_states, s2), put(r.dones, d),
                  put(r.next_masks, m2), (r.ptr + n) % capacity, jnp.minimum(r.size + n, capacity))


class Trainer:
    """Builds the jitted chunk of the loop for one classifier, agent net and option set."""

    def __init__(self, classifier_net: NetDef, classifier_vars: NetVars, agent_net: NetDef, agent_vars: NetVars,
                 config: DQNConfig, options: VectorisedOptions, env_params: jaxenv.EnvParams | None = None):
        options.check()
        if agent_net.spec != classifier_net.spec:
            raise VectorisedTrainingError("agent", "must be of the classifier's preset (the trunk is shared)")
        self.cnet, self.cvars, self.net, self.config, self.options = classifier_net, classifier_vars, agent_net, config, options
        self.env_params = env_params or jaxenv.EnvParams()
        self.optimizer = make_optimizer(config)
        self.learn = make_head_learn_step(agent_net, self.optimizer, config)
        self.init_vars = agent_vars
        self._cvars_on_device = jax.device_put(classifier_vars, jax.devices()[0])
        self.features = int(agent_net.spec.flat_features)
        self._chunk = jax.jit(self._run_chunk, donate_argnums=0)  # the classifier's variables are an argument, not
        # constants folded into the program (that made compiling minutes slower)

    # -- initial state --
    def initial(self) -> Carry:
        o, cap, f = self.options, self.config.buffer_capacity, self.features
        root = jax.random.key(o.seed)
        t = jaxenv.tables(self.env_params)
        probes = jaxenv.initial_probes(jax.random.fold_in(root, 1), o.envs, t)
        n = o.envs
        envs = Envs(probes, jnp.zeros((n, f), jnp.float32), jnp.ones((n, N_ACTIONS), bool),
                    jnp.full((n,), ARMED, jnp.int32), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32))
        replay = Replay(jnp.zeros((cap, f), jnp.float32), jnp.zeros((cap,), jnp.int32), jnp.zeros((cap,), jnp.float32),
                        jnp.zeros((cap, f), jnp.float32), jnp.zeros((cap,), bool), jnp.zeros((cap, N_ACTIONS), bool),
                        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
        learner = LearnerState.create(self.init_vars, self.optimizer)
        learner = learner._replace(updates=jnp.zeros((), jnp.int32), env_steps=jnp.zeros((), jnp.int32))
        learner = jax.tree.map(jnp.array, learner)  # own buffers: the chunk donates its input (online is target here)
        tally = Tally(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                      jnp.zeros((_RECENT,), jnp.int32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        carry = Carry(learner, replay, envs, tally, jax.random.fold_in(root, 2))
        # committed to the device, as the chunk's outputs are: otherwise the second call compiles the loop again
        return jax.device_put(carry, jax.devices()[0])

    # -- one iteration --
    def _iteration(self, cvars: NetVars, c: Carry) -> Carry:
        o, cfg, t = self.options, self.config, jaxenv.tables(self.env_params)
        key, k_eps, k_rand, k_reset, k_env, k_upd = jax.random.split(c.key, 6)
        e, learner = c.envs, c.learner
        n = o.envs
        q, _ = head_apply(self.net, learner.online, e.features)
        greedy = masked_argmax(q, e.masks)
        eps = epsilon_jnp(learner.env_steps, cfg)
        explore = jax.random.uniform(k_eps, (n,)) < eps
        random_allowed = jax.random.categorical(k_rand, jnp.where(e.masks, 0.0, -jnp.inf))
        agent_action = jnp.where(explore, random_allowed, greedy)
        reset_allowed = e.masks & t.reset_actions[None, :]
        reset_action = jax.random.categorical(k_reset, jnp.where(reset_allowed, 0.0, -jnp.inf))
        action = jnp.where(e.mode == EPISODE, agent_action, jnp.where(e.mode == RESET, reset_action, 0)).astype(jnp.int32)
        k_step, k_area = jax.random.split(k_env)
        probes, frames, masks, _seen = jaxenv.step(k_step, e.probes, action, self.env_params)
        feats = trunk_features(self.cnet, cvars, frames)
        logit, _ = head_apply(self.cnet, cvars, feats)
        p_good = jax.nn.sigmoid(logit[:, 0])
        good = p_good > o.good_threshold
        # the episode logic (EpisodeTracker, training mode)
        in_ep = e.mode == EPISODE
        ep_actions = e.episode_actions + in_ep.astype(jnp.int32)
        reward = jnp.where(good, o.step_reward + o.success_reward, o.step_reward)
        truncated = in_ep & ~good & (ep_actions >= o.max_episode_actions)
        ended = in_ep & good
        resetting = e.mode == RESET
        reset_actions = e.reset_actions + resetting.astype(jnp.int32)
        reset_done = resetting & ((p_good < o.reset_stop_below) | (reset_actions >= o.reset_max_actions))
        armed = e.mode == ARMED
        zero_step = armed & good
        mode = jnp.select(
            [ended | zero_step, in_ep & truncated, in_ep, resetting & reset_done, resetting, armed],
            [RESET, ARMED, EPISODE, ARMED, RESET, EPISODE], EPISODE).astype(jnp.int32)
        new_ep_actions = jnp.where(in_ep & ~ended & ~truncated, ep_actions, 0)
        new_reset_actions = jnp.where(mode == RESET, jnp.where(resetting, reset_actions, 0), 0)
        probes = jaxenv.new_area(k_area, probes, truncated)
        replay = _insert(c.replay, in_ep, e.features, action, reward, feats, good, masks)
        learner = learner._replace(env_steps=learner.env_steps + jnp.sum(in_ep).astype(jnp.int32))
        # tally
        tl = c.tally
        finished = ended | truncated
        slot = (tl.episodes + jnp.cumsum(finished) - 1) % _RECENT
        recent = tl.recent.at[jnp.where(finished, slot, _RECENT)].set(ep_actions, mode="drop")
        # the updates owed under the update-to-data ratio
        due = jnp.floor(cfg.updates_per_step * jnp.maximum(learner.env_steps - cfg.random_steps, 0)).astype(jnp.int32)
        due = jnp.where(replay.size >= cfg.batch_size, due - learner.updates, 0)

        def body(i: jax.Array, carry: tuple[LearnerState, jax.Array]) -> tuple[LearnerState, jax.Array]:
            state, _loss = carry
            k_i = jax.random.fold_in(k_upd, i)
            k_idx, k_drop = jax.random.split(k_i)
            idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, replay.size)
            state, metrics = self.learn(state, replay.states[idx], replay.actions[idx], replay.rewards[idx],
                                        replay.next_states[idx], replay.dones[idx], replay.next_masks[idx], k_drop)
            return state, metrics["loss"].astype(jnp.float32)

        learner, loss = jax.lax.fori_loop(0, jnp.maximum(due, 0), body, (learner, tl.loss))
        tally = Tally(tl.episodes + jnp.sum(finished).astype(jnp.int32), tl.zero_step + jnp.sum(zero_step).astype(jnp.int32),
                      tl.truncated + jnp.sum(truncated).astype(jnp.int32), recent, loss, tl.frames + n)
        envs = Envs(probes, feats, masks, mode, new_ep_actions, new_reset_actions)
        return Carry(learner, replay, envs, tally, key)

    def _run_chunk(self, c: Carry, cvars: NetVars) -> Carry:
        c, _ = jax.lax.scan(lambda carry, _: (self._iteration(cvars, carry), None), c, None, length=self.options.chunk)
        return c

    def run_chunk(self, c: Carry) -> Carry:
        return self._chunk(c, self._cvars_on_device)


def _summary(c: Carry, config: DQNConfig) -> dict[str, Any]:
    t = c.tally
    episodes = int(t.episodes)
    recent = np.asarray(t.recent)[: min(episodes, _RECENT)]
    steps = int(c.learner.env_steps)
    return {"env_steps": steps, "updates": int(c.learner.updates), "episodes": episodes,
            "zero_step_episodes": int(t.zero_step), "truncated_episodes": int(t.truncated),
            "mean_actions_last_100": float(recent.mean()) if recent.size else None,
            "epsilon": float(epsilon_jnp(jnp.asarray(steps), config)), "loss": float(t.loss), "frames": int(t.frames)}


def train_agent_vectorised(
    classifier_checkpoint: Path | str, out: Path | str, *, envs: int = 64, steps: int = 3000, seed: int = 0,
    updates_per_step: float = 1.0, random_steps: int = 500, epsilon_decay_steps: int = 500,
    max_episode_actions: int = 100, chunk: int = 8, overwrite: bool = False, progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a conditioning agent with `envs` simulated microscopes in the jitted loop; save it to `out` (kind
    "agent", with `out/metrics.json`). `steps` counts agent actions (stored transitions), as the old loop's."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    options = VectorisedOptions(envs=envs, steps=steps, seed=seed, chunk=chunk, max_episode_actions=max_episode_actions)
    options.check()
    if updates_per_step < 0:
        raise VectorisedTrainingError("updates_per_step", f"must be >= 0, got {updates_per_step}")
    classifier = load_net(classifier_checkpoint, expect_kind="classifier")
    if classifier.net.n_outputs != 1:
        raise VectorisedTrainingError("--classifier", f"{classifier_checkpoint}: needs a good/bad classifier (1 output)")
    config = DQNConfig(random_steps=random_steps, epsilon_decay_steps=epsilon_decay_steps, updates_per_step=updates_per_step)
    net, variables = agent_from_classifier(classifier.net, classifier.variables, N_ACTIONS,
                                           jax.random.fold_in(jax.random.key(seed), 1))
    trainer = Trainer(classifier.net, classifier.variables, net, variables, config, options)
    carry = trainer.initial()
    start = time.perf_counter()
    curve: list[dict[str, Any]] = []
    while int(carry.learner.env_steps) < steps:
        carry = trainer.run_chunk(carry)
        s = _summary(carry, config)
        elapsed = time.perf_counter() - start
        curve.append({**s, "seconds": round(elapsed, 1)})
        if progress:
            mean = "-" if s["mean_actions_last_100"] is None else f"{s['mean_actions_last_100']:.2f}"
            print_fn(f"[{elapsed:6.0f} s] actions {s['env_steps']}/{steps}  updates {s['updates']}  episodes "
                     f"{s['episodes']}  actions/episode (last 100) {mean}  eps {s['epsilon']:.2f}  loss {s['loss']:.3f}  "
                     f"frames/s {s['frames'] / max(elapsed, 1e-9):.0f}")
    seconds = time.perf_counter() - start
    summary = {"kind": "agent", "loop": "vectorised", "options": {**asdict(options), "updates_per_step": updates_per_step,
               "random_steps": random_steps, "epsilon_decay_steps": epsilon_decay_steps,
               "classifier_checkpoint": str(classifier_checkpoint)},
               **_summary(carry, config), "train_seconds": round(seconds, 1), "final": True}
    save_net(out, net, carry.learner.online, kind="agent", overwrite=True, metadata=summary)
    tmp = out / f".{METRICS_FILE}.tmp"
    tmp.write_text(json.dumps({**summary, "curve": curve}, indent=2) + "\n")
    tmp.replace(out / METRICS_FILE)
    mean = summary["mean_actions_last_100"]
    print_fn(f"agent trained for {summary['env_steps']} actions ({summary['updates']} updates, {summary['episodes']} "
             f"episodes, {envs} environments) in {seconds:.0f} s; mean actions per episode over the last 100 "
             f"episodes: {'-' if mean is None else f'{mean:.2f}'}; saved {out}")
    return summary


def vectorised_command(args: Any) -> int:
    """`deepspm train agent --sim --vectorised --envs N`: the CLI's options checked, then the training."""
    from deepspm.controller.session import checkpoint_path

    if not args.vectorised:
        raise ArgumentProblem("--envs", "needs --vectorised")
    if args.init is not None:
        raise ArgumentProblem("--init", "not with --vectorised (it trains a new agent from the classifier)")
    if args.target_state != "good" or args.sample not in (None, "ag_mgpc"):
        raise ArgumentProblem("--vectorised", "simulates the Ag/MgPc surface for the target state good only")
    classifier = args.classifier or checkpoint_path("shipped", "classifier")
    train_agent_vectorised(classifier, args.out, envs=args.envs or 64, steps=args.steps, seed=args.seed,
                           overwrite=args.overwrite)
    return 0
