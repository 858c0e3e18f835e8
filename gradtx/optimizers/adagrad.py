"""AdaGrad (Duchi et al., 2011): per-coordinate step sizes from the sum of all squared gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.scaling import scale_by_learning_rate


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the running sum of squared gradients, one array per parameter."""

    sum_of_squares: Any


def _check_rss(owner: str, initial_accumulator_value, eps, state_dtype) -> None:
    check_storage(owner, "state_dtype", state_dtype)
    _checks.non_negative(owner, "initial_accumulator_value", initial_accumulator_value)
    _checks.non_negative(owner, "eps", eps)


def scale_by_rss(initial_accumulator_value: float = 0.1, eps: float = 1e-7, *, state_dtype: Any = None) -> GradientTransformation:
    r"""Rescale updates by the root of the sum of all squared gradients to date (AdaGrad's diagonal).

    .. math::

        G_t = G_{t-1} + |g_t|^2, \quad G_0 = G_{init}, \qquad
        u_t = \frac{g_t}{\sqrt{G_t + \epsilon}} \quad (u_t = 0 \text{ where } G_t = 0)

    Args:
        initial_accumulator_value: :math:`G_{init}` (``>= 0``).
        eps: :math:`\epsilon`, added inside the square root (``>= 0``).
        state_dtype: storage of :math:`G`: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByRssState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
        >>> tx.update(jnp.array([3.0, -4.0]), tx.init(jnp.zeros(2)))[0]
        Array([ 1., -1.], dtype=float32)

    References:
        Duchi et al., 2011. Adaptive Subgradient Methods for Online Learning and Stochastic Optimization,
        https://jmlr.org/papers/v12/duchi11a.html
    """
    _check_rss("scale_by_rss", initial_accumulator_value, eps, state_dtype)

    def init(params):
        return ScaleByRssState(sum_of_squares=tree.moment_full_like(params, initial_accumulator_value, state_dtype, signed=False))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args

        def per_leaf(g, sum_prev):
            g_wide = tree.at_least_float32(g)
            sum_of_squares = tree.abs_sq(g_wide) + jnp.real(tree.load(sum_prev))
            inverse_root = jnp.where(sum_of_squares > 0, jax.lax.rsqrt(sum_of_squares + eps), 0.0)
            return (inverse_root * g_wide).astype(g.dtype), tree.store(sum_of_squares, sum_prev)

        updates, sum_of_squares = tree.unzip(recompute.map_moments(per_leaf, updates, state.sum_of_squares), updates, 2)
        return updates, ScaleByRssState(sum_of_squares=sum_of_squares)

    return GradientTransformation(init, update)


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The AdaGrad optimizer: :func:`scale_by_rss` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t \frac{g_t}{\sqrt{G_{init} + \sum_{\tau \le t} |g_\tau|^2 + \epsilon}}

    The sum only grows, so the effective step size decays over training.

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0`` or a schedule ``count -> lr``.
        initial_accumulator_value, eps, state_dtype: see :func:`scale_by_rss`.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_rss, scale_by_learning_rate)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adagrad(learning_rate=0.1, initial_accumulator_value=0.0, eps=0.0)
        >>> params = {"w": jnp.array([1.0, -1.0])}
        >>> updates, state = tx.update({"w": jnp.array([3.0, -0.5])}, tx.init(params), params)
        >>> gradtx.apply_updates(params, updates)["w"]
        Array([ 0.9, -0.9], dtype=float32)

    References:
        Duchi et al., 2011. Adaptive Subgradient Methods for Online Learning and Stochastic Optimization,
        https://jmlr.org/papers/v12/duchi11a.html
    """
    _checks.learning_rate("adagrad", learning_rate)
    _check_rss("adagrad", initial_accumulator_value, eps, state_dtype)
    return chain(scale_by_rss(initial_accumulator_value, eps, state_dtype=state_dtype), scale_by_learning_rate(learning_rate))
