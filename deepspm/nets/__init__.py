"""Pure JAX/Flax networks: the probe classifier and the double-DQN agent.

Imports only jax, flax, optax, orbax, numpy (and scikit-learn for metrics).
"""
