"""Rectified Adam (Liu et al., 2020): Adam whose adaptive step is switched on once its variance is tractable."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import ScaleByAdamState, _check_adam, _debiased_first_moment
from gradtx.state import recompute
from gradtx.transforms.scaling import scale_by_learning_rate


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by Rectified Adam: momentum SGD until the second moment is reliable, then rectified Adam.

    .. math::

        \rho_\infty = \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t}, \qquad
        r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}},

        u_t = \begin{cases}
            r_t \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon) & \rho_t \ge \text{threshold} \\
            \hat m_t & \text{otherwise}
        \end{cases}

    with :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments (see
    :func:`gradtx.scale_by_adam`, also for ``nesterov``).

    Deliberate difference from Optax: the rectified branch is taken only where :math:`r_t`
    is defined (:math:`\rho_t > 4`, the paper's condition). With ``threshold < 4`` Optax
    returns NaN updates at the steps where :math:`\text{threshold} \le \rho_t < 4`; gradtx takes
    the momentum step :math:`\hat m_t` there. With ``threshold >= 4`` (the default is 5)
    the two agree.

    Args:
        b1: decay of the first-moment EMA, in ``[0, 1)``.
        b2: decay of the second-moment EMA, in ``[0, 1)``.
        eps: added to the denominator outside the square root (``> 0``).
        eps_root: added inside the square root (``>= 0``).
        threshold: the value of :math:`\rho_t` from which the adaptive step is used.
        nesterov: use Nesterov's look-ahead first moment.
        state_dtype: storage of every moment: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`gradtx.ScaleByAdamState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_radam()
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> updates.round(4)  # rho_1 = 1 < 5: the first step is plain (bias-corrected) momentum
        Array([ 0.5, -2. ], dtype=float32)

    References:
        Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond, https://arxiv.org/abs/1908.03265
    """
    owner = "scale_by_radam"
    _check_adam(owner, b1, b2, eps, eps_root, state_dtype=state_dtype)
    _checks.number(owner, "threshold", threshold)
    _checks.one_of(owner, "nesterov", nesterov, (False, True))
    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def init(params):
        mu = tree.moment_zeros_like(params, state_dtype, signed=True)
        return ScaleByAdamState(count=tree.zero_count(), mu=mu, nu=tree.moment_zeros_like(params, state_dtype, signed=False))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        c1, c2 = tree.bias_correction(b1, count), tree.bias_correction(b2, count)
        c1_next = tree.bias_correction(b1, tree.safe_increment(count))  # for Nesterov's look-ahead
        b2_t = b2**count
        rho = rho_inf - 2 * count * b2_t / (1 - b2_t)
        rectify = (rho >= threshold) & (rho > 4.0)
        # Only where rectify holds is the ratio positive; elsewhere 1 keeps NaN out of sqrt (and its gradient).
        ratio = jnp.where(rectify, (rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho), 1.0)
        r = jnp.sqrt(ratio)

        def per_leaf(g, m_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            m = tree.ema_update(g_wide, tree.load(m_prev), b1)
            v = tree.ema_update(tree.abs_sq(g_wide), jnp.real(tree.load(v_prev)), b2)
            m_hat = _debiased_first_moment(g_wide, m, b1, c1, c1_next, nesterov)
            v_hat = v / c2
            u = jnp.where(rectify, r.astype(m_hat.dtype) * m_hat / (jnp.sqrt(v_hat + eps_root) + eps), m_hat)
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The Rectified Adam optimizer: :func:`scale_by_radam` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t u_t, \qquad u_t \text{ from } \texttt{scale\_by\_radam}

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, eps_root, threshold, nesterov, state_dtype: see :func:`scale_by_radam`.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_radam, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.radam(learning_rate=1e-3)

    References:
        Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond, https://arxiv.org/abs/1908.03265
    """
    _checks.learning_rate("radam", learning_rate)
    _checks.boolean("radam", "nesterov", nesterov)
    _check_adam("radam", b1, b2, eps, eps_root, state_dtype=state_dtype)
    _checks.number("radam", "threshold", threshold)
    return chain(
        scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov, state_dtype=state_dtype),
        scale_by_learning_rate(learning_rate),
    )
