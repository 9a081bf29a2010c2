"""Pure JAX/Flax networks: the probe classifier and the double-DQN agent.

Imports only jax, flax, optax, orbax, numpy (and scikit-learn for metrics).

Modules (import what you need; nothing is re-exported here, so `deepspm.nets.data` stays light):
- `presets`: the layer plans `paper`, `original`, `compact`, `wide`, `tiny` (`NetSpec`, `get_preset`).
- `model`: the NNX module and the functional core (`NetDef`, `NetVars`, `apply_eval`, `apply_train`,
  `count_params`).
- `inference`: compiled eval-mode `Predictor` and `predict_async`.
- `classifier`: `train_classifier`, `evaluate`, the train step; `metrics`: scikit-learn metrics as dicts.
- `dqn`: double-DQN targets, masked epsilon-greedy, `Learner` / `Actor`; `replay_buffer`: the ring memory.
- `checkpoints`: self-describing orbax checkpoints of nets and of the DQN training state.
- `data`: the DeepSPM folder layout and the H:Si(100) npz.
"""
