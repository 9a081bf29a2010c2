"""Loss terms shared by the classifier and the agent (pure JAX)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _is_kernel(path: tuple[Any, ...]) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return "kernel" in names


def l2_on_kernels(params: Any) -> jax.Array:
    """sum(w^2) / 2 over conv and FC kernels only: no BN scale/shift, no biases (tf.nn.l2_loss convention)."""
    squares = [jnp.sum(jnp.square(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(params) if _is_kernel(path)]
    return 0.5 * sum(squares, jnp.zeros((), jnp.float32))


def weighted_sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array, positive_weight: float) -> jax.Array:
    """Mean sigmoid cross-entropy with positive (good-probe) samples weighted by `positive_weight`.

    `logits` and `labels` have the same shape ((B,) or (B, K)); soft labels in [0, 1] are allowed.
    The mean is over all entries, i.e. the weights scale, they are not renormalised (as in the original).
    """
    labels = labels.astype(logits.dtype)
    weights = 1.0 + (positive_weight - 1.0) * labels
    return jnp.mean(weights * optax.sigmoid_binary_cross_entropy(logits, labels))


def random_flips(images: jax.Array, key: jax.Array) -> jax.Array:
    """Independent random left-right and up-down flips per image of a (B, H, W, C) batch, p = 0.5 each."""
    lr_key, ud_key = jax.random.split(key)
    shape = (images.shape[0], 1, 1, 1)
    flip_lr = jax.random.bernoulli(lr_key, 0.5, shape)
    flip_ud = jax.random.bernoulli(ud_key, 0.5, shape)
    images = jnp.where(flip_lr, images[:, :, ::-1, :], images)
    return jnp.where(flip_ud, images[:, ::-1, :, :], images)
