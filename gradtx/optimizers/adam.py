"""Adam (Kingma & Ba, 2015), its Nesterov variant NAdam (Dozat, 2016) and decoupled weight decay (AdamW, NAdamW).

The per-leaf helpers at the bottom of this module (precision policy, bias correction,
Nesterov's look-ahead moment) are shared by the other adaptive-moment optimizers of
``gradtx.optimizers`` (AMSGrad, RAdam, AdaBelief, Adamax, Yogi).

Precision policy of the whole family: each leaf is computed in at least float32 (a narrow
stored moment is upcast, updated, and downcast to be stored), the moments are stored in their
state dtype, and the updates are returned in the gradient's dtype. In float32 the arithmetic
follows Optax's formula order, so results agree with Optax to rounding.
"""

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


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam` (and RAdam, Adamax, Yogi): the step counter and the two moment estimates."""

    count: jax.Array
    mu: Any
    nu: Any


def _check_adam(owner: str, b1, b2, eps, eps_root, mu_dtype=None, nu_dtype=None, state_dtype=None) -> None:
    _checks.decay_rate(owner, "b1", b1)
    _checks.decay_rate(owner, "b2", b2)
    _checks.positive(owner, "eps", eps)
    _checks.non_negative(owner, "eps_root", eps_root)
    check_storage(owner, "mu_dtype", mu_dtype)
    check_storage(owner, "nu_dtype", nu_dtype)
    check_storage(owner, "state_dtype", state_dtype)


def _check_adamw(owner: str, learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, weight_decay, state_dtype=None) -> None:
    _checks.learning_rate(owner, learning_rate)
    _check_adam(owner, b1, b2, eps, eps_root, mu_dtype, nu_dtype, state_dtype)
    _checks.non_negative(owner, "weight_decay", weight_decay, schedule_ok=True)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Rescale updates by Adam's bias-corrected moment estimates.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2,

        \hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad
        \hat v_t = \frac{v_t}{1 - \beta_2^t}, \qquad
        u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}.

    With ``nesterov=True`` (NAdam, Dozat 2016) the first moment looks one step ahead:
    :math:`\hat m_t = \beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`
    (like Optax, without Dozat's extra :math:`\beta_2` factor on :math:`\hat v_t`).

    Each leaf is computed in at least float32; the moments are stored in ``mu_dtype`` /
    ``nu_dtype`` (either may be ``gradtx.Quantized8bit()``, block-wise 8-bit storage; see
    ``docs/memory.md``) and the updates keep the gradient's dtype. ``nu_dtype`` is a gradtx addition
    (Optax stores the second moment in the parameter dtype); with ``nu_dtype=jnp.bfloat16`` it
    halves the memory of :math:`v` at the cost of ~3 significant digits in :math:`\sqrt{v}`.

    Args:
        b1: decay of the first-moment EMA, in ``[0, 1)``.
        b2: decay of the second-moment EMA, in ``[0, 1)``.
        eps: added to the denominator outside the square root (``> 0``).
        eps_root: added inside the square root (``>= 0``); make it positive when
            differentiating through the update (meta-learning).
        mu_dtype: storage dtype of :math:`m`; ``None`` means the parameter dtype.
        nesterov: use Nesterov's look-ahead first moment (NAdam).
        nu_dtype: storage dtype of :math:`v`; ``None`` means the parameter dtype.
        state_dtype: storage of every moment whose own argument (``mu_dtype``, ``nu_dtype``)
            is ``None``: a floating dtype or ``gradtx.Quantized8bit()``; ``None`` means the
            parameter dtype.

    Returns:
        A ``GradientTransformation`` whose state is :class:`ScaleByAdamState`.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.scale_by_adam()
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
        >>> updates.round(4)
        Array([ 1., -1.], dtype=float32)

    References:
        Kingma & Ba, 2015. Adam: A Method for Stochastic Optimization, https://arxiv.org/abs/1412.6980

        Dozat, 2016. Incorporating Nesterov Momentum into Adam, https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ
    """
    owner = "scale_by_adam"
    _check_adam(owner, b1, b2, eps, eps_root, mu_dtype, nu_dtype, state_dtype)
    _checks.one_of(owner, "nesterov", nesterov, (False, True))
    mu_storage, nu_storage = tree.resolve_storage(mu_dtype, state_dtype), tree.resolve_storage(nu_dtype, state_dtype)

    def init(params):
        mu = tree.moment_zeros_like(params, mu_storage, signed=True)
        nu = tree.moment_zeros_like(params, nu_storage, signed=False)
        return ScaleByAdamState(count=tree.zero_count(), mu=mu, nu=nu)

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        count = tree.safe_increment(state.count)
        c1, c2 = tree.bias_correction(b1, count), tree.bias_correction(b2, count)
        c1_next = tree.bias_correction(b1, tree.safe_increment(count))  # for Nesterov's look-ahead

        def per_leaf(g, m_prev, v_prev):
            g_wide = tree.at_least_float32(g)
            m = tree.ema_update(g_wide, tree.load(m_prev), b1)
            v = tree.ema_update(tree.abs_sq(g_wide), jnp.real(tree.load(v_prev)), b2)
            m_hat = _debiased_first_moment(g_wide, m, b1, c1, c1_next, nesterov)
            v_hat = v / c2
            u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
            return u.astype(g.dtype), tree.store(m, m_prev), tree.store(v, v_prev)

        updates, mu, nu = tree.unzip(recompute.map_moments(per_leaf, updates, state.mu, state.nu), updates, 3)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""The Adam optimizer: :func:`scale_by_adam` followed by the (negative) learning rate.

    .. math::

        p_{t+1} = p_t - \eta_t \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    with :math:`\hat m_t, \hat v_t` the bias-corrected moments of :func:`scale_by_adam`.

    Args:
        learning_rate: a float ``>= 0`` or a schedule ``count -> lr``.
        b1, b2, eps, eps_root, mu_dtype, nesterov, nu_dtype, state_dtype: see :func:`scale_by_adam`.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_adam, scale_by_learning_rate)``.

    Example:
        >>> import jax.numpy as jnp, gradtx
        >>> tx = gradtx.adam(learning_rate=0.1)
        >>> params = {"w": jnp.array([1.0, -1.0])}
        >>> updates, state = tx.update({"w": jnp.array([3.0, -0.2])}, tx.init(params), params)
        >>> gradtx.apply_updates(params, updates)["w"].round(4)
        Array([ 0.9, -0.9], dtype=float32)

    References:
        Kingma & Ba, 2015. Adam: A Method for Stochastic Optimization, https://arxiv.org/abs/1412.6980
    """
    _checks.learning_rate("adam", learning_rate)
    _checks.boolean("adam", "nesterov", nesterov)
    _check_adam("adam", b1, b2, eps, eps_root, mu_dtype, nu_dtype, state_dtype)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype, state_dtype=state_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[Any], Any] | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""Adam with decoupled weight decay (AdamW); see :func:`adam`.

    .. math::

        p_{t+1} = p_t - \eta_t \left(\frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
                  + \lambda_t p_t\right)

    The decay :math:`\lambda_t p_t` is added after Adam's rescaling, so it is not divided by
    :math:`\sqrt{\hat v_t}` (unlike an L2 penalty added to the loss).

    Args:
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov, nu_dtype, state_dtype: see :func:`adam`.
        weight_decay: :math:`\lambda`, a float ``>= 0`` or a schedule.
        mask: a pytree of booleans (or a callable ``params -> pytree``) selecting the
            parameters to decay; ``None`` decays all of them.

    Returns:
        A ``GradientTransformation``: ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.adamw(learning_rate=1e-3, weight_decay=1e-2)

    References:
        Loshchilov & Hutter, 2019. Decoupled Weight Decay Regularization, https://arxiv.org/abs/1711.05101
    """
    _check_adamw("adamw", learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, weight_decay, state_dtype)
    _checks.boolean("adamw", "nesterov", nesterov)
    _checks.mask("adamw", "mask", mask)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype, state_dtype=state_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""NAdam: :func:`adam` with Nesterov's look-ahead first moment (``nesterov=True``).

    :math:`\hat m_t = \beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`;
    everything else is :func:`adam`.

    Args:
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, state_dtype: see :func:`adam`.

    Returns:
        ``adam(..., nesterov=True)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.nadam(learning_rate=1e-3)

    References:
        Dozat, 2016. Incorporating Nesterov Momentum into Adam, https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ
    """
    _checks.learning_rate("nadam", learning_rate)
    _check_adam("nadam", b1, b2, eps, eps_root, mu_dtype, nu_dtype, state_dtype)
    return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=True, nu_dtype=nu_dtype, state_dtype=state_dtype)


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[Any], Any] | None = None,
    *,
    nu_dtype: Any = None,
    state_dtype: Any = None,
) -> GradientTransformation:
    r"""NAdamW: :func:`adamw` with Nesterov's look-ahead first moment (``nesterov=True``); see :func:`nadam`.

    Args:
        learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nu_dtype, state_dtype: see :func:`adamw`.

    Returns:
        ``adamw(..., nesterov=True)``.

    Example:
        >>> import gradtx
        >>> tx = gradtx.nadamw(learning_rate=1e-3, weight_decay=1e-2)

    References:
        Dozat, 2016. Incorporating Nesterov Momentum into Adam, https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ

        Loshchilov & Hutter, 2019. Decoupled Weight Decay Regularization, https://arxiv.org/abs/1711.05101
    """
    _check_adamw("nadamw", learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, weight_decay, state_dtype)
    _checks.mask("nadamw", "mask", mask)
    return adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=True,
        nu_dtype=nu_dtype,
        state_dtype=state_dtype,
    )


# Per-leaf helpers shared by the adaptive-moment optimizers of this package.


def _debiased_first_moment(g: jax.Array, m: jax.Array, b1, correction: jax.Array, next_correction: jax.Array, nesterov: bool):
    """``m / (1 - b1^t)``, or with ``nesterov`` Dozat's look-ahead ``b1 m / (1 - b1^{t+1}) + (1 - b1) g / (1 - b1^t)``.

    ``correction`` and ``next_correction`` are :func:`tree.bias_correction` at ``t`` and ``t + 1``.
    """
    if not nesterov:
        return m / correction
    return b1 * (m / next_correction) + (1 - b1) * (g / correction)
