"""Yogi (Zaheer et al., 2018): Adam with an additive, sign-controlled second-moment update."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import ScaleByAdamState, _check_adam
from gradtx.state import recompute
from gradtx.transforms.scaling import scale_by_learning_rate


def scale_by_yogi(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    eps_root: float = 0.0,
    initial_accumulator_value: float = 1e-6,
    *,
    state_dtype: Any = None,
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
        state_dtype: storage of every moment: a floating dtype or ``gradtx.Quantized8bit()``;
            ``None`` means the parameter dtype (see ``docs/memory.md``).

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
    _check_adam(owner, b1, b2, eps, eps_root, state_dtype=state_dtype)
    _checks.non_negative(owner, "initial_accumulator_value", initial_accumulator_value)

    def init(params):
        # Two distinct buffers: a donated state must not hold the same array twice.
        mu = tree.moment_full_like(params, initial_accumulator_value, state_dtype, signed=True)
        nu = tree.moment_full_like(params, initial_accumulator_value, state_dtype, signed=False)
        return ScaleByAdamState(count=tree.zero_count(), mu=mu, nu=nu)

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        c1, c2 = tree.bias_correction(b1, count), tree.bias_correction(b2, count)

        def per_leaf(g, m_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            g_sq = tree.abs_sq(g_wide)
            m = tree.ema_update(g_wide, tree.load(m_prev), b1)
            v = jnp.real(tree.load(v_prev))
            v = v - (1 - b2) * jnp.sign(v - g_sq) * g_sq
            u = (m / c1) / (jnp.sqrt(v / c2 + eps_root) + eps)
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def yogi(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3, *, state_dtype: Any = None
) -> GradientTransformation:
    r"""The Yogi optimizer: :func:`scale_by_yogi` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t u_t, \qquad u_t \text{ from } \texttt{scale\_by\_yogi}

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, state_dtype: see :func:`scale_by_yogi` (``eps_root = 0`` and
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
    _check_adam("yogi", b1, b2, eps, 0.0, state_dtype=state_dtype)
    return chain(scale_by_yogi(b1, b2, eps, state_dtype=state_dtype), scale_by_learning_rate(learning_rate))
