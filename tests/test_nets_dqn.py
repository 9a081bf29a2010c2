"""Double DQN: targets, masking, epsilon schedule, agent initialisation, learner/actor decoupling."""

from __future__ import annotations

import asyncio
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspm.nets.dqn import (
    Actor,
    DQNConfig,
    Learner,
    NoAllowedAction,
    _batch_arrays,
    agent_from_classifier,
    double_dqn_targets,
    epsilon_at,
    make_learn_step,
    select_action,
)
from deepspm.nets.inference import Predictor
from deepspm.nets.model import NetDef

N_ACTIONS = 12


def test_double_dqn_target_uses_online_argmax_and_target_value() -> None:
    gamma = 0.95
    q_online = jnp.array([
        [1.0, 5.0, 3.0, 0.0],  # online prefers a1, which is allowed
        [1.0, 9.0, 3.0, 2.0],  # online prefers a1, but a1 is masked -> a2
        [7.0, 1.0, 1.0, 1.0],  # terminal: no bootstrap
        [0.0, 0.0, 0.0, 4.0],  # online prefers a3
    ])
    q_target = jnp.array([
        [10.0, 2.0, 30.0, 40.0],  # the target net's own max (a3) must NOT be used
        [10.0, 20.0, 6.0, 40.0],
        [10.0, 20.0, 30.0, 40.0],
        [-1.0, -2.0, -3.0, -8.0],
    ])
    rewards = jnp.array([-1.0, -1.0, 10.0, -1.0])
    dones = jnp.array([False, False, True, False])
    masks = jnp.array([
        [True, True, True, True],
        [True, False, True, False],
        [False, False, False, False],  # irrelevant for a terminal transition
        [True, True, True, True],
    ])
    y = np.asarray(double_dqn_targets(q_online, q_target, rewards, dones, masks, gamma))
    expected = [-1 + gamma * 2.0, -1 + gamma * 6.0, 10.0, -1 + gamma * -8.0]
    np.testing.assert_allclose(y, expected, rtol=1e-6)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.booleans(), min_size=N_ACTIONS, max_size=N_ACTIONS).filter(any),
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=N_ACTIONS, max_size=N_ACTIONS),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32 - 1),
)
def test_masking_never_picks_a_masked_action(mask, q_values, epsilon, seed) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(5):
        choice = select_action(q_values, mask, epsilon, rng)
        assert mask[choice.action]
        if not choice.explored:
            allowed = [q for q, m in zip(q_values, mask) if m]
            assert q_values[choice.action] == max(allowed)


def test_greedy_choice_ignores_a_masked_maximum_and_exploration_is_uniform_over_allowed() -> None:
    q = np.arange(N_ACTIONS, dtype=float)
    mask = np.zeros(N_ACTIONS, bool)
    mask[[0, 3, 5]] = True
    rng = np.random.default_rng(0)
    assert select_action(q, mask, 0.0, rng).action == 5
    picks = np.bincount([select_action(q, mask, 1.0, rng).action for _ in range(3000)], minlength=N_ACTIONS)
    assert picks[~mask].sum() == 0
    assert np.all(np.abs(picks[mask] / 3000 - 1 / 3) < 0.04)
    with pytest.raises(NoAllowedAction):
        select_action(q, np.zeros(N_ACTIONS, bool), 0.5, rng)


def test_epsilon_schedule() -> None:
    config = DQNConfig()
    assert epsilon_at(0, config) == 1.0 and epsilon_at(499, config) == 1.0
    assert epsilon_at(500, config) == 1.0
    assert epsilon_at(750, config) == pytest.approx(0.525)
    assert epsilon_at(1000, config) == pytest.approx(0.05)
    assert epsilon_at(10_000, config) == pytest.approx(0.05)


@pytest.fixture(scope="module")
def agent():
    classifier = NetDef.of("tiny", 1)
    classifier_vars = classifier.init(jax.random.key(0))
    # make the BN statistics non-trivial so the copy is observable
    classifier_vars = classifier_vars._replace(
        batch_stats=jax.tree.map(lambda a: a + 0.25, classifier_vars.batch_stats)
    )
    net, variables = agent_from_classifier(classifier, classifier_vars, N_ACTIONS, jax.random.key(1))
    return classifier, classifier_vars, net, variables


def test_agent_copies_everything_but_the_output_layer(agent) -> None:
    classifier, classifier_vars, net, variables = agent
    assert net.spec == classifier.spec and net.n_outputs == N_ACTIONS
    clf = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(classifier_vars)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        name = jax.tree_util.keystr(path)
        if "'head'" in name:
            assert leaf.shape[-1] == N_ACTIONS
        else:
            np.testing.assert_array_equal(leaf, clf[name])
    head = np.asarray(variables.params["head"]["kernel"][...])
    limit = np.sqrt(6.0 / (head.shape[0] + N_ACTIONS))
    assert np.abs(head).max() <= limit


def random_image(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1.5, 1.5, (64, 64)).astype(np.float32)


def same_vars(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_same_vars(a, b) -> None:
    assert same_vars(a, b)


def small_config(**overrides) -> DQNConfig:
    base = dict(random_steps=4, batch_size=8, buffer_capacity=400, target_update_every=3, epsilon_decay_steps=10)
    return DQNConfig(**{**base, **overrides})


def test_learner_follows_the_update_ratio_and_copies_the_target(agent) -> None:
    _, _, net, variables = agent
    learner = Learner(net, variables, small_config(updates_per_step=2.0), seed=0)
    learner.compile()  # as a run does before it starts: the step is traced once, the learner's state untouched
    assert learner.traces["dqn_update"] == 1 and learner.updates == 0 and learner.state.online is variables
    rng = np.random.default_rng(1)
    mask = np.ones(N_ACTIONS, bool)
    for _ in range(4):
        learner.record(random_image(rng), 1, -1.0, random_image(rng), False, mask)
    assert learner.updates_due() == 0 and learner.catch_up() == 0  # random steps: no learning yet
    assert len(learner.buffer) == 16  # four flipped copies per experience
    learner.record(random_image(rng), 2, 10.0, random_image(rng), True, mask)
    assert learner.updates_due() == 2
    assert learner.catch_up() == 2 and learner.updates == 2
    assert_same_vars(learner.target, variables)  # not yet copied (every 3 updates)
    learner.record(random_image(rng), 3, -1.0, random_image(rng), False, mask)
    assert learner.catch_up() == 2 and learner.updates == 4
    assert not same_vars(learner.target, variables)  # copied at update 3 ...
    assert not same_vars(learner.target, learner.online)  # ... and not since (update 4)
    assert learner.snapshot().version == 4
    assert learner.traces["dqn_update"] == 1
    assert np.isfinite(learner.last_metrics["loss"])


def test_updates_publish_new_snapshots_and_old_snapshots_stay_intact(agent) -> None:
    _, _, net, variables = agent
    learner = Learner(net, variables, small_config(random_steps=0), seed=0)
    rng = np.random.default_rng(2)
    mask = np.ones(N_ACTIONS, bool)
    for _ in range(2):
        learner.record(random_image(rng), 0, -1.0, random_image(rng), False, mask)
    predictor = Predictor(net, variables, "values")
    image = random_image(rng)
    old = learner.snapshot()
    q_old = predictor(image, old.variables)
    learner.catch_up()
    new = learner.snapshot()
    assert new.version > old.version
    np.testing.assert_array_equal(predictor(image, old.variables), q_old)  # nothing was donated or mutated
    assert not np.array_equal(predictor(image, new.variables), q_old)


def test_actor_respects_masks_and_reports_its_net_version(agent) -> None:
    _, _, net, variables = agent
    learner = Learner(net, variables, small_config(), seed=0)
    actor = Actor(learner)
    rng = np.random.default_rng(3)
    mask = np.zeros(N_ACTIONS, bool)
    mask[[2, 7]] = True
    for epsilon in (0.0, 0.5, 1.0):
        decision = actor.act(random_image(rng), mask, epsilon, rng)
        assert decision.action in (2, 7) and decision.q_values.shape == (N_ACTIONS,)
        assert decision.net_version == 0
    greedy = actor.act(random_image(rng), mask, 0.0, rng)
    assert greedy.action == [2, 7][int(np.argmax(greedy.q_values[[2, 7]]))]
    assert actor.predictor.traces["forward"] == 1


async def test_learner_task_runs_beside_a_free_running_actor(agent) -> None:
    """The actor keeps acting on the event loop while the learner task trains in a worker thread."""
    _, _, net, variables = agent
    learner = Learner(net, variables, small_config(random_steps=2), seed=0)
    actor = Actor(learner)
    rng = np.random.default_rng(4)
    mask = np.ones(N_ACTIONS, bool)
    learner_task = asyncio.create_task(learner.run())
    versions = []
    state = random_image(rng)
    for step in range(12):
        decision = await actor.act_async(state, mask, epsilon_at(step, learner.config), rng)
        versions.append(decision.net_version)
        next_state = random_image(rng)
        learner.record(state, decision.action, -1.0, next_state, False, mask)
        state = next_state
        await asyncio.sleep(0)
    await asyncio.wait_for(learner.wait_idle(), timeout=60)  # the learner finishes what is owed
    assert learner.updates_due() == 0
    learner.stop()
    await asyncio.wait_for(learner_task, timeout=30)
    assert learner.updates == 10  # 12 steps - 2 random steps, ratio 1
    assert versions == sorted(versions)  # the actor only ever sees newer snapshots


def test_snapshot_reads_do_not_wait_for_an_update_in_progress(agent) -> None:
    """While a gradient step is computing, `snapshot()` and `record()` return immediately."""
    _, _, net, variables = agent
    learner = Learner(net, variables, small_config(random_steps=0), seed=0)
    rng = np.random.default_rng(5)
    mask = np.ones(N_ACTIONS, bool)
    for _ in range(2):
        learner.record(random_image(rng), 0, -1.0, random_image(rng), False, mask)
    learner.update()  # compile first
    inside_step = threading.Event()
    release_step = threading.Event()
    real_step = learner._update_step

    def held_step(*args):
        inside_step.set()
        assert release_step.wait(timeout=30)
        return real_step(*args)

    learner._update_step = held_step
    worker = threading.Thread(target=learner.update)
    worker.start()
    assert inside_step.wait(timeout=30)
    snapshot = learner.snapshot()  # would deadlock here if the update held the lock while computing
    learner.record(random_image(rng), 1, -1.0, random_image(rng), False, mask)
    assert snapshot.version == 1 and learner.env_steps == 3
    release_step.set()
    worker.join(timeout=30)
    assert learner.snapshot().version == 2


def test_the_learn_step_is_pure_and_scans_like_the_learner_updates(agent) -> None:
    """The learner state is one pytree: three `Learner.update`s equal one `lax.scan` of the pure learn step
    over the same batches and keys (target copy at update 3 included)."""
    _, _, net, variables = agent
    config = small_config(random_steps=0, target_update_every=3)
    learner = Learner(net, variables, config, seed=0)
    rng = np.random.default_rng(3)
    mask = np.ones(N_ACTIONS, bool)
    for _ in range(4):
        learner.record(random_image(rng), 1, -1.0, random_image(rng), False, mask)
    start = learner.state
    batches = [learner.buffer.sample(config.batch_size) for _ in range(3)]
    keys = jnp.stack([jax.random.fold_in(learner._key_root, i) for i in range(3)])
    learn = make_learn_step(net, learner.optimizer, config)
    stacked = [np.stack(a) for a in zip(*(_batch_arrays(b) for b in batches))]

    def body(state, xs):
        *batch, key = xs
        return learn(state, *batch, key)

    scanned, metrics = jax.lax.scan(body, start._replace(updates=jnp.int32(0), env_steps=jnp.int32(4)),
                                    (*stacked, keys))
    for batch in batches:  # the same three batches through the learner's own jitted step
        learner.state, _ = learner._update_step(learner.state, *_batch_arrays(batch), keys[int(learner.updates)])
        learner.state = learner.state._replace(updates=int(learner.state.updates))
    assert int(scanned.updates) == 3 and metrics["loss"].shape == (3,)
    for a, b in ((scanned.online, learner.online), (scanned.target, learner.target)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)
    assert same_vars(scanned.target, scanned.online)  # copied at update 3
