"""Small pytree helpers that the building blocks share.

Each helper is written per array and lifted to pytrees with ``jax.tree.map``; ``None``
leaves (masked-out updates) are empty subtrees and pass through untouched. State arrays
are created only through :func:`zeros_like` so that placement (sharding) and storage
dtype policy live in one place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradtx.base import ScalarOrSchedule

INT32_MAX = jnp.iinfo(jnp.int32).max


def zero_count() -> jax.Array:
    """A fresh int32 step counter, ``0``."""
    return jnp.zeros([], jnp.int32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` for an int32 step counter, saturating at the int32 maximum instead of wrapping."""
    return jnp.where(count < INT32_MAX, count + 1, INT32_MAX).astype(jnp.int32)


def resolve(value: ScalarOrSchedule, count: jax.Array) -> Any:
    """The value of a hyperparameter at step ``count``: ``value(count)`` for a schedule, else ``value``."""
    return value(count) if callable(value) else value


def canonical_dtype(dtype) -> Any:
    """``None`` stays ``None`` (meaning: the parameter's dtype); anything else becomes a numpy dtype."""
    return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def zeros_like(tree: Any, dtype=None) -> Any:
    """Zeros shaped like every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``), in ``dtype`` or the leaf's dtype."""
    dtype = canonical_dtype(dtype)
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype or x.dtype), tree)


def cast(tree: Any, dtype) -> Any:
    """Cast every leaf to ``dtype``; ``dtype=None`` returns ``tree`` unchanged."""
    dtype = canonical_dtype(dtype)
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def cast_like(tree: Any, reference: Any) -> Any:
    """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``reference``."""
    return jax.tree.map(lambda x, r: x.astype(r.dtype), tree, reference)


def update_moment(updates: Any, moments: Any, decay: Any, order: int) -> Any:
    """Exponential moving average of ``g ** order``: ``m = (1 - decay) * g**order + decay * m``."""
    return jax.tree.map(lambda g, m: (1 - decay) * (g**order) + decay * m, updates, moments)


def update_moment_per_elem_norm(updates: Any, moments: Any, decay: Any, order: int) -> Any:
    """Moving average of ``|g| ** order`` (``g * conj(g)`` for ``order == 2``), complex-safe."""

    def per_leaf(g, m):
        if order == 2:
            g_power = jnp.real(g * jnp.conj(g)) if jnp.iscomplexobj(g) else jnp.square(g)
        else:
            g_power = jnp.abs(g) ** order
        return (1 - decay) * g_power + decay * m

    return jax.tree.map(per_leaf, updates, moments)


def update_infinity_moment(updates: Any, moments: Any, decay: Any, eps: Any) -> Any:
    """Exponentially weighted infinity norm: ``u = max(|g| + eps, decay * u)``."""
    return jax.tree.map(lambda g, u: jnp.maximum(jnp.abs(g) + eps, decay * u), updates, moments)


def bias_correction(moments: Any, decay: Any, count: jax.Array) -> Any:
    """Adam's bias correction ``m / (1 - decay ** t)`` (Kingma & Ba, 2015, Algorithm 1)."""
    correction = 1 - decay ** count.astype(jnp.float32)
    return jax.tree.map(lambda m: (m / correction.astype(m.dtype)).astype(m.dtype), moments)


def leaves(tree: Any) -> list:
    """The array leaves of ``tree`` (``None`` leaves dropped)."""
    return jax.tree.leaves(tree)


def global_norm(tree: Any) -> jax.Array:
    """The l2 norm of all leaves of ``tree`` taken together: ``sqrt(sum_i ||x_i||^2)``."""
    squares = [jnp.sum(jnp.real(x * jnp.conj(x))) if jnp.iscomplexobj(x) else jnp.sum(jnp.square(x)) for x in leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))


def tree_add_scaled(a: Any, scalar: Any, b: Any) -> Any:
    """``a + scalar * b`` leaf by leaf."""
    return jax.tree.map(lambda x, y: x + scalar * y, a, b)


def tree_scale(scalar: Any, tree: Any) -> Any:
    """``scalar * x`` for every leaf, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: (scalar * x).astype(x.dtype), tree)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite (a scalar boolean)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)
