"""Scaling building blocks: multiply updates by a constant, a learning rate or a schedule."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import EmptyState, GradientTransformation, ScalarOrSchedule, elementwise


def scale(step_size: float) -> GradientTransformation:
    """Multiply every update by a constant: ``u_t = step_size * g_t``.

    Args:
        step_size: the factor (any real number; negative values turn ascent into descent).

    Returns:
        A stateless ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale(-0.5)
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([-0.5, -0.5], dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _checks.number("scale", "step_size", step_size)
    return elementwise("scale", lambda g: (step_size * g).astype(g.dtype))


class ScaleByScheduleState(NamedTuple):
    """State of a scheduled scaling: the int32 step counter."""

    count: jax.Array


def scale_by_schedule(step_size_fn) -> GradientTransformation:
    """Multiply updates by a schedule evaluated at the step count: ``u_t = s(t) * g_t``.

    Args:
        step_size_fn: a schedule, ``count -> factor``.

    Returns:
        A ``GradientTransformation`` whose state is the step counter.

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    if not callable(step_size_fn):
        raise TypeError(f"scale_by_schedule: step_size_fn must be callable, got {step_size_fn!r}")

    def init(params):
        del params
        return ScaleByScheduleState(count=tree.zero_count())

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        factor = step_size_fn(state.count)
        updates = jax.tree.map(lambda g: (jnp.asarray(factor, jnp.float32) * g).astype(g.dtype), updates)
        return updates, ScaleByScheduleState(count=tree.safe_increment(state.count))

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Scale by a learning rate (float or schedule), descending by default: ``u_t = -lr_t * g_t``.

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        flip_sign: when ``True`` (default) the result is ``-lr * g`` so that adding it descends.

    Returns:
        A ``GradientTransformation`` (stateless for a float, holding a counter for a schedule).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_learning_rate(0.1)
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([-0.1, -0.1], dtype=float32)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax), https://github.com/google-deepmind/optax
    """
    _checks.learning_rate("scale_by_learning_rate", learning_rate)
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)
