"""Reduce the step size when a monitored value stops improving."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation


class ReduceOnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau`: best value, steps without improvement, current scale, cooldown, running mean of the value."""

    best_value: jax.Array
    plateau_count: jax.Array
    scale: jax.Array
    cooldown_count: jax.Array
    count: jax.Array
    avg_value: jax.Array


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
) -> GradientTransformation:
    """Multiply updates by a scale that shrinks by ``factor`` when a monitored value plateaus.

    ``update(updates, state, params, value=v)``: values are averaged over
    ``accumulation_size`` calls; the average ``v̄`` improves on the best value ``b`` when
    ``v̄ < b - (rtol * |b| + atol)``. After ``patience`` averages without improvement the scale
    becomes ``max(scale * factor, min_scale)`` and ``cooldown`` averages are ignored.
    Updates are ``u = scale * g``: chain it after the optimizer.

    Deliberate difference from Optax's ``contrib.reduce_on_plateau``: Optax's improvement test
    ``v̄ < (1 - rtol) * b - atol`` misjudges negative values (for ``b < 0`` it accepts a slightly
    *worse* value as an improvement); gradtx uses ``rtol * |b|`` and agrees with Optax whenever
    ``b >= 0``. The scale and best value are float32 whatever the parameter dtype.

    Args:
        factor: multiplicative reduction, in (0, 1) (0.5 halves the step).
        patience: averages without improvement before reducing (>= 1).
        rtol: relative improvement threshold, in [0, 1].
        atol: absolute improvement threshold, >= 0 (``rtol`` and ``atol`` not both 0).
        cooldown: averages to wait after a reduction (>= 0).
        accumulation_size: values averaged before each decision (>= 1).
        min_scale: the scale never drops below this (>= 0).

    Returns:
        A ``GradientTransformation`` whose update needs the keyword argument ``value``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.chain(gradtx.adam(1e-3), gradtx.reduce_on_plateau(factor=0.5, patience=5))

    References:
        PyTorch ``ReduceLROnPlateau``; Babuschkin et al., 2020, Optax ``contrib.reduce_on_plateau``,
        https://github.com/google-deepmind/optax
    """
    owner = "reduce_on_plateau"
    _checks.number(owner, "factor", factor, low=0.0, high=1.0, low_open=True, high_open=True)
    _checks.positive_int(owner, "patience", patience)
    _checks.number(owner, "rtol", rtol, low=0.0, high=1.0)
    _checks.non_negative(owner, "atol", atol)
    if rtol == 0.0 and atol == 0.0:
        raise ValueError(f"{owner}: rtol and atol must not both be 0, got rtol=0.0 and atol=0.0")
    _checks.non_negative_int(owner, "cooldown", cooldown)
    _checks.positive_int(owner, "accumulation_size", accumulation_size)
    _checks.non_negative(owner, "min_scale", min_scale)

    def init(params):
        del params
        return ReduceOnPlateauState(
            best_value=jnp.asarray(jnp.inf, jnp.float32),
            plateau_count=tree.zero_count(),
            scale=jnp.asarray(1.0, jnp.float32),
            cooldown_count=tree.zero_count(),
            count=tree.zero_count(),
            avg_value=jnp.asarray(0.0, jnp.float32),
        )

    def decide(state):
        # Before the first value, best is +inf and any finite value improves on it
        # (inf - rtol * inf would be NaN).
        margin = jnp.where(jnp.isfinite(state.best_value), rtol * jnp.abs(state.best_value) + atol, 0.0)
        improved = state.avg_value < state.best_value - margin
        best = jnp.where(improved, state.avg_value, state.best_value)
        stalled = jnp.where(improved, 0, tree.safe_increment(state.plateau_count))
        in_cooldown = state.cooldown_count > 0
        reduce = ~in_cooldown & (stalled >= patience)
        return ReduceOnPlateauState(
            best_value=best,
            plateau_count=jnp.where(in_cooldown | reduce, 0, stalled).astype(jnp.int32),
            scale=jnp.where(reduce, jnp.maximum(state.scale * factor, min_scale), state.scale),
            cooldown_count=jnp.where(in_cooldown, state.cooldown_count - 1, jnp.where(reduce, cooldown, 0)).astype(jnp.int32),
            count=tree.zero_count(),
            avg_value=jnp.zeros([], jnp.float32),
        )

    def update(updates, state, params=None, *, value=None, **extra_args):
        del params, extra_args
        if value is None:
            raise ValueError(f"{owner}: update needs the monitored value, e.g. update(updates, state, params, value=loss)")
        count = tree.safe_increment(state.count)
        avg = state.avg_value + (jnp.asarray(value, jnp.float32) - state.avg_value) / count.astype(jnp.float32)
        state = state._replace(count=count, avg_value=avg)
        state = jax.lax.cond(count >= accumulation_size, decide, lambda s: s, state)
        return jax.tree.map(lambda g: (state.scale * g).astype(g.dtype), updates), state

    return GradientTransformation(init, update)
