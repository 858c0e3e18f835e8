"""AdaBelief (Zhuang et al., 2020): Adam whose second moment tracks the gradient's deviation from its EMA."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import _check_adam, _debiased_first_moment
from gradtx.state import recompute
from gradtx.transforms.scaling import scale_by_learning_rate


class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief`: the step counter, the gradient EMA and the EMA of the squared prediction error."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_belief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by AdaBelief: the step shrinks where the gradient deviates from its prediction.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        s_t = \beta_2 s_{t-1} + (1 - \beta_2) |g_t - m_t|^2 + \epsilon_{root},

        \hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad
        \hat s_t = \frac{s_t}{1 - \beta_2^t}, \qquad
        u_t = \frac{\hat m_t}{\sqrt{\hat s_t} + \epsilon}.

    :math:`\epsilon_{root}` is added to the stored :math:`s_t` at every step, as in the
    paper's Algorithm 2 and in Optax. ``nesterov`` is as in :func:`gradtx.scale_by_adam`.

    Args:
        b1: decay of the first-moment EMA, in ``[0, 1)``.
        b2: decay of the prediction-error EMA, in ``[0, 1)``.
        eps: added to the denominator outside the square root (``> 0``).
        eps_root: added to :math:`s_t` at every step (``>= 0``); keep it positive when
            differentiating through the update.
        nesterov: use Nesterov's look-ahead first moment.
        state_dtype: storage of every moment: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByBeliefState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_belief()
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> updates.round(4)  # the first prediction error is 0.9 g: u_1 = g / (0.9 |g|)
        Array([ 1.1111, -1.1111], dtype=float32)

    References:
        Zhuang et al., 2020. AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients,
        https://arxiv.org/abs/2010.07468
    """
    owner = "scale_by_belief"
    _check_adam(owner, b1, b2, eps, eps_root, state_dtype=state_dtype)
    _checks.one_of(owner, "nesterov", nesterov, (False, True))

    def init(params):
        mu = tree.moment_zeros_like(params, state_dtype, signed=True)
        return ScaleByBeliefState(count=tree.zero_count(), mu=mu, nu=tree.moment_zeros_like(params, state_dtype, signed=False))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        c1, c2 = tree.bias_correction(b1, count), tree.bias_correction(b2, count)
        c1_next = tree.bias_correction(b1, tree.safe_increment(count))  # for Nesterov's look-ahead

        def per_leaf(g, m_prev, s_prev):
            g_wide = tree.at_least_float32(g)
            m = tree.ema_update(g_wide, tree.load(m_prev), b1)
            s = tree.ema_update(tree.abs_sq(g_wide - m), jnp.real(tree.load(s_prev)), b2)
            s = s + eps_root
            m_hat = _debiased_first_moment(g_wide, m, b1, c1, c1_next, nesterov)
            s_hat = s / c2
            u = m_hat / (jnp.sqrt(s_hat) + eps)
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(s, s_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByBeliefState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def adabelief(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The AdaBelief optimizer: :func:`scale_by_belief` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t \frac{\hat m_t}{\sqrt{\hat s_t} + \epsilon}

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, eps_root, nesterov, state_dtype: see :func:`scale_by_belief`.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_belief, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.adabelief(learning_rate=1e-3)

    References:
        Zhuang et al., 2020. AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients,
        https://arxiv.org/abs/2010.07468
    """
    _checks.learning_rate("adabelief", learning_rate)
    _checks.boolean("adabelief", "nesterov", nesterov)
    _check_adam("adabelief", b1, b2, eps, eps_root, state_dtype=state_dtype)
    return chain(
        scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov, state_dtype=state_dtype), scale_by_learning_rate(learning_rate)
    )
