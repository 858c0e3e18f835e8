"""AMSGrad (Reddi et al., 2018): Adam whose denominator never shrinks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import _checks, tree
from gradtx.base import GradientTransformation, ScalarOrSchedule
from gradtx.combine import chain
from gradtx.optimizers.adam import _check_adam
from gradtx.state import recompute
from gradtx.transforms.scaling import scale_by_learning_rate


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`: the step counter, Adam's two moments and the running maximum of the second."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by AMSGrad: Adam with the running maximum of the second moment.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2,

        \hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad
        \hat v^{max}_t = \max\left(\hat v^{max}_{t-1}, \frac{v_t}{1 - \beta_2^t}\right), \qquad
        u_t = \frac{\hat m_t}{\sqrt{\hat v^{max}_t + \epsilon_{root}} + \epsilon}.

    Like Optax, the maximum is taken over the *bias-corrected* :math:`\hat v_t` by default,
    so the first steps are not dominated by the small uncorrected :math:`v_t`. Reddi et al.'s
    Algorithm 2 uses no bias correction at all: pass ``bias_correction_mu=False,
    bias_correction_nu=False`` to get it.

    Args:
        b1: decay of the first-moment EMA, in ``[0, 1)``.
        b2: decay of the second-moment EMA, in ``[0, 1)``.
        eps: added to the denominator outside the square root (``> 0``).
        eps_root: added inside the square root (``>= 0``).
        mu_dtype: storage dtype of :math:`m`; ``None`` means the parameter dtype.
        bias_correction_mu: divide :math:`m_t` by :math:`1 - \beta_1^t`.
        bias_correction_nu: divide :math:`v_t` by :math:`1 - \beta_2^t` before the maximum.
        state_dtype: storage of every moment whose own ``mu_dtype`` is ``None``: a floating dtype
            or ``gradtx.Quantized8bit()``; ``None`` means the parameter dtype (see ``docs/memory.md``).

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByAmsgradState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_amsgrad()
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> updates.round(4)
        Array([ 1., -1.], dtype=float32)

    References:
        Reddi, Kale & Kumar, 2018. On the Convergence of Adam and Beyond, https://arxiv.org/abs/1904.09237
    """
    owner = "scale_by_amsgrad"
    _check_adam(owner, b1, b2, eps, eps_root, mu_dtype, state_dtype=state_dtype)
    _checks.one_of(owner, "bias_correction_mu", bias_correction_mu, (False, True))
    _checks.one_of(owner, "bias_correction_nu", bias_correction_nu, (False, True))

    def init(params):
        mu = tree.moment_zeros_like(params, tree.resolve_storage(mu_dtype, state_dtype), signed=True)
        nu, nu_max = (tree.moment_zeros_like(params, state_dtype, signed=False) for _ in range(2))
        return ScaleByAmsgradState(count=tree.zero_count(), mu=mu, nu=nu, nu_max=nu_max)

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        c1, c2 = tree.bias_correction(b1, count), tree.bias_correction(b2, count)

        def per_leaf(g, m_prev, v_prev, v_max_prev):
            g_wide = tree.at_least_float32(g)
            m = tree.ema_update(g_wide, tree.load(m_prev), b1)
            v = tree.ema_update(tree.abs_sq(g_wide), jnp.real(tree.load(v_prev)), b2)
            m_hat = m / c1 if bias_correction_mu else m
            v_hat = v / c2 if bias_correction_nu else v
            v_max = jnp.maximum(jnp.real(tree.load(v_max_prev)), v_hat)
            u = m_hat / (jnp.sqrt(v_max + eps_root) + eps)
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev), tree.store(v_max, v_max_prev)

        updates, mu, nu, nu_max = tree.unzip(
            recompute.map_moments(per_leaf, updates, state.mu, state.nu, state.nu_max), updates, 4
        )
        return updates, ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return GradientTransformation(init, update)


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The AMSGrad optimizer: :func:`scale_by_amsgrad` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t \frac{\hat m_t}{\sqrt{\hat v^{max}_t + \epsilon_{root}} + \epsilon}

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu, state_dtype: see
            :func:`scale_by_amsgrad`.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_amsgrad, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.amsgrad(learning_rate=1e-3)

    References:
        Reddi, Kale & Kumar, 2018. On the Convergence of Adam and Beyond, https://arxiv.org/abs/1904.09237
    """
    _checks.learning_rate("amsgrad", learning_rate)
    _checks.boolean("amsgrad", "bias_correction_mu", bias_correction_mu)
    _checks.boolean("amsgrad", "bias_correction_nu", bias_correction_nu)
    _check_adam("amsgrad", b1, b2, eps, eps_root, mu_dtype, state_dtype=state_dtype)
    return chain(
        scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu, state_dtype=state_dtype),
        scale_by_learning_rate(learning_rate),
    )
