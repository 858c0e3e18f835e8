"""Adamax (Kingma & Ba, 2015, Section 7.1): Adam with an exponentially weighted infinity norm, and its AdamW-style variant."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import ScaleByAdamState
from gradtx.state import recompute
from gradtx.state.quantize import check_storage
from gradtx.transforms.decay import add_decayed_weights
from gradtx.transforms.scaling import scale_by_learning_rate


def _check_adamax(owner: str, b1, b2, eps, state_dtype) -> None:
    check_storage(owner, "state_dtype", state_dtype)
    _checks.decay_rate(owner, "b1", b1)
    _checks.decay_rate(owner, "b2", b2)
    _checks.positive(owner, "eps", eps)


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, state_dtype: Any = None) -> GradientTransformation:
    r"""Rescale updates by Adamax: Adam's first moment over an exponentially weighted infinity norm.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        u^\infty_t = \max(|g_t| + \epsilon, \beta_2 u^\infty_{t-1}), \qquad
        u_t = \frac{m_t / (1 - \beta_1^t)}{u^\infty_t}.

    The infinity norm needs no bias correction. As in Optax, :math:`\epsilon` sits inside
    the maximum (the paper has none), so the denominator is never below :math:`\epsilon`.

    Args:
        b1: decay of the first-moment EMA, in ``[0, 1)``.
        b2: decay of the infinity norm, in ``[0, 1)``.
        eps: added to :math:`|g_t|` (``> 0``).
        state_dtype: storage of every moment: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`gradtx.ScaleByAdamState`
        (``nu`` holds the infinity norm).

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_adamax()
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> updates.round(4)
        Array([ 1., -1.], dtype=float32)

    References:
        Kingma & Ba, 2015. Adam: A Method for Stochastic Optimization (Section 7.1), https://arxiv.org/abs/1412.6980
    """
    _check_adamax("scale_by_adamax", b1, b2, eps, state_dtype)

    def init(params):
        mu = tree.moment_zeros_like(params, state_dtype, signed=True)
        return ScaleByAdamState(count=tree.zero_count(), mu=mu, nu=tree.moment_zeros_like(params, state_dtype, signed=False))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        c1 = tree.bias_correction(b1, count)

        def per_leaf(g, m_prev, u_prev):
            g_wide = tree.at_least_float32(g)
            m = tree.ema_update(g_wide, tree.load(m_prev), b1)
            u_inf = jnp.maximum(jnp.abs(g_wide) + eps, b2 * jnp.real(tree.load(u_prev)))
            u = (m / c1) / u_inf
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(u_inf, u_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def adamax(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, state_dtype: Any = None
) -> GradientTransformation:
    r"""The Adamax optimizer: :func:`scale_by_adamax` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t \frac{m_t / (1 - \beta_1^t)}{u^\infty_t}

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, state_dtype: see :func:`scale_by_adamax`.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_adamax, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.adamax(learning_rate=2e-3)

    References:
        Kingma & Ba, 2015. Adam: A Method for Stochastic Optimization (Section 7.1), https://arxiv.org/abs/1412.6980
    """
    _checks.learning_rate("adamax", learning_rate)
    _check_adamax("adamax", b1, b2, eps, state_dtype)
    return chain(scale_by_adamax(b1, b2, eps, state_dtype=state_dtype), scale_by_learning_rate(learning_rate))


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[Any], Any] | None = None,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Adamax with decoupled weight decay; see :func:`adamax` (and :func:`gradtx.adamw` for the decay).

    .. math::

        p_{t+1} = p_t - \eta_t \left(\frac{m_t / (1 - \beta_1^t)}{u^\infty_t} + \lambda_t p_t\right)

    Args:
        learning_rate, b1, b2, eps, state_dtype: see :func:`adamax`.
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule.
        mask: a pytree of booleans (or a callable ``params -> pytree``) selecting the
            parameters to decay; ``None`` decays all of them.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_adamax, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.adamaxw(learning_rate=2e-3, weight_decay=1e-2)

    References:
        Loshchilov & Hutter, 2019. Decoupled Weight Decay Regularization, https://arxiv.org/abs/1711.05101
    """
    _checks.learning_rate("adamaxw", learning_rate)
    _checks.mask("adamaxw", "mask", mask)
    _check_adamax("adamaxw", b1, b2, eps, state_dtype)
    _checks.non_negative("adamaxw", "weight_decay", weight_decay, schedule_ok=True)
    return chain(
        scale_by_adamax(b1, b2, eps, state_dtype=state_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
