"""Weight decay as a building block: add a multiple of the parameters to the updates."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import masked


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights`: the int32 step counter at which a scheduled decay is evaluated."""

    count: jax.Array


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> GradientTransformation:
    r"""Add the parameters, scaled by a weight decay, to the updates.

    .. math::

        u_t = g_t + \lambda_t \, p_t

    Placed after an adaptive rescaling (e.g. Adam) and before the learning rate, this is
    decoupled weight decay (AdamW); placed first, it is an L2 penalty on the loss.

    Unlike Optax, whose state is ``EmptyState`` for a constant decay and a counter for a
    scheduled one, the state is always :class:`AddDecayedWeightsState` so that its structure
    does not depend on the argument's type.

    Args:
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule ``count -> lambda``.
        mask: a pytree of booleans with the structure of the parameters (or a prefix of it),
            or a callable ``params -> such a pytree``, selecting the leaves to decay; the
            others pass through unchanged. ``None`` decays every leaf.

    Returns:
        A ``GradientTransformation`` whose state is :class:`AddDecayedWeightsState`
        (wrapped in ``MaskedState`` when a mask is given). Its ``update`` needs ``params``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.add_decayed_weights(0.1)
        >>> params = jnp.array([1.0, -2.0])
        >>> tx.update(jnp.zeros(2), tx.init(params), params)[0]
        Array([ 0.1, -0.2], dtype=float32)

    References:
        Loshchilov & Hutter, 2019. Decoupled Weight Decay Regularization, https://arxiv.org/abs/1711.05101
    """
    _checks.non_negative("add_decayed_weights", "weight_decay", weight_decay, schedule_ok=True)
    _checks.mask("add_decayed_weights", "mask", mask)
    # A constant zero decay is the identity; skipping the multiply-add also keeps infinite
    # parameters from turning the update into NaN (0 * inf), as in Optax.
    is_zero = isinstance(weight_decay, numbers.Real) and weight_decay == 0.0

    def init(params):
        del params
        return AddDecayedWeightsState(count=tree.zero_count())

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("add_decayed_weights: update needs params, got params=None")
        new_state = AddDecayedWeightsState(count=tree.safe_increment(state.count))
        if is_zero:
            return updates, new_state
        decay = tree.resolve(weight_decay, state.count)

        def per_leaf(g, p):
            return None if g is None else (g + decay * p).astype(g.dtype)

        return jax.tree.map(per_leaf, updates, params, is_leaf=lambda x: x is None), new_state

    tx = GradientTransformation(init, update)
    return tx if mask is None else masked(tx, mask)
