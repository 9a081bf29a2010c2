"""Double DQN for probe conditioning (reference section 4.3), with acting decoupled from learning.

- `agent_from_classifier`: trunk, hidden FC layers and every BN parameter and running statistic copied from
  a trained classifier; a fresh Glorot output layer with one Q-value per action.
- `double_dqn_targets`: y = r if terminal else r + gamma * Q_target(s', argmax over allowed a of Q_main(s', a)).
- `select_action`: epsilon-greedy over the allowed actions only.
- `Learner`: owns the online/target nets, the optimiser and the replay buffer. The actor reads an immutable
  `PolicySnapshot` (a reference swapped under a lock after each update), so it never sees a half-updated
  net and never waits for a gradient step; updates follow a fixed update-to-data ratio.

Acting and the targets use BN in inference mode; the Q(s, a) regression pass is a training pass (batch
statistics, running statistics updated, dropout), as in the original.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepspm.nets import parallel
from deepspm.nets.inference import Predictor, TraceCounter
from deepspm.nets.losses import l2_on_kernels
from deepspm.nets.model import NetDef, NetVars, apply_eval, apply_train
from deepspm.nets.replay_buffer import DEFAULT_CAPACITY, Batch, ReplayBuffer

_HEAD = "head"  # the output layer's attribute name in ProbeNet


@dataclass(frozen=True)
class DQNConfig:
    gamma: float = 0.95
    learning_rate: float = 5e-4
    batch_size: int = 64
    target_update_every: int = 100  # hard copy online -> target every N gradient updates
    random_steps: int = 500  # epsilon = 1 and no updates for the first N environment steps
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay_steps: int = 500  # linear decay after the random steps
    updates_per_step: float = 1.0  # update-to-data ratio once learning has started
    l2: float = 5e-5  # on the online net's kernels only (the original also decayed the target net's)
    buffer_capacity: int = DEFAULT_CAPACITY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(config: DQNConfig) -> optax.GradientTransformation:
    """Adam at a constant learning rate, default betas, no clipping (as the original)."""
    return optax.adam(config.learning_rate)


def epsilon_at(step: int, config: DQNConfig = DQNConfig()) -> float:
    """Exploration rate for the `step`-th environment step (0-based): 1 during the random steps, then a
    linear decay to `epsilon_end` over `epsilon_decay_steps`, then constant."""
    if step < config.random_steps:
        return config.epsilon_start
    if config.epsilon_decay_steps <= 0:
        return config.epsilon_end
    fraction = min(1.0, (step - config.random_steps) / config.epsilon_decay_steps)
    return config.epsilon_start + fraction * (config.epsilon_end - config.epsilon_start)


class NoAllowedAction(ValueError):
    """The mask allows no action (the caller must handle 'no room' before asking the agent)."""


@dataclass(frozen=True)
class ActionChoice:
    action: int
    explored: bool  # drawn at random (epsilon) rather than greedy


def select_action(q_values: Any, mask: Any, epsilon: float, rng: np.random.Generator) -> ActionChoice:
    """Epsilon-greedy restricted to allowed actions: explore uniformly among them with probability
    `epsilon`, else take the allowed action with the highest Q (masked actions count as -inf)."""
    q_values = np.asarray(q_values, dtype=np.float64).ravel()
    mask = np.asarray(mask, dtype=bool).ravel()
    if q_values.shape != mask.shape:
        raise ValueError(f"{q_values.size} Q-values but a mask of {mask.size}")
    allowed = np.flatnonzero(mask)
    if allowed.size == 0:
        raise NoAllowedAction("no action is allowed")
    if rng.random() < epsilon:
        return ActionChoice(int(rng.choice(allowed)), True)
    masked = np.where(mask, np.nan_to_num(q_values, nan=-np.inf), -np.inf)
    best = allowed[np.argmax(masked[allowed])]
    return ActionChoice(int(best), False)


def masked_argmax(q_values: jax.Array, mask: jax.Array) -> jax.Array:
    """argmax over the last axis with disallowed entries at -inf."""
    return jnp.argmax(jnp.where(mask, q_values, -jnp.inf), axis=-1)


def double_dqn_targets(
    q_online_next: jax.Array,
    q_target_next: jax.Array,
    rewards: jax.Array,
    dones: jax.Array,
    next_masks: jax.Array,
    gamma: float,
) -> jax.Array:
    """y = r if done else r + gamma * Q_target(s', a*), a* = argmax over allowed a of Q_online(s', a)."""
    best = masked_argmax(q_online_next, next_masks)
    value = jnp.take_along_axis(q_target_next, best[:, None], axis=-1)[:, 0]
    return jnp.where(dones, rewards, rewards + gamma * value)


def agent_from_classifier(
    classifier_net: NetDef, classifier_vars: NetVars, n_actions: int, key: jax.Array
) -> tuple[NetDef, NetVars]:
    """An agent net of the classifier's preset: everything but the output layer copied (weights, BN scale and
    shift, BN running statistics); a fresh Glorot-uniform output layer with `n_actions` Q-values."""
    agent_net = NetDef(classifier_net.spec, n_actions)
    fresh = agent_net.init(key)
    trained = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(classifier_vars.params)}

    def take(path: tuple[Any, ...], new: Any) -> Any:
        if getattr(path[0], "key", None) == _HEAD:
            return new
        name = jax.tree_util.keystr(path)
        if name not in trained or np.shape(trained[name]) != np.shape(new):
            raise ValueError(f"classifier has no parameter {name} of shape {np.shape(new)}")
        return trained[name]

    params = jax.tree_util.tree_map_with_path(take, fresh.params)
    return agent_net, NetVars(params, classifier_vars.batch_stats)


class LearnerState(NamedTuple):
    """Everything learning owns besides the replay memory, as one pytree (purejaxrl's shape): the online and
    target nets, Adam's state and the two counters. `learn_step` maps it to the next one; checkpoints
    (`checkpoints.save_learner`) save exactly this, with the buffer beside it."""

    online: NetVars
    target: NetVars
    opt_state: Any
    updates: Any  # gradient updates done (int, or an int32 scalar inside jit)
    env_steps: Any  # environment steps recorded (int, or an int32 scalar inside jit)

    @classmethod
    def create(cls, variables: NetVars, optimizer: optax.GradientTransformation) -> LearnerState:
        return cls(variables, variables, optimizer.init(variables.params), 0, 0)


def make_learn_step(
    net: NetDef, optimizer: optax.GradientTransformation, config: DQNConfig,
    q_eval: Callable[[NetVars, jax.Array], jax.Array] | None = None,
    q_train: Callable[[NetVars, jax.Array, jax.Array], tuple[jax.Array, Any]] | None = None,
    frozen: Callable[[tuple[Any, ...]], bool] | None = None,
):
    """The pure update `(state, batch arrays, key) -> (next state, metrics)`, unjitted (jit it, scan it or
    shard it as the caller needs): one double-DQN gradient step on the batch, `updates` + 1, and the target
    net hard-copied from the new online net every `target_update_every` updates.

    The Q-values come from the whole net on images (`apply_eval` / `apply_train`) unless `q_eval(vars, x)` and
    `q_train(vars, x, key) -> (q, batch stats)` say otherwise (the vectorised loop's head on trunk features);
    parameters whose path `frozen` accepts get zero gradients (Adam then leaves them as they are)."""
    def default_eval(variables: NetVars, x: jax.Array) -> jax.Array:
        return apply_eval(net, variables, x)

    def default_train(variables: NetVars, x: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
        return apply_train(net, variables, x, key)

    forward_eval = q_eval or default_eval
    forward_train = q_train or default_train

    def learn(state: LearnerState, states: jax.Array, actions: jax.Array, rewards: jax.Array,
              next_states: jax.Array, dones: jax.Array, next_masks: jax.Array, key: jax.Array):
        online = state.online
        y = double_dqn_targets(
            forward_eval(online, next_states), forward_eval(state.target, next_states),
            rewards, dones, next_masks, config.gamma,
        )
        y = jax.lax.stop_gradient(y)

        def loss_of(params: Any):
            q, stats = forward_train(NetVars(params, online.batch_stats), states, key)
            q_taken = jnp.take_along_axis(q, actions[:, None], axis=-1)[:, 0]
            mse = jnp.mean(jnp.square(q_taken - y))
            return mse + config.l2 * l2_on_kernels(params), (stats, mse, jnp.mean(q_taken))

        (loss, (stats, mse, mean_q)), grads = jax.value_and_grad(loss_of, has_aux=True)(online.params)
        if frozen is not None:
            grads = jax.tree_util.tree_map_with_path(lambda p, g: jnp.zeros_like(g) if frozen(p) else g, grads)
        step, opt_state = optimizer.update(grads, state.opt_state, online.params)
        new_online = NetVars(optax.apply_updates(online.params, step), stats)
        updates = state.updates + 1
        sync = updates % config.target_update_every == 0
        target = jax.tree.map(lambda new, old: jnp.where(sync, new, old), new_online, state.target)
        metrics = {"loss": loss, "mse": mse, "mean_q": mean_q, "mean_target": jnp.mean(y)}
        return LearnerState(new_online, target, opt_state, updates, state.env_steps), metrics

    return learn


def make_update_step(
    net: NetDef, optimizer: optax.GradientTransformation, config: DQNConfig, traces: TraceCounter | None = None
):
    """`make_learn_step` jitted, counting its traces. Nothing is donated: the actor may still be reading the
    previous online variables."""
    traces = traces if traces is not None else TraceCounter()
    return jax.jit(traces.wrap("dqn_update", make_learn_step(net, optimizer, config)))


def _batch_arrays(batch: Batch) -> tuple[np.ndarray, ...]:
    return (
        batch.states[..., None], batch.actions.astype(np.int32), batch.rewards.astype(np.float32),
        batch.next_states[..., None], batch.dones.astype(bool), batch.next_masks.astype(bool),
    )


@dataclass(frozen=True)
class PolicySnapshot:
    """An immutable view of the online net for acting. `version` = gradient updates behind it."""

    version: int
    net: NetDef
    variables: NetVars


class Learner:
    """Online + target nets, Adam state and replay memory; one gradient update at a time.

    Thread model: the actor calls `snapshot()` and `record()`, which take `_lock` only for a reference read
    or a buffer copy; `update()` samples under the lock, computes outside it, then publishes the new
    snapshot under it. Run updates either synchronously (`catch_up`, e.g. in tests) or as the learner task
    (`run`), which does the work in a worker thread so the event loop is never blocked.
    """

    def __init__(
        self, net: NetDef, variables: NetVars, config: DQNConfig = DQNConfig(), seed: int = 0,
        buffer: ReplayBuffer | None = None, state: LearnerState | None = None,
    ) -> None:
        self.net = net
        self.config = config
        self.seed = seed
        self.buffer = buffer if buffer is not None else ReplayBuffer(
            net.n_outputs, config.buffer_capacity, net.spec.image_side_px, seed=seed
        )
        self.optimizer = make_optimizer(config)
        self.traces = TraceCounter()
        step = make_update_step(net, self.optimizer, config, self.traces)
        # data-parallel under `train ... --devices` (parallel.use_devices); one device otherwise (the run)
        self._update_step = parallel.over_devices(step, batch_argnums=range(1, 7), batch_size=config.batch_size)
        self._across_devices = self._update_step is not step
        self._key_root = jax.random.fold_in(jax.random.key(seed), 0xD09)
        self.state = LearnerState.create(variables, self.optimizer) if state is None else state
        self.last_metrics: dict[str, float] = {}
        self._lock = threading.Lock()  # buffer, counters and the snapshot reference
        self._update_lock = threading.Lock()  # serialises gradient updates
        self._snapshot = PolicySnapshot(self.updates, net, self.state.online)
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    # --- the state's parts, read-only (`state` is replaced whole, never edited in place) ---------------
    @property
    def online(self) -> NetVars:
        return self.state.online

    @property
    def target(self) -> NetVars:
        return self.state.target

    @property
    def updates(self) -> int:
        return int(self.state.updates)

    @property
    def env_steps(self) -> int:
        return int(self.state.env_steps)

    # --- actor side -----------------------------------------------------------------------------------
    def snapshot(self) -> PolicySnapshot:
        with self._lock:
            return self._snapshot

    def record(self, state: np.ndarray, action: int, reward: float, next_state: np.ndarray, done: bool,
               next_mask: Any) -> None:
        """Store one transition (4 flipped copies) and count one environment step."""
        with self._lock:
            self.buffer.add(state, action, reward, next_state, done, next_mask)
            self.state = self.state._replace(env_steps=self.env_steps + 1)
        self._signal()

    # --- learner side ---------------------------------------------------------------------------------
    def updates_due(self) -> int:
        """Updates owed under the update-to-data ratio (0 during the random steps or while the buffer is
        smaller than a batch)."""
        with self._lock:
            learning_steps = self.env_steps - self.config.random_steps
            if learning_steps <= 0 or len(self.buffer) < self.config.batch_size:
                return 0
            return max(0, math.floor(self.config.updates_per_step * learning_steps) - self.updates)

    def update(self) -> dict[str, float]:
        """One gradient step on a sampled batch; publishes a new snapshot; hard-copies the target net every
        `target_update_every` updates."""
        with self._update_lock:
            return self._update_locked()

    def _update_locked(self) -> dict[str, float]:
        with self._lock:
            batch = self.buffer.sample(self.config.batch_size)
            key = jax.random.fold_in(self._key_root, self.updates)
            before = self.state
        after, metrics = self._update_step(before, *_batch_arrays(batch), key)
        if self._across_devices:  # the actor's batch-1 predictor and the checkpoints see ordinary arrays
            after = parallel.to_local(after)
        metrics = {k: float(v) for k, v in metrics.items()}
        with self._lock:  # counters back to ints; env_steps may have moved on while the step ran
            self.state = after._replace(updates=int(after.updates), env_steps=self.state.env_steps)
            self._snapshot = PolicySnapshot(self.updates, self.net, after.online)
        self.last_metrics = metrics
        return metrics

    def compile(self) -> None:
        """Compile the update step now, by one step on a dummy batch whose result is dropped: a run compiles it
        before it starts, so its first learning step does not stall it (seconds), and every process of a
        resumed run holds the compiled step from its start (the soak's memory samples compare like with like)."""
        b, side = self.config.batch_size, self.net.spec.image_side_px
        images = np.zeros((b, side, side), np.float32)
        dummy = Batch(images, np.zeros(b, np.int32), np.zeros(b, np.float32), images, np.zeros(b, bool),
                      np.ones((b, self.net.n_outputs), bool))
        jax.block_until_ready(self._update_step(self.state, *_batch_arrays(dummy), self._key_root))

    def catch_up(self, max_updates: int | None = None, stoppable: bool = False) -> int:
        """Run the updates that are due (at most `max_updates`); returns how many ran. With `stoppable`
        (the learner task), `stop()` ends it after the update in progress."""
        done = 0
        while not (stoppable and self._stop) and (max_updates is None or done < max_updates):
            with self._update_lock:  # checked under the lock: two callers never overshoot the ratio
                if self.updates_due() == 0:
                    break
                self._update_locked()
            done += 1
        return done

    async def run(self) -> None:
        """The learner task: wait for data, catch up in a worker thread, repeat until `stop()`."""
        self._loop = asyncio.get_running_loop()
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        try:
            while not self._stop:
                if self.updates_due() > 0:
                    self._idle.clear()
                    await asyncio.to_thread(self.catch_up, None, True)
                    continue
                self._idle.set()
                await self._wake.wait()
                self._wake.clear()
        finally:
            self._loop = self._wake = None
            self._idle.set()
            self._stop = False  # a later `run` starts afresh

    async def wait_idle(self) -> None:
        """Return once the running learner task has done every update that is due (or has stopped)."""
        if self._idle is None:
            raise RuntimeError("the learner task is not running")
        while True:
            await self._idle.wait()
            if self._loop is None or self.updates_due() == 0:
                return
            await asyncio.sleep(0)  # a record() woke the task: let it pick the work up

    def stop(self) -> None:
        """Ask the learner task (`run`) to finish after the update in progress."""
        self._stop = True
        self._signal()

    def _signal(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    # --- resume ---------------------------------------------------------------------------------------
    def training_state(self) -> tuple[LearnerState, dict[str, Any]]:
        """A consistent `(state, buffer state)` pair: what a checkpoint saves to resume learning exactly."""
        with self._update_lock, self._lock:
            return self.state, self.buffer.state_dict()

    def resume_point(self) -> tuple[LearnerState, dict[str, Any]]:
        """`training_state` without the memory's rows (cheap): the state, and the memory's state emptied with its
        sampling RNG where it is, for a run whose journal holds the experience (the memory is rebuilt from it)."""
        with self._update_lock, self._lock:
            return self.state, self.buffer.state_dict(rows=False)

    def adopt_resume_point(self, state: LearnerState, sampling_state: dict[str, Any]) -> None:
        """Take a state saved earlier in this run before a resume re-lives the run's experience: its nets, Adam
        state, update count and sampling RNG; `env_steps` counts from 0 again as the re-live records the
        experience. No update is due until the re-live passes the saved point (`updates_due`), and from there
        on the updates are the ones the run made, so the updates behind the saved state are not redone."""
        with self._update_lock, self._lock:
            if self.env_steps or len(self.buffer):
                raise RuntimeError("a resume point is adopted by a fresh learner, before any experience")
            self.state = state._replace(updates=int(state.updates), env_steps=0)
            self.buffer.load_sampling_state(sampling_state)
            self._snapshot = PolicySnapshot(self.updates, self.net, self.state.online)


@dataclass(frozen=True)
class Decision:
    """What the actor chose and why (journaled by the controller)."""

    action: int
    q_values: np.ndarray
    epsilon: float
    explored: bool
    net_version: int


class Actor:
    """Chooses actions with the learner's latest snapshot through one compiled batch-1 Q predictor."""

    def __init__(self, learner: Learner, compile_now: bool = True) -> None:
        self.learner = learner
        snapshot = learner.snapshot()
        self.predictor = Predictor(snapshot.net, snapshot.variables, "values")
        if compile_now:
            self.predictor.compile([1])

    def q_values(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        snapshot = self.learner.snapshot()  # one consistent set of parameters for this decision
        return self.predictor(image, snapshot.variables)[0], snapshot.version

    def act(self, image: np.ndarray, mask: Any, epsilon: float, rng: np.random.Generator) -> Decision:
        q, version = self.q_values(image)
        choice = select_action(q, mask, epsilon, rng)
        return Decision(choice.action, q, float(epsilon), choice.explored, version)

    async def act_async(self, image: np.ndarray, mask: Any, epsilon: float, rng: np.random.Generator) -> Decision:
        """`act` in a worker thread (the forward pass is CPU work)."""
        return await asyncio.to_thread(self.act, image, mask, epsilon, rng)
