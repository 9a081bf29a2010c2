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


def random_dihedral(images: jax.Array, key: jax.Array) -> jax.Array:
    """One of the 8 symmetries of the square per image of a (B, S, S, C) batch, each with p = 1/8: a transpose
    with p = 0.5, then independent left-right and up-down flips (together: the 90-degree rotations and the
    mirrorings)."""
    t_key, flip_key = jax.random.split(key)
    transpose = jax.random.bernoulli(t_key, 0.5, (images.shape[0], 1, 1, 1))
    images = jnp.where(transpose, jnp.swapaxes(images, 1, 2), images)
    return random_flips(images, flip_key)


def random_crops(images: jax.Array, key: jax.Array, min_scale: float) -> jax.Array:
    """A random square crop per image of a (B, S, S, C) batch, resized back to S x S (bilinear): side
    uniform in [min_scale, 1] x S, position uniform inside the image. `min_scale` 1 returns the batch."""
    if min_scale >= 1.0:
        return images
    side = images.shape[1]
    size_key, x_key, y_key = jax.random.split(key, 3)
    crop = jax.random.uniform(size_key, (images.shape[0],), minval=min_scale, maxval=1.0) * side
    offset = jnp.stack([jax.random.uniform(k, (images.shape[0],)) for k in (y_key, x_key)], axis=1)
    offset = offset * (side - crop)[:, None]
    scale = side / crop

    def one(image: jax.Array, s: jax.Array, o: jax.Array) -> jax.Array:  # out = (in - o) * s
        return jax.image.scale_and_translate(image, image.shape, (0, 1), jnp.stack([s, s]), -o * s, "linear",
                                             antialias=False)

    return jax.vmap(one)(images, scale, offset)
