"""Conditional wrappers: skip non-finite steps, accumulate gradients over micro-steps."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation
from gradtx.combine import _check_transformation, _forwarding_update


class NonFiniteUpdatesWarning(RuntimeWarning):
    """Warned (from inside ``jit``, through a host callback) when ``apply_if_finite`` skipped too many steps in a row."""


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`: consecutive and total skips, whether the last step was finite, the inner state."""

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def _warn_stuck(consecutive):
    warnings.warn(
        f"apply_if_finite: {int(consecutive)} consecutive steps had non-finite gradients and were skipped",
        NonFiniteUpdatesWarning,
        stacklevel=2,
    )


def _identity_update(updates):
    # Adding -0.0 is the IEEE identity for every value, +0.0 included, so a skipped step
    # leaves the parameters bit for bit unchanged (adding +0.0 would turn -0.0 into +0.0).
    return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates)


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int = 5) -> GradientTransformation:
    """Apply ``inner`` only when every gradient is finite; otherwise skip the step and count it.

    ``(u_t, s_t) = inner(g_t, s_{t-1})`` if all of ``g_t`` and ``u_t`` are finite, else
    ``u_t = -0.0`` (so ``p + u_t`` is bit-identical to ``p``) and ``s_t = s_{t-1}``.

    Deliberate difference from Optax: Optax applies the (non-finite) update once
    ``max_consecutive_errors`` is exceeded; gradtx never lets a non-finite value through.
    Instead, whenever the number of consecutive skips reaches a multiple of
    ``max_consecutive_errors``, it warns with :class:`NonFiniteUpdatesWarning` (from inside
    ``jit``, through a host callback); ``state.notfinite_count`` and ``state.total_notfinite``
    can be read at any time.

    Args:
        inner: the transformation to protect.
        max_consecutive_errors: how many consecutive skipped steps trigger the warning (>= 1).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ApplyIfFiniteState`.

    Example:
        >>> import gradtx
        >>> tx = gradtx.apply_if_finite(gradtx.adam(1e-3), max_consecutive_errors=3)

    References:
        Micikevicius et al., 2018. Mixed Precision Training (dynamic loss scaling skips
        non-finite steps), https://arxiv.org/abs/1710.03740
    """
    _check_transformation("apply_if_finite", "inner", inner)
    _checks.positive_int("apply_if_finite", "max_consecutive_errors", max_consecutive_errors)
    inner_update = _forwarding_update(inner)

    def init(params):
        return ApplyIfFiniteState(
            notfinite_count=tree.zero_count(),
            last_finite=jnp.array(True),
            total_notfinite=tree.zero_count(),
            inner_state=inner.init(params),
        )

    def update(updates, state, params=None, **extra_args):
        inner_updates, inner_state = inner_update(updates, state.inner_state, params, **extra_args)
        finite = tree.all_finite(updates) & tree.all_finite(inner_updates)
        new_updates = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_updates, _identity_update(inner_updates))
        new_inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state)
        notfinite_count = jnp.where(finite, 0, tree.safe_increment(state.notfinite_count))
        jax.lax.cond(
            (notfinite_count > 0) & (notfinite_count % max_consecutive_errors == 0),
            lambda n: jax.debug.callback(_warn_stuck, n),
            lambda n: None,
            notfinite_count,
        )
        return new_updates, ApplyIfFiniteState(
            notfinite_count=notfinite_count.astype(jnp.int32),
            last_finite=finite,
            total_notfinite=jnp.where(finite, state.total_notfinite, tree.safe_increment(state.total_notfinite)),
            inner_state=new_inner_state,
        )

    return GradientTransformation(init, update)


class AccumulateGradientsState(NamedTuple):
    """State of :func:`accumulate_gradients`: micro-step within the window, optimizer steps taken, the inner state, the accumulator."""

    mini_step: jax.Array
    gradient_step: jax.Array
    inner_state: Any
    acc_grads: Any


def accumulate_gradients(inner: GradientTransformation, every_k_schedule: int, *, use_grad_mean: bool = True) -> GradientTransformation:
    """Accumulate gradients over ``k`` micro-steps, then take one step of ``inner`` (Optax's ``MultiSteps``).

    ``a_j = a_{j-1} + (g_j - a_{j-1}) / j`` (running mean; the sum when ``use_grad_mean`` is
    false) for ``j = 1..k``; at ``j = k``: ``u = inner(a_k)`` and the accumulator resets;
    before that ``u = -0.0`` (parameters unchanged bit for bit) and the inner state is kept.
    The only parameter-sized buffer beyond the inner state is the accumulator; ``inner``
    runs inside ``lax.cond``, once per ``k`` micro-steps.

    Args:
        inner: the optimizer that takes the accumulated step.
        every_k_schedule: the number of micro-steps per optimizer step (an int >= 1).
        use_grad_mean: average the micro-step gradients (default) instead of summing them.

    Returns:
        A ``GradientTransformation`` whose state is :class:`AccumulateGradientsState`.

    Example:
        >>> import gradtx
        >>> tx = gradtx.accumulate_gradients(gradtx.lamb(1e-3), every_k_schedule=4)

    References:
        Babuschkin et al., 2020. The DeepMind JAX Ecosystem (Optax ``MultiSteps``), https://github.com/google-deepmind/optax
    """
    _check_transformation("accumulate_gradients", "inner", inner)
    _checks.positive_int("accumulate_gradients", "every_k_schedule", every_k_schedule)
    _checks.boolean("accumulate_gradients", "use_grad_mean", use_grad_mean)
    inner_update = _forwarding_update(inner)
    k = every_k_schedule

    def init(params):
        return AccumulateGradientsState(
            mini_step=tree.zero_count(),
            gradient_step=tree.zero_count(),
            inner_state=inner.init(params),
            acc_grads=tree.zeros_like(params),
        )

    def update(updates, state, params=None, **extra_args):
        mini_step = state.mini_step
        if use_grad_mean:
            acc = jax.tree.map(lambda g, a: a + (g - a) / (mini_step + 1).astype(a.dtype), updates, state.acc_grads)
        else:
            acc = jax.tree.map(lambda g, a: a + g, updates, state.acc_grads)

        def emit(_):
            final, inner_state = inner_update(acc, state.inner_state, params, **extra_args)
            final = tree.cast_like(final, updates)
            return final, inner_state, tree.zeros_like(acc), jnp.zeros([], jnp.int32), tree.safe_increment(state.gradient_step)

        def hold(_):
            return _identity_update(updates), state.inner_state, acc, mini_step + 1, state.gradient_step

        final, inner_state, acc, mini_step, gradient_step = jax.lax.cond(mini_step == k - 1, emit, hold, None)
        return final, AccumulateGradientsState(mini_step, gradient_step, inner_state, acc)

    return GradientTransformation(init, update)
