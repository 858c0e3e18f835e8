"""Yogi (Zaheer et al., 2018): Adam with an additive, sign-controlled second-moment update."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import ScaleByAdamState, _check_adam
from gradtx.transforms.scaling import scale_by_learning_rate


def scale_by_yogi(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    eps_root: float = 0.0,
    initial_accumulator_value: float = 1e-6,
) -> GradientTransformation:
    r"""Rescale updates by Yogi: the second moment moves by at most :math:`(1 - \beta_2) g_t^2` per step.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = v_{t-1} - (1 - \beta_2)\,\mathrm{sign}(v_{t-1} - |g_t|^2)\,|g_t|^2,

        u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}.

    Unlike Adam's multiplicative EMA, :math:`v_t` grows or shrinks additively, so a burst
    of large gradients cannot inflate it, nor a quiet spell collapse it, too quickly. As in
    Optax, both :math:`m_0` and :math:`v_0` start at ``initial_accumulator_value`` and both
    moments are bias-corrected.

    Args:
        b1: decay of the first-moment EMA, in ``[0, 1)``.
        b2: rate of the second-moment update, in ``[0, 1)``.
        eps: added to the denominator outside the square root (``> 0``; the paper uses 1e-3).
        eps_root: added inside the square root (``>= 0``).
        initial_accumulator_value: the starting value of both moments (``>= 0``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`gradtx.ScaleByAdamState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_yogi()
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> [round(u, 3) for u in updates.tolist()]
        [0.996, -0.999]

    References:
        Zaheer et al., 2018. Adaptive Methods for Nonconvex Optimization,
        https://proceedings.neurips.cc/paper/2018/file/90365351ccc7437a1309dc64e4db32a3-Paper.pdf
    """
    owner = "scale_by_yogi"
    _check_adam(owner, b1, b2, eps, eps_root)
    _checks.non_negative(owner, "initial_accumulator_value", initial_accumulator_value)

    def init(params):
        def accumulator(zeros):
            return (zeros + initial_accumulator_value).astype(zeros.dtype)

        start = jax.tree.map(accumulator, tree.zeros_like(params))
        # Two distinct buffers: a donated state must not hold the same array twice.
        return ScaleByAdamState(count=tree.zero_count(), mu=start, nu=jax.tree.map(jnp.copy, start))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        c1, c2 = tree.bias_correction(b1, count), tree.bias_correction(b2, count)

        def per_leaf(g, m_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            g_sq = tree.abs_sq(g_wide)
            m = tree.ema_update(g_wide, m_prev, b1)
            v = tree.real_at_least_float32(v_prev)
            v = v - (1 - b2) * jnp.sign(v - g_sq) * g_sq
            u = (m / c1) / (jnp.sqrt(v / c2 + eps_root) + eps)
            return u.astype(g.dtype), m.astype(m_prev.dtype), v.astype(v_prev.dtype)

        updates, mu, nu = tree.unzip(jax.tree.map(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def yogi(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3) -> GradientTransformation:
    r"""The Yogi optimizer: :func:`scale_by_yogi` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t u_t, \qquad u_t \text{ from } \texttt{scale\_by\_yogi}

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps: see :func:`scale_by_yogi` (``eps_root = 0`` and
            ``initial_accumulator_value = 1e-6``, as in Optax).

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_yogi, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.yogi(learning_rate=1e-2)

    References:
        Zaheer et al., 2018. Adaptive Methods for Nonconvex Optimization,
        https://proceedings.neurips.cc/paper/2018/file/90365351ccc7437a1309dc64e4db32a3-Paper.pdf
    """
    _checks.learning_rate("yogi", learning_rate)
    _check_adam("yogi", b1, b2, eps, 0.0)
    return chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(learning_rate))
