"""Lion (Chen et al., 2023): the sign of an interpolated momentum, found by program search."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import scale_by_learning_rate

_MODES = ("hard", "smooth", "refined")


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: the int32 step counter and the momentum, one array per parameter."""

    count: jax.Array
    mu: Any


def _check_lion(owner: str, b1, b2, mu_dtype, state_dtype=None) -> None:
    _checks.number(owner, "b1", b1, low=0.0, high=1.0)
    _checks.decay_rate(owner, "b2", b2)
    check_storage(owner, "mu_dtype", mu_dtype)
    check_storage(owner, "state_dtype", state_dtype)


def _squash(c: jax.Array, mode: str, smooth_beta) -> jax.Array:
    if mode == "hard":
        return jnp.sign(c)
    if mode == "smooth":
        return jnp.tanh(smooth_beta * c)
    return jnp.where(jnp.abs(c) < 1.0, c, jnp.sign(c))


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    mode: str = "hard",
    smooth_beta: float = 1.0,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates to the sign of Lion's interpolated momentum.

    .. math::

        c_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        u_t = \operatorname{sign}(c_t), \qquad
        m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t

    The update uses :math:`\beta_1` and the stored momentum uses :math:`\beta_2`; every
    element of the update has magnitude 1, so Lion wants a learning rate 3-10x smaller
    (and a weight decay 3-10x larger) than AdamW.

    Args:
        b1: :math:`\beta_1`, the interpolation weight of the momentum in the update, in ``[0, 1]``.
        b2: :math:`\beta_2`, the decay of the stored momentum, in ``[0, 1)``.
        mu_dtype: storage dtype of :math:`m`; ``None`` means the parameter's dtype.
        mode: ``"hard"`` (the paper's sign), ``"smooth"`` (:math:`\tanh(\beta_s c_t)`) or
            ``"refined"`` (:math:`c_t` where :math:`|c_t| < 1`, else its sign), as in Optax.
        smooth_beta: :math:`\beta_s`, the sharpness of ``"smooth"`` (``> 0``).
        state_dtype: storage of every moment whose own ``mu_dtype`` is ``None``: a floating dtype
            or ``gradtx.Quantized8bit()``; ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByLionState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_lion()
        >>> tx.update(jnp.array([0.3, -2.0, 0.0]), tx.init(jnp.zeros(3)))[0]
        Array([ 1., -1.,  0.], dtype=float32)

    References:
        Chen et al., 2023. Symbolic Discovery of Optimization Algorithms, https://arxiv.org/abs/2302.06675
    """
    owner = "scale_by_lion"
    _check_lion(owner, b1, b2, mu_dtype, state_dtype)
    _checks.one_of(owner, "mode", mode, _MODES)
    _checks.positive(owner, "smooth_beta", smooth_beta)

    def init(params):
        tree.check_real_params(owner, params)
        mu = tree.moment_zeros_like(params, tree.resolve_storage(mu_dtype, state_dtype), signed=True)
        return ScaleByLionState(count=tree.zero_count(), mu=mu)

    def update(updates, state, params=None, **extra_args):
        del params, extra_args

        def per_leaf(g, m_prev):
            g_wide, m_prev_wide = tree.at_least_float32(g), tree.load(m_prev)
            c = (1 - b1) * g_wide + b1 * m_prev_wide
            m = (1 - b2) * g_wide + b2 * m_prev_wide
            return _squash(c, mode, smooth_beta).astype(g.dtype), tree.store(m, m_prev)

        updates, mu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu), updates, 2)
        return updates, ScaleByLionState(count=tree.safe_increment(state.count), mu=mu)

    return GradientTransformation(init, update)


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[Any], Any] | None = None,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The Lion optimizer: :func:`scale_by_lion`, decoupled weight decay, and the learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t \left(\operatorname{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t) + \lambda_t p_t\right)

    The weight decay is multiplied by the learning rate (as in PyTorch and Optax).

    Args:
        learning_rate: :math:`\eta`, a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, mu_dtype, state_dtype: see :func:`scale_by_lion`.
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule.
        mask: a pytree of booleans (or a callable ``params -> pytree``) selecting the
            parameters to decay; ``None`` decays all of them.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_lion, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.lion(learning_rate=1e-4, weight_decay=1e-2)

    References:
        Chen et al., 2023. Symbolic Discovery of Optimization Algorithms, https://arxiv.org/abs/2302.06675
    """
    _checks.learning_rate("lion", learning_rate)
    _checks.mask("lion", "mask", mask)
    _check_lion("lion", b1, b2, mu_dtype, state_dtype)
    _checks.non_negative("lion", "weight_decay", weight_decay, schedule_ok=True)
    return chain(
        scale_by_lion(b1, b2, mu_dtype, state_dtype=state_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
